//! Several fsd nodes over a real distributed file system (issue 19): `scripts/cluster.sh` brings
//! up GlusterFS (or JuiceFS with `FSD_CLUSTER_ENGINE=juicefs`) on this machine and mounts one
//! volume twice; each test starts node A on one mount and node B on the other, both with their
//! state directory on the volume (`MOUNT/state`, the same directory through two mounts), and
//! moves files through them with the real `fsc`: an upload begun on A and finished on B, 1,000
//! small files up and down through both, a download resumed on the other node, `-j 4` spread
//! over both nodes by a round-robin balancer, a node killed mid-transfer, racing uploads.
//!
//! `FSD_CLUSTER_ENGINE=local` is the control: one local directory bind-mounted twice (one file
//! system, one st_dev), where every case passes; what fails on an engine fails because of it.
//!
//! Runs only where the engine can: as root, with /dev/fuse, with the engine installed
//! (`scripts/cluster.sh install`) and startable; otherwise each test prints `SKIPPED: <reason>`
//! and passes at once. The file system is started once per test process (in
//! /var/tmp/fsd-cluster-test, after purging what a killed run left there) and purged at exit;
//! the tests take turns (one lock), since the engine's daemons use fixed ports. Set
//! `FSD_CLUSTER_KEEP=1` to keep the volume, the bricks and the logs after the run.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::balancer::Balancer;
use common::proxy::{Fault, Proxy};
use common::*;

const MIB: usize = 1 << 20;
const CLUSTER_DIR: &str = "/var/tmp/fsd-cluster-test";
/// What a crash of a node may cost an upload: the client's unacknowledged window plus what the
/// node had stored but not synced (as in tests/uploads.rs).
const WINDOW: u64 = 8 * MIB as u64 + fsd::fs::upload::MAX_UNSYNCED;

// ---- the file system -------------------------------------------------------------------------

struct Cluster {
    engine: String,
    /// The two mounts of one volume.
    mnt: [PathBuf; 2],
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

fn engine() -> String {
    std::env::var("FSD_CLUSTER_ENGINE").unwrap_or_else(|_| "gluster".into())
}

fn cluster_sh(action: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
        .arg(action)
        .env("CLUSTER_DIR", CLUSTER_DIR)
        .env("CLUSTER_NODES", "0")
        .env("ENGINE", engine())
        .stdin(Stdio::null());
    c
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn bring_up() -> Result<Cluster, String> {
    let engine = engine();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: FUSE mounts and the engine's daemons need root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse: no FUSE mounts here".into());
    }
    let needs: &[&str] = match engine.as_str() {
        "gluster" => &["glusterd", "gluster", "glusterfs"],
        "juicefs" => &["juicefs", "redis-server", "redis-cli"],
        "local" => &["mount"],
        other => {
            return Err(format!(
                "FSD_CLUSTER_ENGINE={other}: gluster, juicefs or local"
            ))
        }
    };
    if let Some(missing) = needs.iter().find(|b| !on_path(b)) {
        return Err(format!(
            "{missing} is not installed (ENGINE={engine} scripts/cluster.sh install)"
        ));
    }
    // What a killed run left behind goes first; then a fresh volume.
    let _ = Proc::spawn(cluster_sh("purge")).finish(Duration::from_secs(120));
    let t = Instant::now();
    let up = Proc::spawn(cluster_sh("start")).finish(Duration::from_secs(300));
    if !up.status.success() {
        let _ = Proc::spawn(cluster_sh("purge")).finish(Duration::from_secs(120));
        return Err(format!(
            "scripts/cluster.sh start failed ({}): {}",
            up.status,
            up.stderr.trim()
        ));
    }
    eprintln!("cluster: {engine} up in {:.1} s", t.elapsed().as_secs_f64());
    // SAFETY: registers a plain function; it runs once, at exit.
    unsafe { libc::atexit(tear_down) };
    let mnt = [0, 1].map(|i| Path::new(CLUSTER_DIR).join("mnt").join(["a", "b"][i]));
    for m in &mnt {
        std::fs::create_dir_all(m.join("data")).map_err(|e| format!("{}: {e}", m.display()))?;
    }
    Ok(Cluster { engine, mnt })
}

extern "C" fn tear_down() {
    let keep = std::env::var_os("FSD_CLUSTER_KEEP").is_some();
    let action = if keep { "stop" } else { "purge" };
    let out = Proc::spawn(cluster_sh(action)).finish(Duration::from_secs(120));
    if !out.status.success() {
        eprintln!("scripts/cluster.sh {action} failed: {}", out.stderr);
    }
}

/// One test's world: the cluster (taken in turn), nodes A and B, a remote directory of its own
/// and a local scratch directory.
struct Env {
    c: &'static Cluster,
    a: Fsd,
    b: Fsd,
    prefix: String,
    local: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

fn setup(name: &str) -> Option<Env> {
    let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = match CLUSTER.get_or_init(bring_up) {
        Ok(c) => c,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return None;
        }
    };
    let node = |m: &Path| {
        let state = m.join("state");
        let state = state.to_str().unwrap();
        Fsd::start_on(
            &m.join("data"),
            &["--state-dir", state, "--metrics", "127.0.0.1:0"],
        )
    };
    let (a, b) = (node(&c.mnt[0]), node(&c.mnt[1]));
    std::fs::create_dir_all(c.mnt[0].join("data").join(name)).unwrap();
    eprintln!(
        "{name}: engine {}, node A {} on {}, node B {} on {}",
        c.engine,
        a.addr,
        c.mnt[0].display(),
        b.addr,
        c.mnt[1].display()
    );
    Some(Env {
        c,
        a,
        b,
        prefix: name.to_string(),
        local: tempfile::tempdir().unwrap(),
        _turn: turn,
    })
}

impl Env {
    /// The path of a test file on the server.
    fn remote(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.prefix)
    }

    /// The same file seen directly through mount `i` (0: A's, 1: B's).
    fn on_mount(&self, i: usize, leaf: &str) -> PathBuf {
        self.c.mnt[i].join("data").join(&self.prefix).join(leaf)
    }

    /// The file's bytes through mount `i`; a failure to read it names the file, the mount
    /// and `when` (what fsc had said about it).
    fn read_mount(&self, i: usize, leaf: &str, when: &str) -> Vec<u8> {
        let p = self.on_mount(i, leaf);
        std::fs::read(&p).unwrap_or_else(|e| {
            panic!(
                "{} unreadable through mount {} ({when}): {e}",
                p.display(),
                ["A", "B"][i]
            )
        })
    }

    fn local(&self, name: &str) -> PathBuf {
        self.local.path().join(name)
    }

    /// Writes a file straight onto the volume (through mount A) and fsyncs it.
    fn put_direct(&self, leaf: &str, data: &[u8]) {
        use std::io::Write;
        let p = self.on_mount(0, leaf);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    fn node(&self, i: usize) -> String {
        [&self.a, &self.b][i].addr()
    }

    /// Bytes node `i` has sent in file data (`fsd_sent_bytes_total`, sendfile and copy), from
    /// its metrics endpoint.
    fn sent_bytes(&self, i: usize) -> u64 {
        use std::io::Write;
        let node = [&self.a, &self.b][i];
        let log = node.log_text();
        let addr = log
            .lines()
            .find_map(|l| l.strip_prefix("fsd: metrics on "))
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
            .trim()
            .to_string();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            sock,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        sock.read_to_string(&mut resp).unwrap();
        resp.lines()
            .filter(|l| l.starts_with("fsd_sent_bytes_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// `leaf` holds exactly `want`, read straight through both mounts and downloaded with fsc
    /// through both nodes. The messages say which way failed.
    fn assert_everywhere(&self, leaf: &str, want: &[u8]) {
        for i in 0..2 {
            let p = self.on_mount(i, leaf);
            let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(
                got == want,
                "{} ({} bytes) differs from what was sent ({} bytes)",
                p.display(),
                got.len(),
                want.len()
            );
        }
        for (i, name) in ["A", "B"].iter().enumerate() {
            let out = self.local(&format!("check-{leaf}-{i}").replace('/', "_"));
            let r = run(
                &[
                    "--json",
                    "--retries",
                    "1",
                    "download",
                    &self.node(i),
                    &self.remote(leaf),
                ],
                Some(&out),
                Duration::from_secs(120),
            );
            r.assert_ok(&format!("download {leaf} via node {name}"));
            let got = std::fs::read(&out).unwrap();
            assert!(
                got == want,
                "{leaf} downloaded via node {name}: {} bytes, differs from what was sent ({} bytes)",
                got.len(),
                want.len()
            );
            let _ = std::fs::remove_file(&out);
        }
    }
}

// ---- bounded child processes -----------------------------------------------------------------

/// A child process whose stdout (NDJSON events from `fsc --json`, or text) and stderr are
/// collected by threads, so that waiting on it is bounded.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

/// How a child ended.
struct Finished {
    status: ExitStatus,
    lines: Vec<String>,
    stderr: String,
    secs: f64,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (mut err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Proc {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
            started: Instant::now(),
        }
    }

    /// Reads events until one satisfies `until` (true), or the child ends or `limit` passes
    /// (false).
    fn wait_for(&mut self, limit: Duration, until: impl Fn(&serde_json::Value) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = serde_json::from_str(&l).is_ok_and(|v| until(&v));
                    self.stdout.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits up to `limit` for the child to end (then SIGKILL), and collects its output.
    fn finish(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close with the child; what is left in them arrives within moments.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stdout.push(l);
        }
        let mut stderr = String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned();
        if timed_out {
            stderr.push_str(&format!("\n[killed: still running after {limit:?}]"));
        }
        Finished {
            status,
            lines: self.stdout,
            stderr,
            secs: self.started.elapsed().as_secs_f64(),
        }
    }
}

impl Finished {
    fn events(&self) -> Vec<serde_json::Value> {
        self.lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// Exit status, the first error events and the end of stderr: what a failure message shows.
    fn describe(&self) -> String {
        let errors: Vec<String> = self
            .of("error")
            .iter()
            .chain(self.of("retry").iter())
            .take(4)
            .map(|e| e.to_string())
            .collect();
        let tail: String = {
            let lines: Vec<&str> = self.stderr.trim().lines().collect();
            lines[lines.len().saturating_sub(6)..].join("\n    ")
        };
        format!(
            "{} after {:.1} s; events: {} error, {} retry, {} restart, {} done; first: [{}]; stderr: {}",
            self.status,
            self.secs,
            self.of("error").len(),
            self.of("retry").len(),
            self.of("restart").len(),
            self.of("done").len(),
            errors.join(", "),
            tail
        )
    }

    fn assert_ok(&self, what: &str) {
        assert!(self.status.success(), "{what} failed: {}", self.describe());
    }

    /// The `transferred` of the last done event.
    fn transferred(&self) -> u64 {
        self.of("done")
            .last()
            .and_then(|e| e["transferred"].as_u64())
            .unwrap_or_else(|| panic!("no done event: {}", self.describe()))
    }
}

/// `fsc ARGS [OUT]`, bounded by `limit`.
fn run(args: &[&str], out: Option<&Path>, limit: Duration) -> Finished {
    let mut all: Vec<&str> = args.to_vec();
    if let Some(o) = out {
        all.push(o.to_str().unwrap());
    }
    Proc::spawn(fsc(&all)).finish(limit)
}

fn spawn_fsc(args: &[&str]) -> Proc {
    Proc::spawn(fsc(args))
}

/// Event predicate: a progress (or done) event with at least `n` bytes in place.
fn done_at_least(n: usize) -> impl Fn(&serde_json::Value) -> bool {
    move |e| e["done"].as_u64().is_some_and(|d| d >= n as u64) || e["event"] == "done"
}

// ---- the cases -------------------------------------------------------------------------------

/// An upload begun on node A (fsc SIGKILLed part-way) is finished on node B, resuming A's
/// chunks from the shared state directory; nothing shows at the final name before that.
#[test]
fn an_upload_begun_on_node_a_is_finished_on_node_b() {
    let Some(e) = setup("upload_a_then_b") else {
        return;
    };
    let size = 64 * MIB;
    let src = e.local("src.bin");
    let data = write_random(&src, size, 1901);
    // Paced (16 MiB/s), so that the kill lands mid-way.
    let proxy = Proxy::throttled(e.a.addr, 16 * MIB as u64);
    let mut up = spawn_fsc(&[
        "--json",
        "upload",
        &proxy.addr(),
        src.to_str().unwrap(),
        &e.remote("big.bin"),
    ]);
    let reached = up.wait_for(Duration::from_secs(60), done_at_least(32 * MIB));
    up.kill9();
    let first = up.finish(Duration::from_secs(10));
    assert!(
        reached && first.of("done").is_empty(),
        "the upload via A should have been killed at 32 MiB of {size}: {}",
        first.describe()
    );
    drop(proxy);
    std::thread::sleep(Duration::from_millis(500)); // A notices the hang-up, lets the upload go
    for i in 0..2 {
        assert!(
            !e.on_mount(i, "big.bin").exists(),
            "a partial file at the final name"
        );
    }
    let second = run(
        &[
            "--json",
            "upload",
            &e.node(1),
            src.to_str().unwrap(),
            &e.remote("big.bin"),
        ],
        None,
        Duration::from_secs(120),
    );
    second.assert_ok("the upload resumed via node B");
    let sent = second.transferred();
    assert!(
        sent <= (size - 16 * MIB) as u64,
        "node B did not resume node A's upload: it took {sent} of {size} bytes"
    );
    eprintln!("resumed on B: sent {sent} of {size} bytes");
    e.assert_everywhere("big.bin", &data);
}

/// 1,000 small files: half uploaded (`upload -r`) through A, half through B at the same time;
/// every file fsc reports as done must be readable and byte-identical through the other mount,
/// and both trees come back byte-identical through both nodes (`download -r`).
#[test]
fn a_thousand_small_files_up_and_down_through_both_nodes() {
    let Some(e) = setup("small_files") else {
        return;
    };
    let mut files = Vec::new(); // (tree, relative path, content)
    for i in 0..1000usize {
        let tree = if i < 500 { "left" } else { "right" };
        let rel = format!("d{}/f{i:04}.bin", i % 10);
        // 0 bytes to 16 KiB, all below one chunk: the one-round-trip PUT path.
        let len = if i % 97 == 0 { 0 } else { (i * 7919) % 16384 };
        let data = write_random(&e.local(tree).join(&rel), len, 19_000 + i as u64);
        files.push((tree, rel, data));
    }
    let t = Instant::now();
    let up = |tree: &str, node: usize| {
        spawn_fsc(&[
            "--json",
            "--retries",
            "2",
            "upload",
            "-r",
            &e.node(node),
            e.local(tree).to_str().unwrap(),
            &e.remote(tree),
        ])
    };
    let (ua, ub) = (up("left", 0), up("right", 1));
    let (ua, ub) = (
        ua.finish(Duration::from_secs(180)),
        ub.finish(Duration::from_secs(180)),
    );
    eprintln!(
        "upload -r of 2 x 500 files: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // First the promise that matters most: whatever fsc reported as done is there, whole,
    // through the other node's mount.
    let mut lost = Vec::new();
    for (tree, up, other) in [("left", &ua, 1), ("right", &ub, 0)] {
        for d in up.of("done") {
            let local = PathBuf::from(d["local"].as_str().unwrap_or_default());
            let Ok(rel) = local.strip_prefix(e.local(tree)) else {
                continue;
            };
            let want = std::fs::read(&local).unwrap();
            let seen = e.on_mount(other, &format!("{tree}/{}", rel.display()));
            match std::fs::read(&seen) {
                Ok(got) if got == want => {}
                Ok(got) => lost.push(format!("{}: {} bytes differ", seen.display(), got.len())),
                Err(err) => lost.push(format!("{}: {err}", seen.display())),
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} files that fsc reported as uploaded are not there through the other mount (fsc \
         via A: {}, via B: {}); first: {:?}",
        lost.len(),
        ua.status,
        ub.status,
        &lost[..lost.len().min(5)]
    );
    ua.assert_ok("upload -r of 500 files via node A");
    ub.assert_ok("upload -r of 500 files via node B");
    assert_eq!(ua.of("done").len() + ub.of("done").len(), 1000);
    // Both trees through both nodes.
    let t = Instant::now();
    for node in 0..2 {
        let down = |tree: &str| {
            let out = e.local(&format!("back-{node}-{tree}"));
            let p = spawn_fsc(&[
                "--json",
                "--retries",
                "2",
                "download",
                "-r",
                &e.node(node),
                &e.remote(tree),
                out.to_str().unwrap(),
            ]);
            (out, p)
        };
        let ((la, pa), (lb, pb)) = (down("left"), down("right"));
        let (ra, rb) = (
            pa.finish(Duration::from_secs(180)),
            pb.finish(Duration::from_secs(180)),
        );
        let name = ["A", "B"][node];
        ra.assert_ok(&format!("download -r of left via node {name}"));
        rb.assert_ok(&format!("download -r of right via node {name}"));
        let mut bad = Vec::new();
        for (tree, rel, data) in &files {
            let p = if *tree == "left" { &la } else { &lb }.join(rel);
            match std::fs::read(&p) {
                Ok(got) if got == *data => {}
                Ok(got) => bad.push(format!("{tree}/{rel}: {} bytes differ", got.len())),
                Err(err) => bad.push(format!("{tree}/{rel}: {err}")),
            }
        }
        assert!(
            bad.is_empty(),
            "{} of 1000 files differ or are missing when downloaded via node {name}; first: {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }
    eprintln!(
        "download -r of 2 x 500 files via both nodes: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// fsc downloading a tree *into* a shared mount (the client side of the same traps: JuiceFS
/// links an O_TMPFILE and then destroys it, GlusterFS refuses it, syncfs reaches no server):
/// every file fsc reports is readable, whole, through the other mount.
#[test]
fn fsc_downloads_a_tree_into_a_shared_mount() {
    let Some(e) = setup("download_into_mount") else {
        return;
    };
    std::fs::create_dir_all(e.on_mount(0, "tree")).unwrap();
    let mut files = Vec::new();
    for i in 0..200usize {
        // Mostly one-chunk files (the anonymous-file path), two of several chunks.
        let len = if i < 2 {
            3 * 1024 * 1024 + i
        } else {
            (i * 7919) % 20000
        };
        let data = random_bytes(len, 23_000 + i as u64);
        e.put_direct(&format!("tree/f{i:03}.bin"), &data);
        files.push((format!("f{i:03}.bin"), data));
    }
    // The destination is on the volume, through mount B; it is read back through mount A.
    let dest = |i: usize| e.c.mnt[i].join("client").join(&e.prefix);
    std::fs::create_dir_all(dest(1)).unwrap();
    let r = run(
        &[
            "--json",
            "--retries",
            "2",
            "download",
            "-r",
            &e.node(0),
            &e.remote("tree"),
            dest(1).join("tree").to_str().unwrap(),
        ],
        None,
        Duration::from_secs(180),
    );
    let mut bad = Vec::new();
    for (name, data) in &files {
        let p = dest(0).join("tree").join(name);
        match std::fs::read(&p) {
            Ok(got) if got == *data => {}
            Ok(got) => bad.push(format!("{}: {} bytes differ", p.display(), got.len())),
            Err(err) => bad.push(format!("{}: {err}", p.display())),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 200 files downloaded into mount B are not there through mount A (fsc: {}); \
         first: {:?}",
        bad.len(),
        r.status,
        &bad[..bad.len().min(5)]
    );
    r.assert_ok("download -r into a shared mount");
}

/// A download interrupted (fsc SIGKILLed) on node A is resumed on node B: B serves the same
/// file identity, so fsc keeps the verified part instead of starting over.
#[test]
fn a_download_interrupted_on_node_a_resumes_on_node_b() {
    let Some(e) = setup("download_a_then_b") else {
        return;
    };
    let size = 64 * MIB;
    let data = random_bytes(size, 1902);
    e.put_direct("big.bin", &data);
    let out = e.local("big.bin");
    // About 16 MiB/s: 4 ms per 64 KiB read.
    let proxy = Proxy::start(e.a.addr, Fault::Delay(Duration::from_millis(4)));
    let mut dl = spawn_fsc(&[
        "--json",
        "download",
        &proxy.addr(),
        &e.remote("big.bin"),
        out.to_str().unwrap(),
    ]);
    let reached = dl.wait_for(Duration::from_secs(60), done_at_least(32 * MIB));
    dl.kill9();
    let first = dl.finish(Duration::from_secs(10));
    assert!(
        reached && first.of("done").is_empty(),
        "the download via A should have been killed at 32 MiB of {size}: {}",
        first.describe()
    );
    assert!(!out.exists(), "a partial download under the final name");
    let second = run(
        &[
            "--json",
            "download",
            &e.node(1),
            &e.remote("big.bin"),
            out.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(120),
    );
    second.assert_ok("the download resumed via node B");
    assert_same_content(&out, &data, "download resumed via node B");
    let restarts = second.of("restart");
    assert!(
        restarts.is_empty(),
        "node B's copy looked like another file to fsc, which started over: {restarts:?}"
    );
    let resumed = second.of("start")[0]["resumed"].as_u64().unwrap_or(0);
    assert!(
        resumed >= 16 * MIB as u64,
        "only {resumed} bytes of A's part were kept: {}",
        second.describe()
    );
    eprintln!("resumed on B from {resumed} of {size} bytes");
}

/// `fsc download -j 4` through a round-robin balancer in front of A and B: the chunks come from
/// both nodes and the file is whole. (fsc takes one HOST:PORT today; the balancer is what
/// spreads its connections.)
#[test]
fn download_j4_through_a_balancer_over_both_nodes() {
    let Some(e) = setup("download_j4") else {
        return;
    };
    let size = 96 * MIB;
    let data = random_bytes(size, 1903);
    e.put_direct("big.bin", &data);
    let bal = Balancer::start(&[e.a.addr, e.b.addr]);
    let out = e.local("big.bin");
    let r = run(
        &[
            "--json",
            "download",
            "-j",
            "4",
            &bal.addr(),
            &e.remote("big.bin"),
        ],
        Some(&out),
        Duration::from_secs(120),
    );
    if r.status.success() {
        assert_same_content(&out, &data, "download -j 4 over both nodes (exit 0)");
    }
    r.assert_ok("download -j 4 through the balancer over A and B");
    let (sa, sb) = (e.sent_bytes(0), e.sent_bytes(1));
    eprintln!(
        "-j 4: fsd metrics: A sent {sa}, B {sb} bytes of file data; the balancer passed on {} and {} bytes",
        bal.served(0),
        bal.served(1)
    );
    assert!(
        sa >= 8 * MIB as u64 && sb >= 8 * MIB as u64,
        "both nodes should serve chunks: A sent {sa}, B sent {sb} bytes"
    );
}

/// Node A is SIGKILLed halfway through a 256 MiB download spread over A and B (`-j 2`, fsd
/// metrics show both serving): fsc's retries land on B (the balancer skips the dead node) and
/// the file arrives whole. Never exit 0 with wrong bytes.
#[test]
fn a_node_killed_mid_download() {
    let Some(mut e) = setup("node_killed_download") else {
        return;
    };
    let size = 256 * MIB;
    let data = random_bytes(size, 1904);
    e.put_direct("big.bin", &data);
    // About 16 MiB/s per connection, so that halfway is a few seconds in.
    let bal = Balancer::start_paced(&[e.a.addr, e.b.addr], Some(Duration::from_millis(4)));
    let out = e.local("big.bin");
    let mut dl = spawn_fsc(&[
        "--json",
        "--retries",
        "10",
        "download",
        "-j",
        "2",
        &bal.addr(),
        &e.remote("big.bin"),
        out.to_str().unwrap(),
    ]);
    let reached = dl.wait_for(Duration::from_secs(90), done_at_least(size / 2));
    let a_sent = if reached { e.sent_bytes(0) } else { 0 };
    e.a.kill9();
    let r = dl.finish(Duration::from_secs(120));
    assert!(
        reached,
        "fsc did not get halfway, before any node was killed: {}",
        r.describe()
    );
    let b_sent = e.sent_bytes(1);
    eprintln!("node A sent {a_sent} bytes before it was killed, node B {b_sent} in all");
    assert!(a_sent > 0, "node A served nothing before it was killed");
    if r.status.success() {
        assert_same_content(&out, &data, "download after node A was killed (exit 0)");
    } else {
        assert!(
            !out.exists(),
            "a failed download left a file at the final name"
        );
    }
    r.assert_ok("download -j 2 over A and B with A killed halfway");
    assert!(
        b_sent >= (size / 2) as u64,
        "node B sent only {b_sent} bytes: it should have served what A left"
    );
}

/// `fsc download -j 4 A,B`: fsc itself spreads its connections over the two nodes (no
/// balancer), and both serve chunks of one file version (the same identity through both mounts).
#[test]
fn download_j4_given_both_nodes() {
    let Some(e) = setup("download_j4_nodes") else {
        return;
    };
    let size = 96 * MIB;
    let data = random_bytes(size, 1905);
    e.put_direct("big.bin", &data);
    let out = e.local("big.bin");
    let nodes = format!("{},{}", e.a.addr, e.b.addr);
    let r = run(
        &[
            "--json",
            "download",
            "-j",
            "4",
            &nodes,
            &e.remote("big.bin"),
        ],
        Some(&out),
        Duration::from_secs(120),
    );
    if r.status.success() {
        assert_same_content(&out, &data, "download -j 4 A,B (exit 0)");
    }
    r.assert_ok("download -j 4 given both nodes");
    let (sa, sb) = (e.sent_bytes(0), e.sent_bytes(1));
    eprintln!("-j 4 A,B: fsd metrics: A sent {sa}, B {sb} bytes of file data");
    assert!(
        sa >= 8 * MIB as u64 && sb >= 8 * MIB as u64,
        "both nodes should serve chunks: A sent {sa}, B sent {sb} bytes"
    );
}

/// A 256 MiB download given both nodes (`fsc download -j 2 A,B`, each node behind its own
/// pacing balancer so that halfway is a few seconds in): both serve chunks (fsd metrics), node A
/// is killed halfway, fsc moves A's connection to B and the file arrives whole.
#[test]
fn a_node_killed_mid_download_given_both_nodes() {
    let Some(mut e) = setup("node_killed_download_nodes") else {
        return;
    };
    let size = 256 * MIB;
    let data = random_bytes(size, 1906);
    e.put_direct("big.bin", &data);
    let pace = Some(Duration::from_millis(4));
    let (ba, bb) = (
        Balancer::start_paced(&[e.a.addr], pace),
        Balancer::start_paced(&[e.b.addr], pace),
    );
    let nodes = format!("{},{}", ba.addr(), bb.addr());
    let out = e.local("big.bin");
    let mut dl = spawn_fsc(&[
        "--json",
        "--retries",
        "10",
        "download",
        "-j",
        "2",
        &nodes,
        &e.remote("big.bin"),
        out.to_str().unwrap(),
    ]);
    let reached = dl.wait_for(Duration::from_secs(90), done_at_least(size / 2));
    let (a_sent, b_before) = if reached {
        (e.sent_bytes(0), e.sent_bytes(1))
    } else {
        (0, 0)
    };
    e.a.kill9();
    let r = dl.finish(Duration::from_secs(120));
    assert!(reached, "fsc did not get halfway: {}", r.describe());
    let b_sent = e.sent_bytes(1);
    eprintln!("A,B: node A sent {a_sent} bytes before it was killed; node B {b_before} by then, {b_sent} in all");
    assert!(
        a_sent > 0 && b_before > 0,
        "both nodes should serve before the kill"
    );
    if r.status.success() {
        assert_same_content(&out, &data, "download A,B after node A was killed (exit 0)");
    } else {
        assert!(
            !out.exists(),
            "a failed download left a file at the final name"
        );
    }
    r.assert_ok("download -j 2 A,B with A killed halfway");
    assert!(b_sent > b_before, "node B did not take over A's part");
}

/// Node A is SIGKILLed mid-upload: fsc's retries reach B through the balancer, B resumes the
/// upload from the shared state directory, and the file is whole through both nodes.
#[test]
fn a_node_killed_mid_upload() {
    let Some(mut e) = setup("node_killed_upload") else {
        return;
    };
    let size = 64 * MIB;
    let src = e.local("src.bin");
    let data = write_random(&src, size, 1905);
    let bal = Balancer::start(&[e.a.addr, e.b.addr]);
    // fsc -> pacing proxy (16 MiB/s) -> balancer -> A (first) or B.
    let proxy = Proxy::throttled(bal.addr, 16 * MIB as u64);
    let mut up = spawn_fsc(&[
        "--json",
        "--retries",
        "10",
        "upload",
        &proxy.addr(),
        src.to_str().unwrap(),
        &e.remote("big.bin"),
    ]);
    let reached = up.wait_for(Duration::from_secs(60), done_at_least(24 * MIB));
    let to_a = bal.connections[0].load(std::sync::atomic::Ordering::Relaxed);
    e.a.kill9();
    let r = up.finish(Duration::from_secs(120));
    assert!(reached, "never reached 24 MiB: {}", r.describe());
    assert!(to_a > 0, "the upload did not go through node A");
    if r.status.success() {
        // Exit 0 is a promise: the file is whole at its name.
        let got = e.read_mount(1, "big.bin", "after fsc exit 0");
        assert!(
            got == data,
            "fsc exit 0 but the file through B's mount is {} bytes and differs",
            got.len()
        );
    }
    r.assert_ok("upload with node A killed at 24 MiB");
    let sent = r.transferred();
    assert!(
        sent <= size as u64 + WINDOW,
        "the upload started over on B instead of resuming: sent {sent} for {size} bytes"
    );
    let b_conns = bal.connections[1].load(std::sync::atomic::Ordering::Relaxed);
    assert!(b_conns > 0, "no connection reached node B");
    e.a.restart(); // assert_everywhere downloads through both nodes
    e.assert_everywhere("big.bin", &data);
}

/// Two uploads of different 24 MiB files to one path at once, one through each node: both
/// complete, and the file is exactly one of them, the same one through both nodes.
#[test]
fn racing_uploads_of_big_files_through_both_nodes_leave_one_winner() {
    let Some(e) = setup("race_big") else {
        return;
    };
    let (pa, pb) = (e.local("a.bin"), e.local("b.bin"));
    let da = write_random(&pa, 24 * MIB, 1906);
    let db = write_random(&pb, 24 * MIB, 1907);
    let up = |p: &Path, node: usize| {
        spawn_fsc(&[
            "--json",
            "--retries",
            "3",
            "upload",
            &e.node(node),
            p.to_str().unwrap(),
            &e.remote("same.bin"),
        ])
    };
    let (ua, ub) = (up(&pa, 0), up(&pb, 1));
    let (ra, rb) = (
        ua.finish(Duration::from_secs(120)),
        ub.finish(Duration::from_secs(120)),
    );
    // Which one is there, before judging the exit codes: a failure message then says whether
    // the failed upload was in fact published.
    let exits = format!("fsc via A: {}, via B: {}", ra.status, rb.status);
    let got = e.read_mount(0, "same.bin", &exits);
    let (winner, name) = match (got == da, got == db) {
        (true, _) => (&da, "a.bin (via A)"),
        (_, true) => (&db, "b.bin (via B)"),
        _ => panic!("the file is neither upload ({} bytes; {exits})", got.len()),
    };
    eprintln!("race: the file is {name}");
    ra.assert_ok(&format!("upload of a.bin via node A (the file is {name})"));
    rb.assert_ok(&format!("upload of b.bin via node B (the file is {name})"));
    e.assert_everywhere("same.bin", winner);
}

/// Small files (one chunk: the PUT path) raced to one path from both nodes, ten times: both
/// uploads complete each time and the file is exactly one of them through both mounts.
#[test]
fn racing_uploads_of_small_files_through_both_nodes_leave_one_winner() {
    let Some(e) = setup("race_small") else {
        return;
    };
    for round in 0..10u64 {
        let leaf = format!("small-{round}.bin");
        let (pa, pb) = (e.local(&format!("a{round}")), e.local(&format!("b{round}")));
        let da = write_random(&pa, 4096 + round as usize, 1910 + 2 * round);
        let db = write_random(&pb, 4096 + round as usize, 1911 + 2 * round);
        let up = |p: &Path, node: usize| {
            spawn_fsc(&[
                "--json",
                "--retries",
                "1",
                "upload",
                &e.node(node),
                p.to_str().unwrap(),
                &e.remote(&leaf),
            ])
        };
        let (ua, ub) = (up(&pa, 0), up(&pb, 1));
        let (ra, rb) = (
            ua.finish(Duration::from_secs(60)),
            ub.finish(Duration::from_secs(60)),
        );
        ra.assert_ok(&format!("round {round}: small upload via node A"));
        rb.assert_ok(&format!("round {round}: small upload via node B"));
        for i in 0..2 {
            let got = e.read_mount(i, &leaf, &format!("round {round}, both exit 0"));
            assert!(
                got == da || got == db,
                "round {round}: through mount {i} the file is neither upload ({} bytes)",
                got.len()
            );
        }
        assert!(
            e.read_mount(0, &leaf, "") == e.read_mount(1, &leaf, ""),
            "round {round}: the two mounts show different files"
        );
    }
}

/// `--no-clobber` uploads raced to one new path from both nodes (a multi-chunk file, then small
/// ones): exactly one succeeds, the other is refused as existing, the file is the winner's.
#[test]
fn racing_no_clobber_uploads_through_both_nodes_have_one_winner() {
    let Some(e) = setup("race_no_clobber") else {
        return;
    };
    for (round, size) in [8 * MIB, 4096, 4096, 4096].into_iter().enumerate() {
        let leaf = format!("nc-{round}.bin");
        let (pa, pb) = (e.local(&format!("a{round}")), e.local(&format!("b{round}")));
        let da = write_random(&pa, size, 1930 + 2 * round as u64);
        let db = write_random(&pb, size, 1931 + 2 * round as u64);
        let up = |p: &Path, node: usize| {
            spawn_fsc(&[
                "--json",
                "--retries",
                "1",
                "upload",
                "--no-clobber",
                &e.node(node),
                p.to_str().unwrap(),
                &e.remote(&leaf),
            ])
        };
        let (ua, ub) = (up(&pa, 0), up(&pb, 1));
        let (ra, rb) = (
            ua.finish(Duration::from_secs(60)),
            ub.finish(Duration::from_secs(60)),
        );
        let what = format!("round {round} ({size} bytes)");
        let (lose, want) = match (ra.status.success(), rb.status.success()) {
            (true, false) => (&rb, &da),
            (false, true) => (&ra, &db),
            (true, true) => panic!("{what}: both --no-clobber uploads succeeded"),
            (false, false) => panic!(
                "{what}: neither --no-clobber upload succeeded.\n  via A: {}\n  via B: {}",
                ra.describe(),
                rb.describe()
            ),
        };
        let said = format!("{} {}", lose.stderr, lose.lines.join(" ")).to_lowercase();
        assert!(
            said.contains("exists"),
            "{what}: the loser should be refused as existing: {}",
            lose.describe()
        );
        for i in 0..2 {
            let got = e.read_mount(i, &leaf, &format!("{what}, one exit 0"));
            assert!(
                got == *want,
                "{what}: through mount {i} the file is not the winner's"
            );
        }
    }
}

fn assert_same_content(p: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(p).unwrap_or_else(|e| panic!("{what}: {}: {e}", p.display()));
    assert!(
        got == want,
        "{what}: {} holds {} bytes that differ from the {} expected",
        p.display(),
        got.len(),
        want.len()
    );
}
