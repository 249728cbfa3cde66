//! Long, lossy paths (issue 15), with real fsd and fsc: the congestion control each side sets
//! on its sockets (read back with `ss -ti`), the fallback on a name the kernel refuses, and
//! rate limits by behaviour: a transfer at a limit takes at least the time the limit implies.
//! (Whether it comes close to that time is a benchmark's question, not a test's.)
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SIZE: usize = 6 << 20;
/// 2 MB/s: 6 MiB takes ~3.1 s.
const RATE: &str = "2M";
const RATE_BPS: f64 = 2e6;

/// The shortest time `bytes` may take at RATE: what the limit grants, less one 1 MiB frame
/// (kernel pacing may let a first burst out) and the bucket's 50 ms of credit.
fn lower_bound(bytes: usize) -> Duration {
    Duration::from_secs_f64((bytes - (1 << 20)) as f64 / RATE_BPS - 0.05)
}

/// `ss -tin` lines of established sockets whose local (`sport`) or remote (`dport`) port is
/// `port`, with their TCP_INFO line joined.
fn ss(filter: &str, port: u16) -> Option<String> {
    let out = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( {filter} = :{port} )"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// fsd set to reno and fsc to cubic (explicit names hold on any path; `auto` picks BBR on long
/// paths only, which loopback is not — net.rs tests that): while a rate-limited download runs,
/// `ss` shows each side's socket with its own.
#[test]
fn each_side_sets_its_congestion_control_on_its_sockets() {
    if ss("sport", 1).is_none() {
        eprintln!("skipped: no usable `ss`");
        return;
    }
    if fsd::net::choose_congestion("cubic").0.is_none() {
        eprintln!("skipped: this process may not use cubic");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), SIZE, 1);
    let s = Fsd::start_on(&root, &["--congestion", "reno"]);
    let dest = dir.path().join("f.bin");
    let mut child = fsc(&[
        "-q",
        "--congestion",
        "cubic",
        "--bwlimit",
        RATE,
        "download",
        &s.addr(),
        "f.bin",
        dest.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let port = s.addr.port();
    let (mut server_side, mut client_side) = (None, None);
    while child.try_wait().unwrap().is_none() && (server_side.is_none() || client_side.is_none()) {
        server_side = server_side.or(ss("sport", port).filter(|o| !o.trim().is_empty()));
        client_side = client_side.or(ss("dport", port).filter(|o| !o.trim().is_empty()));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.wait().unwrap().success());
    let (server_side, client_side) = (server_side.unwrap(), client_side.unwrap());
    assert!(
        server_side.split_whitespace().any(|w| w == "reno"),
        "fsd's socket: {server_side}"
    );
    assert!(
        client_side.split_whitespace().any(|w| w == "cubic"),
        "fsc's socket: {client_side}"
    );
    assert_same_file(&root.join("f.bin"), &dest);
}

/// A name the kernel does not have: one warning on each side, and the transfer works on the
/// system default.
#[test]
fn an_unknown_congestion_control_falls_back_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), 300_000, 2);
    let s = Fsd::start_on(&root, &["--congestion", "nosuchcc"]);
    let dest = dir.path().join("f.bin");
    let out = fsc_ok(&[
        "-q",
        "--congestion",
        "nosuchcc",
        "download",
        &s.addr(),
        "f.bin",
        dest.to_str().unwrap(),
    ]);
    assert_same_file(&root.join("f.bin"), &dest);
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<_> = err.lines().filter(|l| l.contains("nosuchcc")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("warning") && warnings[0].contains("system default"),
        "{err}"
    );
    let log = s.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("nosuchcc") && l.contains("system default")),
        "{log}"
    );
}

fn timed_fsc(args: &[&str]) -> Duration {
    let t0 = Instant::now();
    fsc_ok(args);
    t0.elapsed()
}

#[test]
fn fsc_bwlimit_holds_downloads_and_uploads_to_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), SIZE, 3);
    let s = Fsd::start_on(&root, &[]);
    let dest = dir.path().join("down.bin");
    let took = timed_fsc(&[
        "-q",
        "--bwlimit",
        RATE,
        "download",
        "-j",
        "2",
        &s.addr(),
        "f.bin",
        dest.to_str().unwrap(),
    ]);
    assert!(took >= lower_bound(SIZE), "download took {took:?}");
    assert_same_file(&root.join("f.bin"), &dest);

    let took = timed_fsc(&[
        "-q",
        "--bwlimit",
        RATE,
        "upload",
        &s.addr(),
        dest.to_str().unwrap(),
        "up.bin",
    ]);
    assert!(took >= lower_bound(SIZE), "upload took {took:?}");
    assert_same_file(&root.join("f.bin"), &root.join("up.bin"));
}

#[test]
fn fsd_bwlimit_holds_the_server_to_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), SIZE, 4);
    // Two downloads at once share the server-wide limit.
    let s = Fsd::start_on(&root, &["--bwlimit", RATE]);
    let t0 = Instant::now();
    let runs: Vec<_> = (0..2)
        .map(|i| {
            let dest = dir.path().join(format!("d{i}.bin"));
            let c = fsc(&["-q", "download", &s.addr(), "f.bin", dest.to_str().unwrap()])
                .spawn()
                .unwrap();
            (c, dest)
        })
        .collect();
    for (mut c, dest) in runs {
        assert!(c.wait().unwrap().success());
        assert_same_file(&root.join("f.bin"), &dest);
    }
    let took = t0.elapsed();
    assert!(took >= lower_bound(2 * SIZE), "two downloads took {took:?}");

    // Uploads into the server count against the same limit.
    let t0 = Instant::now();
    fsc_ok(&[
        "-q",
        "upload",
        &s.addr(),
        root.join("f.bin").to_str().unwrap(),
        "up.bin",
    ]);
    let took = t0.elapsed();
    assert!(took >= lower_bound(SIZE), "upload took {took:?}");
}

#[test]
fn fsd_bwlimit_conn_paces_each_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), SIZE, 5);
    let s = Fsd::start_on(&root, &["--bwlimit-conn", RATE]);
    let dest = dir.path().join("d.bin");
    let took = timed_fsc(&["-q", "download", &s.addr(), "f.bin", dest.to_str().unwrap()]);
    assert!(took >= lower_bound(SIZE), "download took {took:?}");
    assert_same_file(&root.join("f.bin"), &dest);
}

/// `-j auto` on loopback: one connection, downloads and uploads, even when a transfer lasts
/// long enough (48 MiB at 16 MB/s: ~3 s) for growth to have had its chance on a long path.
#[test]
fn j_auto_uses_one_connection_on_a_short_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), 48 << 20, 6);
    let s = Fsd::start_on(&root, &[]);
    let dest = dir.path().join("d.bin");
    let dest = dest.to_str().unwrap();
    let limited = ["-q", "--bwlimit", "16M"];
    fsc_ok(
        &[
            &limited[..],
            &["download", "-j", "auto", &s.addr(), "f.bin", dest],
        ]
        .concat(),
    );
    assert_same_file(&root.join("f.bin"), Path::new(dest));
    assert_eq!(s.connections(), 1, "{}", s.log_text());
    fsc_ok(
        &[
            &limited[..],
            &["upload", "-j", "auto", &s.addr(), dest, "up.bin"],
        ]
        .concat(),
    );
    assert_same_file(&root.join("f.bin"), &root.join("up.bin"));
    assert_eq!(s.connections(), 2, "{}", s.log_text());
}

/// `-j auto` told the path is long (FSC_ASSUME_RTT_MS, for tests): after its first windows
/// it adds a connection, downloads and uploads alike; under a --bwlimit that caps the run,
/// the connection it added raises nothing, so it is retired while the file still moves, and
/// the file arrives intact over what is left; with `-j 1`, one connection. Without `-j` it is
/// auto.
#[test]
fn j_auto_adds_connections_on_a_long_path_and_retires_one_that_does_not_pay() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // 128 MiB at 32 MB/s: ~4 s. With 50 ms assumed (200 ms windows) the first connection is
    // added after ~1 s (a plateau of one), judged ~1 s later (8 RTTs to settle, then its
    // plateau) and retired while a third of the file or more is still to come.
    write_random(&root.join("f.bin"), 128 << 20, 7);
    let s = Fsd::start_on(&root, &[]);
    let dest = dir.path().join("d.bin");
    let dest = dest.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = fsc(args)
            .env("FSC_ASSUME_RTT_MS", "50")
            .env("RUST_LOG", "fsc::grow=debug")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let limited = ["-q", "--bwlimit", "32M"];
    run(&[
        &limited[..],
        &["download", "-j", "1", &s.addr(), "f.bin", dest],
    ]
    .concat());
    assert_eq!(s.connections(), 1, "-j 1: {}", s.log_text());
    std::fs::remove_file(dest).unwrap();
    // -j auto is the default.
    let log = run(&[&limited[..], &["download", &s.addr(), "f.bin", dest]].concat());
    assert_same_file(&root.join("f.bin"), Path::new(dest));
    let down = s.connections() - 1;
    assert!(
        (2..=8).contains(&down),
        "{down} connections: {}",
        s.log_text()
    );
    assert!(log.contains("retired"), "download: {log}");
    let log = run(&[
        &limited[..],
        &["upload", "-j", "auto", &s.addr(), dest, "up.bin"],
    ]
    .concat());
    assert_same_file(&root.join("f.bin"), &root.join("up.bin"));
    let up = s.connections() - 1 - down;
    assert!((2..=8).contains(&up), "{up} connections: {}", s.log_text());
    assert!(log.contains("retired"), "upload: {log}");
}

/// The socket's `SO_MAX_PACING_RATE` in bytes per second, from an `ss -ti` line: its
/// `pacing_rate RATE/MAX` (no `/MAX` when none is set).
fn max_pacing_rate(ss: &str) -> Option<u64> {
    let field = ss
        .split_whitespace()
        .skip_while(|w| *w != "pacing_rate")
        .nth(1)?;
    let max = field.split_once('/')?.1.strip_suffix("bps")?;
    let (num, mult) = match max.char_indices().last()? {
        (i, 'K') => (&max[..i], 1e3),
        (i, 'M') => (&max[..i], 1e6),
        (i, 'G') => (&max[..i], 1e9),
        _ => (max, 1.0),
    };
    Some((num.parse::<f64>().ok()? * mult / 8.0) as u64)
}

/// Runs `args` with fsc and collects what `ss` shows, until it exits, of the established
/// sockets whose `filter` port is `port`. Bounded: 30 s, 50 ms apart.
fn fsc_watching_ss(args: &[&str], filter: &str, port: u16) -> (std::process::Output, Vec<String>) {
    let mut child = fsc(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(30) {
        if let Some(o) = ss(filter, port).filter(|o| !o.trim().is_empty()) {
            seen.push(o);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), seen)
}

/// The pacing caps the sender's socket showed; every one within the controller's bounds.
fn background_caps(seen: &[String]) -> Vec<u64> {
    let caps: Vec<u64> = seen.iter().filter_map(|o| max_pacing_rate(o)).collect();
    for &c in &caps {
        assert!(
            (fsd::ledbat::FLOOR..=fsd::ledbat::CEILING).contains(&c),
            "cap {c} B/s out of bounds"
        );
    }
    caps
}

/// `fsc --background download`: fsc asks in Hello and fsd paces its socket (the sender's):
/// `ss` shows a pacing cap on fsd's side that a plain download does not have. fsc's
/// `--bwlimit` only keeps the transfer going long enough to look (it does not pace fsd).
#[test]
fn background_download_is_paced_by_the_server() {
    if ss("sport", 1).is_none() {
        eprintln!("skipped: no usable `ss`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), SIZE, 7);
    let s = Fsd::start_on(&root, &[]);
    let dest = dir.path().join("f.bin");
    let dest = dest.to_str().unwrap();
    let (out, seen) = fsc_watching_ss(
        &[
            "-q",
            "--background",
            "--bwlimit",
            RATE,
            "download",
            &s.addr(),
            "f.bin",
            dest,
        ],
        "sport",
        s.addr.port(),
    );
    assert!(out.status.success(), "{out:?}");
    assert_same_file(&root.join("f.bin"), Path::new(dest));
    assert!(!background_caps(&seen).is_empty(), "fsd's socket: {seen:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("--background"), "{err}");

    std::fs::remove_file(dest).unwrap();
    let (out, seen) = fsc_watching_ss(
        &[
            "-q",
            "--bwlimit",
            RATE,
            "download",
            &s.addr(),
            "f.bin",
            dest,
        ],
        "sport",
        s.addr.port(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(!seen.is_empty());
    assert!(background_caps(&seen).is_empty(), "not asked: {seen:?}");
}

/// `fsc --background upload`: fsc paces its own socket. fsd's `--bwlimit` keeps the upload
/// going long enough to look, without a cap on fsc's socket of its own.
#[test]
fn background_upload_is_paced_by_the_client() {
    if ss("sport", 1).is_none() {
        eprintln!("skipped: no usable `ss`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let src = dir.path().join("src.bin");
    write_random(&src, SIZE, 8);
    let s = Fsd::start_on(&root, &["--bwlimit", RATE]);
    let (out, seen) = fsc_watching_ss(
        &[
            "-q",
            "--background",
            "upload",
            &s.addr(),
            src.to_str().unwrap(),
            "up.bin",
        ],
        "dport",
        s.addr.port(),
    );
    assert!(out.status.success(), "{out:?}");
    assert_same_file(&src, &root.join("up.bin"));
    assert!(!background_caps(&seen).is_empty(), "fsc's socket: {seen:?}");
}

/// A server that ignores Hello `background` (as one before it; `--no-background` makes fsd
/// behave so): the download works at normal priority and fsc says so once.
#[test]
fn background_download_from_a_server_without_it_works_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), SIZE, 9);
    let s = Fsd::start_on(&root, &["--no-background"]);
    let dest = dir.path().join("f.bin");
    let (out, seen) = fsc_watching_ss(
        &[
            "-q",
            "--background",
            "--bwlimit",
            RATE,
            "download",
            "-j",
            "2",
            &s.addr(),
            "f.bin",
            dest.to_str().unwrap(),
        ],
        "sport",
        s.addr.port(),
    );
    assert!(out.status.success(), "{out:?}");
    assert_same_file(&root.join("f.bin"), &dest);
    if ss("sport", 1).is_some() {
        assert!(background_caps(&seen).is_empty(), "fsd's socket: {seen:?}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings = err.lines().filter(|l| l.contains("--background")).count();
    assert_eq!(warnings, 1, "{err}");
    assert!(err.contains("normal priority"), "{err}");
}
