//! TCP settings for long, lossy paths, shared by fsd and fsc (issue 15).
//!
//! - Congestion control per socket: BBR when this process may use it, whatever the system
//!   default. Loss-based cubic collapses on a long path with a little random loss (1.5 MB/s at
//!   0.1 % loss and 50 ms RTT, where the link does 115), BBR does not. `TCP_CONGESTION` can
//!   only pick what the kernel has built or loaded, and an unprivileged process only what
//!   `net.ipv4.tcp_allowed_congestion_control` lists, so a choice is tried once on a scratch
//!   socket and falls back to the system default with one warning.
//! - Send buffer sized to the path: autotuning grows a send buffer only up to the third field
//!   of `net.ipv4.tcp_wmem` (4 MiB on common systems: ~80 MB/s at 50 ms RTT). On a connection
//!   whose handshake RTT says that is too little, the buffer is set explicitly, up to what
//!   `net.core.wmem_max` allows — and never when that would be less than autotuning's reach.
//!   Receive buffers are left to autotuning (its reach, `tcp_rmem`, is usually far larger).
//! - Pacing: `SO_MAX_PACING_RATE` caps one socket's sending rate in the kernel (TCP paces
//!   itself, no fq qdisc needed); [`TokenBucket`] shares a limit among connections.
//!
//! All of this is best effort: a setting the kernel refuses leaves the socket as it was.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

/// The congestion control preferred when the kernel offers it.
pub const PREFERRED_CONGESTION: &str = "bbr";

/// Rate the send buffer is sized for when the RTT says autotuning's reach is too small: a
/// 10 Gbit/s path. Only the kernel's `wmem_max` bounds it further.
const ASSUMED_PATH_RATE: u64 = 10_000_000_000 / 8;

/// `SO_MAX_PACING_RATE` (asm-generic/socket.h, and mips; sparc's own number): libc 0.2's
/// stable API lacks it.
#[cfg(not(target_arch = "sparc64"))]
const SO_MAX_PACING_RATE: libc::c_int = 47;
#[cfg(target_arch = "sparc64")]
const SO_MAX_PACING_RATE: libc::c_int = 0x31;

/// Below this RTT a path is short (loopback, a LAN): no SO_RCVLOWAT trouble, no need for BBR.
pub const SHORT_PATH_RTT: Duration = Duration::from_millis(1);

/// Settings applied to every connection's socket.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Congestion control to set; `None` keeps the system default. Resolve it with
    /// [`choose_congestion`] so that it is known to work.
    pub congestion: Option<String>,
    /// The congestion control is `auto`'s choice: a short path goes back to the system default
    /// after the handshake. BBR gains nothing there and costs CPU (TCP paces itself without
    /// an fq qdisc): 1 GiB over loopback took 1.0–1.2 s with BBR against 0.6–0.7 s with cubic.
    pub long_paths_only: bool,
    /// Cap on each socket's sending rate, bytes per second.
    pub max_pacing_rate: Option<u64>,
}

impl Tuning {
    /// Before connect (or on a listener, whose accepted sockets inherit it): the congestion
    /// control. A failure here is unexpected (the choice was tried) and only logged.
    fn before_connect(&self, fd: RawFd) {
        if let Some(cc) = &self.congestion {
            if let Err(e) = set_congestion(fd, cc) {
                tracing::debug!("TCP_CONGESTION {cc}: {e}");
            }
        }
    }

    /// On a connected socket: the congestion control of a short path, the send buffer for
    /// the path's RTT, and the pacing cap.
    pub fn connected(&self, fd: RawFd) {
        if self.congestion.is_some() && self.long_paths_only && is_short_path(fd) {
            let system = &limits().system_congestion;
            if let Err(e) = set_congestion(fd, system) {
                tracing::debug!("TCP_CONGESTION {system}: {e}");
            }
        }
        size_send_buffer(fd);
        if let Some(rate) = self.max_pacing_rate {
            if let Err(e) = set_max_pacing_rate(fd, rate) {
                tracing::warn!("cannot cap the sending rate (SO_MAX_PACING_RATE): {e}");
            }
        }
    }
}

/// Resolves `--congestion VALUE`: `auto` (BBR if this process may use it, else the system
/// default), `system` (the system default), or a name. A name is tried on a scratch socket —
/// the kernel's answer covers "not built", "not loaded" and "not allowed for this process" —
/// and on failure the result is `None` plus a one-line warning for the caller to print.
pub fn choose_congestion(value: &str) -> (Option<String>, Option<String>) {
    match value {
        "system" => (None, None),
        "auto" => match try_congestion(PREFERRED_CONGESTION) {
            Ok(()) => (Some(PREFERRED_CONGESTION.to_string()), None),
            Err(e) => {
                tracing::debug!("{PREFERRED_CONGESTION} not usable ({e}); system default");
                (None, None)
            }
        },
        name => match try_congestion(name) {
            Ok(()) => (Some(name.to_string()), None),
            Err(e) => {
                let why = match e.raw_os_error() {
                    Some(libc::ENOENT) => format!(
                        "not available (tcp_available_congestion_control: {})",
                        sysctl("tcp_available_congestion_control")
                    ),
                    Some(libc::EPERM) => format!(
                        "not allowed for this process (tcp_allowed_congestion_control: {})",
                        sysctl("tcp_allowed_congestion_control")
                    ),
                    _ => e.to_string(),
                };
                let warning = format!(
                    "congestion control {name:?} {why}; using the system default ({})",
                    sysctl("tcp_congestion_control")
                );
                (None, Some(warning))
            }
        },
    }
}

fn try_congestion(name: &str) -> io::Result<()> {
    // A plain TCP socket that never connects: only to ask the kernel.
    // SAFETY: socket(2) with constant arguments; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns; closed when `s` drops.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    set_congestion(s.as_raw_fd(), name)
}

#[allow(clippy::disallowed_methods)] // kernel settings in /proc, not a client path
fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Sets the socket's congestion control.
pub fn set_congestion(fd: RawFd, name: &str) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_bytes())
}

/// The socket's congestion control.
pub fn congestion(fd: RawFd) -> io::Result<String> {
    let mut buf = [0u8; 16];
    let n = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, &mut buf)?;
    let name = &buf[..n];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Caps the socket's sending rate (bytes per second) in the kernel.
pub fn set_max_pacing_rate(fd: RawFd, rate: u64) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        SO_MAX_PACING_RATE,
        &rate.to_ne_bytes(),
    )
}

/// The kernel's TCP_INFO for socket `fd`.
pub fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// The smoothed RTT the kernel keeps for the socket (after the handshake: its RTT).
pub fn rtt(fd: RawFd) -> io::Result<Duration> {
    Ok(Duration::from_micros(u64::from(tcp_info(fd)?.tcpi_rtt)))
}

/// Whether the connection's RTT is below [`SHORT_PATH_RTT`].
pub fn is_short_path(fd: RawFd) -> bool {
    rtt(fd).is_ok_and(|rtt| rtt < SHORT_PATH_RTT)
}

/// Gives a connection on a long path a send buffer that can hold its bandwidth-delay product,
/// when autotuning could not reach it and the kernel lets a socket have more (see the module
/// doc). Returns the size set, if any.
pub fn size_send_buffer(fd: RawFd) -> Option<usize> {
    let rtt = rtt(fd).ok()?;
    let auto_max = limits().wmem_auto_max?;
    let want = u64::try_from(ASSUMED_PATH_RATE as u128 * rtt.as_micros() / 1_000_000).ok()?;
    if want <= auto_max {
        return None;
    }
    // The kernel doubles SO_SNDBUF (bookkeeping overhead) and caps the request at wmem_max.
    let max = limits().wmem_max?;
    let set = want.div_ceil(2).min(max);
    if set * 2 <= auto_max {
        // Locking the buffer there would stop autotuning short of its own reach.
        return None;
    }
    let v = libc::c_int::try_from(set).ok()?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &v.to_ne_bytes()).ok()?;
    tracing::debug!(?rtt, bytes = set * 2, "send buffer sized to the path");
    usize::try_from(set * 2).ok()
}

/// The kernel settings every connection consults, read once: not per accepted connection (a
/// flood of them would each read three /proc files), at the price of missing a change made
/// while the process runs.
struct Limits {
    /// `net.ipv4.tcp_wmem`'s third field: how far send-buffer autotuning goes.
    wmem_auto_max: Option<u64>,
    /// `net.core.wmem_max`: the most SO_SNDBUF may ask for.
    wmem_max: Option<u64>,
    system_congestion: String,
}

fn limits() -> &'static Limits {
    static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
    LIMITS.get_or_init(|| Limits {
        wmem_auto_max: read_number("/proc/sys/net/ipv4/tcp_wmem", 2),
        wmem_max: read_number("/proc/sys/net/core/wmem_max", 0),
        system_congestion: sysctl("tcp_congestion_control"),
    })
}

/// The `field`th whitespace-separated number of a /proc file.
#[allow(clippy::disallowed_methods)] // kernel settings in /proc, not a client path
fn read_number(path: &str, field: usize) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .nth(field)?
        .parse()
        .ok()
}

fn setsockopt(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(val.len()).map_err(io::Error::other)?;
    // SAFETY: the kernel reads `len` bytes from a valid slice; a bad fd only makes it fail.
    let r = unsafe { libc::setsockopt(fd, level, opt, val.as_ptr().cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).map_err(io::Error::other)?;
    // SAFETY: the kernel writes at most `len` bytes into the slice and updates `len`.
    let r = unsafe { libc::getsockopt(fd, level, opt, buf.as_mut_ptr().cast(), &mut len) };
    if r == 0 {
        Ok((len as usize).min(buf.len()))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Listen backlog: room for a burst of connection attempts (a flood included) without dropping
/// a legitimate client's SYN, which would cost it a 1 s retransmission. The kernel caps it at
/// net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener whose accepted sockets inherit the congestion control; call
/// [`Tuning::connected`] on each accepted socket for the rest.
pub fn listen(addr: SocketAddr, tuning: &Tuning) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    tuning.before_connect(raw(&socket));
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connects to `HOST:PORT` (each resolved address in turn), with the congestion control set
/// before the handshake and the rest of `tuning` after it.
pub async fn connect(addr: &str, tuning: &Tuning) -> io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = match a {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        tuning.before_connect(raw(&socket));
        match socket.connect(a).await {
            Ok(s) => {
                tuning.connected(raw(&s));
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"))))
}

fn raw(s: &impl AsRawFd) -> RawFd {
    s.as_raw_fd()
}

/// Parses a byte count: a number with an optional suffix, `K`, `M`, `G`, `T` decimal (`20M` =
/// 20,000,000) or `Ki`, `Mi`, `Gi`, `Ti` binary (`20Mi` = 20,971,520); case-insensitive, a
/// trailing `B` or `B/s` allowed. At most 10^15.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("/s")
        .unwrap_or(&lower)
        .trim_end_matches('b');
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0f64.powi(4),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit (K, M, G, T or Ki, Mi, Gi, Ti)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number like 20M"))?;
    let size = n * mult;
    if !(0.0..=1e15).contains(&size) {
        return Err(format!("{s:?}: out of range (0..1000T)"));
    }
    Ok(size as u64)
}

/// Parses a rate in bytes per second, as [`parse_size`]. At least 1 KB/s (slower is not a
/// useful limit, and keeps [`TokenBucket`]'s arithmetic sane).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let rate = parse_size(s)?;
    if rate < 1000 {
        return Err(format!("{s:?}: out of range (1K..1000T bytes per second)"));
    }
    Ok(rate)
}

/// A rate limit shared by many tasks (every connection of a client, or of a server): a
/// caller takes bytes before sending or requesting them and waits until the rate allows.
/// Unused time is credited up to [`TokenBucket::BURST`] only, so a pause does not buy a
/// burst that would overshoot the rate afterwards.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    /// When the bytes granted so far have been paid for at `rate`.
    paid_until: Mutex<Instant>,
}

impl TokenBucket {
    /// Credit that idle time may build up.
    pub const BURST: Duration = Duration::from_millis(50);

    /// `rate` in bytes per second (at least 1).
    pub fn new(rate: u64) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1),
            paid_until: Mutex::new(Instant::now()),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` are paid for at the rate: whatever a caller does after the wait
    /// stays within the rate, give or take [`TokenBucket::BURST`].
    pub async fn take(&self, bytes: u64) {
        tokio::time::sleep_until(self.reserve(bytes)).await;
    }

    /// Books `bytes` and returns when they are paid for (for callers that wait in their own
    /// way).
    pub fn reserve(&self, bytes: u64) -> Instant {
        let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let start = (*paid).max(now.checked_sub(Self::BURST).unwrap_or(now));
        *paid = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *paid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20M"), Ok(20_000_000));
        assert_eq!(parse_rate("20m"), Ok(20_000_000));
        assert_eq!(parse_rate("20MB/s"), Ok(20_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("20Mi"), Ok(20 << 20));
        assert_eq!(parse_rate("64KiB"), Ok(64 << 10));
        assert_eq!(parse_rate("5000"), Ok(5000));
        // Sizes (--compress-cache) share the units; 0 is a size, not a rate.
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_rate("0").is_err());
        assert!(parse_size("2000T").is_err());
        for bad in ["", "M", "20X", "-1M", "1", "nanM", "1e9", "2000T"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_name_falls_back_with_a_warning() {
        let (cc, warning) = choose_congestion("nosuchcc");
        assert_eq!(cc, None);
        let w = warning.expect("a warning");
        assert!(
            w.contains("nosuchcc") && w.contains("system default"),
            "{w}"
        );
        assert_eq!(choose_congestion("system"), (None, None));
        // reno is always built in and always allowed.
        assert_eq!(choose_congestion("reno"), (Some("reno".into()), None));
    }

    #[tokio::test]
    async fn congestion_is_set_on_both_ends() {
        let tuning = Tuning {
            congestion: Some("reno".into()),
            long_paths_only: false,
            max_pacing_rate: None,
        };
        let l = listen("127.0.0.1:0".parse().unwrap(), &tuning).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (c, a) = tokio::join!(connect(&addr, &tuning), l.accept());
        let (c, (a, _)) = (c.unwrap(), a.unwrap());
        assert_eq!(congestion(raw(&c)).unwrap(), "reno");
        assert_eq!(congestion(raw(&a)).unwrap(), "reno");
        // "auto" picks BBR where this kernel lets us, and a short path (this one) goes back
        // to the system default after the handshake.
        if let (Some(cc), None) = choose_congestion("auto") {
            assert_eq!(cc, PREFERRED_CONGESTION);
            let auto = Tuning {
                congestion: Some(cc),
                long_paths_only: true,
                max_pacing_rate: None,
            };
            let (c, a) = tokio::join!(connect(&addr, &auto), l.accept());
            let system = sysctl("tcp_congestion_control");
            assert_eq!(congestion(raw(&c.unwrap())).unwrap(), system);
            assert_eq!(
                congestion(raw(&a.unwrap().0)).unwrap(),
                "reno",
                "not tuned by fsd"
            );
        }
    }

    #[test]
    fn bucket_holds_the_rate() {
        let b = TokenBucket::new(1_000_000);
        let t0 = Instant::now();
        let starts: Vec<Instant> = (0..100).map(|_| b.reserve(100_000)).collect();
        // 10 MB at 1 MB/s: paid for after 10 s, however fast they are asked for.
        let last = starts[99].duration_since(t0);
        assert!(last >= Duration::from_millis(9_990), "{last:?}");
        assert!(last <= Duration::from_millis(10_010), "{last:?}");
        // Idle time is credited up to BURST only.
        let b = TokenBucket::new(1_000_000);
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        let paid = b.reserve(1_000_000);
        assert!(paid >= now + Duration::from_millis(940), "{:?}", paid - now);
    }
}
