//! fsc against fsd, real processes: sizes at the edges, resume after kill -9 of either side,
//! corruption on the wire, a remote file changing between runs, trees, parallel connections.
#![allow(clippy::disallowed_methods)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy};
use common::*;

const CHUNK: usize = 1 << 20;

fn done_event(stdout: &[u8]) -> serde_json::Value {
    events(stdout)
        .into_iter()
        .rev()
        .find(|e| e["event"] == "done")
        .unwrap_or_else(|| panic!("no done event in {}", String::from_utf8_lossy(stdout)))
}

fn start_event(stdout: &[u8]) -> serde_json::Value {
    events(stdout)
        .into_iter()
        .find(|e| e["event"] == "start")
        .expect("start event")
}

/// Arguments in the wrong order (a path where HOST:PORT goes) fail at once, without retries.
#[test]
fn a_path_given_as_the_server_is_a_usage_error_not_retried() {
    let local = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = fsc(&[
        "-q",
        "upload",
        local.path().to_str().unwrap(),
        "127.0.0.1:1",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a server address"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "retried: {:?}",
        started.elapsed()
    );
}

#[test]
fn edge_sizes_both_ways() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    for (i, len) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]
        .into_iter()
        .enumerate()
    {
        let name = format!("f{len}");
        write_random(&s.root.join(&name), len, i as u64);
        let dst = local.path().join(&name);
        let out = fsc_ok(&[
            "--json",
            "download",
            &s.addr(),
            &name,
            dst.to_str().unwrap(),
        ]);
        assert_same_file(&s.root.join(&name), &dst);
        let done = done_event(&out.stdout);
        assert_eq!(done["bytes"], len as u64);
        assert_eq!(
            done["blake3"],
            blake3::hash(&std::fs::read(&dst).unwrap())
                .to_hex()
                .as_str()
        );
        // fsc's working directory is gone once nothing is left to resume.
        assert!(!local.path().join(".fsc-work").exists());

        let up = format!("up/{name}");
        std::fs::create_dir_all(s.root.join("up")).unwrap();
        fsc_ok(&["upload", &s.addr(), dst.to_str().unwrap(), &up]);
        assert_same_file(&dst, &s.root.join(&up));
    }
}

#[test]
fn sparse_file_over_4_gib_both_ways() {
    let s = Fsd::start();
    // The download and the upload each write 4 GiB for real.
    let fs = nix::sys::statvfs::statvfs(&s.root).unwrap();
    let free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
    if free < 20 << 30 {
        eprintln!(
            "SKIPPED: {} GiB free, the > 4 GiB test needs 20",
            free >> 30
        );
        return;
    }
    let size = (4u64 << 30) + 12345;
    let f = std::fs::File::create(s.root.join("sparse")).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"tail marker", size - 11).unwrap();
    f.write_all_at(b"head marker", 0).unwrap();
    drop(f);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("sparse");
    fsc_ok(&["-q", "download", &s.addr(), "sparse", dst.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), size);
    let expected = hash_file(&s.root.join("sparse"));
    assert_eq!(hash_file(&dst), expected);
    fsc_ok(&["-q", "upload", &s.addr(), dst.to_str().unwrap(), "back"]);
    std::fs::remove_file(&dst).unwrap();
    assert_eq!(hash_file(&s.root.join("back")), expected);
}

/// A file of more chunks than one MANIFEST page of chaining values can carry in a control
/// frame (16384 x 36 bytes would be 576 KiB; the limit is 256 KiB): fsc asks for them on every
/// fresh download, so the pages must be small enough. 8000 chunks of 64 KiB, mostly a hole.
#[test]
fn a_file_of_many_chunks_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let s = Fsd::start_on(dir.path(), &["--chunk-size", "65536"]);
    let size = 8000u64 * 65536;
    let f = std::fs::File::create(s.root.join("many")).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, at) in [0, size / 3, size - 11].into_iter().enumerate() {
        f.write_all_at(format!("marker {i}").as_bytes(), at)
            .unwrap();
    }
    drop(f);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("many");
    fsc_ok(&["-q", "download", &s.addr(), "many", dst.to_str().unwrap()]);
    assert_eq!(hash_file(&dst), hash_file(&s.root.join("many")));
}

fn hash_file(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize()
}

/// Runs `fsc --json ...` and SIGKILLs it once its progress events report `at` bytes in place.
fn kill_fsc_when(args: &[&str], at: u64) {
    use std::io::BufRead;
    let mut child = fsc(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in lines.map_while(Result::ok) {
        let e: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_ne!(
            e["event"], "done",
            "fsc finished before it could be killed; make the file bigger"
        );
        if e["done"].as_u64().is_some_and(|d| d >= at) || Instant::now() > deadline {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn download_resumes_after_fsc_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    write_random(&dir.path().join("big"), 256 * CHUNK, 5);
    // A proxy forwarding in tiny pieces keeps the first run slow enough to kill mid-way.
    let s = Fsd::start_on(dir.path(), &[]);
    let proxy = Proxy::start(s.addr, Fault::Tiny);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("big");
    let work = local.path().join(".fsc-work");
    kill_fsc_when(
        &[
            "--json",
            "download",
            &proxy.addr(),
            "big",
            dst.to_str().unwrap(),
        ],
        80 * CHUNK as u64,
    );
    let parts = std::fs::read_dir(&work).unwrap().filter(|e| {
        let name = e.as_ref().unwrap().file_name();
        name.to_string_lossy().ends_with(".part")
    });
    assert_eq!(
        parts.count(),
        1,
        "the partial download is in fsc's working directory"
    );
    assert!(
        !dst.exists(),
        "a partial file must never appear under the final name"
    );
    let out = fsc_ok(&[
        "--json",
        "download",
        &s.addr(),
        "big",
        dst.to_str().unwrap(),
    ]);
    assert_same_file(&dir.path().join("big"), &dst);
    let resumed = start_event(&out.stdout)["resumed"].as_u64().unwrap();
    let transferred = done_event(&out.stdout)["transferred"].as_u64().unwrap();
    assert!(resumed > 0, "nothing was resumed");
    // At most the missing part plus one chunk per stream (fsc uses at most 8 streams).
    assert!(
        transferred <= 256 * CHUNK as u64 - resumed + 8 * CHUNK as u64,
        "transferred {transferred}, resumed {resumed}"
    );
}

#[test]
fn download_and_upload_survive_fsd_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_random(&dir.path().join("big"), 200 * CHUNK, 6);
    let mut s = Fsd::start_on(dir.path(), &[]);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("big");
    let dst = dst.to_str().unwrap();
    // Download, then upload back: fsd is killed while each (slowed) transfer runs and restarted
    // on the same port; the one fsc command retries, resumes and finishes.
    for (args, result) in [
        (["download", "big", dst], local.path().join("big")),
        (["upload", dst, "copy"], dir.path().join("copy")),
    ] {
        let proxy = Proxy::start(s.addr, Fault::Tiny);
        let child = fsc(&[
            "--json",
            "--retries",
            "20",
            args[0],
            &proxy.addr(),
            args[1],
            args[2],
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        s.restart();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            std::fs::read(&result).unwrap() == data,
            "{} differs",
            result.display()
        );
    }
}

#[test]
fn a_flipped_bit_on_the_wire_is_detected_and_refetched() {
    let s = Fsd::start();
    write_random(&s.root.join("f"), 8 * CHUNK, 8);
    // Somewhere inside the third chunk's payload.
    let proxy = Proxy::start(s.addr, Fault::FlipBitAt(2 * CHUNK as u64 + 4321));
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("f");
    let out = fsc_ok(&[
        "--json",
        "download",
        &proxy.addr(),
        "f",
        dst.to_str().unwrap(),
    ]);
    assert_same_file(&s.root.join("f"), &dst);
    assert!(
        events(&out.stdout).iter().any(|e| e["event"] == "corrupt"),
        "corruption not reported"
    );
}

/// The same for a small file sent inline with its OPEN reply: the handshake and the reply
/// take a few hundred bytes, so byte 10,000 is inside the 30,000-byte contents.
#[test]
fn a_flipped_bit_in_an_inline_file_is_detected_and_refetched() {
    let s = Fsd::start();
    write_random(&s.root.join("small"), 30_000, 18);
    let proxy = Proxy::start(s.addr, Fault::FlipBitAt(10_000));
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("small");
    let out = fsc_ok(&[
        "--json",
        "download",
        &proxy.addr(),
        "small",
        dst.to_str().unwrap(),
    ]);
    assert_same_file(&s.root.join("small"), &dst);
    assert!(
        events(&out.stdout).iter().any(|e| e["event"] == "corrupt"),
        "corruption not reported"
    );
}

#[test]
fn a_cut_connection_is_retried() {
    let s = Fsd::start();
    write_random(&s.root.join("f"), 20 * CHUNK, 10);
    let proxy = Proxy::start(s.addr, Fault::CutAfter(7 * CHUNK as u64 + 99));
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("f");
    fsc_ok(&["download", &proxy.addr(), "f", dst.to_str().unwrap()]);
    assert_same_file(&s.root.join("f"), &dst);
    assert!(proxy.connections.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}

#[test]
fn a_silent_connection_is_given_up_by_the_watchdog() {
    let s = Fsd::start();
    write_random(&s.root.join("f"), 20 * CHUNK, 11);
    let proxy = Proxy::start(s.addr, Fault::StallAfter(3 * CHUNK as u64));
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("f");
    let t0 = Instant::now();
    fsc_ok(&[
        "--stall-timeout",
        "2",
        "download",
        &proxy.addr(),
        "f",
        dst.to_str().unwrap(),
    ]);
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_same_file(&s.root.join("f"), &dst);
}

#[test]
fn a_remote_change_between_runs_restarts_the_download() {
    let dir = tempfile::tempdir().unwrap();
    write_random(&dir.path().join("f"), 256 * CHUNK, 12);
    let s = Fsd::start_on(dir.path(), &[]);
    let proxy = Proxy::start(s.addr, Fault::Tiny);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("f");
    kill_fsc_when(
        &[
            "--json",
            "download",
            &proxy.addr(),
            "f",
            dst.to_str().unwrap(),
        ],
        40 * CHUNK as u64,
    );
    // Replace the remote file with new content of the same size.
    write_random(&dir.path().join("f.new"), 256 * CHUNK, 13);
    std::fs::rename(dir.path().join("f.new"), dir.path().join("f")).unwrap();
    let out = fsc_ok(&["--json", "download", &s.addr(), "f", dst.to_str().unwrap()]);
    assert_same_file(&dir.path().join("f"), &dst);
    assert!(
        events(&out.stdout).iter().any(|e| e["event"] == "restart"),
        "restart not reported"
    );
}

fn tree(root: &Path) -> Vec<(String, u64, u32, i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.starts_with(".fsd-state") {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
                out.push((rel, 0, m.mode() & 0o7777, 0, Vec::new()));
            } else {
                out.push((
                    rel,
                    m.len(),
                    m.mode() & 0o7777,
                    m.mtime(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn recursive_trees_of_1000_files_both_ways() {
    let s = Fsd::start();
    let src = s.root.join("tree");
    for i in 0..1000 {
        let p = src.join(format!("d{}/e{}/f{i}.dat", i % 10, i % 7));
        write_random(&p, (i * 37) % 5000, i as u64);
        if i % 5 == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("tree");
    fsc_ok(&[
        "-q",
        "download",
        "-r",
        &s.addr(),
        "tree",
        dst.to_str().unwrap(),
    ]);
    assert_eq!(tree(&src), tree(&dst));
    fsc_ok(&[
        "-q",
        "upload",
        "-r",
        &s.addr(),
        dst.to_str().unwrap(),
        "back",
    ]);
    assert_eq!(tree(&dst), tree(&s.root.join("back")));
}

#[test]
fn four_connections_on_one_big_file() {
    let s = Fsd::start();
    write_random(&s.root.join("big"), 1 << 30, 14);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("big");
    fsc_ok(&[
        "-q",
        "download",
        "-j",
        "4",
        &s.addr(),
        "big",
        dst.to_str().unwrap(),
    ]);
    assert_same_file(&s.root.join("big"), &dst);
    std::fs::remove_file(s.root.join("big")).unwrap();
    fsc_ok(&[
        "-q",
        "upload",
        "-j",
        "4",
        &s.addr(),
        dst.to_str().unwrap(),
        "big2",
    ]);
    assert_same_file(&dst, &s.root.join("big2"));
}

/// Downloads to stdout arrive in order and whole, on one connection and on four; with four,
/// lanes run ahead of stdout and must wait for it (a bounded reorder buffer), never deadlock.
#[test]
fn downloads_to_stdout_are_in_order_with_one_and_four_connections() {
    let s = Fsd::start();
    let big = write_random(&s.root.join("big"), (80 << 20) + 7, 15);
    let small = write_random(&s.root.join("small"), 5000, 16);
    for (name, want) in [("big", &big), ("small", &small)] {
        for j in ["1", "4"] {
            let out = fsc_ok(&["-q", "download", "-j", j, &s.addr(), name, "-"]);
            assert!(
                out.stdout == *want,
                "{name} -j {j}: stdout differs ({} bytes)",
                out.stdout.len()
            );
        }
    }
}

#[test]
fn transfers_through_a_slow_link_in_tiny_pieces_stay_identical() {
    let s = Fsd::start();
    write_random(&s.root.join("f"), 3 * CHUNK + 5, 15);
    let local = tempfile::tempdir().unwrap();
    for (i, fault) in [Fault::Delay(Duration::from_millis(5)), Fault::Tiny]
        .into_iter()
        .enumerate()
    {
        let proxy = Proxy::start(s.addr, fault);
        let dst = local.path().join(format!("f{i}"));
        fsc_ok(&["-q", "download", &proxy.addr(), "f", dst.to_str().unwrap()]);
        assert_same_file(&s.root.join("f"), &dst);
        fsc_ok(&[
            "-q",
            "upload",
            &proxy.addr(),
            dst.to_str().unwrap(),
            &format!("back{i}"),
        ]);
        assert_same_file(&dst, &s.root.join(format!("back{i}")));
    }
}

/// A remote file that changes after part of it went to stdout: bytes on stdout cannot be taken
/// back, so fsc must fail (non-zero, saying so) rather than start over and splice the new
/// version after the old one. The change is made while the test holds stdout unread, after it
/// has read 1 MiB: fsc has emitted bytes by then, and (64 KiB chunks, at most 32 of them
/// fetched ahead of stdout) most of the file is still to be read from fsd, which answers those
/// READs with Changed.
#[test]
fn a_change_after_bytes_went_to_stdout_fails_the_download() {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let size = 16 << 20;
    let old = write_random(&path, size, 31);
    let s = Fsd::start_on(dir.path(), &["--chunk-size", "65536"]);
    let mut child = fsc(&["-q", "download", "-j", "1", &s.addr(), "f", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 1 << 20];
    stdout.read_exact(&mut got).unwrap();
    assert!(got == old[..1 << 20], "the first MiB is the old version");
    // The same size, other bytes, written in place (fsd sees a new mtime).
    let new = random_bytes(size, 32);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&new, 0)
        .unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    got.extend_from_slice(&rest);
    assert!(
        !out.status.success(),
        "exit 0 after {} bytes on stdout ({} of a {size}-byte file), stderr: {stderr}",
        got.len(),
        if got.len() > size { "more" } else { "part" }
    );
    assert!(stderr.contains("changed"), "stderr: {stderr}");
    assert!(got.len() <= size, "{} bytes: a restart's", got.len());
}

/// A crash between publishing (the part's inode linked under the final name) and unlinking the
/// part leaves the part a second name of the published file. The next run must not write into
/// that inode: here the server has a new version and the run is cut off part way (so it
/// cannot end by publishing over whatever it did), and the published file must be untouched.
#[test]
fn a_part_that_is_another_name_of_the_published_file_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = write_random(&dir.path().join("v.bin"), 4 << 20, 41);
    let s = Fsd::start_on(dir.path(), &["--chunk-size", "65536"]);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("v.bin");
    fsc_ok(&["-q", "download", &s.addr(), "v.bin", dst.to_str().unwrap()]);
    // The crash's leftovers: the working directory, and the part (named by a hash of the
    // destination's path relative to its root) linked to the published file.
    let wd = local.path().join(".fsc-work");
    std::fs::create_dir(&wd).unwrap();
    let key = hex::encode(&blake3::hash(b"v.bin").as_bytes()[..16]);
    std::fs::hard_link(&dst, wd.join(format!("{key}.part"))).unwrap();
    // A new version on the server, and a run whose only connection is cut after 1 MiB.
    write_random(&dir.path().join("v.new"), 4 << 20, 42);
    std::fs::rename(dir.path().join("v.new"), dir.path().join("v.bin")).unwrap();
    let proxy = Proxy::start(s.addr, Fault::CutAfter(1 << 20));
    let out = fsc(&[
        "-q",
        "--retries",
        "0",
        "download",
        "-j",
        "1",
        &proxy.addr(),
        "v.bin",
        dst.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let now = std::fs::read(&dst).unwrap();
    assert!(
        now == v1,
        "the published file changed under a run that did not finish ({}, {} of {} bytes \
         as before; stderr: {})",
        out.status,
        now.iter().zip(&v1).filter(|(a, b)| a == b).count(),
        v1.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}
