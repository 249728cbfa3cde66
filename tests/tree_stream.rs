//! Tree streams (issue 17): `-r` transfers move small files in batches (TREE_READ,
//! TREE_WRITE) and big ones by the chunked path, both ways; a server without the commands gets
//! per-file requests; hostile TREE_READ / TREE_WRITE requests are refused or confined, with
//! nothing written outside the root and the server's memory bounded.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use fsd::protocol::tree::{push, Records, MAX_TREE_FILES};
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame, MAX_PATH_LEN};

const CHUNK: usize = 1 << 20;

fn set_mtime(p: &Path, secs_ago: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs_ago);
    let f = std::fs::File::open(p).unwrap();
    f.set_modified(t).unwrap();
}

/// 300 small files (0 B to 9 KiB) over three levels, two files of several chunks, empty
/// directories; every directory's mtime in the past (set last, deepest first).
fn make_tree(top: &Path) {
    for i in 0..300usize {
        let dir = top.join(format!("d{}/e{}", i % 3, i % 2));
        write_random(&dir.join(format!("f{i}")), (i * 31) % 9000, i as u64);
    }
    write_random(&top.join("empty-file"), 0, 999);
    write_random(&top.join("d0/big.bin"), 3 * CHUNK + 7, 1000);
    write_random(&top.join("big2.bin"), 2 * CHUNK, 1001);
    std::fs::create_dir_all(top.join("empty/deeper")).unwrap();
    for (i, d) in [
        "empty/deeper",
        "empty",
        "d0/e0",
        "d0/e1",
        "d1/e0",
        "d1/e1",
        "d2/e0",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&top.join(d), 1000 + i as u64);
    }
    for d in ["d0", "d1", "d2"] {
        set_mtime(&top.join(d), 5000);
    }
}

fn json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    events(&fsc_ok(&all).stdout)
}

fn count(ev: &[serde_json::Value], kind: &str) -> usize {
    ev.iter().filter(|e| e["event"] == kind).count()
}

#[test]
fn a_mixed_tree_goes_both_ways_by_tree_stream_and_reruns_move_nothing() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    make_tree(&src);
    let up = json(&["upload", "-r", &s.addr(), src.to_str().unwrap(), "t"]);
    assert_eq!(tree(&src), tree(&s.root.join("t")), "upload");
    assert_eq!(count(&up, "done"), 303);
    assert!(
        s.log_text().contains("tree written"),
        "small files went by TREE_WRITE"
    );

    let dst = local.path().join("dst");
    let down = json(&["download", "-r", &s.addr(), "t", dst.to_str().unwrap()]);
    assert_eq!(tree(&src), tree(&dst), "download");
    assert_eq!(count(&down, "done"), 303);
    assert!(
        s.log_text().contains("tree read"),
        "small files came by TREE_READ"
    );

    // Unchanged: nothing moves either way.
    let again = json(&["download", "-r", &s.addr(), "t", dst.to_str().unwrap()]);
    assert_eq!(
        (count(&again, "done"), count(&again, "unchanged")),
        (0, 303)
    );
    let again = json(&["upload", "-r", &s.addr(), src.to_str().unwrap(), "t"]);
    assert_eq!(
        (count(&again, "done"), count(&again, "unchanged")),
        (0, 303)
    );

    // Five small files change (same size, new contents and mtime): only they move.
    for i in [1usize, 50, 100, 151, 299] {
        let p = src.join(format!("d{}/e{}/f{i}", i % 3, i % 2));
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        write_random(&p, len, 7000 + i as u64);
        set_mtime(&p, 10);
    }
    let sent = json(&["upload", "-r", &s.addr(), src.to_str().unwrap(), "t"]);
    assert_eq!(count(&sent, "done"), 5);
    let got = json(&["download", "-r", &s.addr(), "t", dst.to_str().unwrap()]);
    assert_eq!(count(&got, "done"), 5);
    assert_eq!(tree(&src), tree(&dst));
}

#[test]
fn delete_filters_and_dry_run_work_through_the_tree_stream() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    make_tree(&src);
    write_random(&src.join("d1/skip.log"), 100, 1);
    let (a, srcs) = (s.addr(), src.to_str().unwrap().to_string());
    // Dry run: nothing at the server.
    let dry = json(&["upload", "-r", "--dry-run", &a, &srcs, "t"]);
    assert!(count(&dry, "dry_run") > 300, "{dry:?}");
    assert!(!s.root.join("t/d0").exists());
    json(&["upload", "-r", "--exclude", "*.log", &a, &srcs, "t"]);
    assert!(!s.root.join("t/d1/skip.log").exists(), "excluded");
    // A stray file at the destination goes with --delete.
    write_random(&s.root.join("t/d2/stray"), 10, 2);
    json(&[
        "upload",
        "-r",
        "--delete",
        "--exclude",
        "*.log",
        &a,
        &srcs,
        "t",
    ]);
    assert!(!s.root.join("t/d2/stray").exists());
    let mut want = tree(&src);
    want.retain(|e| e.0 != "d1/skip.log");
    assert!(
        want == tree(&s.root.join("t")),
        "the tree less the excluded file"
    );
}

#[test]
fn an_interrupted_tree_download_run_again_ends_identical() {
    let s = Fsd::start();
    let src = s.root.join("t");
    for i in 0..3000usize {
        write_random(
            &src.join(format!("d{}/f{i}", i % 7)),
            2000 + i % 100,
            i as u64,
        );
    }
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("t");
    let dsts = dst.to_str().unwrap();
    let mut child = fsc(&["--json", "download", "-r", &s.addr(), "t", dsts])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once some files are in: the lines are read until the 200th done event.
    use std::io::BufRead;
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut done = 0;
    for line in lines.map_while(Result::ok).take(10_000) {
        if line.contains("\"done\"") {
            done += 1;
            if done >= 200 {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    json(&["download", "-r", &s.addr(), "t", dsts]);
    assert_eq!(tree(&src), tree(&dst));
}

#[test]
fn a_server_without_tree_streams_gets_per_file_requests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = Fsd::start_on(&root, &["--no-tree-stream"]);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    make_tree(&src);
    json(&["upload", "-r", &s.addr(), src.to_str().unwrap(), "t"]);
    assert_eq!(tree(&src), tree(&root.join("t")));
    let dst = local.path().join("dst");
    json(&["download", "-r", &s.addr(), "t", dst.to_str().unwrap()]);
    assert_eq!(tree(&src), tree(&dst));
    let log = s.log_text();
    assert!(!log.contains("tree written") && !log.contains("tree read"));
    // Asked anyway, it answers as an old server: UnknownCommand, connection open.
    let mut r = Raw::authed(s.addr);
    let f = r.call(Cmd::TREE_READ, 1, &msg::TreeReadRequest::default());
    assert_eq!(error_of(&f).code, ErrorCode::UnknownCommand as u32);
    let f = r.call(Cmd::PING, 2, &msg::Ping { nonce: 5 });
    assert!(!f.header.is_error());
}

/// Reads a TREE_READ reply: every record, until END.
fn read_reply(r: &mut Raw, sid: u32) -> Result<Vec<(msg::TreeEntry, Bytes)>, msg::Error> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let f = r.recv().expect("reply frame");
        assert_eq!(f.stream_id(), sid);
        if f.header.is_error() {
            return Err(error_of(&f));
        }
        assert!(f.header.is_data());
        out.extend(Records::new(f.payload.clone()).map(Result::unwrap));
        if f.header.is_end() {
            return Ok(out);
        }
    }
    panic!("no END");
}

#[test]
fn hostile_tree_reads_are_confined_and_bounded() {
    let s = Fsd::start();
    write_random(&s.root.join("ok/a"), 100, 1);
    std::os::unix::fs::symlink("/etc", s.root.join("ok/out")).unwrap();
    let mut r = Raw::authed(s.addr);
    // A name within the path limit that makes the joined path too long ("ok/" + 4095 bytes).
    let long = "x/".repeat(2047) + "y";
    let names = [
        "a",
        "../ok/a",
        "/etc/passwd",
        "out/passwd",
        "a/../../etc",
        "bad\0name",
        long.as_str(),
        ".fsd-state/x",
        "missing",
    ];
    let req = msg::TreeReadRequest {
        path: "ok".into(),
        files: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    r.send_msg(Cmd::TREE_READ, 1, flags::END, &req);
    let got = read_reply(&mut r, 1).expect("per-file errors, not a failed request");
    assert_eq!(got.len(), names.len());
    assert!(got[0].0.data && got[0].1.len() == 100, "the one good file");
    for (e, data) in &got[1..] {
        assert!(e.error.is_some() && !e.data && data.is_empty(), "{e:?}");
    }
    let code = |i: usize| got[i].0.error.as_ref().unwrap().code;
    assert_eq!(code(1), ErrorCode::InvalidPath as u32);
    assert_eq!(
        code(3),
        ErrorCode::InvalidPath as u32,
        "symlink out of the root"
    );
    assert_eq!(code(8), ErrorCode::NotFound as u32);

    // Too many names: refused whole.
    let req = msg::TreeReadRequest {
        files: vec!["a".into(); MAX_TREE_FILES + 1],
        ..Default::default()
    };
    let f = r.call(Cmd::TREE_READ, 3, &req);
    assert_eq!(error_of(&f).code, ErrorCode::BadRequest as u32);
    // A prefix-confined credential cannot name files outside its prefix.
    drop(r);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("team/mine"), 10, 1);
    write_random(&root.join("secret"), 10, 2);
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "alice alice-token-0123456789 read team\n").unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let s2 = Fsd::start_on(&root, &["--token-file", tokens.to_str().unwrap()]);
    let mut r = Raw::authed_as(s2.addr, "alice-token-0123456789", 0);
    let req = msg::TreeReadRequest {
        path: "team".into(),
        files: vec!["mine".into(), "../secret".into()],
        ..Default::default()
    };
    r.send_msg(Cmd::TREE_READ, 1, flags::END, &req);
    let got = read_reply(&mut r, 1).unwrap();
    assert!(got[0].0.data);
    assert!(got[1].0.error.is_some() && got[1].1.is_empty());
    let req = msg::TreeReadRequest {
        path: String::new(),
        files: vec!["secret".into()],
        ..Default::default()
    };
    let f = r.call(Cmd::TREE_READ, 2, &req);
    assert_eq!(error_of(&f).code, ErrorCode::PermissionDenied as u32);
    // Read-only: TREE_WRITE refused.
    let mut buf = Vec::new();
    let e = msg::TreeEntry {
        path: "w".into(),
        size: 1,
        data: true,
        blake3: blake3::hash(b"x").as_bytes().to_vec(),
        ..Default::default()
    };
    push(&mut buf, &e, b"x");
    let f = tree_write(&mut r, 4, "team", 1, buf);
    assert_eq!(error_of(&f).code, ErrorCode::PermissionDenied as u32);
    assert!(!root.join("team/w").exists());
}

/// A name longer than any path used to be answered with an error entry carrying the whole name:
/// over 64 KiB it fit no frame, and fsd sent empty DATA frames until the client went away;
/// over ~7.5 KiB it broke MAX_ENTRY_LEN. Now such a request is refused whole, at once.
#[test]
fn tree_reads_of_overlong_names_end_at_once() {
    let s = Fsd::start();
    let mut r = Raw::connect(s.addr);
    let hello = msg::Hello {
        version: 1,
        max_frame: 64 * 1024,
        ..Default::default()
    };
    assert!(!r.call(Cmd::HELLO, 0, &hello).header.is_error());
    let auth = msg::Auth {
        token: TOKEN.into(),
    };
    assert!(!r.call(Cmd::AUTH, 1, &auth).header.is_error());
    r.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for (sid, len) in [(3, 100_000), (5, 8_000), (7, MAX_PATH_LEN + 1)] {
        let req = msg::TreeReadRequest {
            files: vec!["a".repeat(len)],
            ..Default::default()
        };
        r.send_msg(Cmd::TREE_READ, sid, flags::END, &req);
        // One file: at most one frame of records, or an error.
        let mut frames = 0;
        let end = loop {
            let f = r.recv().expect("a reply within 5 s");
            assert_eq!(f.stream_id(), sid);
            frames += 1;
            if f.header.is_error() {
                break Err(error_of(&f));
            }
            let records: Vec<_> = Records::new(f.payload.clone()).collect();
            let bad: Vec<_> = records.iter().filter_map(|r| r.as_ref().err()).collect();
            assert!(bad.is_empty(), "{len}-byte name: {bad:?}");
            if f.header.is_end() {
                break Ok(records.len());
            }
            assert!(frames < 4, "{len}-byte name: {frames} frames and no END");
        };
        match end {
            Err(e) => assert_eq!(e.code, ErrorCode::BadRequest as u32, "{e:?}"),
            Ok(n) => assert_eq!(n, 1, "{len}-byte name: one entry"),
        }
    }
    assert!(!r
        .call(Cmd::PING, 9, &msg::Ping { nonce: 1 })
        .header
        .is_error());
}

#[test]
fn unread_tree_replies_hold_bounded_memory() {
    let s = Fsd::start();
    for i in 0..64 {
        write_random(&s.root.join(format!("m/f{i}")), 256 * 1024, i);
    }
    let mut r = Raw::authed(s.addr);
    let before = proc_status_kib(s.pid(), "VmRSS:");
    // 32 requests of 1024 × 256 KiB = 8 GiB of replies, none read.
    let files: Vec<String> = (0..MAX_TREE_FILES)
        .map(|i| format!("f{}", i % 64))
        .collect();
    for sid in 1..=32 {
        let req = msg::TreeReadRequest {
            path: "m".into(),
            files: files.clone(),
            ..Default::default()
        };
        r.send_msg(Cmd::TREE_READ, sid, flags::END, &req);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = proc_status_kib(s.pid(), "VmRSS:");
    assert!(
        after < before + 64 * 1024,
        "fsd grew from {before} to {after} KiB with unread replies"
    );
    // Still serving others.
    let mut other = Raw::authed(s.addr);
    let f = other.call(Cmd::PING, 1, &msg::Ping { nonce: 1 });
    assert!(!f.header.is_error());
}

/// Sends a TREE_WRITE of `count` records in `frame` on `sid`; returns the reply.
fn tree_write(r: &mut Raw, sid: u32, path: &str, count: u32, frame: Vec<u8>) -> Frame {
    tree_write_with(r, sid, path, count, frame, false)
}

fn tree_write_with(
    r: &mut Raw,
    sid: u32,
    path: &str,
    count: u32,
    frame: Vec<u8>,
    no_clobber: bool,
) -> Frame {
    let req = msg::TreeWriteRequest {
        path: path.into(),
        count,
        no_clobber,
    };
    r.send_msg(Cmd::TREE_WRITE, sid, 0, &req);
    let data = Frame::new(
        Cmd::TREE_WRITE,
        sid,
        flags::DATA | flags::END,
        Bytes::from(frame),
    );
    r.send(&data).unwrap();
    r.recv().expect("reply")
}

fn record(path: &str, data: &[u8], hash_of: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let e = msg::TreeEntry {
        path: path.into(),
        size: data.len() as u64,
        mode: 0o644,
        data: true,
        blake3: blake3::hash(hash_of).as_bytes().to_vec(),
        ..Default::default()
    };
    push(&mut buf, &e, data);
    buf
}

#[test]
fn hostile_tree_writes_are_refused_and_write_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("in")).unwrap();
    std::os::unix::fs::symlink(dir.path(), root.join("in/out")).unwrap();
    let s = Fsd::start_on(&root, &[]);
    let mut r = Raw::authed(s.addr);
    // Per-file refusals: escapes, a bad hash; the good one is published.
    let mut frame = Vec::new();
    for p in [
        "../escape",
        "out/escape",
        "/abs",
        "a/../../escape",
        ".fsd-state/x",
    ] {
        frame.extend(record(p, b"evil", b"evil"));
    }
    frame.extend(record("wrong-hash", b"data", b"other"));
    frame.extend(record("good", b"fine", b"fine"));
    let f = tree_write(&mut r, 1, "in", 7, frame);
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let reply: msg::TreeWriteResponse = f.decode().unwrap();
    assert_eq!(reply.published, 1);
    let failed: Vec<u32> = reply.failed.iter().map(|f| f.index).collect();
    assert_eq!(failed, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(
        reply.failed[5].error.as_ref().unwrap().code,
        ErrorCode::HashMismatch as u32
    );
    assert_eq!(std::fs::read(root.join("in/good")).unwrap(), b"fine");
    assert!(!dir.path().join("escape").exists() && !root.join("escape").exists());
    assert!(!root.join("in/wrong-hash").exists());

    // Whole-frame refusals: wrong count, zero, too many, a lying entry length, contents
    // longer than the frame. Nothing published.
    let cases: Vec<(u32, Vec<u8>)> = vec![
        (2, record("c1", b"x", b"x")),
        (0, record("c2", b"x", b"x")),
        (5000, record("c3", b"x", b"x")),
        (1, u32::MAX.to_le_bytes().to_vec()),
        (1, {
            let mut b = record("c4", b"xxxxxxxx", b"xxxxxxxx");
            b.truncate(b.len() - 4);
            b
        }),
    ];
    for (i, (count, frame)) in cases.into_iter().enumerate() {
        let f = tree_write(&mut r, 10 + i as u32, "in", count, frame);
        assert_eq!(error_of(&f).code, ErrorCode::BadRequest as u32, "case {i}");
    }
    for c in ["c1", "c2", "c3", "c4"] {
        assert!(!root.join("in").join(c).exists());
    }
    // A DATA frame beyond the server's max_frame: LimitExceeded from the header, closed.
    let req = msg::TreeWriteRequest {
        path: "in".into(),
        count: 1,
        no_clobber: false,
    };
    r.send_msg(Cmd::TREE_WRITE, 30, 0, &req);
    let mut h = fsd::protocol::Header::data(Cmd::TREE_WRITE, 30, 64 << 20, 0, true);
    h.flags = flags::DATA | flags::END;
    let mut b = bytes::BytesMut::new();
    h.encode(&mut b);
    r.send_bytes(&b).unwrap();
    let f = r.recv().expect("an error");
    assert_eq!(error_of(&f).code, ErrorCode::LimitExceeded as u32);
    assert!(r.closed());
    // Nothing but what was published, and the server lives on.
    let mut names: Vec<_> = std::fs::read_dir(root.join("in"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["good", "out"]);
    let mut r = Raw::authed(s.addr);
    assert!(!r
        .call(Cmd::PING, 1, &msg::Ping { nonce: 2 })
        .header
        .is_error());
}

/// TREE_WRITE skips PUT's early look at the destination (server/tree.rs): the publish must
/// make each of those refusals itself, per file, and replace what may be replaced.
#[test]
fn tree_writes_onto_directories_files_and_missing_parents_are_refused_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("in/adir/inner")).unwrap();
    std::fs::write(root.join("in/afile"), b"a file").unwrap();
    std::fs::write(root.join("in/kept"), b"old").unwrap();
    let s = Fsd::start_on(&root, &[]);
    let mut r = Raw::authed(s.addr);
    let code = |f: &msg::TreeFailure| ErrorCode::from_u32(f.error.as_ref().unwrap().code);
    let mut frame = Vec::new();
    for (p, data) in [
        ("adir", &b"over a directory"[..]),
        ("afile/x", b"beneath a file"),
        ("missing/x", b"beneath nothing"),
        ("kept", b"new"),
        ("fresh", b"fresh"),
    ] {
        frame.extend(record(p, data, data));
    }
    let f = tree_write(&mut r, 1, "in", 5, frame);
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let reply: msg::TreeWriteResponse = f.decode().unwrap();
    assert_eq!(reply.published, 2, "{reply:?}");
    let failed: Vec<_> = reply.failed.iter().map(|f| (f.index, code(f))).collect();
    assert_eq!(
        failed,
        vec![
            (0, Some(ErrorCode::IsADirectory)),
            (1, Some(ErrorCode::NotADirectory)),
            (2, Some(ErrorCode::NotFound)),
        ]
    );
    assert!(root.join("in/adir/inner").is_dir());
    assert_eq!(std::fs::read(root.join("in/afile")).unwrap(), b"a file");
    assert_eq!(std::fs::read(root.join("in/kept")).unwrap(), b"new");
    assert_eq!(std::fs::read(root.join("in/fresh")).unwrap(), b"fresh");

    // no_clobber: a taken name is refused, a directory still as a directory, a new one goes.
    let mut frame = Vec::new();
    for (p, data) in [
        ("kept", &b"newer"[..]),
        ("adir", b"over a directory"),
        ("other", b"other"),
    ] {
        frame.extend(record(p, data, data));
    }
    let f = tree_write_with(&mut r, 3, "in", 3, frame, true);
    let reply: msg::TreeWriteResponse = f.decode().unwrap();
    assert_eq!(reply.published, 1, "{reply:?}");
    let failed: Vec<_> = reply.failed.iter().map(|f| (f.index, code(f))).collect();
    assert_eq!(
        failed,
        vec![
            (0, Some(ErrorCode::AlreadyExists)),
            (1, Some(ErrorCode::IsADirectory)),
        ]
    );
    assert_eq!(std::fs::read(root.join("in/kept")).unwrap(), b"new");
    assert_eq!(std::fs::read(root.join("in/other")).unwrap(), b"other");
    // Nothing left behind in the state directory's staging.
    let names: Vec<_> = std::fs::read_dir(root.join("in"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
}

/// A tree download of many small files under an open-file limit of 256 (soft and hard, so fsc
/// cannot raise it): batches are sized by the limit, and every file arrives. Before, 512-file
/// batches, 4 in flight, each holding its files open until its sync, failed hundreds of files
/// with "Too many open files" (review D, stop 30: 1,290 of 8,000).
#[test]
fn a_tree_download_under_a_low_open_file_limit_gets_every_file() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in 0..4 {
        let sub = root.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..800 {
            std::fs::write(sub.join(format!("f{i}")), format!("file {d}/{i}\n")).unwrap();
        }
    }
    let s = Fsd::start_on(&root, &[]);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("dst");
    let mut cmd = fsc(&[
        "-q",
        "download",
        "-r",
        &s.addr(),
        ".",
        dst.to_str().unwrap(),
    ]);
    // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsc failed: {stderr}");
    let root_tree: Vec<_> = tree(&root)
        .into_iter()
        .filter(|e| !e.0.starts_with(".fsd-state"))
        .collect();
    assert_eq!(root_tree, tree(&dst));
}
