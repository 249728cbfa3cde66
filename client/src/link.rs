//! What fsc knows of the network path under a connection, from the kernel's TCP_INFO: used by
//! `--compress auto` to compress only where the link, not the CPU, is the bottleneck.

use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A path with a shorter minimum round trip is a LAN or loopback: bandwidth is plentiful
/// there, and compressing would trade a fast wire for a slower CPU.
const LONG_PATH: Duration = Duration::from_millis(1);
/// Above this many bytes per second on the wire, zstd's fast levels (a few hundred MB/s per
/// core, on both ends) would slow the transfer down rather than speed it up.
const FAST_WIRE: u64 = 250_000_000;
/// Rates are measured over at least this long, so one burst does not decide.
const SAMPLE: Duration = Duration::from_millis(500);

/// The path of one TCP connection. Holds the socket's fd number only: it is valid as long as
/// the connection that owns the socket, which owns this.
pub struct Link {
    fd: RawFd,
    last: Mutex<Sample>,
}

struct Sample {
    at: Instant,
    bytes: u64,
    /// Wire bytes per second (both directions) over the last sample period; None until one
    /// period has passed.
    rate: Option<u64>,
}

impl Link {
    pub fn new(fd: RawFd) -> Link {
        Link {
            fd,
            last: Mutex::new(Sample {
                at: Instant::now(),
                bytes: 0,
                rate: None,
            }),
        }
    }

    /// The path's minimum RTT so far, if the kernel says.
    pub fn min_rtt(&self) -> Option<Duration> {
        let info = tcp_info(self.fd)?;
        Some(Duration::from_micros(u64::from(info.tcpi_min_rtt)))
    }

    /// True when compressing is likely to pay: a long path whose measured rate is below what
    /// compression can keep up with. Unknown (no TCP_INFO): false.
    pub fn is_slow(&self) -> bool {
        let Some(info) = tcp_info(self.fd) else {
            return false;
        };
        if Duration::from_micros(u64::from(info.tcpi_min_rtt)) < LONG_PATH {
            return false;
        }
        let bytes = info
            .tcpi_bytes_received
            .saturating_add(info.tcpi_bytes_acked);
        let mut s = self.last.lock().unwrap();
        let elapsed = s.at.elapsed();
        if elapsed >= SAMPLE {
            let moved = bytes.saturating_sub(s.bytes);
            s.rate = Some((moved as f64 / elapsed.as_secs_f64()) as u64);
            s.at = Instant::now();
            s.bytes = bytes;
        }
        s.rate.is_none_or(|r| r < FAST_WIRE)
    }
}

/// The kernel's TCP_INFO for socket `fd`, if it is a TCP socket.
pub fn tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; the kernel fills at most `len` bytes of it and says
    // how many it wrote; `fd` is only read from.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (r == 0).then_some(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn loopback_is_never_slow() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let info = tcp_info(c.as_raw_fd()).expect("TCP_INFO of a TCP socket");
        assert!(info.tcpi_min_rtt < 1000, "min rtt {} us", info.tcpi_min_rtt);
        assert!(!Link::new(c.as_raw_fd()).is_slow());
        // Not a TCP socket: no info, never slow.
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(tcp_info(f.as_raw_fd()).is_none());
        assert!(!Link::new(f.as_raw_fd()).is_slow());
    }
}
