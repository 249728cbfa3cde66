//! A fault-injecting TCP proxy for tests: sits between fsc and fsd on loopback and damages the
//! server-to-client byte stream of the first connection in one chosen way. Later connections
//! pass through untouched, so a client that retries can finish.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Flip one bit of the byte at this offset of the server->client stream.
    FlipBitAt(u64),
    /// Close both directions after this many server->client bytes.
    CutAfter(u64),
    /// After this many server->client bytes, stop forwarding: the link goes silent for 60 s.
    StallAfter(u64),
    /// Forward server->client bytes in pieces of at most 7 bytes.
    Tiny,
    /// Hold each server->client read for this long before forwarding it (added latency).
    Delay(Duration),
    /// Forward server->client frames until the first one with this command, then close both
    /// directions without it (e.g. a COMMIT whose answer is lost).
    CutAtCmd(u16),
}

pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub connections: Arc<AtomicUsize>,
    /// Server->client bytes forwarded, all connections.
    pub down: Arc<std::sync::atomic::AtomicU64>,
    /// Client->server bytes forwarded, all connections.
    pub up: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, fault: Fault) -> Proxy {
        Proxy::start_with(upstream, fault, None)
    }

    /// A proxy that paces every connection's client->server bytes to `bytes_per_sec`, e.g. to
    /// keep an upload running long enough to be interrupted at chosen points.
    pub fn throttled(upstream: SocketAddr, bytes_per_sec: u64) -> Proxy {
        Proxy::start_with(upstream, Fault::None, Some(bytes_per_sec))
    }

    /// A proxy that paces every connection's server->client bytes to `bytes_per_sec` (a
    /// download that takes long enough to kill a node in the middle of it).
    pub fn throttled_down(upstream: SocketAddr, bytes_per_sec: u64) -> Proxy {
        Proxy::start_paced(upstream, Fault::None, None, Some(bytes_per_sec))
    }

    fn start_with(upstream: SocketAddr, fault: Fault, rate: Option<u64>) -> Proxy {
        Proxy::start_paced(upstream, fault, rate, None)
    }

    fn start_paced(
        upstream: SocketAddr,
        fault: Fault,
        rate: Option<u64>,
        rate_down: Option<u64>,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let up = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, conns, down2, up2) =
            (stop.clone(), connections.clone(), down.clone(), up.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let n = conns.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let fault = if n == 0 { fault } else { Fault::None };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up3 = up2.clone();
                std::thread::spawn(move || pump(c2, s2, Fault::None, rate, Some(up3)));
                let stop3 = stop2.clone();
                let down3 = down2.clone();
                std::thread::spawn(move || {
                    pump(server, client, fault, rate_down, Some(down3));
                    drop(stop3);
                });
            }
        });
        Proxy {
            addr,
            stop,
            connections,
            down,
            up,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies whole frames from `from` to `to` until one with command `cmd`, which is not sent:
/// both directions close there.
fn cut_at_cmd(mut from: TcpStream, mut to: TcpStream, cmd: u16) {
    use fsd::protocol::HEADER_LEN;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= HEADER_LEN {
            if u16::from_be_bytes([pending[6], pending[7]]) == cmd {
                break 'read;
            }
            let len = u32::from_be_bytes(pending[12..16].try_into().unwrap()) as usize;
            if pending.len() < HEADER_LEN + len {
                break;
            }
            if to.write_all(&pending[..HEADER_LEN + len]).is_err() {
                break 'read;
            }
            pending.drain(..HEADER_LEN + len);
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Copies `from` to `to`, applying `fault`; closes both when either side ends.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Fault,
    rate: Option<u64>,
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
) {
    if let Fault::CutAtCmd(cmd) = fault {
        return cut_at_cmd(from, to, cmd);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos: u64 = 0;
    let started = std::time::Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = pos + n as u64;
        let ok = match fault {
            Fault::FlipBitAt(at) if (pos..end).contains(&at) => {
                chunk[(at - pos) as usize] ^= 0x10;
                to.write_all(chunk).is_ok()
            }
            Fault::CutAfter(at) if end >= at => {
                let _ = to.write_all(&chunk[..(at - pos.min(at)) as usize]);
                false
            }
            Fault::StallAfter(at) if end >= at => {
                let _ = to.write_all(&chunk[..(at - pos.min(at)) as usize]);
                // Silent (bounded): the client's watchdog must give up on us first.
                std::thread::sleep(Duration::from_secs(60));
                false
            }
            Fault::Tiny => chunk.chunks(7).all(|p| to.write_all(p).is_ok()),
            Fault::Delay(d) => {
                std::thread::sleep(d);
                to.write_all(chunk).is_ok()
            }
            _ => to.write_all(chunk).is_ok(),
        };
        pos = end;
        if let Some(c) = &counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if !ok {
            break;
        }
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(pos as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
