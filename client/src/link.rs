//! What fsc knows of the network path under a connection, from the kernel's TCP_INFO: used by
//! `--compress auto` to compress only where the link, not the CPU, is the bottleneck, and by
//! `-j auto` to tell a path that drops packets at random from one that is merely full.

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

/// What a socket has seen of lost packets so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossSign {
    /// Packets that arrived out of order (a gap: something before them was lost) plus segments
    /// this side sent again: either way a loss on the path, whichever way the data goes.
    pub lost: u64,
    /// The round trip of the data's direction is within [`queue_slack`] of the path's minimum:
    /// the bottleneck's queue is (nearly) empty, so a loss now is not one of a full queue.
    pub queue_empty: bool,
}

/// How far above the minimum RTT a round trip may be and still count as an empty queue: a
/// quarter of the minimum, at least 1 ms (jitter of the hosts themselves).
fn queue_slack(min_rtt_us: u64) -> u64 {
    (min_rtt_us / 4).max(1000)
}

impl Link {
    /// The socket's [`LossSign`], if the kernel says.
    pub fn loss_sign(&self) -> Option<LossSign> {
        loss_sign(&tcp_info(self.fd)?)
    }
}

fn loss_sign(info: &libc::tcp_info) -> Option<LossSign> {
    let min = u64::from(info.tcpi_min_rtt);
    if min == 0 {
        return None;
    }
    // The round trip the data sees: where this side mostly receives (downloads), the
    // receiver's own estimate (the sender's queue delays the data it times); where it sends,
    // the smoothed RTT of its acknowledged segments.
    let receiving = info.tcpi_bytes_received > info.tcpi_bytes_acked;
    let rtt = match (receiving, info.tcpi_rcv_rtt) {
        (true, r) if r > 0 => u64::from(r),
        _ => u64::from(info.tcpi_rtt),
    };
    Some(LossSign {
        lost: u64::from(info.tcpi_rcv_ooopack) + u64::from(info.tcpi_total_retrans),
        queue_empty: rtt <= min + queue_slack(min),
    })
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
        assert!(Link::new(f.as_raw_fd()).loss_sign().is_none());
    }

    fn info(min_rtt: u32, rtt: u32, rcv_rtt: u32, received: u64, acked: u64) -> libc::tcp_info {
        // SAFETY: tcp_info is plain old data; all-zero is a valid value.
        let mut i: libc::tcp_info = unsafe { std::mem::zeroed() };
        (i.tcpi_min_rtt, i.tcpi_rtt, i.tcpi_rcv_rtt) = (min_rtt, rtt, rcv_rtt);
        (i.tcpi_bytes_received, i.tcpi_bytes_acked) = (received, acked);
        i
    }

    #[test]
    fn the_queue_is_judged_by_the_round_trip_the_data_sees() {
        // Downloading (receiving): the receiver's estimate, not the RTT of fsc's small
        // requests, which the full data queue does not delay the same way.
        let mut i = info(50_000, 51_000, 100_000, 1 << 30, 1_000);
        i.tcpi_rcv_ooopack = 7;
        assert_eq!(
            loss_sign(&i),
            Some(LossSign {
                lost: 7,
                queue_empty: false
            })
        );
        i.tcpi_rcv_rtt = 62_000;
        assert!(
            loss_sign(&i).unwrap().queue_empty,
            "within a quarter of 50 ms"
        );
        // Uploading (sending): the smoothed RTT; retransmissions count as losses.
        let mut i = info(50_000, 63_000, 0, 1_000, 1 << 30);
        i.tcpi_total_retrans = 3;
        assert_eq!(
            loss_sign(&i),
            Some(LossSign {
                lost: 3,
                queue_empty: false
            })
        );
        // A short path: at least 1 ms of slack; no minimum yet: no sign.
        assert!(loss_sign(&info(40, 900, 0, 0, 1)).unwrap().queue_empty);
        assert!(loss_sign(&info(0, 900, 0, 0, 1)).is_none());
    }
}
