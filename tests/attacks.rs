#![allow(clippy::disallowed_methods)]
//! The attack suite (issue 6 item 3): a table of hostile requests against real `fsd` processes.
//!
//! Every case asserts the refusal (the exact [`ErrorCode`], or a closed connection where that is
//! the contract) *and* that nothing was harmed: after each case the directory beside the root
//! (`outside/`, holding the sentinel `secret`) is snapshotted and compared with its state before
//! the attack (kind, inode, size, mtime, mode and contents of every entry, so anything created,
//! removed or changed outside the root is caught), `/etc/passwd` is unchanged (fsd runs as root
//! here, so an escape would not be stopped by file permissions), and a fresh authenticated
//! connection can still STAT a known file. Every case runs; the test then fails listing every
//! failing case by name.
//!
//! Test fixtures are made with std::fs on purpose (hence the lint allowance above).
//!
//! Cases that need a server of their own (auth penalties, auth timeout, BUG probes) start one;
//! the others share one server per table. The tests at the end of the file began as probes of
//! bugs this suite found (setuid bits, the state directory through a symlink, unauthenticated
//! DATA buffering, huge declared uploads); they now assert the fixes.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame, Header, MAGIC, MAX_CONTROL_PAYLOAD};
use fsd::server::{MAX_FRAME, MAX_HANDLES, MAX_STREAMS};
use prost::Message;

/// `ensure!(cond, "fmt", args)`: return `Err(message)` from a case unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Credentials in the token file besides the harness's read-write `TOKEN` (named "admin").
const RO_TOKEN: &str = "reader-token-0123456789abcdef";
const TEAM_TOKEN: &str = "team-token-0123456789abcdef";
const TEAM_RO_TOKEN: &str = "teamro-token-0123456789abcdef";
/// Contents of the sentinel file outside the root.
const SECRET: &str = "OUTSIDE-SECRET";
/// Contents of the outside file that root/hard is a hard link to.
const HARD: &str = "HARDLINKED-OUTSIDE";
/// A file in the root that RENAME-to attacks use as their source: it must never move.
const VICTIM: &str = "victim.txt";
/// The destination RENAME-from attacks use: it must never appear.
const RENAMED: &str = "renamed-by-attack";

// ---------------------------------------------------------------------------------------------
// The environment: root/ and outside/ side by side in one temp dir, and an fsd serving root/.
// ---------------------------------------------------------------------------------------------

struct Env {
    _tmp: tempfile::TempDir,
    /// The temp dir holding root/, outside/ and the token file.
    top: PathBuf,
    root: PathBuf,
    out: PathBuf,
    fsd: Fsd,
    passwd: Vec<u8>,
}

impl Env {
    /// root/ with files, symlinks (to outside, to /proc, a loop), a hard link to an outside file, a
    /// FIFO and a 16 MiB file; outside/ with the sentinel; fsd with four credentials.
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().to_path_buf();
        let root = top.join("root");
        let out = top.join("outside");
        for d in ["a/b", "team", "public"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::create_dir_all(out.join("dir")).unwrap();
        std::fs::write(root.join("known.txt"), "known").unwrap();
        std::fs::write(root.join(VICTIM), "victim").unwrap();
        std::fs::write(root.join("team").join(VICTIM), "victim").unwrap();
        std::fs::write(root.join("a/b/file.txt"), "file").unwrap();
        std::fs::write(root.join("team/t.txt"), "team").unwrap();
        std::fs::write(root.join("public/p.txt"), "public").unwrap();
        std::fs::write(out.join("secret"), SECRET).unwrap();
        std::fs::write(out.join("dir/secret"), SECRET).unwrap();
        std::fs::write(out.join("hardsrc"), HARD).unwrap();
        let link = |target: &Path, at: &str| std::os::unix::fs::symlink(target, root.join(at));
        link(&out.join("secret"), "lnk_file").unwrap();
        link(Path::new("../outside/secret"), "lnk_file_rel").unwrap();
        link(&out.join("dir"), "lnk_dir").unwrap();
        link(Path::new("../../outside/dir"), "a/lnk_dir_rel").unwrap();
        link(Path::new("../public"), "team/esc").unwrap();
        link(&root.join("public"), "team/abs").unwrap();
        link(Path::new("/proc/self/root"), "proc_root").unwrap();
        link(Path::new("/proc/self/fd/0"), "proc_fd0").unwrap();
        link(Path::new("/proc/self"), "proc_self").unwrap();
        link(
            Path::new("../../../../../../../../../../proc/self/root"),
            "proc_climb",
        )
        .unwrap();
        link(Path::new("loop"), "loop").unwrap();
        std::fs::hard_link(out.join("hardsrc"), root.join("hard")).unwrap();
        nix::unistd::mkfifo(
            &root.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        write_random(&root.join("big16"), 16 << 20, 16);
        let tokens = top.join("tokens");
        std::fs::write(
            &tokens,
            [
                format!("admin {TOKEN} rw"),
                format!("reader {RO_TOKEN} read"),
                format!("team {TEAM_TOKEN} rw team"),
                format!("teamro {TEAM_RO_TOKEN} read team/"),
            ]
            .join("\n"),
        )
        .unwrap();
        let fsd = Fsd::start_on(&root, &["--token-file", tokens.to_str().unwrap()]);
        Env {
            _tmp: tmp,
            top,
            root,
            out,
            fsd,
            passwd: std::fs::read("/etc/passwd").unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.fsd.addr
    }

    fn admin(&self) -> Result<Raw, String> {
        authed_as(self.addr(), TOKEN, 0)
    }

    fn as_token(&self, token: &str) -> Result<Raw, String> {
        authed_as(self.addr(), token, 0)
    }

    /// The checks run after every case.
    fn unharmed(&self, before: &Snapshot) -> Result<(), String> {
        let after = snapshot(&self.top);
        if after != *before {
            return Err(format!(
                "something outside the root changed: {}",
                diff(before, &after)
            ));
        }
        let secret = std::fs::read_to_string(self.out.join("secret")).unwrap_or_default();
        ensure!(secret == SECRET, "sentinel changed: {secret:?}");
        ensure!(
            std::fs::read("/etc/passwd").ok().as_ref() == Some(&self.passwd),
            "/etc/passwd changed"
        );
        ensure!(
            std::fs::read_to_string(self.root.join(VICTIM))
                .ok()
                .as_deref()
                == Some("victim"),
            "{VICTIM} moved or changed"
        );
        ensure!(
            std::fs::symlink_metadata(self.root.join(RENAMED)).is_err(),
            "{RENAMED} appeared"
        );
        let state = std::fs::read_to_string(format!("/proc/{}/stat", self.fsd.pid()))
            .map_err(|e| format!("fsd is gone: {e}"))?;
        let st = state.rsplit(')').next().unwrap_or("").trim_start();
        ensure!(!st.starts_with('Z'), "fsd exited");
        let mut r = self.admin().map_err(|e| format!("fresh connection: {e}"))?;
        let f = call(&mut r, Cmd::STAT, 2, &stat_req("known.txt"))?;
        let st: msg::StatResponse = expect_ok(&f, "fresh STAT known.txt")?;
        ensure!(
            st.entry.is_some_and(|e| e.size == 5),
            "fresh STAT known.txt: wrong entry"
        );
        Ok(())
    }
}

/// Kind, inode, size, mtime, mode and contents (or link text) of everything under `top` except
/// root/ (which cases may change).
type Snapshot = BTreeMap<PathBuf, String>;

fn snapshot(top: &Path) -> Snapshot {
    fn walk(top: &Path, dir: &Path, out: &mut Snapshot) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(top).unwrap().to_owned();
            if rel == Path::new("root") {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let desc = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&path).ok())
            } else if m.is_dir() {
                walk(top, &path, out);
                format!("dir ino={} mode={:o}", m.ino(), m.mode())
            } else {
                let data = std::fs::read(&path).unwrap_or_default();
                format!(
                    "file ino={} size={} mtime={}.{} mode={:o} blake3={}",
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.mode(),
                    blake3::hash(&data).to_hex()
                )
            };
            out.insert(rel, desc);
        }
    }
    let mut out = Snapshot::new();
    walk(top, top, &mut out);
    out
}

fn diff(a: &Snapshot, b: &Snapshot) -> String {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("removed {}", k.display())),
            Some(w) if w != v => d.push(format!("changed {} ({v} -> {w})", k.display())),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        d.push(format!("created {}", k.display()));
    }
    d.join("; ")
}

// ---------------------------------------------------------------------------------------------
// The table.
// ---------------------------------------------------------------------------------------------

type Setup = Box<dyn Fn(&Env)>;
type Attack = Box<dyn Fn(&Env) -> Result<(), String>>;

struct Case {
    name: String,
    /// Runs before the "before" snapshot: may create things outside the root.
    setup: Setup,
    /// The attack and its expected refusal.
    attack: Attack,
}

fn case(name: impl Into<String>, attack: impl Fn(&Env) -> Result<(), String> + 'static) -> Case {
    Case {
        name: name.into(),
        setup: Box::new(|_| {}),
        attack: Box::new(attack),
    }
}

fn case_with(
    name: impl Into<String>,
    setup: impl Fn(&Env) + 'static,
    attack: impl Fn(&Env) -> Result<(), String> + 'static,
) -> Case {
    Case {
        name: name.into(),
        setup: Box::new(setup),
        attack: Box::new(attack),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs every case (setup, snapshot, attack, checks) and fails listing each failed case. Consumes
/// the environment so that its fsd is stopped before the failure (the harness would otherwise
/// print fsd's whole log); the last lines of the log are shown instead.
fn run_table(table: &str, env: Env, cases: Vec<Case>) {
    let total = cases.len();
    let mut failed = Vec::new();
    let t0 = Instant::now();
    for c in cases {
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            (c.setup)(&env);
            let before = snapshot(&env.top);
            (c.attack)(&env)?;
            env.unharmed(&before)
        }))
        .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(p))));
        let ms = started.elapsed().as_millis();
        match &result {
            Ok(()) => println!("[{table}] ok   {:<80} {ms:>5} ms", c.name),
            Err(e) => {
                println!("[{table}] FAIL {:<80} {ms:>5} ms: {e}", c.name);
                failed.push(format!("{}: {e}", c.name));
            }
        }
    }
    println!(
        "[{table}] {} of {total} cases passed in {:?}",
        total - failed.len(),
        t0.elapsed()
    );
    let log = tail(&env.fsd.log_text(), 40);
    drop(env);
    assert!(
        failed.is_empty(),
        "{} of {total} {table} cases failed:\n  {}\n---- fsd log tail ----\n{log}",
        failed.len(),
        failed.join("\n  "),
    );
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Raw protocol helpers that report instead of panicking.
// ---------------------------------------------------------------------------------------------

fn send(r: &mut Raw, f: &Frame) -> Result<(), String> {
    r.send(f).map_err(|e| format!("send {}: {e}", f.cmd()))
}

fn recv(r: &mut Raw, what: &str) -> Result<Frame, String> {
    r.recv()
        .ok_or_else(|| format!("{what}: no reply (connection closed or timed out)"))
}

fn call(r: &mut Raw, cmd: Cmd, sid: u32, m: &impl Message) -> Result<Frame, String> {
    send(r, &Frame::message(cmd, sid, flags::END, m))?;
    recv(r, &cmd.to_string())
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.header.encode(&mut b);
    b.extend_from_slice(&f.payload);
    b.to_vec()
}

fn code_of(f: &Frame) -> Option<(ErrorCode, String)> {
    if !f.header.is_error() {
        return None;
    }
    let e = msg::Error::decode(f.payload.clone()).ok()?;
    Some((ErrorCode::from_u32(e.code)?, e.message))
}

fn expect_code(f: &Frame, want: ErrorCode, what: &str) -> Result<(), String> {
    match code_of(f) {
        Some((c, _)) if c == want => Ok(()),
        Some((c, m)) => Err(format!("{what}: expected {want}, got {c} ({m})")),
        None => Err(format!(
            "{what}: expected {want}, got a success reply ({} on stream {})",
            f.cmd(),
            f.stream_id()
        )),
    }
}

fn expect_ok<M: Message + Default>(f: &Frame, what: &str) -> Result<M, String> {
    if let Some((c, m)) = code_of(f) {
        return Err(format!("{what}: expected success, got {c} ({m})"));
    }
    ensure!(!f.header.is_error(), "{what}: undecodable error frame");
    f.decode().map_err(|e| format!("{what}: bad reply: {e}"))
}

/// Whether the server closes the connection within `d` (frames before EOF are discarded).
fn closed_within(r: &mut Raw, d: Duration) -> bool {
    let _ = r.sock.set_read_timeout(Some(d));
    r.closed()
}

/// A connection that sent Hello (with `chunk_size`, 0 = default) and authenticated with `token`.
fn authed_as(addr: SocketAddr, token: &str, chunk_size: u32) -> Result<Raw, String> {
    let mut r = Raw::connect(addr);
    let hello = msg::Hello {
        version: 1,
        chunk_size,
        agent: "attacks".into(),
        ..Default::default()
    };
    let h = call(&mut r, Cmd::HELLO, 0, &hello)?;
    let _: msg::Hello = expect_ok(&h, "hello")?;
    let a = call(
        &mut r,
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: token.into(),
        },
    )?;
    let _: msg::AuthOk = expect_ok(&a, "auth")?;
    Ok(r)
}

/// Connected and Hello'd, not authenticated.
fn hello_only(addr: SocketAddr) -> Result<Raw, String> {
    let mut r = Raw::connect(addr);
    let h = call(
        &mut r,
        Cmd::HELLO,
        0,
        &msg::Hello {
            version: 1,
            ..Default::default()
        },
    )?;
    let _: msg::Hello = expect_ok(&h, "hello")?;
    Ok(r)
}

fn stat_req(path: &str) -> msg::StatRequest {
    msg::StatRequest { path: path.into() }
}

fn open_read_req(path: &str) -> msg::OpenRequest {
    msg::OpenRequest {
        path: path.into(),
        ..Default::default()
    }
}

fn open_write_req(path: &str, size: u64, key: &str) -> msg::OpenRequest {
    msg::OpenRequest {
        path: path.into(),
        mode: msg::OpenMode::OpenWrite as i32,
        size,
        resume_key: key.into(),
        ..Default::default()
    }
}

fn ping_ok(r: &mut Raw, sid: u32) -> Result<(), String> {
    let f = call(r, Cmd::PING, sid, &msg::Ping { nonce: 77 })?;
    let p: msg::Ping = expect_ok(&f, "ping")?;
    ensure!(
        p.nonce == 77 && f.stream_id() == sid,
        "ping: wrong echo {p:?}"
    );
    Ok(())
}

/// Opens `path` for reading and pulls every chunk; checks the whole-file BLAKE3 against the
/// OpenResponse (the codec already checked each chunk's CRC32).
fn download(r: &mut Raw, path: &str, sid: u32) -> Result<Vec<u8>, String> {
    let f = call(r, Cmd::OPEN, sid, &open_read_req(path))?;
    let open: msg::OpenResponse = expect_ok(&f, &format!("open {path}"))?;
    let data = read_chunks(r, sid, &open, 0, open.chunk_count)?;
    ensure!(
        blake3::hash(&data).as_bytes()[..] == open.blake3[..],
        "{path}: whole-file BLAKE3 differs from OpenResponse.blake3"
    );
    Ok(data)
}

fn read_chunks(
    r: &mut Raw,
    sid: u32,
    open: &msg::OpenResponse,
    first: u32,
    count: u32,
) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    if count == 0 {
        return Ok(data);
    }
    send(
        r,
        &Frame::message(
            Cmd::READ,
            sid,
            flags::END,
            &msg::ReadRequest {
                handle: open.handle,
                first_chunk: first,
                count,
                compress_level: 0,
            },
        ),
    )?;
    for i in 0..count {
        let f = recv(r, "read chunk")?;
        if let Some((c, m)) = code_of(&f) {
            return Err(format!("read chunk {}: {c} ({m})", first + i));
        }
        ensure!(f.header.is_data(), "chunk {}: not a DATA frame", first + i);
        ensure!(
            f.header.is_end() == (i + 1 == count),
            "chunk {}: END flag misplaced",
            first + i
        );
        data.extend_from_slice(&f.payload);
    }
    Ok(data)
}

/// The WRITE request frame (no END: its DATA frame follows on the same stream).
fn write_request(sid: u32, handle: u32, chunk: u32) -> Frame {
    Frame::message(Cmd::WRITE, sid, 0, &msg::WriteRequest { handle, chunk })
}

fn write_chunk(
    r: &mut Raw,
    sid: u32,
    handle: u32,
    chunk: u32,
    data: &[u8],
) -> Result<Frame, String> {
    send(r, &write_request(sid, handle, chunk))?;
    send(
        r,
        &Frame::new(
            Cmd::WRITE,
            sid,
            flags::DATA | flags::END,
            Bytes::copy_from_slice(data),
        ),
    )?;
    recv(r, "write ack")
}

/// PUT of `data` to `path` on stream `sid` (request, then its DATA frame); returns the reply.
fn put(r: &mut Raw, sid: u32, path: &str, data: &[u8]) -> Result<Frame, String> {
    let req = msg::PutRequest {
        path: path.into(),
        size: data.len() as u64,
        blake3: blake3::hash(data).as_bytes().to_vec(),
        ..Default::default()
    };
    send(r, &Frame::message(Cmd::PUT, sid, 0, &req))?;
    send(
        r,
        &Frame::new(
            Cmd::PUT,
            sid,
            flags::DATA | flags::END,
            Bytes::copy_from_slice(data),
        ),
    )?;
    recv(r, "put reply")
}

/// Opens an upload of `data` to `path`, writes every chunk; returns the open reply and the
/// COMMIT reply (or the failing OPEN reply).
fn upload(r: &mut Raw, req: msg::OpenRequest, data: &[u8]) -> Result<Result<Frame, Frame>, String> {
    let f = call(r, Cmd::OPEN, 40, &req)?;
    if f.header.is_error() {
        return Ok(Err(f));
    }
    let open: msg::OpenResponse = expect_ok(&f, "open write")?;
    for (i, chunk) in data.chunks(open.chunk_size as usize).enumerate() {
        let ack = write_chunk(r, 41, open.handle, i as u32, chunk)?;
        let _: msg::WriteAck = expect_ok(&ack, "write")?;
    }
    let c = call(
        r,
        Cmd::COMMIT,
        42,
        &msg::CommitRequest {
            handle: open.handle,
            blake3: blake3::hash(data).as_bytes().to_vec(),
            upload_id: String::new(),
        },
    )?;
    Ok(Ok(c))
}

// ---------------------------------------------------------------------------------------------
// Path-taking commands.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Stat,
    List,
    OpenRead,
    OpenWrite,
    /// PUT: the checks of OPEN write, then a whole small file (5 bytes) in the same request.
    Put,
    Mkdir,
    MkdirP,
    Remove,
    RemoveR,
    RenameFrom,
    RenameTo,
}

const ALL_OPS: [Op; 11] = [
    Op::Stat,
    Op::List,
    Op::OpenRead,
    Op::OpenWrite,
    Op::Put,
    Op::Mkdir,
    Op::MkdirP,
    Op::Remove,
    Op::RemoveR,
    Op::RenameFrom,
    Op::RenameTo,
];
const READ_OPS: [Op; 3] = [Op::Stat, Op::List, Op::OpenRead];

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Stat => "STAT",
            Op::List => "LIST",
            Op::OpenRead => "OPEN read",
            Op::OpenWrite => "OPEN write",
            Op::Put => "PUT",
            Op::Mkdir => "MKDIR",
            Op::MkdirP => "MKDIR -p",
            Op::Remove => "REMOVE",
            Op::RemoveR => "REMOVE -r",
            Op::RenameFrom => "RENAME from",
            Op::RenameTo => "RENAME to",
        }
    }
}

/// Sends `op` on `path` and returns the reply. RENAME from moves `path` to [`RENAMED`]; RENAME to
/// moves [`VICTIM`] onto `path`.
fn path_op(r: &mut Raw, op: Op, path: &str) -> Result<Frame, String> {
    path_op_in(r, op, path, "")
}

/// [`path_op`] for a credential confined to the prefix `inside` ("team/"): the RENAME partners
/// are `inside`[`VICTIM`] and `inside`[`RENAMED`], so only `path` can be what is refused.
fn path_op_in(r: &mut Raw, op: Op, path: &str, inside: &str) -> Result<Frame, String> {
    let p = path.to_string();
    match op {
        Op::Stat => call(r, Cmd::STAT, 3, &stat_req(path)),
        Op::List => call(
            r,
            Cmd::LIST,
            3,
            &msg::ListRequest {
                path: p,
                ..Default::default()
            },
        ),
        Op::OpenRead => call(r, Cmd::OPEN, 3, &open_read_req(path)),
        Op::OpenWrite => call(r, Cmd::OPEN, 3, &open_write_req(path, 5, "attack")),
        Op::Put => put(r, 3, path, b"owned"),
        Op::Mkdir | Op::MkdirP => call(
            r,
            Cmd::MKDIR,
            3,
            &msg::MkdirRequest {
                path: p,
                parents: op == Op::MkdirP,
                ..Default::default()
            },
        ),
        Op::Remove | Op::RemoveR => call(
            r,
            Cmd::REMOVE,
            3,
            &msg::RemoveRequest {
                path: p,
                recursive: op == Op::RemoveR,
            },
        ),
        Op::RenameFrom => call(
            r,
            Cmd::RENAME,
            3,
            &msg::RenameRequest {
                from: p,
                to: format!("{inside}{RENAMED}"),
                no_clobber: false,
            },
        ),
        Op::RenameTo => call(
            r,
            Cmd::RENAME,
            3,
            &msg::RenameRequest {
                from: format!("{inside}{VICTIM}"),
                to: p,
                no_clobber: false,
            },
        ),
    }
}

/// A case: `op` on `path` with `token` is refused with `want`.
fn refused(token: &'static str, op: Op, label: &str, path: String, want: ErrorCode) -> Case {
    let (who, inside) = match token {
        TOKEN => ("", ""),
        RO_TOKEN => ("read-only: ", ""),
        TEAM_TOKEN => ("prefix team: ", "team/"),
        _ => ("prefix team read-only: ", "team/"),
    };
    case(format!("{who}{} {label} -> {want}", op.label()), move |e| {
        let mut r = e.as_token(token)?;
        let f = path_op_in(&mut r, op, &path, inside)?;
        expect_code(&f, want, &format!("{} {path:?}", op.label()))
    })
}

fn path_cases(env: &Env) -> Vec<Case> {
    use ErrorCode::*;
    let mut cases = Vec::new();
    let out = env.out.display().to_string();

    // Lexically bad paths: refused by every command before any file-system call.
    let lexical: Vec<(&str, String)> = vec![
        ("`..` first", "../outside/secret".into()),
        ("`..` middle", "a/../../outside/secret".into()),
        ("`..` last", "a/b/..".into()),
        ("`.` component", "./victim.txt".into()),
        ("absolute path to outside/", format!("{out}/secret")),
        ("NUL byte", "victim.txt\0/../../outside/secret".into()),
        ("path of 4097 bytes", format!("{}b", "a/".repeat(2048))),
        ("component of 256 bytes", format!("a/{}", "x".repeat(256))),
        ("empty component a//b", "a//b".into()),
        ("trailing slash", "a/b/".into()),
        ("the state dir .fsd-state", ".fsd-state".into()),
        ("beneath the state dir", ".fsd-state/uploads".into()),
        ("state dir name deeper down", "a/.fsd-state".into()),
    ];
    for (label, path) in &lexical {
        for op in ALL_OPS {
            cases.push(refused(TOKEN, op, label, path.clone(), InvalidPath));
        }
    }
    for op in READ_OPS {
        cases.push(refused(
            TOKEN,
            op,
            "absolute /etc/passwd",
            "/etc/passwd".into(),
            InvalidPath,
        ));
    }
    // The root itself cannot be opened, created, removed or renamed.
    for op in [
        Op::OpenRead,
        Op::OpenWrite,
        Op::Put,
        Op::Mkdir,
        Op::MkdirP,
        Op::Remove,
        Op::RemoveR,
        Op::RenameFrom,
        Op::RenameTo,
    ] {
        cases.push(refused(
            TOKEN,
            op,
            "the root \"\"",
            String::new(),
            InvalidPath,
        ));
    }

    // Encodings are not decoded: these are literal names that do not exist.
    for op in ALL_OPS.into_iter().filter(|o| *o != Op::MkdirP) {
        cases.push(refused(
            TOKEN,
            op,
            "URL-encoded %2e%2e/ (literal)",
            "%2e%2e/outside/secret".into(),
            NotFound,
        ));
    }
    for (label, path) in [
        ("URL-encoded ..%2f (literal)", "..%2f..%2foutside%2fsecret"),
        ("double-encoded %252e%252e (literal)", "%252e%252e/secret"),
        ("backslashes (literal)", "..\\..\\outside\\secret"),
        (
            "Unicode two-dot leader (literal)",
            "\u{2025}/outside/secret",
        ),
    ] {
        for op in READ_OPS {
            cases.push(refused(TOKEN, op, label, path.into(), NotFound));
        }
    }
    cases.push(case(
        "MKDIR -p %2e%2e/x creates a literal directory inside the root",
        |e| {
            let mut r = e.admin()?;
            let f = path_op(&mut r, Op::MkdirP, "%2e%2e/x")?;
            let _: msg::Ok = expect_ok(&f, "mkdir -p")?;
            ensure!(e.root.join("%2e%2e/x").is_dir(), "root/%2e%2e/x missing");
            Ok(())
        },
    ));

    // A symlink inside the root to a file outside it: shown, never followed.
    for (label, path) in [
        ("symlink to an outside file (absolute)", "lnk_file"),
        ("symlink to an outside file (relative ..)", "lnk_file_rel"),
    ] {
        cases.push(refused(TOKEN, Op::OpenRead, label, path.into(), NotAFile));
        cases.push(refused(TOKEN, Op::List, label, path.into(), InvalidPath));
        cases.push(refused(TOKEN, Op::Mkdir, label, path.into(), AlreadyExists));
        let p = path.to_string();
        cases.push(case(
            format!("STAT {label} -> the link itself, not its target"),
            move |e| {
                let mut r = e.admin()?;
                let st: msg::StatResponse = expect_ok(&path_op(&mut r, Op::Stat, &p)?, "stat")?;
                let entry = st.entry.ok_or("no entry")?;
                ensure!(
                    entry.kind == msg::Kind::Symlink as i32,
                    "kind {} is not Symlink",
                    entry.kind
                );
                ensure!(
                    entry.size == entry.target.len() as u64 && entry.size != SECRET.len() as u64,
                    "size {} leaks the target's metadata",
                    entry.size
                );
                Ok(())
            },
        ));
    }

    // A symlink to an outside directory used as an intermediate component.
    for (label, dir) in [
        ("via symlink to outside dir (absolute)", "lnk_dir"),
        ("via symlink to outside dir (relative ..)", "a/lnk_dir_rel"),
    ] {
        for op in ALL_OPS {
            // OPEN write checks the parent with lstat first: a symlink is not a directory.
            let want = if matches!(op, Op::OpenWrite | Op::Put) {
                NotADirectory
            } else {
                InvalidPath
            };
            cases.push(refused(TOKEN, op, label, format!("{dir}/secret"), want));
        }
        cases.push(refused(TOKEN, Op::List, label, dir.into(), InvalidPath));
        for op in [Op::OpenWrite, Op::Put] {
            cases.push(refused(
                TOKEN,
                op,
                &format!("{label}, two levels"),
                format!("{dir}/sub/new"),
                InvalidPath,
            ));
        }
        cases.push(refused(
            TOKEN,
            Op::MkdirP,
            &format!("{label}, new subtree"),
            format!("{dir}/new/deeper"),
            InvalidPath,
        ));
    }

    // /proc magic links, reached through symlinks inside the root.
    for (label, path) in [
        ("via symlink to /proc/self/root", "proc_root/etc/passwd"),
        (
            "via symlink to /proc/self, then root",
            "proc_self/root/etc/passwd",
        ),
        ("via symlink to /proc/self, then fd/0", "proc_self/fd/0"),
        (
            "via relative symlink climbing to /proc",
            "proc_climb/etc/passwd",
        ),
    ] {
        for op in READ_OPS {
            cases.push(refused(TOKEN, op, label, path.into(), InvalidPath));
        }
    }
    cases.push(refused(
        TOKEN,
        Op::OpenRead,
        "symlink to /proc/self/fd/0",
        "proc_fd0".into(),
        NotAFile,
    ));
    cases.push(refused(
        TOKEN,
        Op::List,
        "symlink to /proc/self/root",
        "proc_root".into(),
        InvalidPath,
    ));
    cases.push(refused(
        TOKEN,
        Op::MkdirP,
        "via symlink to /proc/self/root",
        "proc_root/tmp/fsd-attack".into(),
        InvalidPath,
    ));
    for op in [Op::OpenWrite, Op::Put] {
        cases.push(refused(
            TOKEN,
            op,
            "via symlink to /proc/self/root, two levels",
            "proc_root/tmp/fsd-attack".into(),
            InvalidPath,
        ));
    }
    cases.push(refused(
        TOKEN,
        Op::OpenRead,
        "through a symlink loop",
        "loop/x".into(),
        InvalidPath,
    ));
    cases.push(refused(
        TOKEN,
        Op::OpenRead,
        "a symlink loop itself",
        "loop".into(),
        NotAFile,
    ));

    // Hard links: invisible to openat2, a documented gap.
    cases.push(case(
        "OPEN read of a hard link to an outside file -> readable (documented openat2 gap)",
        |e| {
            // openat2 confines *path resolution*; a hard link is a directory entry inside the
            // root naming the outside inode, and no lookup ever leaves the root. SECURITY.md lists
            // this gap: an operator must not let untrusted local users create links in the root.
            let mut r = e.admin()?;
            let data = download(&mut r, "hard", 5)?;
            ensure!(data == HARD.as_bytes(), "hard link content differs");
            Ok(())
        },
    ));
    cases.push(case(
        "upload over a hard link to an outside file -> replaces the link, outside intact",
        |e| {
            let mut r = e.admin()?;
            let c = upload(&mut r, open_write_req("hard", 7, "hard"), b"REPLACE")?
                .map_err(|f| format!("open: {:?}", code_of(&f)))?;
            let _: msg::CommitResponse = expect_ok(&c, "commit")?;
            ensure!(
                std::fs::read(e.root.join("hard")).unwrap() == b"REPLACE",
                "root/hard not replaced"
            );
            ensure!(
                std::fs::read_to_string(e.out.join("hardsrc")).unwrap() == HARD,
                "the outside inode was written through the hard link"
            );
            Ok(())
        },
    ));

    // A FIFO: refused at once, never waited on.
    cases.push(case(
        "OPEN read of a FIFO -> NotAFile, without hanging",
        |e| {
            let mut r = e.admin()?;
            let t = Instant::now();
            let f = path_op(&mut r, Op::OpenRead, "fifo")?;
            expect_code(&f, NotAFile, "open fifo")?;
            ensure!(
                t.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t.elapsed()
            );
            let st: msg::StatResponse = expect_ok(&path_op(&mut r, Op::Stat, "fifo")?, "stat")?;
            ensure!(
                st.entry.is_some_and(|e| e.kind == msg::Kind::Other as i32),
                "fifo not reported as Other"
            );
            Ok(())
        },
    ));

    // Symlinks as targets of changes: the link is what changes, never its target.
    cases.push(case_with(
        "upload over a symlink to an outside file -> replaces the link, target intact",
        |e| std::os::unix::fs::symlink(e.out.join("secret"), e.root.join("up_lnk")).unwrap(),
        |e| {
            let mut r = e.admin()?;
            let no_clobber = msg::OpenRequest {
                no_clobber: true,
                ..open_write_req("up_lnk", 5, "k1")
            };
            let f = upload(&mut r, no_clobber, b"hello")?
                .err()
                .ok_or("no_clobber open succeeded")?;
            expect_code(&f, AlreadyExists, "no_clobber open over a symlink")?;
            let c = upload(&mut r, open_write_req("up_lnk", 5, "k2"), b"hello")?
                .map_err(|f| format!("open: {:?}", code_of(&f)))?;
            let _: msg::CommitResponse = expect_ok(&c, "commit")?;
            let m = std::fs::symlink_metadata(e.root.join("up_lnk")).unwrap();
            ensure!(m.is_file(), "up_lnk is still a symlink");
            ensure!(
                std::fs::read(e.root.join("up_lnk")).unwrap() == b"hello",
                "content"
            );
            Ok(())
        },
    ));
    cases.push(case_with(
        "REMOVE of a symlink to an outside file -> removes the link only",
        |e| std::os::unix::fs::symlink(e.out.join("secret"), e.root.join("rm_lnk")).unwrap(),
        |e| {
            let mut r = e.admin()?;
            let _: msg::Ok = expect_ok(&path_op(&mut r, Op::Remove, "rm_lnk")?, "remove")?;
            ensure!(
                std::fs::symlink_metadata(e.root.join("rm_lnk")).is_err(),
                "link still there"
            );
            Ok(())
        },
    ));
    cases.push(case_with(
        "REMOVE -r of a symlink to an outside dir -> removes the link only",
        |e| std::os::unix::fs::symlink(e.out.join("dir"), e.root.join("rm_lnk_dir")).unwrap(),
        |e| {
            let mut r = e.admin()?;
            let _: msg::Ok = expect_ok(&path_op(&mut r, Op::RemoveR, "rm_lnk_dir")?, "remove -r")?;
            ensure!(
                std::fs::symlink_metadata(e.root.join("rm_lnk_dir")).is_err(),
                "link still there"
            );
            Ok(())
        },
    ));
    cases.push(case_with(
        "REMOVE -r of a tree holding a symlink to an outside dir -> outside intact",
        |e| {
            std::fs::create_dir_all(e.root.join("rmtree/sub")).unwrap();
            std::fs::write(e.root.join("rmtree/sub/f"), "f").unwrap();
            std::os::unix::fs::symlink(e.out.join("dir"), e.root.join("rmtree/sub/l")).unwrap();
            std::os::unix::fs::symlink("../../../outside", e.root.join("rmtree/up")).unwrap();
        },
        |e| {
            let mut r = e.admin()?;
            let _: msg::Ok = expect_ok(&path_op(&mut r, Op::RemoveR, "rmtree")?, "remove -r")?;
            ensure!(!e.root.join("rmtree").exists(), "tree still there");
            Ok(())
        },
    ));
    cases.push(case_with(
        "RENAME a file onto a symlink to an outside file -> replaces the link",
        |e| {
            std::fs::write(e.root.join("mv_src"), "moved").unwrap();
            std::os::unix::fs::symlink(e.out.join("secret"), e.root.join("mv_lnk")).unwrap();
        },
        |e| {
            let mut r = e.admin()?;
            let f = call(
                &mut r,
                Cmd::RENAME,
                3,
                &msg::RenameRequest {
                    from: "mv_src".into(),
                    to: "mv_lnk".into(),
                    no_clobber: false,
                },
            )?;
            let _: msg::Ok = expect_ok(&f, "rename")?;
            ensure!(
                std::fs::read(e.root.join("mv_lnk")).unwrap() == b"moved",
                "mv_lnk not replaced"
            );
            Ok(())
        },
    ));

    // A parent directory swapped for a symlink to outside while a transfer is under way.
    cases.push(case_with(
        "parent swapped for an outside symlink mid-download -> handle keeps serving; re-OPEN InvalidPath",
        |e| {
            write_random(&e.root.join("swap/big"), 4 << 20, 77);
            std::fs::create_dir_all(e.out.join("swapdir")).unwrap();
            std::fs::write(e.out.join("swapdir/big"), SECRET).unwrap();
        },
        |e| {
            let original = std::fs::read(e.root.join("swap/big")).unwrap();
            let mut r = e.admin()?;
            let f = call(&mut r, Cmd::OPEN, 5, &open_read_req("swap/big"))?;
            let open: msg::OpenResponse = expect_ok(&f, "open")?;
            ensure!(open.chunk_count == 4, "chunk_count {}", open.chunk_count);
            let mut got = read_chunks(&mut r, 5, &open, 0, 1)?;
            std::fs::rename(e.root.join("swap"), e.root.join("swap.orig")).unwrap();
            std::os::unix::fs::symlink(e.out.join("swapdir"), e.root.join("swap")).unwrap();
            got.extend(read_chunks(&mut r, 5, &open, 1, 3)?);
            ensure!(got == original, "the open handle served other content after the swap");
            ensure!(
                blake3::hash(&got).as_bytes()[..] == open.blake3[..],
                "BLAKE3 differs from OpenResponse"
            );
            expect_code(&path_op(&mut r, Op::OpenRead, "swap/big")?, InvalidPath, "re-open")?;
            expect_code(&path_op(&mut r, Op::Stat, "swap/big")?, InvalidPath, "stat")?;
            expect_code(&path_op(&mut r, Op::List, "swap")?, InvalidPath, "list")?;
            expect_code(&path_op(&mut r, Op::Mkdir, "swap/new")?, InvalidPath, "mkdir")?;
            expect_code(&path_op(&mut r, Op::OpenWrite, "swap/new")?, NotADirectory, "open write")?;
            expect_code(&path_op(&mut r, Op::Put, "swap/new")?, NotADirectory, "put")?;
            Ok(())
        },
    ));
    cases.push(case_with(
        "symlink swapped in during an upload -> COMMIT InvalidPath, nothing written outside",
        |e| {
            std::fs::create_dir_all(e.root.join("upswap")).unwrap();
            std::fs::create_dir_all(e.out.join("upswapdir")).unwrap();
        },
        |e| {
            let mut r = e.admin()?;
            let f = call(&mut r, Cmd::OPEN, 5, &open_write_req("upswap/f", 5, "swap"))?;
            let open: msg::OpenResponse = expect_ok(&f, "open write")?;
            let _: msg::WriteAck =
                expect_ok(&write_chunk(&mut r, 6, open.handle, 0, b"EVIL!")?, "write")?;
            std::fs::rename(e.root.join("upswap"), e.root.join("upswap.orig")).unwrap();
            std::os::unix::fs::symlink(e.out.join("upswapdir"), e.root.join("upswap")).unwrap();
            let c = call(
                &mut r,
                Cmd::COMMIT,
                7,
                &msg::CommitRequest {
                    handle: open.handle,
                    blake3: blake3::hash(b"EVIL!").as_bytes().to_vec(),
                    upload_id: String::new(),
                },
            )?;
            expect_code(&c, InvalidPath, "commit through the swapped parent")?;
            ensure!(!e.out.join("upswapdir/f").exists(), "written outside");
            Ok(())
        },
    ));

    // A credential confined to the prefix "team".
    cases.push(case(
        "prefix team: inside its prefix works (control for the refusals below)",
        |e| {
            let mut r = e.as_token(TEAM_TOKEN)?;
            let _: msg::StatResponse =
                expect_ok(&path_op(&mut r, Op::Stat, "team/t.txt")?, "stat")?;
            let _: msg::ListResponse = expect_ok(&path_op(&mut r, Op::List, "team")?, "list")?;
            // The admin, confined only to the root, can follow team/esc to public/.
            let mut a = e.admin()?;
            ensure!(
                download(&mut a, "team/esc/p.txt", 5)? == b"public",
                "admin read"
            );
            Ok(())
        },
    ));
    for (op, path) in [
        (Op::Stat, "public/p.txt"),
        (Op::List, ""),
        (Op::List, "public"),
        (Op::OpenRead, "known.txt"),
        (Op::OpenRead, "teamevil/x"),
        (Op::OpenWrite, "public/new"),
        (Op::Put, "public/new"),
        (Op::Mkdir, "public/newdir"),
        (Op::MkdirP, "newtop/x"),
        (Op::Remove, "public/p.txt"),
        (Op::RemoveR, "public"),
        (Op::RenameFrom, "public/p.txt"),
    ] {
        cases.push(refused(
            TEAM_TOKEN,
            op,
            &format!("outside the prefix {path:?}"),
            path.into(),
            PermissionDenied,
        ));
    }
    cases.push(case(
        "prefix team: RENAME team/t.txt to public/ -> PermissionDenied",
        |e| {
            let mut r = e.as_token(TEAM_TOKEN)?;
            let f = call(
                &mut r,
                Cmd::RENAME,
                3,
                &msg::RenameRequest {
                    from: "team/t.txt".into(),
                    to: "public/t.txt".into(),
                    no_clobber: false,
                },
            )?;
            expect_code(&f, PermissionDenied, "rename out of the prefix")?;
            ensure!(e.root.join("team/t.txt").exists(), "team/t.txt moved");
            Ok(())
        },
    ));
    for (label, path, ops) in [
        (
            "`..` out of the prefix",
            "team/../public/p.txt",
            &READ_OPS[..],
        ),
        (
            "via relative symlink in the prefix to elsewhere in the root",
            "team/esc/p.txt",
            &ALL_OPS[..],
        ),
        (
            "via absolute symlink in the prefix to elsewhere in the root",
            "team/abs/p.txt",
            &READ_OPS[..],
        ),
    ] {
        for &op in ops {
            let want = match op {
                Op::OpenWrite | Op::Put if path.contains("esc") => NotADirectory,
                Op::RenameFrom
                | Op::RenameTo
                | Op::Remove
                | Op::RemoveR
                | Op::Mkdir
                | Op::MkdirP
                    if path.starts_with("team/..") =>
                {
                    InvalidPath
                }
                _ => InvalidPath,
            };
            cases.push(refused(TEAM_TOKEN, op, label, path.into(), want));
        }
    }
    cases.push(refused(
        TEAM_TOKEN,
        Op::List,
        "the prefix's symlink to elsewhere",
        "team/esc".into(),
        InvalidPath,
    ));
    for op in [
        Op::Remove,
        Op::RemoveR,
        Op::RenameFrom,
        Op::OpenWrite,
        Op::Put,
    ] {
        cases.push(refused(
            TEAM_TOKEN,
            op,
            "its own prefix directory",
            "team".into(),
            InvalidPath,
        ));
    }
    for op in [Op::OpenWrite, Op::Put] {
        cases.push(refused(
            TEAM_RO_TOKEN,
            op,
            "inside its prefix",
            "team/new".into(),
            PermissionDenied,
        ));
    }
    cases.push(refused(
        TEAM_RO_TOKEN,
        Op::OpenRead,
        "outside its prefix",
        "known.txt".into(),
        PermissionDenied,
    ));

    // A read-only credential.
    cases.push(case("read-only: OPEN read works (control)", |e| {
        let mut r = e.as_token(RO_TOKEN)?;
        ensure!(download(&mut r, "known.txt", 5)? == b"known", "content");
        Ok(())
    }));
    for (op, path) in [
        (Op::OpenWrite, "known.txt"),
        (Op::OpenWrite, "brand-new"),
        (Op::Put, "known.txt"),
        (Op::Put, "brand-new"),
        (Op::Mkdir, "newdir"),
        (Op::MkdirP, "newdir/x"),
        (Op::Remove, VICTIM),
        (Op::RemoveR, "a"),
        (Op::RenameFrom, VICTIM),
        (Op::RenameTo, "moved-here"),
    ] {
        cases.push(refused(
            RO_TOKEN,
            op,
            &format!("{path:?}"),
            path.into(),
            PermissionDenied,
        ));
    }
    cases
}

#[test]
fn path_attacks_are_refused_and_harm_nothing() {
    let env = Env::new();
    let mut cases = path_cases(&env);
    assert!(cases.len() >= 40);
    cases.push(case(
        "afterwards: every file the cases had to leave alone is still in the root",
        |e| {
            for p in [
                "known.txt",
                "a/b/file.txt",
                "team/t.txt",
                "public/p.txt",
                "big16",
            ] {
                ensure!(e.root.join(p).is_file(), "{p} was removed");
            }
            ensure!(
                !Path::new("/tmp/fsd-attack").exists(),
                "/tmp/fsd-attack created"
            );
            Ok(())
        },
    ));
    run_table("path", env, cases);
}

// ---------------------------------------------------------------------------------------------
// Protocol abuse.
// ---------------------------------------------------------------------------------------------

fn header(flags: u8, cmd: Cmd, stream_id: u32, payload_len: u32) -> Header {
    Header {
        version: 1,
        flags,
        cmd,
        stream_id,
        payload_len,
        checksum: 0,
    }
}

/// Sends a bare header announcing `len` bytes and expects LimitExceeded, a close, and no memory
/// growth in fsd beyond `slack_kib`.
fn oversized(e: &Env, authed: bool, h: Header) -> Result<(), String> {
    let mut r = if authed {
        e.admin()?
    } else {
        Raw::connect(e.addr())
    };
    let before = proc_status_kib(e.fsd.pid(), "VmRSS:");
    r.send_bytes(&h.to_bytes()).map_err(|e| e.to_string())?;
    let f = recv(&mut r, "limit error")?;
    expect_code(&f, ErrorCode::LimitExceeded, "oversized frame")?;
    ensure!(
        f.stream_id() == h.stream_id,
        "error on stream {}",
        f.stream_id()
    );
    ensure!(closed_within(&mut r, Duration::from_secs(5)), "not closed");
    let after = proc_status_kib(e.fsd.pid(), "VmRSS:");
    ensure!(
        after < before + 4096,
        "fsd RSS grew from {before} KiB to {after} KiB"
    );
    Ok(())
}

/// MAX_STREAMS WRITE requests without their DATA hold every stream; 100 more requests get
/// LimitExceeded; CANCEL frees them; then a burst of 2000 requests, sent from another thread while
/// this one reads, gets exactly one final frame each (a reply or LimitExceeded): none hangs.
fn many_streams(e: &Env) -> Result<(), String> {
    use ErrorCode::*;
    let stat = |sid| {
        encode(&Frame::message(
            Cmd::STAT,
            sid,
            flags::END,
            &stat_req("known.txt"),
        ))
    };
    let mut r = e.admin()?;
    let mut w = r.sock.try_clone().map_err(|e| e.to_string())?;
    let mut b = Vec::new();
    for sid in 1..=MAX_STREAMS as u32 {
        let req = msg::WriteRequest {
            handle: 1,
            chunk: 0,
        };
        b.extend(encode(&Frame::message(Cmd::WRITE, sid, 0, &req)));
    }
    for sid in 1000..1100 {
        b.extend(stat(sid));
    }
    w.write_all(&b).map_err(|e| e.to_string())?;
    for _ in 0..100 {
        let f = recv(&mut r, "over-limit stream")?;
        let sid = f.stream_id();
        ensure!((1000..1100).contains(&sid), "reply on stream {sid}");
        expect_code(&f, LimitExceeded, "stream over the limit")?;
    }
    b.clear();
    for sid in 1..=MAX_STREAMS as u32 {
        b.extend(encode(&Frame::message(
            Cmd::CANCEL,
            sid,
            flags::END,
            &msg::Cancel {},
        )));
    }
    w.write_all(&b).map_err(|e| e.to_string())?;
    for _ in 0..MAX_STREAMS {
        expect_code(&recv(&mut r, "cancelled write")?, Cancelled, "cancel")?;
    }
    const BURST: u32 = 2000;
    let writer = std::thread::spawn(move || {
        let b: Vec<u8> = (10_000..10_000 + BURST).flat_map(stat).collect();
        w.write_all(&b)
    });
    let mut seen = std::collections::HashSet::new();
    let (mut answered, mut limited) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < BURST as usize {
        let n = seen.len();
        ensure!(Instant::now() < deadline, "burst: {n} of {BURST} answered");
        let f = recv(&mut r, "burst reply")?;
        ensure!(f.header.is_end(), "non-final frame");
        let sid = f.stream_id();
        ensure!(seen.insert(sid), "two replies on stream {sid}");
        match code_of(&f) {
            None => answered += 1,
            Some((LimitExceeded, _)) => limited += 1,
            Some((c, m)) => return Err(format!("burst: {c} ({m})")),
        }
    }
    writer.join().unwrap().map_err(|e| e.to_string())?;
    println!("    burst of {BURST}: {answered} answered, {limited} LimitExceeded");
    ping_ok(&mut r, 3)
}

/// A WRITE whose DATA frame names READ: BadStream (END) ends the WRITE and frees the id (the
/// id can be reused at once, and max_streams of them leave every stream free). This leaked the
/// stream id before a87f58d.
fn mismatched_data_frees_the_stream(e: &Env) -> Result<(), String> {
    let mismatched = |r: &mut Raw, sid: u32| -> Result<(), String> {
        let req = msg::WriteRequest {
            handle: 1,
            chunk: 0,
        };
        send(r, &Frame::message(Cmd::WRITE, sid, 0, &req))?;
        let data = Frame::new(
            Cmd::READ,
            sid,
            flags::DATA | flags::END,
            Bytes::from_static(b"x"),
        );
        send(r, &data)?;
        let f = recv(r, "data error")?;
        expect_code(&f, ErrorCode::BadStream, "mismatched DATA")?;
        ensure!(f.header.is_end(), "the error does not end stream {sid}");
        Ok(())
    };
    let mut r = e.admin()?;
    for sid in 1..=MAX_STREAMS as u32 {
        mismatched(&mut r, sid)?;
    }
    let f = call(&mut r, Cmd::STAT, 1000, &stat_req("known.txt"))?;
    let _: msg::StatResponse = expect_ok(&f, "a request after max_streams of them")?;
    mismatched(&mut r, 5)?;
    let f = call(&mut r, Cmd::STAT, 5, &stat_req("known.txt"))?;
    let _: msg::StatResponse = expect_ok(&f, "reusing the ended stream id")?;
    Ok(())
}

fn protocol_cases() -> Vec<Case> {
    use ErrorCode::*;
    let mut cases = vec![
        case(
            "control frame with payload_len u32::MAX -> LimitExceeded, close, no allocation",
            |e| oversized(e, true, header(flags::END, Cmd::STAT, 3, u32::MAX)),
        ),
        case(
            "control frame of MAX_CONTROL_PAYLOAD+1 -> LimitExceeded, close",
            |e| {
                oversized(
                    e,
                    true,
                    header(flags::END, Cmd::LIST, 5, MAX_CONTROL_PAYLOAD + 1),
                )
            },
        ),
        case(
            "DATA frame of max_frame+1 -> LimitExceeded, close, no allocation",
            |e| {
                oversized(
                    e,
                    true,
                    header(flags::DATA | flags::END, Cmd::WRITE, 7, MAX_FRAME + 1),
                )
            },
        ),
        case("DATA frame of u32::MAX -> LimitExceeded, close", |e| {
            oversized(
                e,
                true,
                header(flags::DATA | flags::END, Cmd::WRITE, 7, u32::MAX),
            )
        }),
        case(
            "before auth: payload_len u32::MAX -> LimitExceeded, close",
            |e| oversized(e, false, header(0, Cmd::HELLO, 0, u32::MAX)),
        ),
        case("truncated header, then hang up -> server unaffected", |e| {
            let mut r = e.admin()?;
            r.send_bytes(&MAGIC.to_be_bytes()[..3])
                .map_err(|e| e.to_string())?;
            drop(r);
            let mut r = Raw::connect(e.addr());
            let h = header(flags::END, Cmd::STAT, 3, 10).to_bytes();
            r.send_bytes(&h[..19]).map_err(|e| e.to_string())?;
            let _ = r.sock.shutdown(std::net::Shutdown::Write);
            ensure!(
                closed_within(&mut r, Duration::from_secs(5)),
                "not closed after EOF"
            );
            Ok(())
        }),
        case(
            "header then a truncated payload, then hang up -> server unaffected",
            |e| {
                let mut r = e.admin()?;
                let f = Frame::message(Cmd::STAT, 3, flags::END, &stat_req("known.txt"));
                let b = encode(&f);
                r.send_bytes(&b[..b.len() - 2]).map_err(|e| e.to_string())?;
                let _ = r.sock.shutdown(std::net::Shutdown::Write);
                ensure!(
                    closed_within(&mut r, Duration::from_secs(5)),
                    "not closed after EOF"
                );
                Ok(())
            },
        ),
        case("wrong magic -> connection closed", |e| {
            let mut r = Raw::connect(e.addr());
            let mut b = encode(&Frame::message(
                Cmd::HELLO,
                0,
                flags::END,
                &msg::Hello::default(),
            ));
            b[..4].copy_from_slice(b"HTTP");
            r.send_bytes(&b).map_err(|e| e.to_string())?;
            // The server may say BadRequest first; the contract is the close.
            if let Some(f) = r.recv() {
                expect_code(&f, BadRequest, "bad magic")?;
            }
            ensure!(closed_within(&mut r, Duration::from_secs(5)), "not closed");
            Ok(())
        }),
        case("wrong version -> UnsupportedVersion, close", |e| {
            let mut r = e.admin()?;
            let mut f = Frame::message(Cmd::STAT, 9, flags::END, &stat_req("known.txt"));
            f.header.version = 2;
            send(&mut r, &f)?;
            let f = recv(&mut r, "version error")?;
            expect_code(&f, UnsupportedVersion, "version 2")?;
            ensure!(f.stream_id() == 9, "error on stream {}", f.stream_id());
            ensure!(closed_within(&mut r, Duration::from_secs(5)), "not closed");
            Ok(())
        }),
        case("unknown flag bits -> BadRequest, close", |e| {
            let mut r = e.admin()?;
            let f = Frame::message(Cmd::STAT, 9, flags::END | 0x80, &stat_req("known.txt"));
            send(&mut r, &f)?;
            expect_code(&recv(&mut r, "flags error")?, BadRequest, "flag 0x80")?;
            ensure!(closed_within(&mut r, Duration::from_secs(5)), "not closed");
            Ok(())
        }),
        case(
            "wrong checksum -> ChecksumMismatch, connection usable",
            |e| {
                let mut r = e.admin()?;
                let mut f = Frame::message(Cmd::STAT, 9, flags::END, &stat_req("known.txt"));
                f.header.checksum ^= 0x8000_0000;
                send(&mut r, &f)?;
                expect_code(&recv(&mut r, "crc error")?, ChecksumMismatch, "bad crc")?;
                ping_ok(&mut r, 9)
            },
        ),
        case(
            "unknown command id -> UnknownCommand, connection usable",
            |e| {
                let mut r = e.admin()?;
                for cmd in [0x0000, 0x0004, 0x001f, 0x7777, 0xffff] {
                    let f = call(&mut r, Cmd(cmd), 9, &msg::Ok {})?;
                    expect_code(&f, UnknownCommand, &format!("cmd {cmd:#06x}"))?;
                }
                ping_ok(&mut r, 9)
            },
        ),
        case("malformed protobuf -> BadRequest, connection usable", |e| {
            let mut r = e.admin()?;
            for cmd in [Cmd::STAT, Cmd::OPEN, Cmd::READ, Cmd::RENAME] {
                send(
                    &mut r,
                    &Frame::new(cmd, 9, flags::END, Bytes::from_static(&[0xff; 7])),
                )?;
                expect_code(&recv(&mut r, "decode error")?, BadRequest, &cmd.to_string())?;
            }
            ping_ok(&mut r, 9)
        }),
        case("OPEN with an unknown mode -> BadRequest", |e| {
            let mut r = e.admin()?;
            let req = msg::OpenRequest {
                mode: 7,
                ..open_read_req("known.txt")
            };
            expect_code(&call(&mut r, Cmd::OPEN, 9, &req)?, BadRequest, "mode 7")
        }),
        case("request on stream 0 -> BadStream, connection usable", |e| {
            let mut r = e.admin()?;
            let f = call(&mut r, Cmd::STAT, 0, &stat_req("known.txt"))?;
            expect_code(&f, BadStream, "stream 0")?;
            ping_ok(&mut r, 4)
        }),
        case(
            "request reusing a stream with a pending WRITE -> connection closed",
            |e| {
                let mut r = e.admin()?;
                send(&mut r, &write_request(7, 1, 0))?;
                send(
                    &mut r,
                    &Frame::message(Cmd::STAT, 7, flags::END, &stat_req("known.txt")),
                )?;
                ensure!(closed_within(&mut r, Duration::from_secs(5)), "not closed");
                Ok(())
            },
        ),
        case(
            "request reusing a stream with an active READ -> connection closed",
            |e| {
                // 16 MiB in 64 KiB chunks: far more than the socket buffers and writer queue hold,
                // so the READ is still running when the second request arrives.
                let mut r = authed_as(e.addr(), TOKEN, 64 << 10)?;
                let open: msg::OpenResponse = expect_ok(
                    &call(&mut r, Cmd::OPEN, 5, &open_read_req("big16"))?,
                    "open",
                )?;
                ensure!(open.chunk_count == 256, "chunk_count {}", open.chunk_count);
                send(
                    &mut r,
                    &Frame::message(
                        Cmd::READ,
                        9,
                        flags::END,
                        &msg::ReadRequest {
                            handle: open.handle,
                            first_chunk: 0,
                            count: 256,
                            compress_level: 0,
                        },
                    ),
                )?;
                send(
                    &mut r,
                    &Frame::message(Cmd::STAT, 9, flags::END, &stat_req("known.txt")),
                )?;
                ensure!(closed_within(&mut r, Duration::from_secs(10)), "not closed");
                Ok(())
            },
        ),
        case("CANCEL of a non-existent stream -> ignored", |e| {
            let mut r = e.admin()?;
            for sid in [0, 5, 999, u32::MAX] {
                send(
                    &mut r,
                    &Frame::message(Cmd::CANCEL, sid, flags::END, &msg::Cancel {}),
                )?;
            }
            // Nothing may come back for those: the next frame is the PING reply.
            ping_ok(&mut r, 6)
        }),
        case(
            "CANCEL of a pending WRITE -> Cancelled, stream id reusable",
            |e| {
                let mut r = e.admin()?;
                send(&mut r, &write_request(7, 1, 0))?;
                send(
                    &mut r,
                    &Frame::message(Cmd::CANCEL, 7, flags::END, &msg::Cancel {}),
                )?;
                expect_code(&recv(&mut r, "cancel")?, Cancelled, "cancel")?;
                let f = call(&mut r, Cmd::STAT, 7, &stat_req("known.txt"))?;
                let _: msg::StatResponse = expect_ok(&f, "stat on the reused id")?;
                Ok(())
            },
        ),
        case("CANCEL of an active READ -> Cancelled, no hang", |e| {
            let mut r = authed_as(e.addr(), TOKEN, 64 << 10)?;
            let open: msg::OpenResponse = expect_ok(
                &call(&mut r, Cmd::OPEN, 5, &open_read_req("big16"))?,
                "open",
            )?;
            send(
                &mut r,
                &Frame::message(
                    Cmd::READ,
                    9,
                    flags::END,
                    &msg::ReadRequest {
                        handle: open.handle,
                        first_chunk: 0,
                        count: 256,
                        compress_level: 0,
                    },
                ),
            )?;
            send(
                &mut r,
                &Frame::message(Cmd::CANCEL, 9, flags::END, &msg::Cancel {}),
            )?;
            let mut chunks = 0;
            loop {
                let f = recv(&mut r, "read/cancel")?;
                ensure!(f.stream_id() == 9, "frame on stream {}", f.stream_id());
                if f.header.is_data() {
                    chunks += 1;
                    if f.header.is_end() {
                        return Err("READ ran to completion despite CANCEL".into());
                    }
                    continue;
                }
                expect_code(&f, Cancelled, "end of cancelled READ")?;
                break;
            }
            ensure!(chunks < 256, "all chunks sent");
            ping_ok(&mut r, 9)
        }),
        case(
            "DATA frame of a WRITE with a wrong checksum -> ChecksumMismatch, resend accepted",
            |e| {
                let mut r = e.admin()?;
                let f = call(&mut r, Cmd::OPEN, 5, &open_write_req("crc.bin", 5, "crc"))?;
                let open: msg::OpenResponse = expect_ok(&f, "open")?;
                let req = msg::WriteRequest {
                    handle: open.handle,
                    chunk: 0,
                };
                send(&mut r, &Frame::message(Cmd::WRITE, 6, 0, &req))?;
                let mut data = Frame::new(
                    Cmd::WRITE,
                    6,
                    flags::DATA | flags::END,
                    Bytes::from_static(b"hello"),
                );
                data.header.checksum ^= 1;
                send(&mut r, &data)?;
                expect_code(&recv(&mut r, "crc")?, ChecksumMismatch, "bad chunk crc")?;
                // The stream was released: the same id carries the resend.
                let ack = write_chunk(&mut r, 6, open.handle, 0, b"hello")?;
                let _: msg::WriteAck = expect_ok(&ack, "resend")?;
                let c = msg::CommitRequest {
                    handle: open.handle,
                    blake3: blake3::hash(b"hello").as_bytes().to_vec(),
                    upload_id: String::new(),
                };
                let _: msg::CommitResponse =
                    expect_ok(&call(&mut r, Cmd::COMMIT, 6, &c)?, "commit")?;
                ensure!(
                    std::fs::read(e.root.join("crc.bin")).unwrap() == b"hello",
                    "content"
                );
                Ok(())
            },
        ),
        case(
            "DATA frame naming another cmd on a pending WRITE -> BadStream, stream freed",
            mismatched_data_frees_the_stream,
        ),
        case(
            "WriteRequest with a wrong checksum -> ChecksumMismatch once, its DATA dropped",
            |e| {
                let mut r = e.admin()?;
                let req = msg::WriteRequest {
                    handle: 1,
                    chunk: 0,
                };
                let mut w = Frame::message(Cmd::WRITE, 6, 0, &req);
                w.header.checksum ^= 1;
                send(&mut r, &w)?;
                let data = Frame::new(
                    Cmd::WRITE,
                    6,
                    flags::DATA | flags::END,
                    Bytes::from_static(b"hello"),
                );
                send(&mut r, &data)?;
                expect_code(&recv(&mut r, "crc")?, ChecksumMismatch, "bad WriteRequest")?;
                // Exactly one final frame for stream 6: the next frame is the PING reply, and
                // the id is free again.
                ping_ok(&mut r, 7)?;
                let f = call(&mut r, Cmd::STAT, 6, &stat_req("known.txt"))?;
                let _: msg::StatResponse = expect_ok(&f, "stat on stream 6")?;
                Ok(())
            },
        ),
        case(
            "damaged frame on a stream with a running READ -> the READ ends Cancelled",
            |e| {
                let mut r = authed_as(e.addr(), TOKEN, 64 << 10)?;
                let f = call(&mut r, Cmd::OPEN, 5, &open_read_req("big16"))?;
                let open: msg::OpenResponse = expect_ok(&f, "open")?;
                let req = msg::ReadRequest {
                    handle: open.handle,
                    first_chunk: 0,
                    count: 256,
                    compress_level: 0,
                };
                send(&mut r, &Frame::message(Cmd::READ, 9, flags::END, &req))?;
                let mut bad = Frame::message(Cmd::STAT, 9, flags::END, &stat_req("known.txt"));
                bad.header.checksum ^= 1;
                send(&mut r, &bad)?;
                loop {
                    let f = recv(&mut r, "read")?;
                    ensure!(f.stream_id() == 9, "frame on stream {}", f.stream_id());
                    if f.header.is_data() {
                        ensure!(
                            !f.header.is_end(),
                            "READ completed despite the damaged frame"
                        );
                        continue;
                    }
                    expect_code(&f, Cancelled, "end of the READ")?;
                    break;
                }
                ping_ok(&mut r, 9)
            },
        ),
        case("HELLO after AUTH -> BadRequest, connection usable", |e| {
            let mut r = e.admin()?;
            let h = msg::Hello {
                version: 1,
                chunk_size: 64 << 10,
                max_frame: 1,
                ..Default::default()
            };
            expect_code(&call(&mut r, Cmd::HELLO, 0, &h)?, BadRequest, "late hello")?;
            // The session's negotiated limits did not change: a 1 MiB chunk is still accepted.
            let mut r2 = e.admin()?;
            ensure!(download(&mut r2, "big16", 3)?.len() == 16 << 20, "download");
            ping_ok(&mut r, 3)
        }),
        case("DATA frame without a pending WRITE -> BadStream", |e| {
            let mut r = e.admin()?;
            send(
                &mut r,
                &Frame::new(
                    Cmd::WRITE,
                    11,
                    flags::DATA | flags::END,
                    Bytes::from_static(b"zz"),
                ),
            )?;
            expect_code(&recv(&mut r, "data error")?, BadStream, "stray DATA")?;
            ping_ok(&mut r, 11)
        }),
    ];

    // Bogus handles.
    type Req = fn(u32) -> (Cmd, Vec<u8>);
    let bogus: [(&str, Req); 4] = [
        ("READ", |h| {
            (
                Cmd::READ,
                msg::ReadRequest {
                    handle: h,
                    first_chunk: 0,
                    count: 1,
                    compress_level: 0,
                }
                .encode_to_vec(),
            )
        }),
        ("COMMIT", |h| {
            (
                Cmd::COMMIT,
                msg::CommitRequest {
                    handle: h,
                    blake3: vec![0; 32],
                    upload_id: String::new(),
                }
                .encode_to_vec(),
            )
        }),
        ("CLOSE", |h| {
            (Cmd::CLOSE, msg::CloseRequest { handle: h }.encode_to_vec())
        }),
        ("MANIFEST", |h| {
            (
                Cmd::MANIFEST,
                msg::ManifestRequest {
                    handle: h,
                    first_chunk: 0,
                    count: 0,
                    cvs: false,
                }
                .encode_to_vec(),
            )
        }),
    ];
    for (name, req) in bogus {
        cases.push(case(
            format!("{name} with bogus handles -> BadHandle"),
            move |e| {
                let mut r = e.admin()?;
                for h in [0, 1, 12345, u32::MAX] {
                    let (cmd, payload) = req(h);
                    send(
                        &mut r,
                        &Frame::new(cmd, 9, flags::END, Bytes::from(payload)),
                    )?;
                    expect_code(
                        &recv(&mut r, name)?,
                        BadHandle,
                        &format!("{name} handle {h}"),
                    )?;
                }
                Ok(())
            },
        ));
    }
    cases.push(case("WRITE with bogus handles -> BadHandle", |e| {
        let mut r = e.admin()?;
        for h in [0, 1, 12345, u32::MAX] {
            expect_code(
                &write_chunk(&mut r, 9, h, 0, b"x")?,
                BadHandle,
                &format!("handle {h}"),
            )?;
        }
        Ok(())
    }));

    // READ bounds.
    for (name, first, count) in [
        ("READ with count 0 -> BadRequest", 0, 0),
        ("READ with count 1025 -> BadRequest", 0, 1025),
        ("READ beyond chunk_count -> BadRequest", 15, 2),
        (
            "READ with first_chunk + count overflowing u32 -> BadRequest",
            u32::MAX,
            2,
        ),
    ] {
        cases.push(case(name, move |e| {
            let mut r = e.admin()?;
            let open: msg::OpenResponse = expect_ok(
                &call(&mut r, Cmd::OPEN, 5, &open_read_req("big16"))?,
                "open",
            )?;
            let req = msg::ReadRequest {
                handle: open.handle,
                first_chunk: first,
                count,
                compress_level: 0,
            };
            expect_code(
                &call(&mut r, Cmd::READ, 6, &req)?,
                ErrorCode::BadRequest,
                "read",
            )?;
            // The handle still works.
            let data = read_chunks(&mut r, 6, &open, 15, 1)?;
            ensure!(data.len() == 1 << 20, "last chunk {} bytes", data.len());
            Ok(())
        }));
    }

    // Uploads.
    cases.push(case("WRITE of a wrong-length chunk -> BadRequest", |e| {
        let mut r = e.admin()?;
        let open: msg::OpenResponse = expect_ok(
            &call(&mut r, Cmd::OPEN, 5, &open_write_req("wl.bin", 10, "wl"))?,
            "open",
        )?;
        for bad in [&b"short"[..], &[7u8; 11][..], &b""[..]] {
            expect_code(
                &write_chunk(&mut r, 6, open.handle, 0, bad)?,
                BadRequest,
                &format!("{} bytes", bad.len()),
            )?;
        }
        expect_code(
            &write_chunk(&mut r, 6, open.handle, 1, &[7; 10])?,
            BadRequest,
            "chunk 1 of 1",
        )?;
        expect_code(
            &write_chunk(&mut r, 6, open.handle, u32::MAX, &[7; 10])?,
            BadRequest,
            "chunk u32::MAX",
        )?;
        ensure!(!e.root.join("wl.bin").exists(), "published");
        Ok(())
    }));
    cases.push(case(
        "WRITE and COMMIT on a read handle -> BadHandle",
        |e| {
            let mut r = e.admin()?;
            let open: msg::OpenResponse = expect_ok(
                &call(&mut r, Cmd::OPEN, 5, &open_read_req("known.txt"))?,
                "open",
            )?;
            expect_code(
                &write_chunk(&mut r, 6, open.handle, 0, b"EVIL!")?,
                BadHandle,
                "write",
            )?;
            let c = msg::CommitRequest {
                handle: open.handle,
                blake3: blake3::hash(b"EVIL!").as_bytes().to_vec(),
                upload_id: String::new(),
            };
            expect_code(&call(&mut r, Cmd::COMMIT, 6, &c)?, BadHandle, "commit")?;
            ensure!(
                std::fs::read(e.root.join("known.txt")).unwrap() == b"known",
                "changed"
            );
            Ok(())
        },
    ));
    cases.push(case(
        "COMMIT with missing chunks -> Incomplete, nothing published",
        |e| {
            let mut r = e.admin()?;
            let data = random_bytes(3 << 20, 5);
            let open: msg::OpenResponse = expect_ok(
                &call(
                    &mut r,
                    Cmd::OPEN,
                    5,
                    &open_write_req("inc.bin", data.len() as u64, "inc"),
                )?,
                "open",
            )?;
            let _: msg::WriteAck = expect_ok(
                &write_chunk(&mut r, 6, open.handle, 1, &data[1 << 20..2 << 20])?,
                "write",
            )?;
            let c = msg::CommitRequest {
                handle: open.handle,
                blake3: blake3::hash(&data).as_bytes().to_vec(),
                upload_id: String::new(),
            };
            expect_code(&call(&mut r, Cmd::COMMIT, 6, &c)?, Incomplete, "commit")?;
            ensure!(!e.root.join("inc.bin").exists(), "published");
            Ok(())
        },
    ));
    cases.push(case(
        "COMMIT with the wrong BLAKE3 -> HashMismatch, nothing published",
        |e| {
            let mut r = e.admin()?;
            let open: msg::OpenResponse = expect_ok(
                &call(&mut r, Cmd::OPEN, 5, &open_write_req("hm.bin", 5, "hm"))?,
                "open",
            )?;
            let _: msg::WriteAck =
                expect_ok(&write_chunk(&mut r, 6, open.handle, 0, b"hello")?, "write")?;
            let c = msg::CommitRequest {
                handle: open.handle,
                blake3: blake3::hash(b"HELLO").as_bytes().to_vec(),
                upload_id: String::new(),
            };
            expect_code(&call(&mut r, Cmd::COMMIT, 6, &c)?, HashMismatch, "commit")?;
            let c = msg::CommitRequest {
                handle: open.handle,
                blake3: vec![],
                upload_id: String::new(),
            };
            expect_code(
                &call(&mut r, Cmd::COMMIT, 6, &c)?,
                HashMismatch,
                "commit with empty hash",
            )?;
            ensure!(!e.root.join("hm.bin").exists(), "published");
            Ok(())
        },
    ));

    // Limits.
    cases.push(case(
        "max_streams+100 concurrent streams -> excess LimitExceeded; 2000-request burst answered",
        many_streams,
    ));
    cases.push(case(
        "max_handles+1000 OPENs -> excess LimitExceeded; CLOSE frees one",
        |e| {
            let mut r = e.admin()?;
            let mut handles = Vec::new();
            for i in 0..MAX_HANDLES + 1000 {
                let f = call(&mut r, Cmd::OPEN, 5, &open_read_req("known.txt"))?;
                if i < MAX_HANDLES {
                    handles.push(expect_ok::<msg::OpenResponse>(&f, &format!("open #{i}"))?.handle);
                } else {
                    expect_code(&f, LimitExceeded, &format!("open #{i}"))?;
                }
            }
            let _: msg::Ok = expect_ok(
                &call(
                    &mut r,
                    Cmd::CLOSE,
                    5,
                    &msg::CloseRequest { handle: handles[7] },
                )?,
                "close",
            )?;
            let _: msg::OpenResponse = expect_ok(
                &call(&mut r, Cmd::OPEN, 5, &open_read_req("known.txt"))?,
                "reopen",
            )?;
            expect_code(
                &call(&mut r, Cmd::OPEN, 5, &open_read_req("known.txt"))?,
                LimitExceeded,
                "full again",
            )?;
            // Another connection has its own table.
            let mut r2 = e.admin()?;
            let _: msg::OpenResponse = expect_ok(
                &call(&mut r2, Cmd::OPEN, 5, &open_read_req("known.txt"))?,
                "other conn",
            )?;
            Ok(())
        },
    ));

    // Hello negotiation abuse.
    cases.push(case("HELLO with version 0 -> UnsupportedVersion", |e| {
        let mut r = Raw::connect(e.addr());
        let f = call(
            &mut r,
            Cmd::HELLO,
            0,
            &msg::Hello {
                version: 0,
                ..Default::default()
            },
        )?;
        expect_code(&f, UnsupportedVersion, "hello v0")
    }));
    cases.push(case(
        "HELLO with absurd chunk_size and max_frame=1 -> BadRequest, nothing changed",
        |e| {
            let mut r = Raw::connect(e.addr());
            let h = msg::Hello {
                version: 1,
                chunk_size: 3,
                max_frame: 1,
                ..Default::default()
            };
            // A client that cannot take the smallest chunk could never read a file.
            expect_code(&call(&mut r, Cmd::HELLO, 0, &h)?, BadRequest, "hello")?;
            let ok = msg::Hello {
                version: 1,
                chunk_size: 3,
                ..Default::default()
            };
            let reply: msg::Hello = expect_ok(&call(&mut r, Cmd::HELLO, 0, &ok)?, "hello")?;
            ensure!(
                reply.chunk_size == 1 << 20,
                "chunk_size {}",
                reply.chunk_size
            );
            Ok(())
        },
    ));

    // Everything before Auth.
    let before_auth: [(Cmd, Vec<u8>); 11] = [
        (Cmd::LIST, msg::ListRequest::default().encode_to_vec()),
        (Cmd::STAT, stat_req("known.txt").encode_to_vec()),
        (Cmd::OPEN, open_read_req("known.txt").encode_to_vec()),
        (
            Cmd::MANIFEST,
            msg::ManifestRequest {
                handle: 1,
                first_chunk: 0,
                count: 1,
                cvs: false,
            }
            .encode_to_vec(),
        ),
        (
            Cmd::READ,
            msg::ReadRequest {
                handle: 1,
                first_chunk: 0,
                count: 1,
                compress_level: 0,
            }
            .encode_to_vec(),
        ),
        (
            Cmd::WRITE,
            msg::WriteRequest {
                handle: 1,
                chunk: 0,
            }
            .encode_to_vec(),
        ),
        (
            Cmd::COMMIT,
            msg::CommitRequest {
                handle: 1,
                blake3: vec![],
                upload_id: String::new(),
            }
            .encode_to_vec(),
        ),
        (Cmd::CLOSE, msg::CloseRequest { handle: 1 }.encode_to_vec()),
        (
            Cmd::MKDIR,
            msg::MkdirRequest {
                path: "preauth".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            Cmd::REMOVE,
            msg::RemoveRequest {
                path: VICTIM.into(),
                recursive: true,
            }
            .encode_to_vec(),
        ),
        (
            Cmd::RENAME,
            msg::RenameRequest {
                from: VICTIM.into(),
                to: RENAMED.into(),
                no_clobber: false,
            }
            .encode_to_vec(),
        ),
    ];
    for (cmd, payload) in before_auth {
        cases.push(case(
            format!("{cmd} before Auth -> NotAuthenticated"),
            move |e| {
                let mut r = hello_only(e.addr())?;
                send(
                    &mut r,
                    &Frame::new(cmd, 3, flags::END, Bytes::from(payload.clone())),
                )?;
                let f = recv(&mut r, "pre-auth reply")?;
                expect_code(&f, NotAuthenticated, &cmd.to_string())?;
                ensure!(!e.root.join("preauth").exists(), "MKDIR ran");
                // The connection stays open and can still authenticate.
                ping_ok(&mut r, 3)?;
                let _: msg::AuthOk = expect_ok(
                    &call(
                        &mut r,
                        Cmd::AUTH,
                        1,
                        &msg::Auth {
                            token: TOKEN.into(),
                        },
                    )?,
                    "auth",
                )?;
                Ok(())
            },
        ));
    }
    cases.push(case(
        "DATA frame and CANCEL before Auth -> BadStream / ignored",
        |e| {
            let mut r = hello_only(e.addr())?;
            send(
                &mut r,
                &Frame::message(Cmd::CANCEL, 5, flags::END, &msg::Cancel {}),
            )?;
            send(
                &mut r,
                &Frame::new(
                    Cmd::WRITE,
                    5,
                    flags::DATA | flags::END,
                    Bytes::from_static(b"x"),
                ),
            )?;
            expect_code(&recv(&mut r, "data")?, BadStream, "pre-auth DATA")?;
            ping_ok(&mut r, 5)
        },
    ));
    cases.push(case(
        "Auth with a wrong token thrice -> AuthFailed x3, answered at once, closed (own fsd)",
        |_| {
            // Its own server: the per-source guess budget must not touch the other cases.
            let s = Fsd::start();
            let mut r = hello_only(s.addr)?;
            let t0 = Instant::now();
            let almost = &TOKEN[..TOKEN.len() - 1];
            let longer = format!("{TOKEN}x");
            for token in ["", almost, longer.as_str()] {
                let f = call(
                    &mut r,
                    Cmd::AUTH,
                    1,
                    &msg::Auth {
                        token: token.into(),
                    },
                )?;
                expect_code(&f, AuthFailed, &format!("token {token:?}"))?;
            }
            let took = t0.elapsed();
            // Failures are paid from a budget, not by holding the connection.
            ensure!(
                took < Duration::from_secs(1),
                "failures answered in {took:?}"
            );
            ensure!(
                closed_within(&mut r, Duration::from_secs(5)),
                "not closed after 3 failures"
            );
            // A right token is still accepted at once.
            let t = Instant::now();
            let mut ok = authed_as(s.addr, TOKEN, 0)?;
            ensure!(
                t.elapsed() < Duration::from_secs(1),
                "good auth took {:?}",
                t.elapsed()
            );
            ping_ok(&mut ok, 2)
        },
    ));
    cases
}

#[test]
fn protocol_abuse_is_refused_and_the_server_keeps_serving() {
    let env = Env::new();
    let cases = protocol_cases();
    assert!(cases.len() >= 40);
    run_table("protocol", env, cases);
}

// ---------------------------------------------------------------------------------------------
// Slowloris and the auth timeout.
// ---------------------------------------------------------------------------------------------

#[test]
fn slowloris_does_not_block_others_and_unauthenticated_connections_time_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("known.txt"), "known").unwrap();
    let s = Fsd::start_on(dir.path(), &["--auth-timeout", "2"]);
    let addr = s.addr;
    let t0 = Instant::now();

    // A: one byte per second of a valid Hello (bounded to 5 s).
    let slow = std::thread::spawn(move || {
        let mut r = Raw::connect(addr);
        let hello = encode(&Frame::message(
            Cmd::HELLO,
            0,
            flags::END,
            &msg::Hello {
                version: 1,
                agent: "slowloris".into(),
                ..Default::default()
            },
        ));
        let start = Instant::now();
        let mut sent = 0;
        let mut last = None;
        // One byte, then up to a second listening for the server's last word (Timeout).
        let _ = r.sock.set_read_timeout(Some(Duration::from_secs(1)));
        for b in &hello {
            if start.elapsed() > Duration::from_secs(5) || r.send_bytes(&[*b]).is_err() {
                break;
            }
            sent += 1;
            if let Some(f) = r.recv() {
                last = code_of(&f).map(|(c, _)| c);
                break;
            }
        }
        let closed = closed_within(&mut r, Duration::from_secs(5));
        (sent, last, closed, start.elapsed())
    });
    // B: silent. C: Hello, then a PING every 300 ms (does not extend the auth deadline).
    // D: 10 idle unauthenticated connections (with B, C and A within the per-source limit of
    // unauthenticated connections, so that each waits for its own timeout).
    let mut b = Raw::connect(addr);
    let mut c = hello_only(addr).unwrap();
    let idle: Vec<Raw> = (0..10).map(|_| Raw::connect(addr)).collect();
    let pinger = std::thread::spawn(move || {
        let start = Instant::now();
        let mut pongs = 0;
        while start.elapsed() < Duration::from_secs(5) {
            if call(&mut c, Cmd::PING, 1, &msg::Ping { nonce: 1 })
                .ok()
                .is_some_and(|f| !f.header.is_error())
            {
                pongs += 1;
            } else {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let closed = closed_within(&mut c, Duration::from_secs(5));
        (pongs, closed, t0.elapsed())
    });

    // Meanwhile another client is served promptly.
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    let mut good = authed_as(addr, TOKEN, 0).unwrap();
    let st: msg::StatResponse = expect_ok(
        &call(&mut good, Cmd::STAT, 2, &stat_req("known.txt")).unwrap(),
        "stat",
    )
    .unwrap();
    assert_eq!(st.entry.unwrap().size, 5);
    let served_in = t.elapsed();
    assert!(
        served_in < Duration::from_secs(1),
        "STAT took {served_in:?}"
    );

    // B gets Timeout at ~2 s, then EOF.
    let f = b.recv().expect("timeout frame");
    assert_eq!(code_of(&f).map(|c| c.0), Some(ErrorCode::Timeout));
    assert!(b.closed());
    let b_at = t0.elapsed();
    let (sent, last, a_closed, a_at) = slow.join().unwrap();
    let (pongs, c_closed, c_at) = pinger.join().unwrap();
    println!("slowloris: sent {sent} bytes, last {last:?}, closed {a_closed} after {a_at:?}");
    println!(
        "silent connection closed at {b_at:?}; pre-auth pinger: {pongs} pongs, closed at {c_at:?}"
    );
    println!("meanwhile an authenticated STAT was served in {served_in:?}");
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(4)).contains(&b_at),
        "silent connection closed at {b_at:?}"
    );
    assert!(sent <= 4, "slowloris sent {sent} bytes before being closed");
    assert_eq!(last, Some(ErrorCode::Timeout));
    assert!(
        a_closed && a_at < Duration::from_secs(5),
        "slowloris closed {a_closed} at {a_at:?}"
    );
    assert!(
        c_closed && c_at < Duration::from_secs(4),
        "pinger closed {c_closed} at {c_at:?}"
    );
    // The idle crowd was closed too.
    for mut r in idle {
        assert!(
            closed_within(&mut r, Duration::from_secs(3)),
            "idle connection left open"
        );
    }
    // And the authenticated client is still served after all that.
    let f = call(&mut good, Cmd::STAT, 2, &stat_req("known.txt")).unwrap();
    let _: msg::StatResponse = expect_ok(&f, "stat").unwrap();
}

// ---------------------------------------------------------------------------------------------
// The harness itself: harm must be noticed, or every "ok" above proves nothing.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_harness_notices_harm() {
    let env = Env::new();
    let cases = vec![
        case("harmless", |_| Ok(())),
        case("simulated escape: creates a file outside the root", |e| {
            std::fs::write(e.out.join("dropped"), "x").unwrap();
            Ok(())
        }),
        case("simulated escape: rewrites the sentinel in place", |e| {
            std::fs::write(e.out.join("secret"), "OUTSIDE-SECREX").unwrap();
            Ok(())
        }),
        case("simulated escape: writes through the hard link", |e| {
            std::fs::write(e.root.join("hard"), "changed-via-link").unwrap();
            Ok(())
        }),
        case("simulated rename of the victim", |e| {
            std::fs::rename(e.root.join(VICTIM), e.root.join(RENAMED)).unwrap();
            Ok(())
        }),
    ];
    let err = catch_unwind(AssertUnwindSafe(|| run_table("self-test", env, cases)))
        .expect_err("the harness passed cases that harmed the file system");
    let text = panic_text(err);
    assert!(text.starts_with("4 of 5 self-test cases failed"), "{text}");
    for name in [
        "creates a file outside",
        "rewrites the sentinel",
        "through the hard link",
        "rename of the victim",
    ] {
        assert!(text.contains(name), "{name} not reported:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Server bugs found by this suite: each test asserts the correct behaviour and fails today.
// ---------------------------------------------------------------------------------------------

#[test]
fn uploads_never_publish_setuid_bits() {
    let env = Env::new();
    let mut r = env.admin().unwrap();
    for (name, bits) in [("suid", 0o4755), ("sgid", 0o2755), ("sticky", 0o1777)] {
        let req = msg::OpenRequest {
            mode_bits: bits,
            ..open_write_req(name, 4, name)
        };
        let c = upload(&mut r, req, b"#!/x").unwrap().unwrap();
        let _: msg::CommitResponse = expect_ok(&c, "commit").unwrap();
        let mode = std::fs::metadata(env.root.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o7000,
            0,
            "{name}: published with mode {mode:o} (special bits from the client)"
        );
    }
}

#[test]
fn state_dir_unreachable_through_a_symlink() {
    let env = Env::new();
    std::os::unix::fs::symlink(".fsd-state", env.root.join("state_alias")).unwrap();
    let mut r = env.admin().unwrap();
    // Make sure an upload is in progress (a multi-chunk one: its files sit in .fsd-state/uploads).
    let size = (1 << 20) + 5;
    let _: msg::OpenResponse = expect_ok(
        &call(
            &mut r,
            Cmd::OPEN,
            5,
            &open_write_req("private.bin", size, "p"),
        )
        .unwrap(),
        "open",
    )
    .unwrap();
    let id = std::fs::read_dir(env.root.join(".fsd-state/uploads"))
        .unwrap()
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".data").map(str::to_owned)
        })
        .expect("an upload in the state dir");
    let mut reached = Vec::new();
    for (op, path) in [
        (Op::List, "state_alias/uploads".to_string()),
        (Op::Stat, format!("state_alias/uploads/{id}.state")),
        (Op::OpenRead, format!("state_alias/uploads/{id}.data")),
        (Op::Remove, format!("state_alias/uploads/{id}.lock")),
    ] {
        let f = path_op(&mut r, op, &path).unwrap();
        match code_of(&f) {
            Some((ErrorCode::InvalidPath, _)) => {}
            other => reached.push(format!("{} {path}: {other:?}", op.label())),
        }
    }
    assert!(
        reached.is_empty(),
        "the state dir is reachable through a symlink (None = success):\n  {}",
        reached.join("\n  ")
    );
}

/// Before Auth the codec accepts no DATA at all and only small control frames: an
/// unauthenticated peer is refused at the header and cannot make fsd buffer anything big.
#[test]
fn unauthenticated_data_frames_are_refused_unbuffered() {
    let env = Env::new();
    let pid = env.fsd.pid();
    let before = proc_status_kib(pid, "VmRSS:");
    const CONNS: usize = 8;
    for _ in 0..CONNS {
        let mut r = Raw::connect(env.addr());
        let h = header(flags::DATA | flags::END, Cmd::WRITE, 1, MAX_FRAME);
        r.send_bytes(&h.to_bytes()).unwrap();
        // The server answers at the header and closes; the rest of the payload may not even
        // be accepted by the socket any more.
        let _ = r.send_bytes(&vec![0x5a; MAX_FRAME as usize - 1]);
        let f = r.recv();
        assert!(
            f.as_ref()
                .is_none_or(|f| code_of(f).is_some_and(|(c, _)| c == ErrorCode::LimitExceeded)),
            "expected LimitExceeded or a close, got {f:?}"
        );
        assert!(closed_within(&mut r, Duration::from_secs(5)));
    }
    let after = proc_status_kib(pid, "VmRSS:");
    let grew_mib = after.saturating_sub(before) / 1024;
    println!("{CONNS} unauthenticated 16 MiB DATA frames: fsd RSS {before} -> {after} KiB (+{grew_mib} MiB)");
    assert!(
        grew_mib < 16,
        "{CONNS} unauthenticated connections grew fsd by {grew_mib} MiB"
    );
}

/// OPEN write sizes its per-chunk state by the declared size: a declared size that cannot fit
/// on the server's disk is refused at once (NoSpace, retryable), and one connection may hold at
/// most 16 multi-chunk uploads, so a peer cannot pin memory by declaring huge files. Uploads of
/// one chunk pin one chunk's state and count only toward the handle limit.
#[test]
fn huge_declared_uploads_are_bounded() {
    let env = Env::new();
    let mut r = env.admin().unwrap();
    let f = call(&mut r, Cmd::OPEN, 5, &open_write_req("huge", 1 << 44, "k")).unwrap();
    expect_code(&f, ErrorCode::NoSpace, "16 TiB upload").unwrap();
    let two_chunks = (1 << 20) + 1;
    for i in 0..16 {
        let f = call(
            &mut r,
            Cmd::OPEN,
            5,
            &open_write_req(&format!("u{i}"), two_chunks, &format!("k{i}")),
        )
        .unwrap();
        let _: msg::OpenResponse = expect_ok(&f, "open").unwrap();
    }
    let f = call(
        &mut r,
        Cmd::OPEN,
        5,
        &open_write_req("u16", two_chunks, "k16"),
    )
    .unwrap();
    expect_code(
        &f,
        ErrorCode::LimitExceeded,
        "17th multi-chunk upload on one connection",
    )
    .unwrap();
    for i in 0..20 {
        let f = call(
            &mut r,
            Cmd::OPEN,
            5,
            &open_write_req(&format!("s{i}"), 1 << 20, &format!("s{i}")),
        )
        .unwrap();
        let _: msg::OpenResponse = expect_ok(&f, "single-chunk upload beside 16 others").unwrap();
    }
}

/// PUT keeps the rules of OPEN WRITE + WRITE + COMMIT: the declared size must be the DATA
/// frame's, one chunk at most, the BLAKE3 must match (else nothing is published), no_clobber
/// refuses an existing file, and the published mode carries permission bits only.
#[test]
fn put_checks_size_hash_and_clobbering() {
    let env = Env::new();
    let mut r = env.admin().unwrap();
    let req = |path: &str, data: &[u8]| msg::PutRequest {
        path: path.into(),
        size: data.len() as u64,
        blake3: blake3::hash(data).as_bytes().to_vec(),
        mode_bits: 0o4755,
        ..Default::default()
    };
    let send_put = |r: &mut Raw, sid: u32, req: &msg::PutRequest, data: &[u8]| {
        send(r, &Frame::message(Cmd::PUT, sid, 0, req)).unwrap();
        let d = Frame::new(
            Cmd::PUT,
            sid,
            flags::DATA | flags::END,
            Bytes::copy_from_slice(data),
        );
        send(r, &d).unwrap();
        recv(r, "put reply").unwrap()
    };

    let f = send_put(&mut r, 3, &req("p1", b"hello"), b"hello");
    let c: msg::CommitResponse = expect_ok(&f, "put").unwrap();
    assert_eq!(c.size, 5);
    assert_eq!(std::fs::read(env.root.join("p1")).unwrap(), b"hello");
    let mode = std::fs::metadata(env.root.join("p1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o7777,
        0o755,
        "special bits dropped, permission bits kept"
    );

    let f = send_put(&mut r, 3, &req("p2", b"hello"), b"hell");
    expect_code(
        &f,
        ErrorCode::BadRequest,
        "size differs from the DATA frame",
    )
    .unwrap();
    let mut bad = req("p2", b"hello");
    bad.blake3 = blake3::hash(b"other").as_bytes().to_vec();
    let f = send_put(&mut r, 3, &bad, b"hello");
    expect_code(&f, ErrorCode::HashMismatch, "wrong BLAKE3").unwrap();
    assert!(
        !env.root.join("p2").exists(),
        "published despite a failed PUT"
    );

    let big = vec![7u8; (1 << 20) + 1];
    let f = send_put(&mut r, 3, &req("p3", &big), &big);
    expect_code(&f, ErrorCode::BadRequest, "more than one chunk").unwrap();
    assert!(!env.root.join("p3").exists());

    let mut keep = req("p1", b"world");
    keep.no_clobber = true;
    let f = send_put(&mut r, 3, &keep, b"world");
    expect_code(&f, ErrorCode::AlreadyExists, "no_clobber").unwrap();
    let f = send_put(&mut r, 3, &req("p1", b"world"), b"world");
    let _: msg::CommitResponse = expect_ok(&f, "replace").unwrap();
    assert_eq!(std::fs::read(env.root.join("p1")).unwrap(), b"world");
    let f = send_put(&mut r, 3, &req("", b"x"), b"x");
    expect_code(&f, ErrorCode::InvalidPath, "the root").unwrap();
    // Nothing of all this is left in the state directory.
    let left: Vec<_> = std::fs::read_dir(env.root.join(".fsd-state/uploads"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
