//! fsc against a scripted fake server (SECURITY.md, "The client is attacked too";
//! docs/SECURITY.md §9 lists what each case proves).
//!
//! [`Fake`] serves an in-memory tree honestly (LIST, STAT, OPEN, MANIFEST, READ, CLOSE), and a
//! [`Script`] bends one part of that per case: what OPEN declares, what MANIFEST says, how READ
//! or LIST are answered. Tests drive the library in-process or the real `fsc` binary, always
//! against 127.0.0.1:0, with real files, and every loop bounded in count and time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame, FrameCodec, Header};
use futures::{SinkExt, StreamExt};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// A node of the fake server's tree. Paths are relative, "" is the root.
#[derive(Clone)]
enum Node {
    Dir { mode: u32, mtime_ns: i64 },
    File(FileNode),
    Symlink(String),
}

#[derive(Clone)]
struct FileNode {
    data: Bytes,
    /// A file of this size whose chunk i is all bytes `i as u8`, made up as it is read (big
    /// files without holding them); its BLAKE3 is not computed (all zeros).
    synthetic: Option<u64>,
    mode: u32,
    mtime_ns: i64,
    chunk_size: u32,
}

impl FileNode {
    fn size(&self) -> u64 {
        self.synthetic.unwrap_or(self.data.len() as u64)
    }

    fn count(&self) -> u32 {
        self.size().div_ceil(u64::from(self.chunk_size)) as u32
    }

    fn chunk(&self, i: u32) -> Bytes {
        let cs = u64::from(self.chunk_size);
        let start = (u64::from(i) * cs).min(self.size());
        let end = (start + cs).min(self.size());
        match self.synthetic {
            Some(_) => Bytes::from(vec![i as u8; (end - start) as usize]),
            None => self.data.slice(start as usize..end as usize),
        }
    }

    fn blake3(&self) -> [u8; 32] {
        match self.synthetic {
            Some(_) => [0; 32],
            None => *blake3::hash(&self.data).as_bytes(),
        }
    }
}

/// How an answer is bent.
#[derive(Clone, Default)]
enum ReadReply {
    /// The chunks asked for.
    #[default]
    Honest,
    /// The chunks asked for, then one more DATA frame.
    ExtraChunk,
    /// Different bytes than the file's (frame CRC valid, so only the hash can tell).
    WrongContent,
    /// Never answers; sends a junk frame on a stream fsc never opened every few milliseconds.
    Junk,
    /// Never answers.
    Silent,
    /// DATA frames of the right size on the READ's stream, without end (until the socket fails).
    Flood,
}

/// What the fake server does differently from an honest fsd.
#[derive(Clone, Default)]
struct Script {
    /// Replaces OPEN's declared size, chunk size and chunk count.
    declare: Option<(u64, u32, u32)>,
    /// Replaces OPEN's whole-file BLAKE3.
    blake3: Option<[u8; 32]>,
    /// MANIFEST claims a wrong CRC32 for chunk 1 while this many manifest requests remain.
    manifest_lies: Arc<AtomicU32>,
    read: ReadReply,
    /// LIST never ends: every page says more=true, with new names.
    endless_list: bool,
    /// Every directory under "deep" holds one directory with a 255-byte name: a tree without
    /// a bottom.
    bottomless: bool,
    /// Hello chunk_size.
    hello_chunk: Option<u32>,
    /// The READ of chunk 0 is answered only after this long (the others at once).
    delay_first: Option<Duration>,
    /// Only this many READs are answered; later ones never are.
    reads_answered: Option<u64>,
    /// Takes OPEN(WRITE) in chunks of this size; never acknowledges a WRITE.
    upload_chunk: Option<u32>,
    /// Answers every OPEN(WRITE) with this error, marked retryable (a full disk, say).
    refuse_writes: Option<ErrorCode>,
    /// What MANIFEST answers to a request for chaining values.
    cvs: CvsReply,
    /// STAT calls every file a directory: what a STAT sees just before a file takes the place
    /// of a directory on a real server (OPEN, a moment later, finds the file).
    stat_says_dir: bool,
    /// OPEN of a file is answered only once this gives a permit (the test adds them): the
    /// test acts while fsc waits for it.
    hold_open: Option<Arc<tokio::sync::Semaphore>>,
}

/// MANIFEST's chaining values (chunk delta), when asked for.
#[derive(Default, Clone, Copy, PartialEq)]
enum CvsReply {
    /// None, as from a server older than the field.
    #[default]
    Absent,
    Honest,
    /// One value fewer than the page has chunks.
    Short,
}

struct Fake {
    nodes: BTreeMap<String, Node>,
    /// Directory -> paths of its children, built by `start`.
    children: std::collections::HashMap<String, Vec<String>>,
    script: Script,
    /// READ requests answered.
    reads: AtomicU64,
}

impl Fake {
    fn new() -> Fake {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            String::new(),
            Node::Dir {
                mode: 0o755,
                mtime_ns: 1_000_000_000,
            },
        );
        Fake {
            nodes,
            children: Default::default(),
            script: Script::default(),
            reads: AtomicU64::new(0),
        }
    }

    fn dir(mut self, path: &str, mode: u32) -> Fake {
        self.nodes.insert(
            path.into(),
            Node::Dir {
                mode,
                mtime_ns: 1_000_000_000,
            },
        );
        self
    }

    fn file(mut self, path: &str, data: &[u8], chunk_size: u32) -> Fake {
        self.nodes.insert(
            path.into(),
            Node::File(FileNode {
                data: Bytes::copy_from_slice(data),
                synthetic: None,
                mode: 0o644,
                mtime_ns: 1_000_000_000,
                chunk_size,
            }),
        );
        self
    }

    /// A big file made up as it is read (see [`FileNode::synthetic`]).
    fn synthetic(mut self, path: &str, size: u64, chunk_size: u32) -> Fake {
        self = self.file(path, b"", chunk_size);
        if let Some(Node::File(f)) = self.nodes.get_mut(path) {
            f.synthetic = Some(size);
        }
        self
    }

    /// Sets the mode of an existing node.
    fn mode(mut self, path: &str, new: u32) -> Fake {
        match self.nodes.get_mut(path) {
            Some(Node::Dir { mode, .. }) => *mode = new,
            Some(Node::File(f)) => f.mode = new,
            _ => panic!("no node {path}"),
        }
        self
    }

    fn script(mut self, s: Script) -> Fake {
        self.script = s;
        self
    }

    async fn start(mut self) -> (SocketAddr, Arc<Fake>) {
        for p in self.nodes.keys().filter(|p| !p.is_empty()) {
            let parent = p.rsplit_once('/').map_or("", |(d, _)| d);
            self.children
                .entry(parent.to_string())
                .or_default()
                .push(p.clone());
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Arc::new(self);
        let fake = me.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(fake.clone().serve(sock));
            }
        });
        (addr, me)
    }

    fn entry(&self, path: &str, name: &str) -> Option<msg::Entry> {
        let (kind, size, mode, mtime_ns, target) = match self.nodes.get(path)? {
            Node::Dir { mode, mtime_ns } => (msg::Kind::Dir, 0, *mode, *mtime_ns, ""),
            Node::File(f) => (msg::Kind::File, f.size(), f.mode, f.mtime_ns, ""),
            Node::Symlink(t) => (msg::Kind::Symlink, 0, 0o777, 0, t.as_str()),
        };
        Some(msg::Entry {
            name: name.into(),
            kind: kind as i32,
            size,
            mtime_ns,
            mode,
            target: target.into(),
        })
    }

    fn children(&self, dir: &str) -> Vec<msg::Entry> {
        let skip = if dir.is_empty() { 0 } else { dir.len() + 1 };
        let mut v: Vec<msg::Entry> = self
            .children
            .get(dir)
            .into_iter()
            .flatten()
            .filter_map(|p| self.entry(p, &p[skip..]))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn file_at(&self, path: &str) -> Option<&FileNode> {
        match self.nodes.get(path) {
            Some(Node::File(f)) => Some(f),
            _ => None,
        }
    }

    async fn serve(self: Arc<Self>, sock: TcpStream) {
        let (mut tx, mut rx) = Framed::new(sock, FrameCodec::new(1 << 26)).split();
        // One writer; answers that take time (delays, floods, junk) are tasks feeding it.
        let (out, mut queue) = tokio::sync::mpsc::channel::<Frame>(64);
        let writer = tokio::spawn(async move {
            while let Some(f) = queue.recv().await {
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        });
        // Handle -> path of the file it reads.
        let mut handles: Vec<String> = Vec::new();
        let mut tasks = Vec::new();
        while let Some(Ok(Ok(f))) = rx.next().await {
            let out = out.clone();
            match self.answer(&f, &mut handles) {
                Answer::Frames(v) => {
                    for fr in v {
                        if out.send(fr).await.is_err() {
                            break;
                        }
                    }
                }
                Answer::Delayed(d, v) => tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    for fr in v {
                        let _ = out.send(fr).await;
                    }
                })),
                Answer::Gated(gate, v) => tasks.push(tokio::spawn(async move {
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                    for fr in v {
                        let _ = out.send(fr).await;
                    }
                })),
                Answer::Junk => tasks.push(tokio::spawn(async move {
                    // Frames on streams fsc never opened, for at most a minute.
                    let start = Instant::now();
                    let mut sid = 1_000_000;
                    while start.elapsed() < Duration::from_secs(60) {
                        let fr = Frame::new(Cmd::PING, sid, flags::END, Bytes::new());
                        if out.send(fr).await.is_err() {
                            return;
                        }
                        sid += 1;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })),
                Answer::Silent => {}
                Answer::Flood(sid, chunks, len) => tasks.push(tokio::spawn(async move {
                    // The chunks asked for, good ones but with no END, then zeros.
                    for c in chunks {
                        if out
                            .send(Frame::new(Cmd::READ, sid, flags::DATA, c))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let payload = Bytes::from(vec![0u8; len]);
                    // At most 8 GiB; fsc must hang up long before.
                    for _ in 0..(8u64 << 30) / len as u64 {
                        let fr = Frame::new(Cmd::READ, sid, flags::DATA, payload.clone());
                        if out.send(fr).await.is_err() {
                            return;
                        }
                    }
                })),
            }
        }
        for t in tasks {
            t.abort();
        }
        writer.abort();
    }

    fn answer(&self, f: &Frame, handles: &mut Vec<String>) -> Answer {
        let sid = f.stream_id();
        let msg_reply = |m: &dyn Fn() -> Vec<u8>| {
            Answer::Frames(vec![Frame::new(f.cmd(), sid, flags::END, m().into())])
        };
        let not_found = |p: &str| {
            Answer::Frames(vec![Frame::error(
                f.cmd(),
                sid,
                &ErrorCode::NotFound.msg(p),
            )])
        };
        match f.cmd() {
            Cmd::HELLO => Answer::Frames(vec![Frame::message(
                Cmd::HELLO,
                0,
                flags::END,
                &msg::Hello {
                    version: 1,
                    max_frame: 1 << 24,
                    chunk_size: self.script.hello_chunk.unwrap_or(1 << 20),
                    max_streams: 16,
                    agent: "fake".into(),
                    compress_level: 0,
                    // No tree streams: fsc must use its per-file requests with this server.
                    features: 0,
                    background: false,
                },
            )]),
            Cmd::STAT => {
                let req: msg::StatRequest = f.decode().unwrap();
                let entry = self.entry(&req.path, &req.path).map(|mut e| {
                    if self.script.stat_says_dir {
                        (e.kind, e.size) = (msg::Kind::Dir as i32, 0);
                    }
                    e
                });
                match entry {
                    Some(e) => msg_reply(&|| {
                        msg::StatResponse {
                            entry: Some(e.clone()),
                        }
                        .encode_to_vec()
                    }),
                    None => not_found(&req.path),
                }
            }
            Cmd::LIST => {
                let req: msg::ListRequest = f.decode().unwrap();
                if self.script.bottomless && req.path.starts_with("deep") {
                    let r = msg::ListResponse {
                        entries: vec![msg::Entry {
                            name: "n".repeat(255),
                            kind: msg::Kind::Dir as i32,
                            mode: 0o755,
                            ..Default::default()
                        }],
                        more: false,
                        unlisted: 0,
                    };
                    return msg_reply(&|| r.encode_to_vec());
                }
                if self.script.endless_list {
                    // 1000 new names per page, 200 bytes each, forever.
                    let base: u64 = req
                        .after
                        .get(..20)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let entries = (1..=1000)
                        .map(|i| {
                            let name = format!("{:020}{}", base + i, "x".repeat(180));
                            msg::Entry {
                                name,
                                kind: msg::Kind::File as i32,
                                size: 1,
                                ..Default::default()
                            }
                        })
                        .collect();
                    let r = msg::ListResponse {
                        entries,
                        more: true,
                        unlisted: 0,
                    };
                    return msg_reply(&|| r.encode_to_vec());
                }
                let dir = req.path.trim_matches('/');
                if !matches!(self.nodes.get(dir), Some(Node::Dir { .. })) {
                    return not_found(dir);
                }
                let mut entries = self.children(dir);
                entries.retain(|e| req.after.is_empty() || e.name > req.after);
                let more = entries.len() > 1000;
                entries.truncate(1000);
                let r = msg::ListResponse {
                    entries,
                    more,
                    unlisted: 0,
                };
                msg_reply(&|| r.encode_to_vec())
            }
            Cmd::OPEN => {
                let req: msg::OpenRequest = f.decode().unwrap();
                if let (Some(code), true) = (
                    self.script.refuse_writes,
                    req.mode == msg::OpenMode::OpenWrite as i32,
                ) {
                    let mut e = code.msg("no space left on the server");
                    e.retryable = true;
                    return Answer::Frames(vec![Frame::error(Cmd::OPEN, sid, &e)]);
                }
                if let (Some(cs), true) = (
                    self.script.upload_chunk,
                    req.mode == msg::OpenMode::OpenWrite as i32,
                ) {
                    // Takes uploads in chunks of its choosing, and never acknowledges one.
                    let r = msg::OpenResponse {
                        handle: 1,
                        size: req.size,
                        chunk_size: cs,
                        chunk_count: req.size.div_ceil(u64::from(cs)) as u32,
                        upload_id: "u1".into(),
                        ..Default::default()
                    };
                    return Answer::Frames(vec![Frame::message(Cmd::OPEN, sid, flags::END, &r)]);
                }
                let Some(file) = self.file_at(&req.path) else {
                    return not_found(&req.path);
                };
                handles.push(req.path.clone());
                let mut r = msg::OpenResponse {
                    handle: handles.len() as u32,
                    size: file.size(),
                    mtime_ns: file.mtime_ns,
                    identity: "v1".into(),
                    chunk_size: file.chunk_size,
                    chunk_count: file.count(),
                    blake3: file.blake3().to_vec(),
                    mode: file.mode,
                    ..Default::default()
                };
                if let Some((size, cs, count)) = self.script.declare {
                    (r.size, r.chunk_size, r.chunk_count) = (size, cs, count);
                }
                if let Some(b) = self.script.blake3 {
                    r.blake3 = b.to_vec();
                }
                let reply = vec![Frame::message(Cmd::OPEN, sid, flags::END, &r)];
                match &self.script.hold_open {
                    Some(gate) => Answer::Gated(gate.clone(), reply),
                    None => Answer::Frames(reply),
                }
            }
            Cmd::MANIFEST => {
                let req: msg::ManifestRequest = f.decode().unwrap();
                let path = &handles[req.handle as usize - 1];
                let file = self.file_at(path).unwrap();
                // As many CRCs as OPEN declared; those past the real file are 0.
                let total = self.script.declare.map_or(file.count(), |d| d.2);
                let end = req.first_chunk.saturating_add(req.count).min(total);
                let mut crc32: Vec<u32> = (req.first_chunk..end)
                    .map(|i| match i < file.count() {
                        true => crc32fast::hash(&file.chunk(i)),
                        false => 0,
                    })
                    .collect();
                let lie = self.script.manifest_lies.fetch_update(
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                    |n| n.checked_sub(1),
                );
                if lie.is_ok() && req.first_chunk == 0 && crc32.len() > 1 {
                    crc32[1] ^= 1;
                }
                let mut cvs: Vec<u8> = match (req.cvs, self.script.cvs) {
                    (false, _) | (true, CvsReply::Absent) => Vec::new(),
                    (true, _) => (req.first_chunk..end)
                        .flat_map(|i| {
                            fsd::integrity::chunk_cv(
                                &file.chunk(i),
                                i,
                                file.chunk_size,
                                file.size(),
                            )
                        })
                        .collect(),
                };
                if self.script.cvs == CvsReply::Short {
                    cvs.truncate(cvs.len().saturating_sub(32));
                }
                let r = msg::ManifestResponse {
                    first_chunk: req.first_chunk,
                    crc32,
                    cvs,
                };
                msg_reply(&|| r.encode_to_vec())
            }
            Cmd::READ => {
                let n = self.reads.fetch_add(1, Ordering::SeqCst);
                if self.script.reads_answered.is_some_and(|max| n >= max) {
                    return Answer::Silent;
                }
                let req: msg::ReadRequest = f.decode().unwrap();
                let path = &handles[req.handle as usize - 1];
                let file = self.file_at(path).unwrap();
                let cs = file.chunk_size as usize;
                let mut chunks: Vec<Bytes> = (req.first_chunk..req.first_chunk + req.count)
                    .map(|i| file.chunk(i))
                    .collect();
                match self.script.read {
                    ReadReply::Honest => {}
                    ReadReply::ExtraChunk => chunks.push(chunks[0].clone()),
                    ReadReply::WrongContent => {
                        for c in &mut chunks {
                            *c = c.iter().map(|b| b ^ 0x20).collect::<Vec<u8>>().into();
                        }
                    }
                    ReadReply::Junk => return Answer::Junk,
                    ReadReply::Silent => return Answer::Silent,
                    ReadReply::Flood => return Answer::Flood(sid, chunks, cs),
                }
                let n = chunks.len();
                let frames = chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let end = i + 1 == n;
                        Frame {
                            header: Header::data(
                                Cmd::READ,
                                sid,
                                c.len() as u32,
                                crc32fast::hash(&c),
                                end,
                            ),
                            payload: c,
                        }
                    })
                    .collect();
                match self.script.delay_first {
                    Some(d) if req.first_chunk == 0 => Answer::Delayed(d, frames),
                    _ => Answer::Frames(frames),
                }
            }
            Cmd::CLOSE => Answer::Frames(vec![Frame::message(
                Cmd::CLOSE,
                sid,
                flags::END,
                &msg::Ok {},
            )]),
            Cmd::CANCEL | Cmd::WRITE => Answer::Silent,
            _ => Answer::Frames(vec![Frame::error(
                f.cmd(),
                sid,
                &ErrorCode::UnknownCommand.msg("no"),
            )]),
        }
    }
}

enum Answer {
    Frames(Vec<Frame>),
    /// These frames, after a while.
    Delayed(Duration, Vec<Frame>),
    /// These frames, once the semaphore gives a permit (kept: one per reply).
    Gated(Arc<tokio::sync::Semaphore>, Vec<Frame>),
    Junk,
    Silent,
    /// On this stream: these chunks, then DATA frames of this length without end.
    Flood(u32, Vec<Bytes>, usize),
}

fn opts() -> fsc::Options {
    fsc::Options {
        retries: 1,
        backoff: Duration::from_millis(10),
        ..Default::default()
    }
}

async fn client(addr: SocketAddr) -> fsc::Client {
    fsc::Client::connect(&addr.to_string(), opts())
        .await
        .unwrap()
}

/// Deterministic, incompressible-enough test data.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Every path under `root`, relative, sorted.
fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

// Running the real fsc binary.

/// Runs the real `fsc` binary through `sh -c` (for `umask` and `ulimit`), bounded in time.
async fn fsc_sh(prelude: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = format!("{prelude}; exec {}", env!("CARGO_BIN_EXE_fsc"));
    for a in args {
        cmd.push_str(&format!(" '{a}'"));
    }
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("fsc finished within 2 minutes")
        .unwrap()
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Peak resident memory and outcome of one `fsc` run.
struct Measured {
    code: Option<i32>,
    peak_mib: u64,
    stderr: String,
}

/// Runs the real `fsc` binary with `args` and measures its peak RSS exactly (wait4's
/// ru_maxrss of that one child). It is killed after `limit` if still running. With
/// `unread_stdout` its stdout is a pipe nobody reads (a consumer that stalls).
// The child is reaped by wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
async fn fsc_measured(args: &[&str], limit: Duration, unread_stdout: bool) -> Measured {
    let tmp = tempfile::tempdir().unwrap();
    let err_path = tmp.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fsc"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(match unread_stdout {
            true => std::process::Stdio::piped(),
            false => std::process::Stdio::null(),
        })
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let unread = child.stdout.take();
    let (code, peak_kib) = tokio::task::spawn_blocking(move || {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let killer = std::thread::spawn(move || {
            if done_rx.recv_timeout(limit).is_err() {
                // SAFETY: signals our own child, which is not reaped yet (see below).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        // Wait for the exit without reaping (WNOWAIT), so the pid cannot be reused while the
        // killer may still signal it; then stop the killer, then reap with its rusage.
        // SAFETY: plain syscalls on our own child with out-pointers to locals.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            );
        }
        drop(done_tx);
        killer.join().unwrap();
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(r, pid);
        let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        (code, usage.ru_maxrss as u64)
    })
    .await
    .unwrap();
    drop(unread);
    eprintln!(
        "fsc {args:?}: exit {code:?}, peak RSS {} MiB",
        peak_kib / 1024
    );
    Measured {
        code,
        peak_mib: peak_kib / 1024,
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

/// The issue's bound: fsc's peak RSS whatever the server does.
const RSS_LIMIT_MIB: u64 = 256;

/// Runs `fsc ARGS` in a fresh 16 MiB tmpfs (its working directory, in a user and mount
/// namespace, so a real ENOSPC is near), then `after` there; `None` where this machine allows
/// no user namespaces.
async fn fsc_on_16_mib(args: &[&str], after: &str) -> Option<String> {
    let mnt = tempfile::tempdir().unwrap();
    let mut cmd = format!(
        "mount -t tmpfs -o size=16m tmpfs '{0}' && cd '{0}' && {1}",
        mnt.path().display(),
        env!("CARGO_BIN_EXE_fsc")
    );
    for a in args {
        cmd.push_str(&format!(" '{a}'"));
    }
    cmd.push_str(&format!(" 2>&1; echo \"rc=$?\"; {after}"));
    let out = tokio::process::Command::new("unshare")
        .args(["-Urm", "sh", "-c", &cmd])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("done within a minute")
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !text.contains("rc=") {
        eprintln!(
            "SKIPPED: no user namespace here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(text)
}

const CONTENT: &[u8] = b"hello";

#[tokio::test]
async fn names_that_escape_the_destination_are_refused() {
    let mut fake = Fake::new().dir("d", 0o755).file("d/ok", CONTENT, 1 << 20);
    for bad in ["../evil", "a/b", "..", "x\0y"] {
        fake = fake.file(&format!("d/{bad}"), CONTENT, 1 << 20);
    }
    let (addr, _) = fake.start().await;
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("inner").join("dest");
    let s = client
        .download_tree("d", &dest, &Default::default())
        .await
        .unwrap();
    assert_eq!(s.files, 1, "the honest file arrives");
    assert_eq!(std::fs::read(dest.join("ok")).unwrap(), CONTENT);
    // "../evil" and "a/b" are not children of "d" in the fake's tree walk: only those listed.
    assert!(!s.failed.is_empty(), "{:?}", s.failed);
    assert!(s
        .failed
        .iter()
        .all(|(_, e)| matches!(e, fsc::Error::UnsafeName(_))));
    assert_eq!(s.exit_code(), 2);
    // Nothing was written anywhere but `dest/ok`.
    assert_eq!(walk(tmp.path()), ["inner", "inner/dest", "inner/dest/ok"]);
}

/// A listing with names fsc refuses is incomplete: `--delete` then removes nothing, so a server
/// cannot make fsc delete local files by naming its own entries badly.
#[tokio::test]
async fn delete_removes_nothing_after_a_listing_with_refused_names() {
    let (addr, _) = Fake::new()
        .dir("d", 0o755)
        .file("d/ok", CONTENT, 1 << 20)
        .file("d/..", CONTENT, 1 << 20)
        .start()
        .await;
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("mine"), b"keep").unwrap();
    let sync = fsc::SyncOptions {
        delete: true,
        ..Default::default()
    };
    let s = client.download_tree("d", tmp.path(), &sync).await.unwrap();
    assert_eq!((s.files, s.deleted), (1, 0));
    assert!(
        s.failed.iter().any(|(p, _)| p == "--delete"),
        "{:?}",
        s.failed
    );
    assert_eq!(std::fs::read(tmp.path().join("mine")).unwrap(), b"keep");
}

#[tokio::test]
async fn a_reply_with_more_chunks_than_asked_is_refused() {
    let (addr, _) = Fake::new()
        .file("big", &data(5000, 1), 1024)
        .script(Script {
            read: ReadReply::ExtraChunk,
            ..Default::default()
        })
        .start()
        .await;
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    let err = client
        .download("big", &tmp.path().join("big"))
        .await
        .unwrap_err();
    assert!(matches!(err, fsc::Error::Protocol(_)), "{err}");
    assert!(!tmp.path().join("big").exists());
}

#[tokio::test]
async fn content_that_does_not_match_the_announced_hash_never_lands() {
    let (addr, _) = Fake::new()
        .file("ok", CONTENT, 1 << 20)
        .script(Script {
            read: ReadReply::WrongContent,
            ..Default::default()
        })
        .start()
        .await;
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    let err = client
        .download("ok", &tmp.path().join("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, fsc::Error::Integrity { .. }), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert_eq!(
        walk(tmp.path()),
        Vec::<String>::new(),
        "nothing left behind"
    );
}

/// Item 1: fsc's working files never share a name with the user's or the server's files.
#[tokio::test]
async fn remote_names_like_fscs_own_transfer_like_any_other() {
    let big = data(5000, 2);
    let part = b"31 bytes of a file named .part!".to_vec();
    let state = br#"{"version":1,"not":"fsc's"}"#.to_vec();
    let (addr, _) = Fake::new()
        .dir("d", 0o755)
        .file("d/big", &big, 1024)
        .file("d/big.fsc-part", &part, 1024)
        .file("d/big.fsc-state", &state, 1024)
        .file("d/big.fsc-state.tmp", b"t", 1024)
        // fsc's working directory's own name, as a multi-chunk file.
        .file("d/.fsc-work", &big[..3000], 1024)
        .start()
        .await;
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let s = client
        .download_tree("d", &dest, &Default::default())
        .await
        .unwrap();
    assert_eq!((s.files, s.exit_code()), (5, 0), "{:?}", s.failed);
    assert!(std::fs::read(dest.join(".fsc-work")).unwrap() == big[..3000]);
    assert!(std::fs::read(dest.join("big")).unwrap() == big, "big");
    assert!(std::fs::read(dest.join("big.fsc-part")).unwrap() == part);
    assert!(std::fs::read(dest.join("big.fsc-state")).unwrap() == state);
    assert!(std::fs::read(dest.join("big.fsc-state.tmp")).unwrap() == b"t");
    // A single-file download beside a user's file of that name leaves it alone.
    std::fs::write(tmp.path().join("big.fsc-part"), b"mine").unwrap();
    client.download("d/big", tmp.path()).await.unwrap();
    assert!(std::fs::read(tmp.path().join("big")).unwrap() == big);
    assert!(std::fs::read(tmp.path().join("big.fsc-part")).unwrap() == b"mine");
    client.download("d/.fsc-work", tmp.path()).await.unwrap();
    assert!(std::fs::read(tmp.path().join(".fsc-work")).unwrap() == big[..3000]);
    // Nothing of fsc's is left: only what was downloaded, and the user's file.
    let mut names = walk(tmp.path());
    names.retain(|n| !n.starts_with("dest"));
    assert_eq!(names, [".fsc-work", "big", "big.fsc-part"]);
}

/// Item 2: a declared size whose chunk count does not fit the protocol's maximum is refused,
/// whatever the server claims the count is (2^42 bytes in 1 KiB chunks wraps a u32 to 0).
#[tokio::test]
async fn a_chunk_count_that_wraps_is_refused() {
    for declare in [
        (1u64 << 42, 1024, 0),
        (1 << 42, 1024, u32::MAX),
        (1 << 31, 1024, 1 << 21),
    ] {
        let (addr, _) = Fake::new()
            .file("big", &data(5000, 3), 1024)
            .script(Script {
                declare: Some(declare),
                // What a file of the wrapped count (0 chunks) would hash to.
                blake3: Some(*blake3::hash(b"").as_bytes()),
                read: ReadReply::Silent,
                ..Default::default()
            })
            .start()
            .await;
        let client = client(addr).await;
        let tmp = tempfile::tempdir().unwrap();
        let r = client.download("big", &tmp.path().join("big")).await;
        let err = r.expect_err("a wrapped chunk count must not download");
        assert!(matches!(err, fsc::Error::Protocol(_)), "{err}");
        assert_eq!(walk(tmp.path()), Vec::<String>::new(), "{declare:?}");
    }
}

/// Item 3: resume state that disagrees with the server's manifest does not win over it.
#[tokio::test]
async fn a_failed_download_does_not_poison_the_next_run() {
    let big = data(5000, 4);
    let lies = Arc::new(AtomicU32::new(1));
    let (addr, _) = Fake::new()
        .file("big", &big, 1024)
        .script(Script {
            manifest_lies: lies.clone(),
            ..Default::default()
        })
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("big");
    let err = client(addr).await.download("big", &dest).await.unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    assert_eq!(lies.load(Ordering::SeqCst), 0, "the lie was told");
    // The server is honest now: the rerun must succeed.
    client(addr).await.download("big", &dest).await.unwrap();
    assert!(std::fs::read(&dest).unwrap() == big);
}

/// Chunk delta (issue 16): the old local version's current chunks are kept by the server's
/// chaining values, or by CRC32 from a server that sends none; chaining values of the wrong
/// length are a protocol error that leaves the old file as it was.
#[tokio::test]
async fn the_chunk_delta_trusts_only_well_formed_chaining_values() {
    let new = data(8 * 1024, 6);
    let mut old = new.clone();
    old[2 * 1024 + 5] ^= 1;
    for (cvs, kept) in [
        (CvsReply::Honest, true),
        (CvsReply::Absent, true),
        (CvsReply::Short, false),
    ] {
        let (addr, _) = Fake::new()
            .file("big", &new, 1024)
            .script(Script {
                cvs,
                ..Default::default()
            })
            .start()
            .await;
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("big");
        std::fs::write(&dest, &old).unwrap();
        let r = client(addr).await.download("big", &dest).await;
        match kept {
            true => {
                let t = r.unwrap();
                assert_eq!(t.transferred, 1024, "only chunk 2 moved");
                assert!(std::fs::read(&dest).unwrap() == new);
            }
            false => {
                let err = r.unwrap_err();
                assert!(matches!(err, fsc::Error::Protocol(_)), "{err}");
                assert!(std::fs::read(&dest).unwrap() == old, "old file untouched");
            }
        }
    }
}

/// Item 4: directories that existed are left alone; what fsc creates gets the server's mode
/// less the umask, or exactly with -p (never setuid/setgid/sticky).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_directories_keep_their_mode_and_created_ones_honour_the_umask() {
    let (addr, _) = Fake::new()
        .mode("", 0o000)
        .dir("d", 0o7777)
        .dir("d/sub", 0o777)
        .file("d/f", b"f", 1024)
        .mode("d/f", 0o4777)
        .file("d/sub/g", &data(3000, 5), 1024)
        .mode("d/sub/g", 0o777)
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::open(&dest)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let server = addr.to_string();
    let d = dest.display().to_string();
    let out = fsc_sh("umask 027", &["download", "-r", &server, "d", &d]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        mode_of(&dest),
        0o700,
        "an existing directory keeps its mode"
    );
    // Its mtime moves as entries are created in it (as with tar or cp), but never to the
    // server's (1 s after the epoch).
    let mtime = std::fs::metadata(&dest).unwrap().modified().unwrap();
    assert!(mtime > old, "{mtime:?}");
    assert_eq!(mode_of(&dest.join("sub")), 0o750);
    assert_eq!(mode_of(&dest.join("f")), 0o750);
    assert_eq!(mode_of(&dest.join("sub/g")), 0o750);

    // The current directory as the destination ("fsc download -r H d ."): the root's mode
    // (000 on this server) is not applied to it.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let before = mode_of(&cwd);
    let c = cwd.display().to_string();
    let out = fsc_sh(&format!("cd '{c}'"), &["download", "-r", &server, "", "."]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&cwd), before);

    // -p: exact modes for what is created, still never the special bits.
    let exact = tmp.path().join("exact");
    let e = exact.display().to_string();
    let out = fsc_sh("umask 077", &["download", "-r", "-p", &server, "d", &e]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&exact), 0o777);
    assert_eq!(mode_of(&exact.join("f")), 0o777);
    assert_eq!(mode_of(&exact.join("sub/g")), 0o777);
}

/// Item 6: a tree of more directories than the descriptor limit downloads completely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_wider_than_the_descriptor_limit_downloads() {
    let mut fake = Fake::new().dir("t", 0o755);
    for i in 0..1500 {
        fake = fake.dir(&format!("t/d{i:04}"), 0o755).file(
            &format!("t/d{i:04}/f"),
            format!("file {i}").as_bytes(),
            1024,
        );
    }
    let (addr, _) = fake.start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let (server, d) = (addr.to_string(), dest.display().to_string());
    let out = fsc_sh(
        "ulimit -n 1024",
        &["download", "-r", "-j", "4", &server, "t", &d],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in [0, 777, 1499] {
        let got = std::fs::read(dest.join(format!("d{i:04}/f"))).unwrap();
        assert_eq!(got, format!("file {i}").as_bytes());
    }
    assert_eq!(walk(&dest).len(), 3000);
}

/// Item 8: frames on streams fsc never opened do not count as progress: the stall watchdog
/// still fires when the READ it waits for gets no answer.
#[tokio::test]
async fn junk_on_unopened_streams_does_not_hold_off_the_stall_watchdog() {
    let (addr, _) = Fake::new()
        .file("big", &data(5000, 6), 1024)
        .script(Script {
            read: ReadReply::Junk,
            ..Default::default()
        })
        .start()
        .await;
    // Retries allowed: a server that answers only with junk is not retried.
    let client = fsc::Client::connect(
        &addr.to_string(),
        fsc::Options {
            retries: 5,
            stall_timeout: Duration::from_secs(2),
            ..opts()
        },
    )
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        client.download("big", &tmp.path().join("big")),
    )
    .await
    .expect("fsc gave up on the stalled READ instead of hanging");
    assert!(
        matches!(&r, Err(fsc::Error::Protocol(m)) if m.contains("only frames")),
        "{r:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

/// Item 9: a flood of junk frames is reported once and then summarized, not one line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_frames_are_summarized_in_the_log() {
    let (addr, _) = Fake::new()
        .file("big", &data(5000, 7), 1024)
        .script(Script {
            read: ReadReply::Junk,
            ..Default::default()
        })
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let (server, dest) = (addr.to_string(), tmp.path().join("big"));
    let args = ["--retries", "0", "--stall-timeout", "3"];
    let d = dest.display().to_string();
    let out = fsc_sh(
        "true",
        &[&args[..], &["download", &server, "big", &d]].concat(),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a server that only sends junk: protocol violation"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = stderr.lines().count();
    eprintln!("{lines} lines of stderr:\n{stderr}");
    // About 1,000 junk frames arrive in those 3 s.
    assert!(lines < 10, "{lines} lines:\n{stderr}");
    assert!(stderr.contains("on streams that"), "{stderr}");
}

/// Item 10: names, link targets and messages from the server never reach the terminal raw;
/// NDJSON carries them exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_strings_are_escaped_when_printed() {
    let evil = "e\x1b[2Jvil\u{202e}txt\u{9b}\x07";
    let mut fake = Fake::new()
        .dir("d", 0o755)
        .file(&format!("d/{evil}"), b"x", 1024);
    fake.nodes
        .insert("d/link".into(), Node::Symlink("\x1b]0;pwned\x07".into()));
    let (addr, _) = fake.start().await;
    let server = addr.to_string();
    let raw = |s: &str| {
        s.chars()
            .any(|c| c.is_control() && c != '\n' || c == '\u{202e}')
    };

    let out = fsc_sh("true", &["ls", &server, "d"]).await;
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!raw(&stdout), "{stdout:?}");
    assert!(
        stdout.contains(r"e\x1b[2Jvil\u{202e}txt\u{009b}\x07"),
        "{stdout}"
    );
    assert!(stdout.contains(r"-> \x1b]0;pwned\x07"), "{stdout}");

    let out = fsc_sh("true", &["--json", "ls", &server, "d"]).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!raw(&stdout), "{stdout:?}");
    let names: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(names.iter().any(|n| n == evil), "exact in JSON: {names:?}");

    // An error message quoting a server string.
    let out = fsc_sh("true", &["stat", &server, &format!("d/x{evil}")]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!raw(&stderr), "{stderr:?}");
    assert!(stderr.contains(r"\x1b[2J"), "{stderr}");
}

/// Item 7: sizes and chunk counts a server declares never size fsc's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_sizes_do_not_size_memory() {
    // 1 PiB in 2^26 chunks of 16 MiB (over the chunk-count limit), and the most chunks the
    // protocol allows, 2^20 (of 1 KiB), which fsc must be able to track within the bound.
    for declare in [
        (1u64 << 50, 1u32 << 24, 1u32 << 26),
        (1 << 30, 1024, 1 << 20),
    ] {
        let (addr, _) = Fake::new()
            .file("big", &data(5000, 8), 1024)
            .script(Script {
                declare: Some(declare),
                read: ReadReply::Silent,
                ..Default::default()
            })
            .start()
            .await;
        let tmp = tempfile::tempdir().unwrap();
        let (server, d) = (
            addr.to_string(),
            tmp.path().join("big").display().to_string(),
        );
        let args = [
            "--retries",
            "0",
            "--stall-timeout",
            "2",
            "download",
            &server,
            "big",
            &d,
        ];
        let m = fsc_measured(&args, Duration::from_secs(60), false).await;
        assert!(
            m.code.is_some_and(|c| c != 0),
            "{declare:?}: {:?} {}",
            m.code,
            m.stderr
        );
        assert!(
            m.peak_mib <= RSS_LIMIT_MIB,
            "{declare:?}: {} MiB",
            m.peak_mib
        );
    }
}

/// Item 7: a listing without end: `ls` streams it, a tree download stops at its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_listing_does_not_exhaust_memory() {
    let (addr, _) = Fake::new()
        .dir("d", 0o755)
        .script(Script {
            endless_list: true,
            ..Default::default()
        })
        .start()
        .await;
    let server = addr.to_string();
    let m = fsc_measured(&["ls", &server, "d"], Duration::from_secs(5), false).await;
    assert_eq!(m.code, None, "still listing when killed: {}", m.stderr);
    assert!(m.peak_mib <= RSS_LIMIT_MIB, "ls: {} MiB", m.peak_mib);

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d").display().to_string();
    let m = fsc_measured(
        &["download", "-r", &server, "d", &d],
        Duration::from_secs(120),
        false,
    )
    .await;
    assert_eq!(m.code, Some(1), "refused as too big: {}", m.stderr);
    assert!(m.stderr.contains("entries"), "{}", m.stderr);
    assert!(
        m.peak_mib <= RSS_LIMIT_MIB,
        "download -r: {} MiB",
        m.peak_mib
    );
}

/// Item 7: a tree without a bottom (255-byte names, one level under another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bottomless_tree_does_not_exhaust_memory() {
    let (addr, _) = Fake::new()
        .dir("deep", 0o755)
        .script(Script {
            bottomless: true,
            ..Default::default()
        })
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let (server, d) = (addr.to_string(), tmp.path().join("d").display().to_string());
    let args = ["download", "-r", &server, "deep", &d];
    let m = fsc_measured(&args, Duration::from_secs(120), false).await;
    assert!(m.code.is_some(), "finished by itself: {}", m.stderr);
    assert_ne!(m.code, Some(0));
    assert!(m.peak_mib <= RSS_LIMIT_MIB, "{} MiB", m.peak_mib);
    // It stopped where remote paths reach the protocol's 4096 bytes: 16 levels of 256.
    let levels = walk(&tmp.path().join("d")).len();
    assert!(levels <= 16, "{levels} levels created");
    assert!(m.stderr.contains("longer than 4096"), "{}", m.stderr);
}

/// Item 7: READ answered with DATA without end while fsc's stdout is not being read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_data_than_asked_is_not_buffered() {
    // Four chunks: one READ, so the one lane that reads it is the one stuck on stdout.
    let (addr, _) = Fake::new()
        .file("big", &data(4 << 20, 9), 1 << 20)
        .script(Script {
            read: ReadReply::Flood,
            ..Default::default()
        })
        .start()
        .await;
    let server = addr.to_string();
    let m = fsc_measured(
        &["download", &server, "big", "-"],
        Duration::from_secs(8),
        true,
    )
    .await;
    assert!(m.peak_mib <= RSS_LIMIT_MIB, "{} MiB", m.peak_mib);

    // To a file: the connection is dropped as soon as the server oversteps.
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        client.download("big", &tmp.path().join("big")),
    )
    .await
    .expect("no hang");
    assert!(r.is_err(), "{r:?}");
    assert!(!tmp.path().join("big").exists());
}

/// Item 7: `-j 4` to stdout with the largest chunks, while the first chunk is held back: what
/// waits for it is bounded in bytes, not in chunks of a size the server chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_reorder_buffer_is_bounded_in_bytes() {
    let (addr, _) = Fake::new()
        .synthetic("big", 32 << 24, 1 << 24)
        .script(Script {
            delay_first: Some(Duration::from_secs(60)),
            ..Default::default()
        })
        .start()
        .await;
    let server = addr.to_string();
    let args = ["download", "-j", "4", &server, "big", "-"];
    let m = fsc_measured(&args, Duration::from_secs(15), false).await;
    assert!(m.peak_mib <= RSS_LIMIT_MIB, "{} MiB", m.peak_mib);
}

/// Item 7: a Hello chunk size of 2^31 does not make a 1 GiB upload one PUT held in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_hello_chunk_size_does_not_read_a_file_into_memory() {
    let (addr, _) = Fake::new()
        .script(Script {
            hello_chunk: Some(1 << 31),
            ..Default::default()
        })
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("sparse");
    // A sparse 1 GiB file: no disk used, reads as zeros.
    std::fs::File::create(&src)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let (server, s) = (addr.to_string(), src.display().to_string());
    let args = ["--retries", "0", "upload", &server, &s, "up"];
    let m = fsc_measured(&args, Duration::from_secs(60), false).await;
    assert!(
        m.code.is_some_and(|c| c != 0),
        "the fake takes no uploads: {}",
        m.stderr
    );
    assert!(m.peak_mib <= RSS_LIMIT_MIB, "{} MiB", m.peak_mib);
}

/// Item 5: a declared size beyond the free space fails at once and clearly, reserving nothing;
/// a download that fails half way keeps what arrived and gives back what it had reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_space_is_checked_and_never_left_reserved() {
    let (addr, _) = Fake::new()
        .file("big", &data(5000, 10), 1 << 20)
        .script(Script {
            declare: Some((64 << 20, 1 << 20, 64)),
            read: ReadReply::Silent,
            ..Default::default()
        })
        .start()
        .await;
    let server = addr.to_string();
    let args = [
        "--retries",
        "0",
        "--stall-timeout",
        "2",
        "download",
        &server,
        "big",
    ];
    let Some(out) = fsc_on_16_mib(&args, "ls -A; df -k . | tail -1").await else {
        return;
    };
    assert!(out.contains("rc=1"), "{out}");
    assert!(out.contains("not enough free space"), "{out}");
    let after = out.split_once("rc=1\n").unwrap().1;
    let listing: Vec<&str> = after.lines().filter(|l| !l.starts_with("tmpfs")).collect();
    assert!(listing.is_empty(), "nothing left behind: {out}");

    // 8 MiB fits; the server answers one READ (4 of 8 chunks), then goes silent.
    let big = data(8 << 20, 11);
    let (addr, _) = Fake::new()
        .file("big", &big, 1 << 20)
        .script(Script {
            reads_answered: Some(1),
            ..Default::default()
        })
        .start()
        .await;
    let server = addr.to_string();
    let args = [
        "--retries",
        "0",
        "--stall-timeout",
        "2",
        "download",
        &server,
        "big",
    ];
    let Some(out) = fsc_on_16_mib(&args, "du -sk .fsc-work").await else {
        return;
    };
    assert!(out.contains("rc=4"), "stalled: {out}");
    let kib: u64 = out
        .lines()
        .find(|l| l.ends_with(".fsc-work"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the part is kept for a resume: {out}"));
    // 4 MiB received (and a small state file); not the 8 MiB reserved.
    assert!((4096..5000).contains(&kib), "{kib} KiB allocated: {out}");
}

/// A retryable error the server still gives after fsc's retries (here: its disk is full) is
/// a remote error, exit 2, not "connection failed" (4), which it was (review D, stop 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_remote_error_that_outlasts_the_retries_exits_2() {
    let (addr, _) = Fake::new()
        .script(Script {
            refuse_writes: Some(ErrorCode::NoSpace),
            ..Default::default()
        })
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("f");
    std::fs::write(&src, vec![1u8; 3 << 20]).unwrap();
    let (server, s) = (addr.to_string(), src.display().to_string());
    let args = ["--retries", "1", "upload", &server, &s, "up"];
    let m = fsc_measured(&args, Duration::from_secs(60), false).await;
    assert_eq!(m.code, Some(2), "{}", m.stderr);
    assert!(m.stderr.contains("no space"), "{}", m.stderr);
}

/// Item 7: an upload in the largest chunks a server may choose, with `-j 4` and no WRITE ever
/// acknowledged: chunks in memory are bounded by the windows and the read-ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_the_largest_chunks_stays_within_memory() {
    let (addr, _) = Fake::new()
        .script(Script {
            upload_chunk: Some(1 << 24),
            ..Default::default()
        })
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("sparse");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let (server, s) = (addr.to_string(), src.display().to_string());
    let args = [
        "--retries",
        "0",
        "--stall-timeout",
        "4",
        "upload",
        "-j",
        "4",
        &server,
        &s,
        "up",
    ];
    let m = fsc_measured(&args, Duration::from_secs(60), false).await;
    assert_eq!(m.code, Some(4), "stalled: {}", m.stderr);
    assert!(m.peak_mib <= RSS_LIMIT_MIB, "{} MiB", m.peak_mib);
}

/// Items 1-3, as a class: whatever a server declares about a file, fsc exits 0 only with a
/// file that has exactly the declared size and hash — here never, since every declaration
/// below is a lie about the same 5000 bytes — and leaves nothing under the final name.
#[tokio::test]
async fn no_declaration_makes_a_wrong_file_land() {
    let real = data(5000, 12);
    let empty = *blake3::hash(b"").as_bytes();
    type Lie = (Option<(u64, u32, u32)>, Option<[u8; 32]>);
    let cases: Vec<Lie> = vec![
        (Some((5000, 1 << 31, 1)), None), // chunk size beyond the frame limit
        (Some((5000, 1000, 5)), None),    // not a power of two
        (Some((5000, 512, 10)), None),    // below the minimum
        (Some((6000, 1024, 6)), None),    // longer than what is served
        (Some((4000, 1024, 4)), None),    // shorter than what is served
        (Some((0, 1024, 0)), Some([7; 32])), // empty, with a wrong hash
        (Some((1 << 40, 1024, 0)), Some(empty)), // a wrapped count
        (Some((5000, 1024, 4)), None),    // a count that does not match the size
        (None, Some(empty)),              // honest sizes, wrong hash
    ];
    for (declare, blake3) in cases {
        let (addr, _) = Fake::new()
            .file("f", &real, 1024)
            .script(Script {
                declare,
                blake3,
                ..Default::default()
            })
            .start()
            .await;
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("f");
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            client(addr).await.download("f", &dest),
        )
        .await
        .expect("no hang");
        assert!(r.is_err(), "{declare:?} {blake3:?}: {r:?}");
        assert!(!dest.exists(), "{declare:?}: nothing under the final name");
    }
}

/// A server that takes requests and answers none: one stall is retried (the network may have
/// gone quiet), a second in a row without progress ends it, whatever --retries allows.
#[tokio::test]
async fn a_server_that_answers_nothing_is_given_up_after_two_stalls() {
    let (addr, _) = Fake::new()
        .file("big", &data(5000, 13), 1024)
        .script(Script {
            read: ReadReply::Silent,
            ..Default::default()
        })
        .start()
        .await;
    let client = fsc::Client::connect(
        &addr.to_string(),
        fsc::Options {
            retries: 5,
            stall_timeout: Duration::from_secs(1),
            ..opts()
        },
    )
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        client.download("big", &tmp.path().join("big")),
    )
    .await
    .expect("no hang");
    assert!(matches!(r, Err(fsc::Error::Stalled(_))), "{r:?}");
    // Two stalls of 1 s and one short backoff; six of each before.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// Item 10, on a terminal: progress bars and the lines printed between them (skips, errors,
/// the final failures) escape what the server named. Runs fsc under `script` for a pty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_strings_are_escaped_on_a_terminal() {
    let osc = "\x1b]0;pwned\x07";
    let mut fake =
        Fake::new()
            .dir("d", 0o755)
            .file(&format!("d/f{osc}\u{202e}"), &data(3000, 14), 1024);
    fake.nodes
        .insert(format!("d/l{osc}\u{202e}"), Node::Symlink("t".into()));
    // A name fsc refuses, reported as an error line.
    fake = fake.file("d/x\0\u{202e}", b"x", 1024);
    let (addr, _) = fake.start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} download -r {} d '{}'",
        env!("CARGO_BIN_EXE_fsc"),
        addr,
        tmp.path().join("d").display()
    );
    let run = tokio::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("done within a minute");
    let Ok(out) = out else {
        eprintln!("SKIPPED: no `script` (util-linux) for a pty");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("skipped"),
        "bars mode printed the skip: {text:?}"
    );
    assert!(!text.contains(osc), "raw OSC sequence: {text:?}");
    assert!(!text.contains('\u{202e}'), "raw bidi override: {text:?}");
    assert!(!text.contains('\0'), "raw NUL: {text:?}");
    assert!(text.contains(r"\x1b]0;pwned\x07"), "{text:?}");
    // The file itself arrived under its exact name.
    assert!(tmp
        .path()
        .join("d")
        .join(format!("f{osc}\u{202e}"))
        .exists());
}

/// `-l` copies only links that resolve inside the tree through any other links the server
/// lists: `a/l -> ..` (the top) is fine, `a/up -> l/../x` is the top's parent by way of it
/// and is skipped, as are `m -> n/..` with `n -> .`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_links_cannot_point_out_of_the_tree() {
    let mut fake = Fake::new()
        .dir("d", 0o755)
        .dir("d/a", 0o755)
        .file("d/f", b"inside", 1024);
    for (name, target) in [
        ("d/a/l", ".."),
        ("d/a/up", "l/../x"),
        ("d/n", "."),
        ("d/m", "n/.."),
    ] {
        fake.nodes.insert(name.into(), Node::Symlink(target.into()));
    }
    let (addr, _) = fake.start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let d = dest.display().to_string();
    let out = fsc_sh(
        "true",
        &["download", "-r", "-l", &addr.to_string(), "d", &d],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_link(dest.join("a/l")).unwrap(),
        std::path::Path::new("..")
    );
    assert_eq!(
        std::fs::read_link(dest.join("n")).unwrap(),
        std::path::Path::new(".")
    );
    for skipped in ["a/up", "m"] {
        assert!(
            std::fs::symlink_metadata(dest.join(skipped)).is_err(),
            "{skipped} was created"
        );
    }
}

#[tokio::test]
async fn a_dry_run_writes_nothing_whatever_the_server_answers() {
    // STAT says directory (so there is nothing to compare), OPEN finds a file: a dry run must
    // still not download it over the local file.
    let body = data(3 << 20, 9);
    let script = Script {
        stat_says_dir: true,
        ..Default::default()
    };
    let (addr, _) = Fake::new()
        .file("x.bin", &body, 1 << 20)
        .script(script)
        .start()
        .await;
    let client = client(addr).await;
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("x.bin");
    std::fs::write(&local, b"my precious local data").unwrap();
    let sync = fsc::SyncOptions {
        dry_run: true,
        ..Default::default()
    };
    let r = client
        .download_sync("x.bin", fsc::Dest::Path(local.clone()), &sync)
        .await;
    let now = std::fs::read(&local).unwrap();
    assert!(
        now == b"my precious local data",
        "a dry run wrote the local file: {} bytes now ({:?})",
        now.len(),
        r.map(|t| t.map(|t| t.bytes))
    );
    assert_eq!(walk(tmp.path()), ["x.bin"], "a dry run left files behind");
}

#[tokio::test]
async fn a_client_built_for_a_dry_run_refuses_every_write() {
    // The entry points that write (a download into a file, an upload) refuse on a client made
    // with Options::dry_run, whatever its caller decided.
    let body = data(3 << 20, 10);
    let (addr, _) = Fake::new().file("x.bin", &body, 1 << 20).start().await;
    let opts = fsc::Options {
        dry_run: true,
        ..opts()
    };
    let client = fsc::Client::connect(&addr.to_string(), opts).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("x.bin");
    std::fs::write(&local, b"my precious local data").unwrap();
    let r = client.download("x.bin", &local).await;
    assert!(
        matches!(r, Err(fsc::Error::Usage(_))),
        "{:?}",
        r.map(|t| t.bytes)
    );
    let sync = fsc::SyncOptions::default();
    let r = client
        .download_sync("x.bin", fsc::Dest::Path(local.clone()), &sync)
        .await;
    assert!(matches!(r, Ok(None)), "{:?}", r.map(|t| t.map(|t| t.bytes)));
    assert_eq!(std::fs::read(&local).unwrap(), b"my precious local data");
    assert_eq!(walk(tmp.path()), ["x.bin"], "a dry run left files behind");
    let r = client
        .upload(&local, "y.bin", &fsc::UploadOptions::default())
        .await;
    assert!(
        matches!(r, Err(fsc::Error::Usage(_))),
        "{:?}",
        r.map(|t| t.bytes)
    );
}

/// fsc's bytes read so far (`rchar` of /proc/PID/io: every read(2), files and sockets).
fn bytes_read(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_stamps_the_servers_mtime_only_on_what_it_verified() {
    // `-c` finds the local file equal by BLAKE3 and gives it the server's mtime, so later quick
    // checks agree without hashing. A local edit after the file was read (here: while fsc
    // waits for the server's hash, held until the edit is made) must not be stamped: a stamped
    // edit looks unchanged to every later quick check.
    use std::os::unix::fs::{FileExt, MetadataExt};
    let body = data(16 << 20, 7);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let script = Script {
        hold_open: Some(gate.clone()),
        ..Default::default()
    };
    let (addr, _) = Fake::new()
        .file("h.bin", &body, 1 << 20)
        .script(script)
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("h.bin");
    // Same size as the server's, another mtime: -c decides by hashing.
    std::fs::write(&local, &body).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fsc"))
        .args([
            "-q",
            "download",
            "-c",
            "-j",
            "1",
            &addr.to_string(),
            "h.bin",
        ])
        .arg(&local)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    // Until fsc has read the whole local file (its OPEN is held meanwhile), at most a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let size = u64::try_from(body.len()).unwrap();
    while bytes_read(pid) < size && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&local)
        .unwrap()
        .write_all_at(b"LOCAL EDIT", 0)
        .unwrap();
    gate.add_permits(1000);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("fsc finished within 2 minutes")
        .unwrap();
    let now = std::fs::read(&local).unwrap();
    let md = std::fs::metadata(&local).unwrap();
    let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    assert!(
        now == body || mtime_ns != 1_000_000_000,
        "the edited file was stamped with the server's mtime ({}; stderr: {})",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
