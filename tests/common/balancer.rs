//! A round-robin TCP balancer for tests: each new connection goes to the next of several fsd
//! nodes (skipping one that refuses the connection, as a balancer's health check would), and the
//! bytes each node sent back are counted, so a test can see that every node served. Loopback
//! only; its threads end when the balancer is dropped and the connections close.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Balancer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bytes each upstream sent to clients, in the order of the upstreams given.
    pub served: Arc<Vec<AtomicU64>>,
    /// Connections each upstream accepted.
    pub connections: Arc<Vec<AtomicU64>>,
}

impl Balancer {
    pub fn start(upstreams: &[SocketAddr]) -> Balancer {
        Balancer::start_paced(upstreams, None)
    }

    /// A balancer that holds each server-to-client read (at most 64 KiB) for `delay`, so that a
    /// download runs long enough to be interrupted halfway.
    pub fn start_paced(upstreams: &[SocketAddr], delay: Option<Duration>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let served: Arc<Vec<AtomicU64>> =
            Arc::new(upstreams.iter().map(|_| AtomicU64::new(0)).collect());
        let connections: Arc<Vec<AtomicU64>> =
            Arc::new(upstreams.iter().map(|_| AtomicU64::new(0)).collect());
        let upstreams = upstreams.to_vec();
        let (stop2, served2, conns2) = (stop.clone(), served.clone(), connections.clone());
        std::thread::spawn(move || {
            let next = AtomicUsize::new(0);
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                // The next upstream in turn that takes the connection; none: drop the client.
                let start = next.fetch_add(1, Ordering::Relaxed);
                let picked = (0..upstreams.len())
                    .map(|k| (start + k) % upstreams.len())
                    .find_map(|i| {
                        TcpStream::connect_timeout(&upstreams[i], Duration::from_secs(2))
                            .ok()
                            .map(|s| (i, s))
                    });
                let Some((i, server)) = picked else {
                    continue;
                };
                conns2[i].fetch_add(1, Ordering::Relaxed);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(c2, s2, None));
                let counter = served2.clone();
                std::thread::spawn(move || pump(server, client, Some((&counter[i], delay))));
            }
        });
        Balancer {
            addr,
            stop,
            served,
            connections,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn served(&self, i: usize) -> u64 {
        self.served[i].load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` (counting into `count`, each read held for its delay); closes both
/// when either side ends.
fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<(&AtomicU64, Option<Duration>)>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((c, delay)) = count {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
