//! Integration-test harness shared by every test file: real `fsd` processes on 127.0.0.1:0 with
//! a temp root, the real `fsc` binary, raw protocol connections, and file helpers.
#![allow(dead_code, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fsd::protocol::{flags, msg, Cmd, Frame, FrameCodec};
use prost::Message;
use tokio_util::codec::Decoder;

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub fn fsd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fsd"))
}

/// The fsc binary sits beside fsd in the same target dir (built by `cargo test --workspace`).
pub fn fsc_bin() -> PathBuf {
    let p = fsd_bin().with_file_name("fsc");
    assert!(
        p.exists(),
        "{} missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// A running fsd process.
pub struct Fsd {
    pub child: Child,
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
    wrapper: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Fsd {
    /// fsd on a fresh temp root.
    pub fn start() -> Fsd {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut s = Fsd::start_on(&root, &[]);
        s._dir = Some(dir);
        s
    }

    /// fsd serving `root` with extra arguments (default token unless --token-file is given).
    pub fn start_on(root: &Path, extra: &[&str]) -> Fsd {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Fsd::spawn(root, "127.0.0.1:0", extra, Vec::new())
    }

    /// fsd started through a wrapper command line (e.g. `unshare ... sh -c '...; exec "$0" "$@"'`)
    /// that ends by exec'ing its arguments: the fsd binary and its flags.
    pub fn start_wrapped(wrapper: &[&str], root: &Path) -> Fsd {
        Fsd::start_wrapped_with(wrapper, root, &[])
    }

    /// [`Fsd::start_wrapped`] with extra arguments.
    pub fn start_wrapped_with(wrapper: &[&str], root: &Path, extra: &[&str]) -> Fsd {
        let wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Fsd::spawn(root, "127.0.0.1:0", extra, wrapper)
    }

    /// [`Fsd::start_wrapped`] listening on `listen` (e.g. an address inside a network
    /// namespace the wrapper enters).
    pub fn start_wrapped_on(wrapper: &[&str], root: &Path, listen: &str) -> Fsd {
        let wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        Fsd::spawn(root, listen, Vec::new(), wrapper)
    }

    fn spawn(root: &Path, listen: &str, extra: Vec<String>, wrapper: Vec<String>) -> Fsd {
        let log = std::env::temp_dir().join(format!(
            "fsd-test-{}-{}.log",
            std::process::id(),
            rand_suffix()
        ));
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(fsd_bin());
                c
            }
            None => Command::new(fsd_bin()),
        };
        cmd.arg("--root").arg(root).arg("--listen").arg(listen);
        if !extra.iter().any(|a| a == "--token-file" || a == "--token") {
            cmd.arg("--token").arg(TOKEN);
        }
        cmd.args(&extra)
            .env(
                "RUST_LOG",
                std::env::var("FSD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // If the test process dies (killed, timed out), take fsd with it: no orphans.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn fsd");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_path = log.clone();
        // Forward fsd's stderr to a log file; report the bound address from its first line.
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(&log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Log first, so a test reading the log after start sees this line.
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
                if let Some(rest) = line.strip_prefix("fsd: listening on ") {
                    let addr = rest.split(',').next().unwrap().to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fsd did not start; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let state = extra
            .iter()
            .position(|a| a == "--state-dir")
            .map(|i| PathBuf::from(&extra[i + 1]))
            .unwrap_or_else(|| root.join(".fsd-state"));
        Fsd {
            child,
            addr: addr.parse().unwrap(),
            root: root.to_path_buf(),
            state,
            log,
            extra,
            wrapper,
            _dir: None,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then start again on the same port with the same root and arguments.
    pub fn restart(&mut self) {
        self.kill9();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let new = loop {
            match std::panic::catch_unwind(|| {
                Fsd::spawn(
                    &self.root,
                    &listen,
                    self.extra.clone(),
                    self.wrapper.clone(),
                )
            }) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => std::panic::resume_unwind(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut old = std::mem::replace(self, new);
        self._dir = old._dir.take();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connections fsd authenticated so far (its log says so once per connection).
    pub fn connections(&self) -> usize {
        self.log_text().matches("authenticated").count()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Fsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- fsd log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Unique within this test process (the pid makes it unique across processes).
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `fsc` with the test token.
pub fn fsc(args: &[&str]) -> Command {
    let mut c = Command::new(fsc_bin());
    c.args(args)
        .env("FSC_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// Runs fsc and asserts success, returning stdout.
pub fn fsc_ok(args: &[&str]) -> Output {
    let out = fsc(args).output().unwrap();
    assert!(
        out.status.success(),
        "fsc {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// NDJSON events printed by `fsc --json`.
pub fn events(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_random(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, &data).unwrap();
    data
}

pub fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert!(
        x.len() == y.len() && x == y,
        "{} ({} bytes) != {} ({} bytes)",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
}

/// A raw protocol connection for tests that misbehave on purpose.
pub struct Raw {
    pub sock: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::over(TcpStream::connect(addr).unwrap())
    }

    /// A connected socket, with the harness's read timeout.
    fn over(sock: TcpStream) -> Raw {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw {
            sock,
            codec: FrameCodec::new(16 << 20),
            buf: BytesMut::new(),
        }
    }

    /// Connected from the local address `from` (any 127.0.0.0/8 address is this host's), so a
    /// test can be two sources.
    pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> Raw {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(from, 0).into()).unwrap();
        sock.connect(&addr.into()).unwrap();
        Raw::over(TcpStream::from(sock))
    }

    /// Connected with a 4 KiB receive buffer, so that a test that stops reading makes the
    /// server hold what it would send; Hello'd and authenticated.
    pub fn authed_small_window(addr: SocketAddr) -> Raw {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&addr.into()).unwrap();
        let mut r = Raw::over(TcpStream::from(sock));
        let f = r.login(TOKEN);
        assert!(!f.header.is_error(), "auth failed: {:?}", error_of(&f));
        r
    }

    /// Sends Hello and Auth with `token`; returns the Auth reply.
    pub fn login(&mut self, token: &str) -> Frame {
        self.send_msg(
            Cmd::HELLO,
            0,
            flags::END,
            &msg::Hello {
                version: 1,
                ..Default::default()
            },
        );
        let h = self.recv().expect("hello reply");
        if h.header.is_error() {
            return h;
        }
        self.call(
            Cmd::AUTH,
            1,
            &msg::Auth {
                token: token.into(),
            },
        )
    }

    /// Connected, Hello'd and authenticated.
    pub fn authed(addr: SocketAddr) -> Raw {
        Raw::authed_as(addr, TOKEN, 0)
    }

    /// Connected, Hello'd (asking for `chunk_size`, 0 = the server's) and authenticated with
    /// `token`.
    pub fn authed_as(addr: SocketAddr, token: &str, chunk_size: u32) -> Raw {
        let mut r = Raw::connect(addr);
        r.send_msg(
            Cmd::HELLO,
            0,
            flags::END,
            &msg::Hello {
                version: 1,
                chunk_size,
                ..Default::default()
            },
        );
        assert_eq!(r.recv().unwrap().cmd(), Cmd::HELLO);
        let f = r.call(
            Cmd::AUTH,
            1,
            &msg::Auth {
                token: token.into(),
            },
        );
        assert!(!f.header.is_error(), "auth failed: {:?}", error_of(&f));
        r
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(b)
    }

    pub fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        f.header.encode(&mut b);
        b.extend_from_slice(&f.payload);
        self.sock.write_all(&b)
    }

    pub fn send_msg(&mut self, cmd: Cmd, sid: u32, fl: u8, m: &impl Message) {
        self.send(&Frame::message(cmd, sid, fl, m)).unwrap();
    }

    /// Next frame; None on EOF, timeout or a decode error.
    pub fn recv(&mut self) -> Option<Frame> {
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

    /// Sends a request with END and returns its single reply.
    pub fn call(&mut self, cmd: Cmd, sid: u32, m: &impl Message) -> Frame {
        self.send_msg(cmd, sid, flags::END, m);
        self.recv().expect("reply")
    }

    /// Whether the server closed the connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        loop {
            match self.sock.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// The error carried by an ERROR frame.
pub fn error_of(f: &Frame) -> msg::Error {
    assert!(
        f.header.is_error(),
        "expected an error frame, got {:?}",
        f.header
    );
    msg::Error::decode(f.payload.clone()).unwrap()
}

/// A `kB` field of /proc/PID/status (VmRSS:, VmHWM:, ...), 0 if unreadable.
/// Waits up to 10 s for `read()` to equal `want` and returns the last value read. Server
/// counters are bumped after the bytes they count leave, so a client can finish first.
/// Waits until the files written before now are older than fsd's racy window
/// (fsd::fs::identity::RACY): only then does fsd keep what it learns of them (manifests,
/// compressed chunks), since a change within the same timestamp tick would not show.
pub fn past_racy_window() {
    std::thread::sleep(fsd::fs::identity::RACY + Duration::from_millis(100));
}

pub fn settled(want: u64, read: impl Fn() -> u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = read();
        if v == want || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// How far process `pid`'s resident memory rose above `base_kib` at its peak, in MiB, sampled
/// every 100 ms for 3 s (time for a server to do all it is willing to).
pub fn rss_growth_mib(pid: u32, base_kib: u64) -> u64 {
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(proc_status_kib(pid, "VmRSS:"));
    }
    peak.saturating_sub(base_kib) / 1024
}

/// Sockets process `pid` has open (its listeners and connections).
pub fn open_sockets(pid: u32) -> usize {
    socket_inodes(pid).len()
}

/// The sockets process `pid` has open, by inode (one socket open under several descriptors
/// counts once): a test can tell the sockets it caused from those that were there before.
pub fn socket_inodes(pid: u32) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or_else(
        |_| Default::default(),
        |d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| t.starts_with("socket:"))
                .collect()
        },
    )
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn payload(m: &impl Message) -> Bytes {
    Bytes::from(m.encode_to_vec())
}
pub mod balancer;
pub mod inproc;
pub mod proxy;

/// Every entry beneath `root` (not the server's state directory): path, kind, mtime (files and
/// directories) and contents of files; symlinks as their target.
pub fn tree(root: &Path) -> Vec<(String, String, i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            if rel.starts_with(".fsd-state") {
                continue;
            }
            let mtime = std::os::unix::fs::MetadataExt::mtime_nsec(&m)
                + std::os::unix::fs::MetadataExt::mtime(&m) * 1_000_000_000;
            if m.is_dir() {
                stack.push(e.path());
                out.push((rel, "dir".into(), mtime, Vec::new()));
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                out.push((rel, "link".into(), 0, t.display().to_string().into_bytes()));
            } else {
                let data = std::fs::read(e.path()).unwrap();
                out.push((
                    rel,
                    "file".into(),
                    std::os::unix::fs::MetadataExt::mtime_nsec(&m)
                        + std::os::unix::fs::MetadataExt::mtime(&m) * 1_000_000_000,
                    data,
                ));
            }
        }
    }
    out.sort();
    out
}
