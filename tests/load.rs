#![allow(clippy::disallowed_methods)]
//! Load test (issue 6 item 4): many concurrent raw-protocol clients against one real `fsd`,
//! mixing LIST, verified downloads and verified uploads of small and ~4 MiB files, for a bounded
//! time. Every operation is checked end to end (see [`Client`]); the test asserts zero errors and
//! prints clients, seconds, operations, MiB/s moved, latencies and fsd's peak RSS (VmHWM).
//!
//! - `load_ci` (not ignored): 20 clients for 3 s, part of the normal test run.
//! - `load_full` (ignored): LOAD_CLIENTS (default 200) clients for LOAD_SECS (default 60) s; run it
//!   with `scripts/load.sh`, which builds release binaries and runs
//!   `cargo test --release --test load -- --ignored --nocapture`.
//!
//! Each client is a thread with its own connection (200 `fsc` processes would measure process
//! start-up on a 2-core machine, not the server). Fixtures are written with std::fs (hence the
//! lint allowance above).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fsd::protocol::{chunk_len, flags, msg, Cmd, ErrorCode, Frame};
use prost::Message;

/// Small files: sizes spread over 0..=64 KiB (one chunk, or none).
const SMALL_FILES: usize = 64;
/// Big files: about 4 MiB each (several chunks, the last one short).
const BIG_FILES: usize = 4;
const BIG_SIZE: usize = 4 << 20;
/// Upload paths per client, reused in turn so the disk use stays bounded.
const UPLOAD_SLOTS: usize = 3;

/// A fixture file and its contents.
struct Fixture {
    path: String,
    data: Vec<u8>,
}

/// What every client shares: the fixtures it downloads and the pool its uploads are cut from.
struct Shared {
    addr: SocketAddr,
    files: Vec<Fixture>,
    pool: Vec<u8>,
    deadline: Instant,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    #[default]
    List,
    Download,
    Upload,
}

/// One client's tally.
#[derive(Default)]
struct Tally {
    ops: HashMap<Kind, u64>,
    /// Latency of each operation in microseconds, per kind.
    lat: HashMap<Kind, Vec<u32>>,
    bytes_down: u64,
    bytes_up: u64,
    errors: u64,
    first_errors: Vec<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        for (k, n) in o.ops {
            *self.ops.entry(k).or_default() += n;
        }
        for (k, v) in o.lat {
            self.lat.entry(k).or_default().extend(v);
        }
        self.bytes_down += o.bytes_down;
        self.bytes_up += o.bytes_up;
        self.errors += o.errors;
        for e in o.first_errors {
            if self.first_errors.len() < 10 {
                self.first_errors.push(e);
            }
        }
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// One simulated user: a connection, a random stream of operations, and its tally.
struct Client<'a> {
    id: usize,
    shared: &'a Shared,
    r: Raw,
    rng: u64,
    sid: u32,
    /// Base chunk size asked for in Hello (0 = the server's 1 MiB): a quarter of the clients use
    /// 256 KiB chunks, so big files also travel as 17 chunks.
    chunk_pref: u32,
    uploads: u64,
    tally: Tally,
}

impl<'a> Client<'a> {
    fn connect(id: usize, shared: &'a Shared) -> Result<Client<'a>, String> {
        let chunk_pref = if id % 4 == 3 { 256 << 10 } else { 0 };
        let r = authed(shared.addr, chunk_pref)?;
        Ok(Client {
            id,
            shared,
            r,
            rng: (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            sid: 0,
            chunk_pref,
            uploads: 0,
            tally: Tally::default(),
        })
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn next_sid(&mut self) -> u32 {
        self.sid = self.sid % 100_000 + 1;
        self.sid
    }

    /// Runs operations until the deadline; each operation that started is finished.
    fn run(mut self) -> Tally {
        while Instant::now() < self.shared.deadline {
            let roll = self.rand() % 100;
            let kind = match roll {
                0..30 => Kind::List,
                30..75 => Kind::Download,
                _ => Kind::Upload,
            };
            let t = Instant::now();
            let result = match kind {
                Kind::List => self.list(),
                Kind::Download => self.download_fixture(),
                Kind::Upload => self.upload(),
            };
            match result {
                Ok(()) => {
                    *self.tally.ops.entry(kind).or_default() += 1;
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    self.tally.lat.entry(kind).or_default().push(us);
                }
                Err(e) => {
                    self.tally.errors += 1;
                    if self.tally.first_errors.len() < 10 {
                        self.tally
                            .first_errors
                            .push(format!("client {} {kind:?}: {e}", self.id));
                    }
                    // The connection may be out of step: start a fresh one.
                    match authed(self.shared.addr, self.chunk_pref) {
                        Ok(r) => self.r = r,
                        Err(e) => {
                            self.tally.errors += 1;
                            self.tally.first_errors.push(format!("reconnect: {e}"));
                            break;
                        }
                    }
                }
            }
        }
        self.tally
    }

    fn call(&mut self, cmd: Cmd, m: &impl Message) -> Result<Frame, String> {
        let sid = self.next_sid();
        self.r
            .send(&Frame::message(cmd, sid, flags::END, m))
            .map_err(|e| format!("send {cmd}: {e}"))?;
        let f = self.recv(cmd)?;
        ensure!(
            f.stream_id() == sid,
            "{cmd}: reply on stream {} for {sid}",
            f.stream_id()
        );
        Ok(f)
    }

    fn recv(&mut self, what: Cmd) -> Result<Frame, String> {
        self.r
            .recv()
            .ok_or_else(|| format!("{what}: connection closed or timed out"))
    }

    /// LIST of the small-file directory (must hold exactly its fixtures, sorted), of the root, or
    /// of the upload directory (changing all the time).
    fn list(&mut self) -> Result<(), String> {
        let path = match self.rand() % 3 {
            0 => "small",
            1 => "",
            _ => "up",
        };
        let req = msg::ListRequest {
            path: path.into(),
            ..Default::default()
        };
        let f = self.call(Cmd::LIST, &req)?;
        let list: msg::ListResponse = ok(&f, "list")?;
        if path == "small" {
            ensure!(
                list.entries.len() == SMALL_FILES && !list.more,
                "LIST small: {} entries",
                list.entries.len()
            );
            ensure!(
                list.entries.windows(2).all(|w| w[0].name < w[1].name),
                "LIST small: not sorted"
            );
        }
        if path.is_empty() {
            let names: Vec<&str> = list.entries.iter().map(|e| e.name.as_str()).collect();
            ensure!(names == ["big", "small", "up"], "LIST root: {names:?}");
        }
        Ok(())
    }

    /// Downloads a random fixture (a quarter of the time a big one) and compares it.
    fn download_fixture(&mut self) -> Result<(), String> {
        let n = self.shared.files.len();
        let i = if self.rand().is_multiple_of(4) {
            SMALL_FILES + (self.rand() as usize % BIG_FILES)
        } else {
            self.rand() as usize % SMALL_FILES
        };
        let f = &self.shared.files[i.min(n - 1)];
        let got = self.download(&f.path)?;
        ensure!(got == f.data, "{}: content differs", f.path);
        Ok(())
    }

    /// OPEN, MANIFEST, READ every chunk (each checked against the manifest's CRC32), whole-file
    /// BLAKE3 against OpenResponse.blake3, CLOSE.
    fn download(&mut self, path: &str) -> Result<Vec<u8>, String> {
        let req = msg::OpenRequest {
            path: path.into(),
            ..Default::default()
        };
        let f = self.call(Cmd::OPEN, &req)?;
        let open: msg::OpenResponse = ok(&f, &format!("open {path}"))?;
        let m = msg::ManifestRequest {
            handle: open.handle,
            first_chunk: 0,
            count: 0,
            cvs: false,
        };
        let f = self.call(Cmd::MANIFEST, &m)?;
        let manifest: msg::ManifestResponse = ok(&f, "manifest")?;
        ensure!(
            manifest.crc32.len() == open.chunk_count as usize,
            "{path}: {} CRCs for {} chunks",
            manifest.crc32.len(),
            open.chunk_count
        );
        let mut data = Vec::with_capacity(open.size as usize);
        if open.chunk_count > 0 {
            let sid = self.next_sid();
            let req = msg::ReadRequest {
                handle: open.handle,
                first_chunk: 0,
                count: open.chunk_count,
                compress_level: 0,
            };
            self.r
                .send(&Frame::message(Cmd::READ, sid, flags::END, &req))
                .map_err(|e| format!("send read: {e}"))?;
            for i in 0..open.chunk_count {
                let f = self.recv(Cmd::READ)?;
                if f.header.is_error() {
                    return Err(format!("{path} chunk {i}: {}", error_text(&f)));
                }
                ensure!(
                    f.stream_id() == sid && f.header.is_data(),
                    "{path} chunk {i}: unexpected frame {:?}",
                    f.header
                );
                ensure!(
                    f.header.is_end() == (i + 1 == open.chunk_count),
                    "{path} chunk {i}: END misplaced"
                );
                ensure!(
                    f.payload.len() as u32 == chunk_len(open.size, open.chunk_size, i),
                    "{path} chunk {i}: {} bytes",
                    f.payload.len()
                );
                // The codec checked the payload against the header's CRC; the header's CRC must
                // be the manifest's.
                ensure!(
                    crc32fast::hash(&f.payload) == manifest.crc32[i as usize],
                    "{path} chunk {i}: CRC differs from the manifest"
                );
                data.extend_from_slice(&f.payload);
            }
        }
        ensure!(
            data.len() as u64 == open.size,
            "{path}: {} of {} bytes",
            data.len(),
            open.size
        );
        ensure!(
            blake3::hash(&data).as_bytes()[..] == open.blake3[..],
            "{path}: BLAKE3 differs from OpenResponse.blake3"
        );
        let f = self.call(
            Cmd::CLOSE,
            &msg::CloseRequest {
                handle: open.handle,
            },
        )?;
        let _: msg::Ok = ok(&f, "close")?;
        self.tally.bytes_down += data.len() as u64;
        Ok(data)
    }

    /// Uploads a slice of the pool (a quarter of the time ~4 MiB, else 0..=64 KiB) to one of
    /// this client's slots: OPEN write, every chunk pipelined on its own stream, COMMIT with the
    /// BLAKE3; then, one time in three, downloads it back and compares.
    fn upload(&mut self) -> Result<(), String> {
        let big = self.rand().is_multiple_of(4);
        let len = if big {
            BIG_SIZE - 4096 + (self.rand() % 8192) as usize
        } else {
            (self.rand() % (64 * 1024 + 1)) as usize
        };
        let off = (self.rand() as usize) % (self.shared.pool.len() - len);
        let shared = self.shared;
        let data = &shared.pool[off..off + len];
        self.uploads += 1;
        let path = format!("up/c{}-{}", self.id, self.uploads as usize % UPLOAD_SLOTS);
        let req = msg::OpenRequest {
            path: path.clone(),
            mode: msg::OpenMode::OpenWrite as i32,
            size: len as u64,
            resume_key: format!("load-{}-{}", self.id, self.uploads),
            ..Default::default()
        };
        let f = self.call(Cmd::OPEN, &req)?;
        let open: msg::OpenResponse = ok(&f, &format!("open write {path}"))?;
        let cs = open.chunk_size as usize;
        ensure!(
            open.chunk_count as usize == len.div_ceil(cs),
            "{path}: {} chunks for {len} bytes",
            open.chunk_count
        );
        // Every chunk in flight at once, each on its own stream.
        let mut pending = HashMap::new();
        for (i, chunk) in data.chunks(cs).enumerate() {
            let sid = self.next_sid();
            let w = msg::WriteRequest {
                handle: open.handle,
                chunk: i as u32,
            };
            self.r
                .send(&Frame::message(Cmd::WRITE, sid, 0, &w))
                .and_then(|_| {
                    self.r.send(&Frame::new(
                        Cmd::WRITE,
                        sid,
                        flags::DATA | flags::END,
                        Bytes::copy_from_slice(chunk),
                    ))
                })
                .map_err(|e| format!("send write: {e}"))?;
            pending.insert(sid, i as u32);
        }
        while !pending.is_empty() {
            let f = self.recv(Cmd::WRITE)?;
            let ack: msg::WriteAck = ok(&f, "write")?;
            let chunk = pending.remove(&f.stream_id());
            ensure!(
                chunk == Some(ack.chunk),
                "{path}: ack for chunk {} on stream {} (expected {chunk:?})",
                ack.chunk,
                f.stream_id()
            );
        }
        let c = msg::CommitRequest {
            handle: open.handle,
            blake3: blake3::hash(data).as_bytes().to_vec(),
            upload_id: String::new(),
        };
        let f = self.call(Cmd::COMMIT, &c)?;
        let done: msg::CommitResponse = ok(&f, "commit")?;
        ensure!(
            done.size == len as u64,
            "{path}: committed {} of {len} bytes",
            done.size
        );
        self.tally.bytes_up += len as u64;
        if self.rand().is_multiple_of(3) {
            let back = self.download(&path)?;
            ensure!(back == data, "{path}: downloaded upload differs");
        }
        Ok(())
    }
}

fn error_text(f: &Frame) -> String {
    match msg::Error::decode(f.payload.clone()) {
        Ok(e) => format!(
            "{} ({})",
            ErrorCode::from_u32(e.code).map_or(format!("code {}", e.code), |c| c.to_string()),
            e.message
        ),
        Err(_) => "undecodable error".into(),
    }
}

fn ok<M: Message + Default>(f: &Frame, what: &str) -> Result<M, String> {
    ensure!(!f.header.is_error(), "{what}: {}", error_text(f));
    f.decode().map_err(|e| format!("{what}: bad reply: {e}"))
}

fn authed(addr: SocketAddr, chunk_size: u32) -> Result<Raw, String> {
    let mut r = Raw::connect(addr);
    r.sock
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let hello = msg::Hello {
        version: 1,
        chunk_size,
        agent: "load".into(),
        ..Default::default()
    };
    r.send(&Frame::message(Cmd::HELLO, 0, flags::END, &hello))
        .map_err(|e| e.to_string())?;
    let f = r.recv().ok_or("hello: no reply")?;
    let _: msg::Hello = ok(&f, "hello")?;
    let auth = msg::Auth {
        token: TOKEN.into(),
    };
    r.send(&Frame::message(Cmd::AUTH, 1, flags::END, &auth))
        .map_err(|e| e.to_string())?;
    let f = r.recv().ok_or("auth: no reply")?;
    let _: msg::AuthOk = ok(&f, "auth")?;
    Ok(r)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The figures of one run.
struct Report {
    clients: usize,
    secs: f64,
    tally: Tally,
    peak_rss_mib: f64,
}

impl Report {
    fn operations(&self) -> u64 {
        self.tally.ops.values().sum()
    }

    fn mib_per_s(&self) -> f64 {
        (self.tally.bytes_down + self.tally.bytes_up) as f64 / (1 << 20) as f64 / self.secs
    }

    fn print(&mut self) {
        let rate = self.mib_per_s();
        let t = &mut self.tally;
        println!(
            "load: {} clients for {:.1} s: {} operations ({:.0}/s), {} errors",
            self.clients,
            self.secs,
            t.ops.values().sum::<u64>(),
            t.ops.values().sum::<u64>() as f64 / self.secs,
            t.errors
        );
        let mut kinds: Vec<_> = t.lat.keys().copied().collect();
        kinds.sort();
        for k in kinds {
            let v = t.lat.get_mut(&k).unwrap();
            v.sort_unstable();
            println!(
                "  {:<9} {:>8} ops   latency ms p50 {:>8.2}  p99 {:>8.2}  max {:>8.2}",
                format!("{k:?}"),
                v.len(),
                percentile(v, 0.5),
                percentile(v, 0.99),
                percentile(v, 1.0)
            );
        }
        println!(
            "  moved {:.1} MiB (down {:.1}, up {:.1}) = {:.1} MiB/s; fsd peak RSS (VmHWM) {:.1} MiB",
            (t.bytes_down + t.bytes_up) as f64 / (1 << 20) as f64,
            t.bytes_down as f64 / (1 << 20) as f64,
            t.bytes_up as f64 / (1 << 20) as f64,
            rate,
            self.peak_rss_mib
        );
        for e in &t.first_errors {
            println!("  error: {e}");
        }
    }
}

/// Fixtures, one fsd, `clients` threads for `secs` seconds; returns the figures.
fn run_load(clients: usize, secs: u64) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("up")).unwrap();
    let mut files = Vec::new();
    for i in 0..SMALL_FILES {
        // 0, then spread up to 64 KiB (a few exactly at the boundaries).
        let len = match i {
            0 => 0,
            1 => 1,
            2 => 64 * 1024,
            _ => (i * 1031 * 7) % (64 * 1024),
        };
        let path = format!("small/s{i:03}");
        let data = write_random(&root.join(&path), len, i as u64 + 1);
        files.push(Fixture { path, data });
    }
    for i in 0..BIG_FILES {
        let path = format!("big/b{i}");
        let data = write_random(&root.join(&path), BIG_SIZE + i * 4097, 1000 + i as u64);
        files.push(Fixture { path, data });
    }
    let s = Fsd::start_on(
        &root,
        // Every client connects from this one address at once: let them all wait for Auth.
        &[
            "--max-connections",
            &(clients * 2 + 64).to_string(),
            "--max-startups-per-source",
            &clients.to_string(),
        ],
    );
    let pid = s.pid();
    let start_rss = proc_status_kib(pid, "VmRSS:");
    let shared = Arc::new(Shared {
        addr: s.addr,
        files,
        pool: random_bytes(2 * BIG_SIZE, 4242),
        deadline: Instant::now() + Duration::from_secs(secs),
    });
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|id| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("load-{id}"))
                .stack_size(256 << 10)
                .spawn(move || match Client::connect(id, &shared) {
                    Ok(c) => c.run(),
                    Err(e) => Tally {
                        errors: 1,
                        first_errors: vec![format!("client {id} connect: {e}")],
                        ..Default::default()
                    },
                })
                .unwrap()
        })
        .collect();
    let mut tally = Tally::default();
    for t in threads {
        tally.merge(t.join().expect("client thread panicked"));
    }
    let secs = t0.elapsed().as_secs_f64();
    let peak = proc_status_kib(pid, "VmHWM:");
    assert!(peak > 0, "could not read fsd's VmHWM");
    println!("  fsd RSS at start {:.1} MiB", start_rss as f64 / 1024.0);
    Report {
        clients,
        secs,
        tally,
        peak_rss_mib: peak as f64 / 1024.0,
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}

fn check(mut r: Report) {
    r.print();
    assert_eq!(
        r.tally.errors, 0,
        "errors under load: {:?}",
        r.tally.first_errors
    );
    for k in [Kind::List, Kind::Download, Kind::Upload] {
        assert!(
            r.tally.ops.get(&k).copied().unwrap_or(0) > 0,
            "no {k:?} operation completed"
        );
    }
    assert!(r.operations() > 0 && r.mib_per_s() > 0.0);
}

/// CI-sized: 20 clients for 3 s, zero errors.
#[test]
fn load_ci() {
    check(run_load(20, 3));
}

/// The full run: `scripts/load.sh` (LOAD_CLIENTS, default 200; LOAD_SECS, default 60).
#[test]
#[ignore = "long load test: run scripts/load.sh"]
fn load_full() {
    let clients = env_or("LOAD_CLIENTS", 200) as usize;
    let secs = env_or("LOAD_SECS", 60);
    check(run_load(clients, secs));
}
