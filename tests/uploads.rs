//! Resumable uploads under crashes: fsd SIGKILLed at ten points of one upload, a full disk, and
//! an upload begun on one fsd and finished on another serving the same root.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proxy::{Fault, Proxy};
use common::*;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame};

const MIB: u64 = 1 << 20;
/// What one crash may cost: the client's un-acknowledged chunks (8 x 1 MiB) plus what the server
/// has stored but not yet synced, which fsd bounds at fsd::fs::upload::MAX_UNSYNCED (32 MiB).
const WINDOW: u64 = 8 * MIB + fsd::fs::upload::MAX_UNSYNCED;

/// fsd in a private user+mount namespace whose `mount` command (e.g. "mount -t tmpfs -o
/// size=32m none") mounts a file system on `root` before fsd serves it.
fn fsd_on_own_mount(mount: &str, root: &std::path::Path) -> Fsd {
    let script = format!("{mount} {} && exec \"$0\" \"$@\"", root.display());
    Fsd::start_wrapped(&["unshare", "-Urm", "sh", "-c", &script], root)
}

#[test]
fn fsd_killed_at_ten_points_of_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let src = dir.path().join("src.bin");
    let size = 256 * MIB;
    write_random(&src, size as usize, 21);
    let mut s = Fsd::start_on(&root, &[]);
    // fsd restarts on the same port, so the one fsc process retries and resumes each time. The
    // proxy paces the upload (48 MiB/s) so that every kill point is reached while it runs.
    let kills = 10u64;
    let proxy = Proxy::throttled(s.addr, 48 * MIB);
    let addr = proxy.addr();
    let mut child = fsc(&[
        "--json",
        "--retries",
        "50",
        "upload",
        &addr,
        src.to_str().unwrap(),
        "dst.bin",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut done_event = None;
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while let Some(Ok(line)) = lines.next() {
        assert!(Instant::now() < deadline, "upload did not finish in time");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if e["event"] == "done" {
            done_event = Some(e);
            break;
        }
        let Some(done) = e["done"].as_u64() else {
            continue;
        };
        // Kill points spread over the file: after 8%, 16%, ... of it is in place.
        if killed < kills && done >= (killed + 1) * size / (kills + 2) {
            s.kill9();
            assert!(
                !root.join("dst.bin").exists(),
                "partial file at the final path"
            );
            s.restart();
            killed += 1;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "fsc failed: {status}");
    assert_eq!(killed, kills);
    let done = done_event.expect("done event");
    assert_same_file(&src, &root.join("dst.bin"));
    let transferred = done["transferred"].as_u64().unwrap();
    eprintln!("10 kills: transferred {transferred} bytes for a {size}-byte file");
    assert!(
        transferred <= size + kills * WINDOW,
        "transferred {transferred} > {size} + {kills} x {WINDOW}"
    );
}

#[test]
fn enospc_is_a_clear_retryable_error_and_resumes_after_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("small");
    std::fs::create_dir(&root).unwrap();
    // A 32 MiB tmpfs, mounted in a private user+mount namespace around fsd.
    let probe = Command::new("unshare").args(["-Urm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot create a user+mount namespace here (unshare -Urm), so no small tmpfs for ENOSPC");
        return;
    }
    let s = fsd_on_own_mount("mount -t tmpfs -o size=32m none", &root);
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("big");
    write_random(&big, 24 * MIB as usize, 31);
    let filler = local.path().join("filler");
    write_random(&filler, 16 * MIB as usize, 30);
    // The big upload starts while it fits (paced by a proxy); a filler lands meanwhile and the
    // disk runs out under the big upload's feet.
    let proxy = Proxy::throttled(s.addr, 8 * MIB);
    let mut child = fsc(&[
        "--json",
        "--retries",
        "0",
        "upload",
        &proxy.addr(),
        big.to_str().unwrap(),
        "big",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref().map_while(Result::ok) {
        let e: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let started = e["done"].as_u64().is_some_and(|d| d >= 6 * MIB);
        seen.push(e);
        if started {
            break;
        }
    }
    fsc_ok(&[
        "-q",
        "upload",
        &s.addr(),
        filler.to_str().unwrap(),
        "filler",
    ]);
    seen.extend(
        lines
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok()),
    );
    assert!(
        !child.wait().unwrap().success(),
        "upload must fail on a full disk"
    );
    let errors: Vec<_> = seen.iter().filter(|e| e["event"] == "error").collect();
    let text = format!("{errors:?}");
    assert!(
        text.contains("NoSpace") || text.contains("space"),
        "no clear ENOSPC error: {seen:?}"
    );
    assert!(!root.join("big").exists());
    // Free space through the protocol, then the same command resumes and commits.
    fsc_ok(&["rm", &s.addr(), "filler"]);
    let out = fsc_ok(&["--json", "upload", &s.addr(), big.to_str().unwrap(), "big"]);
    let done = events(&out.stdout)
        .into_iter()
        .find(|e| e["event"] == "done")
        .unwrap();
    assert!(
        done["transferred"].as_u64().unwrap() < 24 * MIB,
        "did not resume: {done}"
    );
    // The file lives inside the namespace's tmpfs: download it to compare.
    let back = local.path().join("back");
    fsc_ok(&["-q", "download", &s.addr(), "big", back.to_str().unwrap()]);
    assert_same_file(&big, &back);
}

/// A tree upload into a file system that runs out of inodes part-way: the files that fit are
/// published whole, every other one is reported with a clear NoSpace, and fsc ends promptly.
/// Before the fix each of the ~1,000 files that did not fit waited out its own five retries
/// (6.2 s each): fsc ran for hours.
#[test]
fn a_tree_upload_into_a_full_file_system_ends_promptly_with_every_file_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("small");
    std::fs::create_dir(&root).unwrap();
    let probe = Command::new("unshare").args(["-Urm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot create a user+mount namespace here (unshare -Urm), so no small tmpfs for ENOSPC");
        return;
    }
    // Room for a few hundred inodes: fsd's state directory, the tree's directories and part
    // of its files.
    let s = fsd_on_own_mount("mount -t tmpfs -o size=64m,nr_inodes=400 none", &root);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("tree");
    let (dirs, per) = (3, 500);
    for d in 0..dirs {
        let sub = src.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..per {
            std::fs::write(
                sub.join(format!("f{i:04}")),
                format!("{d}/{i} ").repeat(100),
            )
            .unwrap();
        }
    }
    let total = dirs * per;
    let mut child = fsc(&[
        "--json",
        "upload",
        "-r",
        &s.addr(),
        src.to_str().unwrap(),
        "up",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("fsc was still retrying after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seen = reader.join().unwrap();
    assert!(!status.success(), "a full destination must fail the run");
    let done = seen.iter().filter(|e| e["event"] == "done").count();
    let errors: Vec<_> = seen.iter().filter(|e| e["event"] == "error").collect();
    assert!(
        done > 0,
        "nothing fitted: the test needs a bigger file system"
    );
    assert!(
        !errors.is_empty(),
        "no file failed: the test needs a smaller file system"
    );
    for e in &errors {
        let m = e["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("NoSpace") || m.contains("space"),
            "not a clear ENOSPC: {e}"
        );
    }
    assert_eq!(
        done + errors.len(),
        total,
        "every file done or failed, once"
    );
    // What was published is whole: fetch the tree back and compare file by file.
    let back = local.path().join("back");
    let _ = fsc(&[
        "-q",
        "download",
        "-r",
        &s.addr(),
        "up",
        back.to_str().unwrap(),
    ])
    .output();
    let mut checked = 0;
    for e in seen.iter().filter(|e| e["event"] == "done") {
        let rel = e["path"].as_str().unwrap().strip_prefix("up/").unwrap();
        assert_same_file(&src.join(rel), &back.join(rel));
        checked += 1;
    }
    assert_eq!(checked, done);
}

#[test]
fn an_upload_begun_on_one_fsd_is_finished_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shared");
    std::fs::create_dir(&root).unwrap();
    let a = Fsd::start_on(&root, &[]);
    let b = Fsd::start_on(&root, &[]);
    let src = dir.path().join("src");
    write_random(&src, 128 * MIB as usize, 40);
    // Begin against A through a slow proxy, kill the client part-way.
    let proxy = Proxy::start(a.addr, Fault::Tiny);
    let mut child = fsc(&[
        "--json",
        "upload",
        &proxy.addr(),
        src.to_str().unwrap(),
        "dst",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.map_while(Result::ok) {
        let e: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if e["done"].as_u64().is_some_and(|d| d >= 40 * MIB) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // A notices the hang-up and releases the upload
    assert!(!root.join("dst").exists());
    let out = fsc_ok(&["--json", "upload", &b.addr(), src.to_str().unwrap(), "dst"]);
    let done = events(&out.stdout)
        .into_iter()
        .find(|e| e["event"] == "done")
        .unwrap();
    assert!(
        done["transferred"].as_u64().unwrap() <= 128 * MIB - 24 * MIB,
        "B did not resume A's upload: {done}"
    );
    assert_same_file(&src, &root.join("dst"));
}

#[test]
fn two_uploads_to_one_path_leave_exactly_one_of_them() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    let (a, b) = (local.path().join("a"), local.path().join("b"));
    let da = write_random(&a, 40 * MIB as usize, 50);
    let db = write_random(&b, 40 * MIB as usize, 51);
    let spawn = |p: &std::path::Path| {
        fsc(&["-q", "upload", &s.addr(), p.to_str().unwrap(), "same"])
            .spawn()
            .unwrap()
    };
    let (mut ca, mut cb) = (spawn(&a), spawn(&b));
    let (ra, rb) = (ca.wait().unwrap(), cb.wait().unwrap());
    assert!(
        ra.success() && rb.success(),
        "both uploads complete: {ra} {rb}"
    );
    let got = std::fs::read(s.root.join("same")).unwrap();
    assert!(
        got == da || got == db,
        "the final file is exactly one of the two uploads"
    );
    // With --no-clobber the second upload is refused and the file is untouched.
    let out = fsc(&[
        "upload",
        "--no-clobber",
        &s.addr(),
        a.to_str().unwrap(),
        "same",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(std::fs::read(s.root.join("same")).unwrap() == got);
}

/// The spare name a crash leaves when fsd dies between linking a small file's new version
/// and renaming it over the old one (`replace.<nonce>.<n>` in the state directory's uploads)
/// is collected after the upload TTL. Before, nothing ever removed it (review D, stop 30:
/// still there after a restart and 8 s of collection at a 2 s TTL).
#[test]
fn a_spare_name_left_by_a_crash_is_collected() {
    let dir = tempfile::tempdir().unwrap();
    let s = Fsd::start_on(dir.path(), &["--upload-ttl", "1"]);
    // What a kill -9 between the link and the rename leaves (Root::publish_anonymous).
    let spare = s.state.join("uploads").join("replace.c3633f0e.0");
    std::fs::write(&spare, vec![7u8; 500_000]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while spare.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!spare.exists(), "the spare name was never collected");
}

#[test]
fn idle_uploads_expire_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let s = Fsd::start_on(dir.path(), &["--upload-ttl", "1"]);
    let data = random_bytes(3 * MIB as usize, 60);
    let mut r = Raw::authed(s.addr);
    let open: fsd::protocol::msg::OpenResponse = r
        .call(
            fsd::protocol::Cmd::OPEN,
            1,
            &fsd::protocol::msg::OpenRequest {
                path: "abandoned".into(),
                mode: fsd::protocol::msg::OpenMode::OpenWrite as i32,
                size: data.len() as u64,
                resume_key: "k".into(),
                ..Default::default()
            },
        )
        .decode()
        .unwrap();
    assert!(!open.upload_id.is_empty());
    let uploads = s.state.join("uploads");
    let count = || std::fs::read_dir(&uploads).unwrap().count();
    assert!(count() > 0, "upload state exists while the upload is open");
    drop(r); // the client goes away without committing
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(count(), 0, "expired upload was not collected");
    assert!(!s.root.join("abandoned").exists());
}

/// A committed upload leaves only its commit record in the state directory (which expires with
/// the TTL): no chunk sums, and no link to the file it replaced once that file is freed off the
/// COMMIT's path (fs::upload::Reaper). Before, every committed multi-chunk upload left its
/// `.sums` file behind for good.
#[test]
fn a_committed_upload_leaves_only_its_commit_record() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("f");
    for seed in [70, 71] {
        // The second upload replaces the first's file.
        let data = write_random(&src, 3 * MIB as usize + 5, seed);
        fsc_ok(&["-q", "upload", &s.addr(), src.to_str().unwrap(), "f"]);
        assert!(std::fs::read(s.root.join("f")).unwrap() == data);
    }
    let uploads = s.state.join("uploads");
    let left = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&uploads)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".done"))
            .collect();
        names.sort();
        names
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(left(), Vec::<String>::new());
}

/// A file system that gives no space figures (ramfs: 0 blocks in all, 0 free; some FUSE file
/// systems do the same) is "unknown", not "full": fsd takes uploads into such a root and fsc
/// downloads onto one. Before, both refused every multi-chunk file ("0 bytes free").
#[test]
fn a_file_system_without_space_figures_is_not_taken_for_full() {
    let probe = Command::new("unshare")
        .args(["-Urm", "sh", "-c", "mount -t ramfs none /mnt"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount a ramfs in a user+mount namespace here (unshare -Urm)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ram");
    std::fs::create_dir(&root).unwrap();
    let s = fsd_on_own_mount("mount -t ramfs none", &root);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("f");
    write_random(&src, 3 * MIB as usize + 7, 80);
    let src_s = src.to_str().unwrap();
    // Into fsd's ramfs root, and back out to compare.
    fsc_ok(&["-q", "upload", &s.addr(), src_s, "f"]);
    let back = local.path().join("back");
    fsc_ok(&["-q", "download", &s.addr(), "f", back.to_str().unwrap()]);
    assert_same_file(&src, &back);

    // fsc downloading onto a ramfs of its own (compared inside the namespace, where it exists).
    let dest = local.path().join("ramdest");
    std::fs::create_dir(&dest).unwrap();
    let out = Command::new("unshare")
        .args(["-Urm", "sh", "-c"])
        .arg("mount -t ramfs none \"$1\" && \"$2\" -q download \"$3\" f \"$1/f\" && cmp \"$4\" \"$1/f\"")
        .args(["sh", dest.to_str().unwrap(), fsc_bin().to_str().unwrap(), &s.addr(), src_s])
        .env("FSC_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fields of fsd's upload state record (proto/state.proto UploadRecord) a damaged or
/// foreign record in a shared state directory could get wrong.
#[derive(Clone, PartialEq, prost::Message)]
struct PlantedRecord {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(uint64, tag = "2")]
    size: u64,
    #[prost(uint32, tag = "3")]
    chunk_size: u32,
    #[prost(string, tag = "7")]
    owner: String,
}

/// A state record whose chunk size no upload of its size could have (0, not a power of two,
/// huge) is not resumed from: the upload starts afresh with a chunk size of its own, instead of
/// sizing its bitmaps and buffers from the record (chunk size 0 meant one chunk per byte).
#[test]
fn a_damaged_state_record_is_not_resumed_from() {
    let s = Fsd::start();
    let size = 64 * MIB;
    let open = |r: &mut Raw| -> fsd::protocol::msg::OpenResponse {
        r.call(
            fsd::protocol::Cmd::OPEN,
            1,
            &fsd::protocol::msg::OpenRequest {
                path: "target".into(),
                mode: fsd::protocol::msg::OpenMode::OpenWrite as i32,
                size,
                resume_key: "k".into(),
                ..Default::default()
            },
        )
        .decode()
        .unwrap()
    };
    let mut r = Raw::authed(s.addr);
    let first = open(&mut r);
    assert!(first.chunk_size >= 64 * 1024);
    drop(r);
    let state = s
        .state
        .join("uploads")
        .join(format!("{}.state", first.upload_id));
    let before = std::fs::read(&state).unwrap();
    let good: PlantedRecord = prost::Message::decode(&before[..]).unwrap();
    assert_eq!((good.path.as_str(), good.size), ("target", size));
    for bad in [0, 3, 1 << 31] {
        let planted = PlantedRecord {
            chunk_size: bad,
            ..good.clone()
        };
        // The old handle's last sync may still be under way: write after it (bounded wait).
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&state, prost::Message::encode_to_vec(&planted)).unwrap();
        let mut r = Raw::authed(s.addr);
        let again = open(&mut r);
        assert_eq!(
            (again.chunk_size, again.chunk_count),
            (first.chunk_size, first.chunk_count),
            "resumed from a record with chunk size {bad}"
        );
        drop(r);
    }
}

/// The upload endgame: one upload over two connections to one fsd, one of them paced to
/// 1 MiB/s. Once every chunk has been handed out, the chunks still owed by the slow
/// connection are sent again over the fast one and the upload commits over the fast one
/// without waiting for them, whichever of the two is the first connection. Before, fsc waited
/// for every WRITE on the slow connection (its 8 lanes hold 8 MiB: 8 s at that pace), so the
/// proxy forwarded all of them before fsc ended; and with the slow one first, its COMMIT
/// queued behind the abandoned WRITEs (the connection was picked after the lanes that counted
/// them were dropped).
#[test]
fn an_upload_over_a_fast_and_a_slow_connection_is_not_held_by_the_slow_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let src = dir.path().join("src.bin");
    let data = write_random(&src, 32 * MIB as usize, 29);
    let s = Fsd::start_on(&root, &[]);
    for slow_first in [false, true] {
        let slow = Proxy::throttled(s.addr, MIB);
        let nodes = match slow_first {
            false => format!("{},{}", s.addr(), slow.addr()),
            true => format!("{},{}", slow.addr(), s.addr()),
        };
        let out = fsc(&["upload", "-j", "2", &nodes, src.to_str().unwrap(), "up.bin"])
            .env("RUST_LOG", "fsc::upload=debug")
            .output()
            .unwrap();
        let through_slow = slow.up.load(std::sync::atomic::Ordering::Relaxed);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "slow first: {slow_first}: {out:?}");
        assert_eq!(std::fs::read(root.join("up.bin")).unwrap(), data);
        assert!(
            through_slow < 6 * MIB,
            "slow first: {slow_first}: the slow connection carried {through_slow} bytes before the upload ended"
        );
        assert!(log.contains("endgame"), "{log}");
        std::fs::remove_file(root.join("up.bin")).unwrap();
    }
}

/// A COMMIT sent right behind its upload's last WRITEs, without waiting for their acks, is
/// Busy or done, never Incomplete: PROTOCOL.md §10.2 counts a WRITE as being stored from when
/// its DATA frame is accepted. With one blocking thread the WRITEs wait their turn for it, and
/// they used to be counted only once on it: the COMMIT found their chunks missing and answered
/// Incomplete, which is final.
#[test]
fn a_commit_pipelined_behind_its_writes_is_busy_or_done_never_incomplete() {
    const CHUNK: u32 = 64 * 1024;
    const CHUNKS: u32 = 32;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = Fsd::start_on(&root, &["--max-blocking-threads", "1"]);
    let data = random_bytes((CHUNK * CHUNKS) as usize, 31);
    let blake3 = blake3::hash(&data);
    let mut r = Raw::authed_as(s.addr, TOKEN, CHUNK);
    let open = r.call(
        Cmd::OPEN,
        1,
        &msg::OpenRequest {
            path: "f.bin".into(),
            mode: msg::OpenMode::OpenWrite as i32,
            size: data.len() as u64,
            resume_key: "k".into(),
            ..Default::default()
        },
    );
    let up: msg::OpenResponse = open.decode().unwrap();
    assert_eq!(up.chunk_count, CHUNKS);
    for (i, chunk) in (0..CHUNKS).zip(data.chunks(CHUNK as usize)) {
        let sid = 3 + 2 * i;
        r.send_msg(
            Cmd::WRITE,
            sid,
            0,
            &msg::WriteRequest {
                handle: up.handle,
                chunk: i,
            },
        );
        r.send(&Frame::new(
            Cmd::WRITE,
            sid,
            flags::DATA | flags::END,
            Bytes::copy_from_slice(chunk),
        ))
        .unwrap();
    }
    let commit = msg::CommitRequest {
        handle: up.handle,
        blake3: blake3.as_bytes().to_vec(),
        upload_id: String::new(),
    };
    let commit_sid = 3 + 2 * CHUNKS;
    r.send_msg(Cmd::COMMIT, commit_sid, flags::END, &commit);
    let mut answer = None;
    for _ in 0..=CHUNKS {
        let f = r.recv().expect("a reply");
        if f.header.stream_id == commit_sid {
            answer = Some(f);
        } else {
            assert!(!f.header.is_error(), "WRITE: {:?}", error_of(&f));
        }
    }
    let answer = answer.expect("the COMMIT's reply");
    if answer.header.is_error() {
        let e = error_of(&answer);
        assert_eq!(
            e.code,
            ErrorCode::Busy as u32,
            "COMMIT behind its WRITEs: {e:?}"
        );
        // Every WRITE has been acknowledged by now: the same COMMIT again publishes.
        let again = r.call(Cmd::COMMIT, commit_sid + 2, &commit);
        assert!(!again.header.is_error(), "{:?}", error_of(&again));
    }
    assert_eq!(std::fs::read(root.join("f.bin")).unwrap(), data);
}

/// An upload begun at a 64 KiB base (6 chunks) and reopened from a connection whose base is
/// 1 MiB, at which the file is one chunk: it resumes with its own chunk size and the chunks
/// it holds (PROTOCOL.md §8.1). Before, the reopening got a fresh single-chunk upload without
/// state, and the one holding the chunks was left to expire, counted in the owner's quota.
#[test]
fn an_upload_reopened_at_a_bigger_base_resumes_with_its_own_chunk_size() {
    const SMALL: u32 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = Fsd::start_on(&root, &[]);
    let data = random_bytes(327_687, 17);
    let open = |r: &mut Raw, sid: u32| -> msg::OpenResponse {
        let f = r.call(
            Cmd::OPEN,
            sid,
            &msg::OpenRequest {
                path: "f.bin".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size: data.len() as u64,
                resume_key: "k".into(),
                ..Default::default()
            },
        );
        assert!(!f.header.is_error(), "{:?}", error_of(&f));
        f.decode().unwrap()
    };
    let mut first = Raw::authed_as(s.addr, TOKEN, SMALL);
    let up = open(&mut first, 3);
    assert_eq!((up.chunk_size, up.chunk_count), (SMALL, 6));
    for (i, sid) in [(0u32, 5u32), (3, 7)] {
        let at = (i * SMALL) as usize;
        first.send_msg(
            Cmd::WRITE,
            sid,
            0,
            &msg::WriteRequest {
                handle: up.handle,
                chunk: i,
            },
        );
        first
            .send(&Frame::new(
                Cmd::WRITE,
                sid,
                flags::DATA | flags::END,
                Bytes::copy_from_slice(&data[at..at + SMALL as usize]),
            ))
            .unwrap();
        let ack = first.recv().unwrap();
        assert!(!ack.header.is_error(), "{:?}", error_of(&ack));
    }
    drop(first);
    let mut second = Raw::authed_as(s.addr, TOKEN, 1 << 20);
    let again = open(&mut second, 3);
    assert_eq!(
        (
            again.chunk_size,
            again.chunk_count,
            again.upload_id.as_str()
        ),
        (SMALL, 6, up.upload_id.as_str()),
        "not resumed"
    );
    assert_eq!(again.bitmap, vec![0b0000_1001]);
}

/// `restart` means the same whatever the reopening connection's base: an upload begun at a
/// 64 KiB base (6 chunks) and restarted from a 1 MiB-base connection (one chunk there) is
/// Busy while its first connection holds it open, and once that one is gone its stored state
/// is discarded, so a later OPEN at 64 KiB starts empty (PROTOCOL.md §10.2). Before, the
/// restart got a fresh single-chunk upload under the same id while the other was open (its
/// COMMIT could publish other content), and the stored chunks were resumed afterwards
/// (review E, stop 30).
#[test]
fn a_restart_from_a_bigger_base_is_busy_while_open_and_discards_the_stored_upload() {
    const SMALL: u32 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = Fsd::start_on(&root, &[]);
    let data = random_bytes(327_687, 18);
    let size = u64::try_from(data.len()).unwrap();
    let open = |r: &mut Raw, sid: u32, restart: bool| -> Frame {
        r.call(
            Cmd::OPEN,
            sid,
            &msg::OpenRequest {
                path: "f.bin".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size,
                resume_key: "k".into(),
                restart,
                ..Default::default()
            },
        )
    };
    let mut first = Raw::authed_as(s.addr, TOKEN, SMALL);
    let up: msg::OpenResponse = open(&mut first, 3, false).decode().unwrap();
    assert_eq!((up.chunk_size, up.chunk_count), (SMALL, 6));
    first.send_msg(
        Cmd::WRITE,
        5,
        0,
        &msg::WriteRequest {
            handle: up.handle,
            chunk: 0,
        },
    );
    first
        .send(&Frame::new(
            Cmd::WRITE,
            5,
            flags::DATA | flags::END,
            Bytes::copy_from_slice(&data[..usize::try_from(SMALL).unwrap()]),
        ))
        .unwrap();
    let ack = first.recv().unwrap();
    assert!(!ack.header.is_error(), "{:?}", error_of(&ack));

    let mut big = Raw::authed_as(s.addr, TOKEN, 1 << 20);
    let busy = open(&mut big, 3, true);
    assert!(
        busy.header.is_error(),
        "a restart while open elsewhere was accepted"
    );
    assert_eq!(
        ErrorCode::from_u32(error_of(&busy).code),
        Some(ErrorCode::Busy),
        "{:?}",
        error_of(&busy)
    );

    drop(first);
    // Its handle closes with its connection; the restart then discards the stored upload.
    let deadline = Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        let f = open(&mut big, 5, true);
        if !(f.header.is_error() && ErrorCode::from_u32(error_of(&f).code) == Some(ErrorCode::Busy))
            || Instant::now() > deadline
        {
            break f;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!restarted.header.is_error(), "{:?}", error_of(&restarted));
    drop(big);
    let mut again = Raw::authed_as(s.addr, TOKEN, SMALL);
    let resumed: msg::OpenResponse = open(&mut again, 3, false).decode().unwrap();
    assert_eq!(
        resumed.bitmap,
        vec![0],
        "the restarted upload's stored chunks were resumed"
    );
}
