//! `fsd --metrics`: Prometheus counters move by exactly what a download and an upload did,
//! `/transfers` lists a transfer while it runs and forgets it when its connection ends, and
//! `/healthz` answers.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use fsd::protocol::{flags, msg, Cmd};

const MIB: usize = 1024 * 1024;

/// fsd with `--metrics 127.0.0.1:0` (and `extra`), and the metrics address it printed.
fn start(root: &std::path::Path, extra: &[&str]) -> (Fsd, SocketAddr) {
    let args: Vec<&str> = ["--metrics", "127.0.0.1:0"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let s = Fsd::start_on(root, &args);
    // fsd prints the metrics line before "listening on", so it is in the log by now.
    let log = s.log_text();
    let addr = log
        .lines()
        .find_map(|l| l.strip_prefix("fsd: metrics on "))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .trim()
        .parse()
        .unwrap();
    (s, addr)
}

/// A bare HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = get_with(addr, path, "");
    (status, body)
}

/// A GET with extra header lines (each ending in CRLF): (status, head, body).
fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        sock,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

/// `/metrics` as sample name (with labels, as printed) -> value.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn transfers(addr: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = get(addr, "/transfers");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["transfers"].as_array().unwrap().clone()
}

/// Differences between two scrapes; a sample missing from one counts as 0 there.
struct Delta {
    before: HashMap<String, f64>,
    after: HashMap<String, f64>,
}

impl Delta {
    fn of(&self, name: &str) -> f64 {
        let v = |m: &HashMap<String, f64>| m.get(name).copied().unwrap_or(0.0);
        v(&self.after) - v(&self.before)
    }

    /// Every request counted so far has also finished and been timed. A handler drops its
    /// timer just after queueing its last frame, so the client can see the reply first.
    fn all_timed(&self) -> bool {
        self.after
            .keys()
            .all(|k| match k.strip_prefix("fsd_requests_total") {
                Some(labels) => {
                    self.of(k) == self.of(&format!("fsd_request_duration_seconds_count{labels}"))
                }
                None => true,
            })
    }
}

/// Scrapes until `done` holds for the change since `before` (fsc may exit before fsd has run
/// the CLOSE it sent last), then returns that change.
fn settle(addr: SocketAddr, before: &HashMap<String, f64>, done: impl Fn(&Delta) -> bool) -> Delta {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = Delta {
            before: before.clone(),
            after: scrape(addr),
        };
        if (done(&d) && d.all_timed()) || Instant::now() > deadline {
            return d;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn counters_move_by_what_a_download_and_an_upload_did() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    write_random(&root.join("f"), 5 * MIB, 1);
    past_racy_window();
    let (s, m) = start(&root, &[]);

    assert_eq!(get(m, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(m, "/nope").0, 404);

    // Download: 5 chunks of 1 MiB, all by sendfile on plain TCP.
    let before = scrape(m);
    let dst = dir.path().join("f.copy");
    fsc_ok(&["-q", "download", &s.addr(), "f", dst.to_str().unwrap()]);
    assert_same_file(&root.join("f"), &dst);
    let d = settle(m, &before, |d| {
        d.of(r#"fsd_requests_total{command="close"}"#) >= 1.0
            && d.after["fsd_connections_open"] == 0.0
    });
    assert_eq!(
        d.of(r#"fsd_sent_bytes_total{method="sendfile"}"#),
        (5 * MIB) as f64
    );
    assert_eq!(d.of(r#"fsd_sent_bytes_total{method="copy"}"#), 0.0);
    assert_eq!(d.of("fsd_chunks_sent_total"), 5.0);
    assert_eq!(d.of(r#"fsd_requests_total{command="open"}"#), 1.0);
    assert_eq!(d.of(r#"fsd_requests_total{command="close"}"#), 1.0);
    let reads = d.of(r#"fsd_requests_total{command="read"}"#);
    assert!((1.0..=5.0).contains(&reads), "{reads} READs for 5 chunks");
    assert!(d.all_timed());
    assert_eq!(
        d.of(r#"fsd_request_duration_seconds_count{command="read"}"#),
        reads
    );
    assert_eq!(
        d.of(r#"fsd_request_duration_seconds_count{command="open"}"#),
        1.0
    );
    assert_eq!(d.of("fsd_received_bytes_total"), 0.0);
    assert_eq!(d.of("fsd_manifest_cache_misses_total"), 1.0);
    assert!(d.of("fsd_connections_total") >= 1.0);
    assert_eq!(d.after["fsd_transfers_active"], 0.0);

    // The same file again (to a new place: an identical copy would be skipped): its manifest
    // comes from memory.
    let before = d.after;
    let dst2 = dir.path().join("f.copy2");
    fsc_ok(&["-q", "download", &s.addr(), "f", dst2.to_str().unwrap()]);
    let d = settle(m, &before, |d| {
        d.of(r#"fsd_requests_total{command="close"}"#) >= 1.0
    });
    assert_eq!(d.of(r#"fsd_manifest_cache_hits_total{tier="memory"}"#), 1.0);
    assert_eq!(d.of("fsd_manifest_cache_misses_total"), 0.0);

    // Upload: 3 chunks and a bit, received and committed.
    let size = 3 * MIB + 123;
    let src = dir.path().join("up.bin");
    write_random(&src, size, 2);
    let before = d.after;
    fsc_ok(&["-q", "upload", &s.addr(), src.to_str().unwrap(), "up.bin"]);
    assert_same_file(&src, &root.join("up.bin"));
    let d = settle(m, &before, |d| {
        d.after["fsd_uploads_in_progress"] == 0.0 && d.after["fsd_connections_open"] == 0.0
    });
    assert_eq!(d.of("fsd_received_bytes_total"), size as f64);
    assert_eq!(d.of("fsd_uploads_committed_total"), 1.0);
    assert_eq!(d.of(r#"fsd_requests_total{command="write"}"#), 4.0);
    assert_eq!(d.of(r#"fsd_requests_total{command="commit"}"#), 1.0);
    assert_eq!(d.of(r#"fsd_sent_bytes_total{method="sendfile"}"#), 0.0);
    assert_eq!(d.after["fsd_uploads_in_progress"], 0.0);
    assert_eq!(d.after["fsd_uploads_expired_total"], 0.0);
    assert_eq!(d.of("fsd_crc_failures_total"), 0.0);

    // A wrong token.
    let before = d.after;
    let mut r = Raw::connect(s.addr);
    let f = r.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: "wrong".into(),
        },
    );
    assert!(f.header.is_error());
    let d = settle(m, &before, |_| true);
    assert_eq!(d.of("fsd_auth_failures_total"), 1.0);
    assert_eq!(d.of(r#"fsd_requests_total{command="auth"}"#), 1.0);
    assert_eq!(d.after["fsd_connections_open"], 1.0);
}

#[test]
fn transfers_lists_a_stalled_download_until_its_connection_ends() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let size = 64 * MIB;
    write_random(&root.join("big"), size, 3);
    let (s, m) = start(&root, &[]);
    assert!(transfers(m).is_empty());

    // Ask for every chunk and never read: the writer blocks on the full socket.
    let mut r = Raw::authed(s.addr);
    let f = r.call(
        Cmd::OPEN,
        3,
        &msg::OpenRequest {
            path: "big".into(),
            ..Default::default()
        },
    );
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let open: msg::OpenResponse = f.decode().unwrap();
    r.send_msg(
        Cmd::READ,
        5,
        flags::END,
        &msg::ReadRequest {
            handle: open.handle,
            first_chunk: 0,
            count: open.chunk_count,
            compress_level: 0,
        },
    );
    let mut list = Vec::new();
    wait_for(
        "the download to make progress",
        Duration::from_secs(10),
        || {
            list = transfers(m);
            list.len() == 1 && list[0]["bytes_done"].as_u64() > Some(0)
        },
    );
    let t = &list[0];
    assert_eq!(t["direction"], "download");
    assert_eq!(t["path"], "big");
    assert_eq!(t["size"], size as u64);
    assert_eq!(t["token_name"], "default");
    assert_eq!(t["peer"], r.sock.local_addr().unwrap().to_string());
    assert!(t["rate_bytes_per_sec_5s"].as_f64().unwrap() >= 0.0);
    assert!(t["started_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    // Stalled: the writer queue and socket buffers hold far less than 64 MiB.
    std::thread::sleep(Duration::from_millis(300));
    let stalled = transfers(m)[0]["bytes_done"].as_u64().unwrap();
    assert!(stalled < size as u64, "{stalled} bytes queued of {size}");
    assert_eq!(scrape(m)["fsd_transfers_active"], 1.0);

    // The reader goes away: the writer fails, the READ ends, the handle goes with the session.
    drop(r);
    wait_for(
        "/transfers to empty after the disconnect",
        Duration::from_secs(1),
        || transfers(m).is_empty(),
    );
}

#[test]
fn an_upload_is_listed_until_close_then_expires() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let (s, m) = start(&root, &["--upload-ttl", "1"]);

    let mut r = Raw::authed(s.addr);
    let f = r.call(
        Cmd::OPEN,
        3,
        &msg::OpenRequest {
            path: "new.bin".into(),
            mode: msg::OpenMode::OpenWrite as i32,
            size: 2 * MIB as u64,
            ..Default::default()
        },
    );
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let open: msg::OpenResponse = f.decode().unwrap();
    let list = transfers(m);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["direction"], "upload");
    assert_eq!(list[0]["path"], "new.bin");
    assert_eq!(list[0]["size"], 2 * MIB as u64);
    assert_eq!(list[0]["bytes_done"], 0);
    assert_eq!(scrape(m)["fsd_uploads_in_progress"], 1.0);

    let f = r.call(
        Cmd::CLOSE,
        5,
        &msg::CloseRequest {
            handle: open.handle,
        },
    );
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    assert!(transfers(m).is_empty());
    wait_for("the upload to close", Duration::from_secs(5), || {
        scrape(m)["fsd_uploads_in_progress"] == 0.0
    });
    // Left unfinished: the collector (every second with this TTL) removes it.
    wait_for("the upload to expire", Duration::from_secs(10), || {
        scrape(m)["fsd_uploads_expired_total"] == 1.0
    });
}

/// With `--metrics-token`, every endpoint but /healthz answers 401 (and says how to
/// authenticate) unless the request carries `Authorization: Bearer TOKEN`.
#[test]
fn metrics_token_guards_every_endpoint_but_healthz() {
    const METRICS_TOKEN: &str = "metrics-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let (s, m) = start(dir.path(), &["--metrics-token", METRICS_TOKEN]);
    // An open transfer, so that /transfers would have something to leak.
    std::fs::write(dir.path().join("f"), b"secret-name").unwrap();
    let mut c = Raw::authed(s.addr);
    let open = msg::OpenRequest {
        path: "f".into(),
        ..Default::default()
    };
    let r = c.call(Cmd::OPEN, 1, &open);
    assert!(!r.header.is_error(), "{:?}", error_of(&r));

    let good = format!("Authorization: Bearer {METRICS_TOKEN}\r\n");
    let wrong = [
        String::new(),
        "Authorization: Bearer metrics-token-012345678\r\n".into(),
        format!("Authorization: Bearer {METRICS_TOKEN}0\r\n"),
        format!("Authorization: Basic {METRICS_TOKEN}\r\n"),
        format!("Authorization: {METRICS_TOKEN}\r\n"),
    ];
    for path in ["/metrics", "/transfers", "/nope"] {
        for h in &wrong {
            let (status, head, body) = get_with(m, path, h);
            assert_eq!(status, 401, "{path} with {h:?}: {body}");
            assert!(head.contains("www-authenticate: Bearer"), "{head}");
            assert!(!body.contains("fsd_") && !body.contains("\"f\""), "{body}");
        }
    }
    let (status, _, body) = get_with(m, "/transfers", &good);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"path\":\"f\""), "{body}");
    let (status, _, body) = get_with(m, "/metrics", &good);
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(get_with(m, "/nope", &good).0, 404);
    assert_eq!(get(m, "/healthz"), (200, "ok\n".to_string()));
}

/// A TCP connection to `addr` from the loopback address `from` (all of 127/8 is loopback).
fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

/// One source cannot take every place of the metrics listener: 16 connections from 127.0.0.1
/// that never finish their request headers (or, before, 16 kept-alive scrapers) held all 16
/// places, and a load balancer's `/healthz` from elsewhere waited for the 10 s header timeout,
/// again and again. Now a source holds at most 4 places (the others are closed at once), and a
/// connection serves one request: a kept-alive one is closed after its answer.
#[test]
fn one_source_cannot_lock_others_out_of_the_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, addr) = start(dir.path(), &[]);
    let mut kept = connect_from([127, 0, 0, 1], addr);
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(kept, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    // The answer, then the end of the connection: read_to_string returns only at EOF.
    kept.read_to_string(&mut answer)
        .expect("a kept-alive connection is closed after its answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _hogs: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut c = connect_from([127, 0, 0, 1], addr);
            c.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = connect_from([127, 0, 0, 2], addr);
    probe
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let started = Instant::now();
    write!(
        probe,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let read = probe.read_to_string(&mut resp);
    assert!(
        read.is_ok() && resp.starts_with("HTTP/1.1 200"),
        "/healthz from another source after {:?}: {read:?} {resp:?}",
        started.elapsed()
    );
}
