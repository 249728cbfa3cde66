//! Denial-of-service scenarios against a running fsd, for `scripts/attack.sh`: each attack runs
//! while a legitimate client on another source address (127.0.0.1; attackers use 127.0.0.2 and
//! up) measures its AUTH latency and the p99 of its STATs, and fsd's RSS and open descriptors
//! are read from /proc. Prints one line of figures per scenario.
//!
//!   attack SCENARIO ADDR FSD_PID TOKEN [ATTACKER_TOKEN] [METRICS_ADDR]
//!
//! Scenarios: flood, bigframe, guess, guess-rotating, unread, handles, uploads.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fsd::protocol::{flags, msg, Cmd, Frame, FrameCodec, Header};
use tokio_util::codec::Decoder;

struct Conn {
    sock: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Conn {
    fn connect(addr: SocketAddr, from: IpAddr) -> std::io::Result<Conn> {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.bind(&SocketAddr::new(from, 0).into())?;
        s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        let sock = TcpStream::from(s);
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            sock,
            codec: FrameCodec::new(32 << 20),
            buf: BytesMut::new(),
        })
    }

    fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        f.header.encode(&mut b);
        b.extend_from_slice(&f.payload);
        self.sock.write_all(&b)
    }

    fn recv(&mut self) -> Option<Frame> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(Ok(f))) => return Some(f),
                Ok(Some(Err(_))) | Err(_) => return None,
                Ok(None) => {}
            }
            let mut tmp = [0u8; 65536];
            match self.sock.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    fn call(&mut self, cmd: Cmd, sid: u32, m: &impl prost::Message) -> Option<Frame> {
        self.send(&Frame::message(cmd, sid, flags::END, m)).ok()?;
        self.recv()
    }

    /// Hello (asking for `chunk_size`, 0 = the server's) and Auth; Ok with the connection,
    /// or Err with the server's message.
    fn login(addr: SocketAddr, from: IpAddr, token: &str, chunk_size: u32) -> Result<Conn, String> {
        let mut c = Conn::connect(addr, from).map_err(|e| e.to_string())?;
        let hello = msg::Hello {
            version: 1,
            chunk_size,
            ..Default::default()
        };
        let h = c.call(Cmd::HELLO, 0, &hello).ok_or("no hello reply")?;
        if h.header.is_error() {
            return Err(error_text(&h));
        }
        let a = c
            .call(
                Cmd::AUTH,
                1,
                &msg::Auth {
                    token: token.into(),
                },
            )
            .ok_or("no auth reply")?;
        if a.header.is_error() {
            return Err(error_text(&a));
        }
        Ok(c)
    }
}

fn error_text(f: &Frame) -> String {
    f.decode::<msg::Error>()
        .map(|e| e.message)
        .unwrap_or_default()
}

fn attacker(i: u32) -> IpAddr {
    // 127.0.0.2 upwards; 127.0.0.1 is the legitimate client's.
    IpAddr::V4(Ipv4Addr::from(0x7f00_0002 + i))
}

const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// What the legitimate client saw during an attack.
#[derive(Default)]
struct Probe {
    auths: Vec<Duration>,
    stats: Vec<Duration>,
    failures: u64,
    first_failure: Option<String>,
}

impl Probe {
    fn line(&mut self) -> String {
        self.auths.sort();
        self.stats.sort();
        let p = |v: &[Duration], q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .map_or("-".to_string(), |d| {
                    format!("{:.1}ms", d.as_secs_f64() * 1e3)
                })
        };
        format!(
            "legit AUTH max {} (n={}), STAT p50 {} p99 {} (n={}), legit failures {}{}",
            p(&self.auths, 1.0),
            self.auths.len(),
            p(&self.stats, 0.5),
            p(&self.stats, 0.99),
            self.stats.len(),
            self.failures,
            self.first_failure
                .as_ref()
                .map_or(String::new(), |f| format!(" (first: {f})"))
        )
    }
}

/// A client from an address fsd has never seen, 1 s into the attack: logs in as a client that
/// retries would (every 100 ms, for at most 10 s). Reports how long until it was in.
fn newcomer(addr: SocketAddr, token: String) -> std::thread::JoinHandle<String> {
    const NEWCOMER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1));
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        let mut tries = 0;
        let mut last = String::new();
        while t.elapsed() < Duration::from_secs(10) {
            tries += 1;
            match Conn::login(addr, NEWCOMER, &token, 0) {
                Ok(_) => {
                    return format!(
                        "never-seen client in after {:.1}ms ({tries} attempt(s))",
                        t.elapsed().as_secs_f64() * 1e3
                    )
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("never-seen client NOT in after 10 s ({tries} attempts; last: {last})")
    })
}

/// Runs the legitimate client until `stop`: a fresh login every 500 ms, STATs in between.
fn probe(addr: SocketAddr, token: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Probe> {
    std::thread::spawn(move || {
        let mut p = Probe::default();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            match Conn::login(addr, LEGIT, &token, 0) {
                Ok(mut c) => {
                    p.auths.push(t.elapsed());
                    let round = Instant::now();
                    while round.elapsed() < Duration::from_millis(500) {
                        let t = Instant::now();
                        let ok = c
                            .call(Cmd::STAT, 3, &msg::StatRequest { path: ".".into() })
                            .is_some_and(|f| !f.header.is_error());
                        if ok {
                            p.stats.push(t.elapsed());
                        } else {
                            p.failures += 1;
                            p.first_failure.get_or_insert_with(|| "STAT failed".into());
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                Err(e) => {
                    p.failures += 1;
                    p.first_failure.get_or_insert(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        p
    })
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// fsd's fsd_auth_failures_total from its metrics listener.
fn auth_failures(metrics: Option<&str>) -> Option<f64> {
    let mut s = TcpStream::connect(metrics?).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with("fsd_auth_failures_total"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: attack SCENARIO ADDR FSD_PID TOKEN [ATTACKER_TOKEN] [METRICS_ADDR]");
        std::process::exit(2);
    }
    let (scenario, addr) = (args[1].as_str(), args[2].parse::<SocketAddr>().unwrap());
    let pid: u32 = args[3].parse().unwrap();
    let token = args[4].clone();
    let attacker_token = args.get(5).cloned().unwrap_or_else(|| token.clone());
    let metrics = args.get(6).map(String::as_str);
    let rss0 = proc_kib(pid, "VmRSS:");
    let stop = Arc::new(AtomicBool::new(false));
    // The legitimate user is a known one: it logged in before the attack (as a server's users
    // have, within the last 24 h). A never-seen client is measured apart (`newcomer`).
    if let Err(e) = Conn::login(addr, LEGIT, &token, 0) {
        eprintln!("the legitimate client cannot log in before the attack: {e}");
    }
    let legit = probe(addr, token.clone(), stop.clone());
    let newcomer = newcomer(addr, token.clone());
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            let mut most_fds = 0;
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(proc_kib(pid, "VmRSS:"), Ordering::Relaxed);
                most_fds = most_fds.max(fds(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            most_fds
        })
    };
    let t0 = Instant::now();
    let detail = match scenario {
        "flood" => flood(addr, 1100),
        "bigframe" => bigframe(addr, 64),
        "guess" => guess(addr, metrics, false),
        "guess-rotating" => guess(addr, metrics, true),
        "unread" => unread(addr, &attacker_token, 20),
        "handles" => handles(addr, &attacker_token),
        "uploads" => uploads(addr, &attacker_token),
        _ => panic!("unknown scenario {scenario}"),
    };
    stop.store(true, Ordering::Relaxed);
    let mut p = legit.join().unwrap();
    let newcomer = newcomer.join().unwrap();
    let most_fds = watcher.join().unwrap();
    println!(
        "{scenario:15} {:5.1}s  fsd RSS {} -> peak {} MiB, peak fds {most_fds}; {detail}; {}; {newcomer}",
        t0.elapsed().as_secs_f64(),
        rss0 / 1024,
        peak.load(Ordering::Relaxed) / 1024,
        p.line()
    );
}

/// `n` connections that never say a word, from 16 addresses, held for 5 s.
fn flood(addr: SocketAddr, n: u32) -> String {
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..n {
        match Conn::connect(addr, attacker(i % 16)) {
            Ok(c) => held.push(c),
            Err(_) => refused += 1,
        }
    }
    std::thread::sleep(Duration::from_secs(5));
    // Still open: nothing to read yet (fsd closes the others with a LimitExceeded frame).
    let mut open = 0;
    for c in &mut held {
        c.sock.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        let idle =
            matches!(c.sock.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        open += idle as usize;
    }
    format!("{n} silent connections: {refused} refused at connect, {open} still open after 5 s")
}

/// `n` connections that send Hello then a 16 MiB DATA frame's header and 16 KiB of it.
fn bigframe(addr: SocketAddr, n: u32) -> String {
    let mut held = Vec::new();
    let mut closed = 0;
    for i in 0..n {
        let Ok(mut c) = Conn::connect(addr, attacker(i % 16)) else {
            continue;
        };
        let hello = msg::Hello {
            version: 1,
            max_frame: 16 << 20,
            ..Default::default()
        };
        let _ = c.send(&Frame::message(Cmd::HELLO, 0, flags::END, &hello));
        let mut b = BytesMut::new();
        Header::data(Cmd::WRITE, 3, 16 << 20, 0, true).encode(&mut b);
        b.extend_from_slice(&[0u8; 16 * 1024]);
        if c.sock.write_all(&b).is_err() {
            closed += 1;
        }
        held.push(c);
    }
    std::thread::sleep(Duration::from_secs(2));
    for c in &mut held {
        c.sock
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut sink = [0u8; 4096];
        loop {
            match c.sock.read(&mut sink) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    format!("{n} pre-auth 16 MiB DATA frames: {closed} connections closed by fsd")
}

/// Wrong tokens as fast as ATTACK_THREADS threads (default 8) can send them for 10 s, from one
/// address or rotating over 4,000; each connection hangs up right after its AUTH.
fn guess(addr: SocketAddr, metrics: Option<&str>, rotate: bool) -> String {
    let threads: u32 = std::env::var("ATTACK_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let before = auth_failures(metrics);
    let sent = Arc::new(AtomicU64::new(0));
    let secs = 10;
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut k = 0u32;
                while t0.elapsed() < Duration::from_secs(secs) {
                    let from = if rotate {
                        attacker((t * 131 + k) % 4000)
                    } else {
                        attacker(0)
                    };
                    k += 1;
                    let Ok(mut c) = Conn::connect(addr, from) else {
                        continue;
                    };
                    let hello = msg::Hello {
                        version: 1,
                        ..Default::default()
                    };
                    let auth = msg::Auth {
                        token: format!("guess-{t}-{k}-0123456789abcdef"),
                    };
                    let ok = c
                        .send(&Frame::message(Cmd::HELLO, 0, flags::END, &hello))
                        .and_then(|_| c.send(&Frame::message(Cmd::AUTH, 1, flags::END, &auth)));
                    if ok.is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in workers {
        let _ = t.join();
    }
    std::thread::sleep(Duration::from_millis(300));
    let secs = t0.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    match (before, auth_failures(metrics)) {
        (Some(a), Some(b)) => format!(
            "{threads} threads: {sent} AUTHs sent ({:.0}/s), {} evaluated = {:.1} guesses/s",
            sent as f64 / secs,
            b - a,
            (b - a) / secs
        ),
        _ => format!("{sent} AUTHs sent; evaluated unknown (no metrics address)"),
    }
}

/// `n` connections each asking for 64 inline files of 256 KiB (files i0..i63) and never
/// reading.
fn unread(addr: SocketAddr, token: &str, n: u32) -> String {
    let mut held = Vec::new();
    for i in 0..n {
        let Ok(mut c) = Conn::login(addr, attacker(i % 8), token, 0) else {
            continue;
        };
        c.sock.set_nonblocking(false).unwrap();
        for f in 0..64u32 {
            let open = msg::OpenRequest {
                path: format!("i{f}"),
                inline_max: 256 * 1024,
                ..Default::default()
            };
            let _ = c.send(&Frame::message(Cmd::OPEN, 2 + f, flags::END, &open));
        }
        held.push(c);
    }
    std::thread::sleep(Duration::from_secs(3));
    format!("{} connections x 64 unread inline OPENs", held.len())
}

/// Read handles on the big file until refused, over up to 64 connections.
fn handles(addr: SocketAddr, token: &str) -> String {
    let mut held = Vec::new();
    let mut opened = 0;
    let mut why = String::from("never refused");
    'all: for i in 0..64u32 {
        let Ok(mut c) = Conn::login(addr, attacker(i % 8), token, 0) else {
            why = "login refused".into();
            break;
        };
        for sid in 2..130 {
            let open = msg::OpenRequest {
                path: "big".into(),
                ..Default::default()
            };
            match c.call(Cmd::OPEN, sid, &open) {
                Some(f) if !f.header.is_error() => opened += 1,
                Some(f) => {
                    why = error_text(&f);
                    if !why.contains("more than") {
                        held.push(c);
                        break 'all;
                    }
                    break;
                }
                None => {
                    why = "no reply".into();
                    break 'all;
                }
            }
        }
        held.push(c);
    }
    std::thread::sleep(Duration::from_secs(1));
    format!("{opened} read handles, then: {why}")
}

/// Multi-chunk uploads declaring 16 GiB each with 64 KiB chunks, until refused.
fn uploads(addr: SocketAddr, token: &str) -> String {
    let mut held = Vec::new();
    let mut opened = 0;
    let mut why = String::from("never refused");
    'all: for i in 0..64u32 {
        // The smallest chunks: the most chunks per upload for the server to track.
        let Ok(mut c) = Conn::login(addr, attacker(i % 8), token, 64 * 1024) else {
            why = "login refused".into();
            break;
        };
        for sid in 2..20 {
            let open = msg::OpenRequest {
                path: format!("huge-{i}-{sid}"),
                mode: msg::OpenMode::OpenWrite as i32,
                size: 16 << 30,
                resume_key: "k".into(),
                ..Default::default()
            };
            match c.call(Cmd::OPEN, sid, &open) {
                Some(f) if !f.header.is_error() => opened += 1,
                Some(f) => {
                    why = error_text(&f);
                    if !why.contains("uploads open on one connection") {
                        held.push(c);
                        break 'all;
                    }
                    break;
                }
                None => break 'all,
            }
        }
        held.push(c);
    }
    std::thread::sleep(Duration::from_secs(1));
    format!("{opened} uploads of 16 GiB, then: {why}")
}
