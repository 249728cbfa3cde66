//! fsd over raw frames: the handshake, namespace commands, reads and writes, and every kind of
//! bad input, each refused with its error while the server keeps serving.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame, Header, HEADER_LEN, MAGIC};

fn code(f: &Frame) -> ErrorCode {
    ErrorCode::from_u32(error_of(f).code).unwrap()
}

/// Opens `path` for reading and pulls every chunk, returning the bytes.
fn download(r: &mut Raw, path: &str, sid: u32) -> (msg::OpenResponse, Vec<u8>) {
    let f = r.call(
        Cmd::OPEN,
        sid,
        &msg::OpenRequest {
            path: path.into(),
            ..Default::default()
        },
    );
    assert!(!f.header.is_error(), "open {path}: {:?}", error_of(&f));
    let open: msg::OpenResponse = f.decode().unwrap();
    let mut data = Vec::new();
    if open.chunk_count > 0 {
        r.send_msg(
            Cmd::READ,
            sid,
            flags::END,
            &msg::ReadRequest {
                handle: open.handle,
                first_chunk: 0,
                count: open.chunk_count,
                compress_level: 0,
            },
        );
        for i in 0..open.chunk_count {
            let f = r.recv().unwrap();
            assert!(f.header.is_data(), "chunk {i}: {:?}", f.header);
            assert_eq!(f.header.is_end(), i + 1 == open.chunk_count);
            data.extend_from_slice(&f.payload);
        }
    }
    (open, data)
}

#[test]
fn handshake_list_stat_and_download() {
    let s = Fsd::start();
    let data = write_random(&s.root.join("dir/a.bin"), 3 * 1024 * 1024 + 17, 1);
    std::fs::write(s.root.join("b.txt"), "hello").unwrap();
    std::os::unix::fs::symlink("b.txt", s.root.join("link")).unwrap();
    let mut r = Raw::connect(s.addr);
    r.send_msg(
        Cmd::HELLO,
        0,
        flags::END,
        &msg::Hello {
            version: 1,
            chunk_size: 1 << 20,
            ..Default::default()
        },
    );
    let hello: msg::Hello = r.recv().unwrap().decode().unwrap();
    assert_eq!((hello.version, hello.chunk_size), (1, 1 << 20));
    // Nothing but Hello/Auth/Ping before Auth.
    assert_eq!(
        code(&r.call(Cmd::LIST, 1, &msg::ListRequest::default())),
        ErrorCode::NotAuthenticated
    );
    let pong: msg::Ping = r
        .call(Cmd::PING, 1, &msg::Ping { nonce: 42 })
        .decode()
        .unwrap();
    assert_eq!(pong.nonce, 42);
    assert!(!r
        .call(
            Cmd::AUTH,
            1,
            &msg::Auth {
                token: TOKEN.into()
            }
        )
        .header
        .is_error());

    let list: msg::ListResponse = r
        .call(Cmd::LIST, 2, &msg::ListRequest::default())
        .decode()
        .unwrap();
    let names: Vec<_> = list
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("b.txt", msg::Kind::File as i32),
            ("dir", msg::Kind::Dir as i32),
            ("link", msg::Kind::Symlink as i32)
        ]
    );
    let st: msg::StatResponse = r
        .call(
            Cmd::STAT,
            2,
            &msg::StatRequest {
                path: "dir/a.bin".into(),
            },
        )
        .decode()
        .unwrap();
    assert_eq!(st.entry.unwrap().size, data.len() as u64);

    let (open, got) = download(&mut r, "dir/a.bin", 3);
    assert_eq!(open.chunk_count, 4);
    assert_eq!(open.blake3, blake3::hash(&data).as_bytes().to_vec());
    assert!(got == data);
    let m: msg::ManifestResponse = r
        .call(
            Cmd::MANIFEST,
            3,
            &msg::ManifestRequest {
                handle: open.handle,
                first_chunk: 0,
                count: 0,
                cvs: true,
            },
        )
        .decode()
        .unwrap();
    assert_eq!(m.crc32[3], crc32fast::hash(&data[3 << 20..]));
    // The chaining values a client compares its old chunks with (chunk delta).
    assert_eq!(m.cvs.len(), 4 * 32);
    let size = data.len() as u64;
    assert_eq!(
        m.cvs[3 * 32..],
        fsd::integrity::chunk_cv(&data[3 << 20..], 3, 1 << 20, size)
    );
    assert_eq!(
        m.cvs[..32],
        fsd::integrity::chunk_cv(&data[..1 << 20], 0, 1 << 20, size)
    );
    assert!(!r
        .call(
            Cmd::CLOSE,
            3,
            &msg::CloseRequest {
                handle: open.handle
            }
        )
        .header
        .is_error());
    assert_eq!(
        code(&r.call(
            Cmd::CLOSE,
            3,
            &msg::CloseRequest {
                handle: open.handle
            }
        )),
        ErrorCode::BadHandle
    );
}

#[test]
fn upload_write_commit_publishes_atomically() {
    let s = Fsd::start();
    let data = random_bytes(2 * 1024 * 1024 + 5, 2);
    let mut r = Raw::authed(s.addr);
    let open: msg::OpenResponse = r
        .call(
            Cmd::OPEN,
            1,
            &msg::OpenRequest {
                path: "up.bin".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size: data.len() as u64,
                resume_key: "k".into(),
                ..Default::default()
            },
        )
        .decode()
        .unwrap();
    assert_eq!(open.chunk_count, 3);
    assert_eq!(open.bitmap, vec![0]);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        r.send_msg(
            Cmd::WRITE,
            5,
            0,
            &msg::WriteRequest {
                handle: open.handle,
                chunk: i as u32,
            },
        );
        r.send(&Frame::new(
            Cmd::WRITE,
            5,
            flags::DATA | flags::END,
            Bytes::copy_from_slice(chunk),
        ))
        .unwrap();
        let ack: msg::WriteAck = r.recv().unwrap().decode().unwrap();
        assert_eq!(ack.chunk, i as u32);
        assert!(
            !s.root.join("up.bin").exists(),
            "nothing at the final path before commit"
        );
    }
    // A wrong hash is refused and publishes nothing.
    let bad = r.call(
        Cmd::COMMIT,
        1,
        &msg::CommitRequest {
            handle: open.handle,
            blake3: vec![0; 32],
            upload_id: String::new(),
        },
    );
    assert_eq!(code(&bad), ErrorCode::HashMismatch);
    assert!(!s.root.join("up.bin").exists());
    let ok: msg::CommitResponse = r
        .call(
            Cmd::COMMIT,
            1,
            &msg::CommitRequest {
                handle: open.handle,
                blake3: blake3::hash(&data).as_bytes().to_vec(),
                upload_id: String::new(),
            },
        )
        .decode()
        .unwrap();
    assert_eq!(ok.size, data.len() as u64);
    assert!(std::fs::read(s.root.join("up.bin")).unwrap() == data);
}

#[test]
fn bad_input_gets_its_error_and_the_server_keeps_serving() {
    let s = Fsd::start();
    std::fs::write(s.root.join("f"), "x").unwrap();

    // Unknown command: error, connection stays usable.
    let mut r = Raw::authed(s.addr);
    assert_eq!(
        code(&r.call(Cmd(0x7777), 9, &msg::Ok {})),
        ErrorCode::UnknownCommand
    );
    // Malformed protobuf.
    r.send(&Frame::new(
        Cmd::STAT,
        9,
        flags::END,
        Bytes::from_static(&[0xff, 0xff, 0xff]),
    ))
    .unwrap();
    assert_eq!(code(&r.recv().unwrap()), ErrorCode::BadRequest);
    // Wrong checksum: framing survives, the stream gets ChecksumMismatch.
    let mut f = Frame::message(
        Cmd::STAT,
        9,
        flags::END,
        &msg::StatRequest { path: "f".into() },
    );
    f.header.checksum ^= 1;
    r.send(&f).unwrap();
    assert_eq!(code(&r.recv().unwrap()), ErrorCode::ChecksumMismatch);
    // Paths that escape.
    for p in [
        "../etc/passwd",
        "/etc/passwd",
        "a/../../x",
        "a\0b",
        ".fsd-state/uploads",
    ] {
        let f = r.call(Cmd::STAT, 9, &msg::StatRequest { path: p.into() });
        assert_eq!(code(&f), ErrorCode::InvalidPath, "{p:?}");
    }
    // DATA without a WRITE; READ on a bogus handle.
    r.send(&Frame::new(
        Cmd::WRITE,
        11,
        flags::DATA | flags::END,
        Bytes::from_static(b"zz"),
    ))
    .unwrap();
    assert_eq!(code(&r.recv().unwrap()), ErrorCode::BadStream);
    assert_eq!(
        code(&r.call(
            Cmd::READ,
            12,
            &msg::ReadRequest {
                handle: 999,
                first_chunk: 0,
                count: 1,
                compress_level: 0,
            }
        )),
        ErrorCode::BadHandle
    );
    let st = r.call(Cmd::STAT, 13, &msg::StatRequest { path: "f".into() });
    assert!(!st.header.is_error());

    // Huge length: LimitExceeded, then close, without allocating it.
    let mut r2 = Raw::authed(s.addr);
    let h = Header {
        version: 1,
        flags: 0,
        cmd: Cmd::STAT,
        stream_id: 3,
        payload_len: u32::MAX,
        checksum: 0,
    };
    r2.send_bytes(&h.to_bytes()).unwrap();
    assert_eq!(code(&r2.recv().unwrap()), ErrorCode::LimitExceeded);
    assert!(r2.closed());
    // Wrong version: UnsupportedVersion, then close.
    let mut r3 = Raw::connect(s.addr);
    let h = Header {
        version: 9,
        flags: 0,
        cmd: Cmd::HELLO,
        stream_id: 0,
        payload_len: 0,
        checksum: 0,
    };
    r3.send_bytes(&h.to_bytes()).unwrap();
    assert_eq!(code(&r3.recv().unwrap()), ErrorCode::UnsupportedVersion);
    assert!(r3.closed());
    // Garbage: closed.
    let mut r4 = Raw::connect(s.addr);
    r4.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(r4.recv().is_some_and(|f| f.header.is_error()));
    assert!(r4.closed());
    // Truncated header, then hang up: nothing breaks.
    let mut r5 = Raw::connect(s.addr);
    r5.send_bytes(&MAGIC.to_be_bytes()[..3]).unwrap();
    drop(r5);

    // The first connection still works.
    let st = r.call(Cmd::STAT, 14, &msg::StatRequest { path: "f".into() });
    assert!(!st.header.is_error());
    let _ = HEADER_LEN;
}

#[test]
fn failed_auth_is_answered_at_once_and_closed_after_three() {
    let s = Fsd::start();
    let mut r = Raw::connect(s.addr);
    let t0 = Instant::now();
    for i in 0..3 {
        let f = r.call(
            Cmd::AUTH,
            1,
            &msg::Auth {
                token: format!("wrong{i}"),
            },
        );
        assert_eq!(code(&f), ErrorCode::AuthFailed);
    }
    // Guesses are paid from a per-source budget (tests/hardening.rs), not by a delay that
    // would hold the connection.
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "failures answered in {:?}",
        t0.elapsed()
    );
    assert!(r.closed());
}

#[test]
fn unauthenticated_connections_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = Fsd::start_on(dir.path(), &["--auth-timeout", "1"]);
    let mut r = Raw::connect(s.addr);
    let f = r.recv().expect("timeout error");
    assert_eq!(code(&f), ErrorCode::Timeout);
    assert!(r.closed());
}

/// A connection is closed within a quarter over `--idle-timeout` after the client's last
/// progress. Before, the idle check ran once per timeout and the reply to the client's last
/// request counted as progress found at the next check: a connection silent after a STAT was
/// closed after two timeouts (review E, stop 30: 6.0 s for --idle-timeout 3).
#[test]
fn the_idle_timeout_counts_from_the_last_progress() {
    let dir = tempfile::tempdir().unwrap();
    let s = Fsd::start_on(dir.path(), &["--idle-timeout", "2"]);
    let mut r = Raw::authed(s.addr);
    // Half a timeout after AUTH, one request; its reply is the last thing that happens.
    std::thread::sleep(Duration::from_millis(1000));
    let stat = r.call(Cmd::STAT, 1, &msg::StatRequest { path: ".".into() });
    assert!(!stat.header.is_error());
    let asked = Instant::now();
    let f = r.recv().expect("the idle timeout's error frame");
    let after = asked.elapsed();
    assert_eq!(code(&f), ErrorCode::Timeout);
    assert!(r.closed());
    println!("closed {after:?} after the last request (--idle-timeout 2)");
    assert!(
        after >= Duration::from_millis(1900),
        "closed before the timeout: {after:?}"
    );
    assert!(
        after < Duration::from_millis(3200),
        "closed {after:?} after the last progress, timeout 2 s"
    );
}

#[test]
fn stream_and_handle_limits() {
    let dir = tempfile::tempdir().unwrap();
    write_random(&dir.path().join("big"), 64 << 20, 3);
    let s = Fsd::start_on(dir.path(), &["--max-streams", "2", "--max-handles", "2"]);
    let mut r = Raw::authed(s.addr);
    let open = |r: &mut Raw| {
        r.call(
            Cmd::OPEN,
            1,
            &msg::OpenRequest {
                path: "big".into(),
                ..Default::default()
            },
        )
    };
    let h1: msg::OpenResponse = open(&mut r).decode().unwrap();
    let _h2: msg::OpenResponse = open(&mut r).decode().unwrap();
    assert_eq!(code(&open(&mut r)), ErrorCode::LimitExceeded);
    // Two long reads occupy both streams; a third request is refused, not queued. The three
    // go in one write: sent one by one, a client descheduled before the third would let the
    // first READ finish meanwhile (loopback buffers here hold 36 MiB, the writer queue 32
    // chunks, so 64 MiB can be queued without the client reading).
    let mut batch = Vec::new();
    for sid in [10, 11] {
        let read = msg::ReadRequest {
            handle: h1.handle,
            first_chunk: 0,
            count: 64,
            compress_level: 0,
        };
        batch.push(Frame::message(Cmd::READ, sid, flags::END, &read));
    }
    let stat = msg::StatRequest { path: "big".into() };
    batch.push(Frame::message(Cmd::STAT, 12, flags::END, &stat));
    let mut bytes = bytes::BytesMut::new();
    for f in &batch {
        f.header.encode(&mut bytes);
        bytes.extend_from_slice(&f.payload);
    }
    r.send_bytes(&bytes).unwrap();
    let mut limited = false;
    let mut ends = 0;
    while ends < 2 {
        let f = r.recv().unwrap();
        if f.stream_id() == 12 {
            limited = code(&f) == ErrorCode::LimitExceeded;
        } else if f.header.is_end() {
            ends += 1;
        }
    }
    assert!(limited);
}

#[test]
fn an_authenticated_connection_is_not_cut_at_the_auth_timeout() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    let s = Fsd::start_on(dir.path(), &["--auth-timeout", "1", "--idle-timeout", "30"]);
    let mut r = Raw::authed(s.addr);
    std::thread::sleep(Duration::from_millis(1600));
    let st = r.call(Cmd::STAT, 2, &msg::StatRequest { path: "f".into() });
    assert!(!st.header.is_error(), "{:?}", error_of(&st));
    // Hello after Auth would change nothing: refused.
    let f = r.call(
        Cmd::HELLO,
        0,
        &msg::Hello {
            version: 1,
            chunk_size: 65536,
            ..Default::default()
        },
    );
    assert_eq!(code(&f), ErrorCode::BadRequest);
}

#[test]
fn list_pages_stay_within_the_control_frame_limit() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..1100 {
        std::fs::write(dir.path().join(format!("{i:05}{}", "n".repeat(240))), "").unwrap();
    }
    let s = Fsd::start_on(dir.path(), &[]);
    let mut r = Raw::authed(s.addr);
    let (mut seen, mut after, mut pages) = (0, String::new(), 0);
    loop {
        let f = r.call(
            Cmd::LIST,
            3,
            &msg::ListRequest {
                path: String::new(),
                after: after.clone(),
                limit: 0,
            },
        );
        assert!(f.payload.len() <= fsd::protocol::MAX_CONTROL_PAYLOAD as usize);
        let page: msg::ListResponse = f.decode().unwrap();
        seen += page.entries.len();
        pages += 1;
        after = page.entries.last().unwrap().name.clone();
        if !page.more {
            break;
        }
    }
    assert_eq!(
        seen, 1100,
        "every file and nothing else (the state dir is hidden)"
    );
    assert!(pages >= 2);
}

#[test]
fn a_corrupt_write_request_ends_its_stream_exactly_once() {
    let s = Fsd::start();
    let mut r = Raw::authed(s.addr);
    let open: msg::OpenResponse = r
        .call(
            Cmd::OPEN,
            1,
            &msg::OpenRequest {
                path: "u".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size: 10,
                resume_key: "k".into(),
                ..Default::default()
            },
        )
        .decode()
        .unwrap();
    let mut req = Frame::message(
        Cmd::WRITE,
        7,
        0,
        &msg::WriteRequest {
            handle: open.handle,
            chunk: 0,
        },
    );
    req.header.checksum ^= 0xdead;
    r.send(&req).unwrap();
    r.send(&Frame::new(
        Cmd::WRITE,
        7,
        flags::DATA | flags::END,
        Bytes::from_static(b"0123456789"),
    ))
    .unwrap();
    assert_eq!(code(&r.recv().unwrap()), ErrorCode::ChecksumMismatch);
    // Stream 7 is free again and nothing else was sent on it.
    r.send_msg(
        Cmd::WRITE,
        7,
        0,
        &msg::WriteRequest {
            handle: open.handle,
            chunk: 0,
        },
    );
    r.send(&Frame::new(
        Cmd::WRITE,
        7,
        flags::DATA | flags::END,
        Bytes::from_static(b"0123456789"),
    ))
    .unwrap();
    let ack = r.recv().unwrap();
    assert_eq!(ack.stream_id(), 7);
    assert!(!ack.header.is_error(), "{:?}", error_of(&ack));
}

/// A CANCEL that reaches fsd between a WRITE request and its DATA frame ends the stream with
/// one final frame, Cancelled: the DATA frame that was on its way is dropped unanswered. Before,
/// it got a second final frame (BadStream), which a client that reused the stream after
/// Cancelled (as §6.5 allows) took for the failure of its next request (review E, stop 30).
#[test]
fn a_write_cancelled_before_its_data_ends_its_stream_exactly_once() {
    let s = Fsd::start();
    let mut r = Raw::authed(s.addr);
    let open: msg::OpenResponse = r
        .call(
            Cmd::OPEN,
            1,
            &msg::OpenRequest {
                path: "u".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size: 10,
                resume_key: "k".into(),
                ..Default::default()
            },
        )
        .decode()
        .unwrap();
    let write = msg::WriteRequest {
        handle: open.handle,
        chunk: 0,
    };
    let data = Frame::new(
        Cmd::WRITE,
        10,
        flags::DATA | flags::END,
        Bytes::from_static(b"0123456789"),
    );
    r.send_msg(Cmd::WRITE, 10, 0, &write);
    r.send(&Frame::new(Cmd::CANCEL, 10, flags::END, Bytes::new()))
        .unwrap();
    r.send(&data).unwrap();
    // The stream reused at once, as after its final frame.
    r.send_msg(Cmd::WRITE, 10, 0, &write);
    r.send(&data).unwrap();
    let first = r.recv().unwrap();
    assert_eq!(first.stream_id(), 10);
    assert_eq!(code(&first), ErrorCode::Cancelled);
    let second = r.recv().unwrap();
    assert_eq!(second.stream_id(), 10);
    assert!(
        !second.header.is_error(),
        "the reused stream's WRITE got {:?}",
        error_of(&second)
    );
}

/// SIGTERM stops fsd promptly, even when nobody reads its stderr any more (a log line must not
/// turn into a panic that kills the shutdown path).
#[test]
fn sigterm_stops_fsd_even_with_a_closed_stderr() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(fsd_bin())
        .args(["--listen", "127.0.0.1:0", "--token", TOKEN, "--root"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("fsd: listening on"), "{line}");
    drop(stderr);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fsd ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM stops fsd within the shutdown grace (and the writer's last flush) even while a
/// client that stopped reading holds a full writer queue. Before, the read loop waited for
/// room in that queue to tell the client "shutting down", and fsd never exited (review E,
/// stop 30: still running after 120 s).
#[test]
fn sigterm_stops_fsd_while_a_client_does_not_read() {
    let dir = tempfile::tempdir().unwrap();
    write_random(&dir.path().join("big"), 64 << 20, 5);
    let mut s = Fsd::start_on(dir.path(), &["--shutdown-grace", "1"]);
    let mut r = Raw::authed_small_window(s.addr);
    let open = r.call(
        Cmd::OPEN,
        1,
        &msg::OpenRequest {
            path: "big".into(),
            ..Default::default()
        },
    );
    assert!(!open.header.is_error(), "{:?}", error_of(&open));
    let open: msg::OpenResponse = open.decode().unwrap();
    r.send_msg(
        Cmd::READ,
        3,
        flags::END,
        &msg::ReadRequest {
            handle: open.handle,
            first_chunk: 0,
            count: 64,
            compress_level: 0,
        },
    );
    // The client reads nothing more: the writer's queue fills behind its window.
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(s.pid()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let signalled = Instant::now();
    while s.alive() && signalled.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = signalled.elapsed();
    println!("fsd exited {took:?} after SIGTERM (--shutdown-grace 1)");
    assert!(
        took < Duration::from_secs(8),
        "fsd still running {took:?} after SIGTERM"
    );
    drop(r);
}

/// The manifests fsd keeps in its state directory are bounded (`--manifest-cache`): serving
/// more files than fit leaves at most that many bytes of them (in 4 KiB blocks), the least
/// recently used gone, and every download is still intact (an evicted manifest is recomputed
/// from its file). Without a bound every file ever served kept one for good.
#[test]
fn the_manifests_kept_in_the_state_dir_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // Above the inline limit (256 KiB), so each download opens a handle with a manifest.
    for (i, len) in (300_000..312_000).step_by(1000).enumerate() {
        write_random(&root.join(format!("f{i}")), len, i.try_into().unwrap());
    }
    past_racy_window();
    let s = Fsd::start_on(&root, &["--manifest-cache", "16Ki"]);
    let dest = dir.path().join("d");
    std::fs::create_dir(&dest).unwrap();
    for round in 0..2 {
        for i in 0..12 {
            let name = format!("f{i}");
            let out = dest.join(format!("{round}-{name}"));
            fsc_ok(&["-q", "download", &s.addr(), &name, out.to_str().unwrap()]);
            assert_same_file(&root.join(&name), &out);
        }
    }
    let kept: Vec<u64> = std::fs::read_dir(root.join(".fsd-state/manifests"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    let blocks: u64 = kept.iter().map(|l| l.div_ceil(4096).max(1)).sum();
    assert!(
        (1..=4).contains(&blocks),
        "{} manifests in {blocks} blocks kept under a 16 KiB bound",
        kept.len()
    );
}

/// The Hello's chunk size fits the server's max_frame as well as the client's: a client asking
/// for 1 MiB chunks of an fsd with 64 KiB frames is given 64 KiB and can upload. Before, the
/// reply said 1 MiB and every upload on the connection was refused ("file too large for this
/// server's max frame"). A file whose chunks cannot fit (over 2^20 chunks of max_frame) is
/// LimitExceeded at OPEN WRITE, as PROTOCOL.md §7 and §11 say (it was BadRequest).
#[test]
fn the_hello_chunk_size_fits_the_server_s_max_frame() {
    let dir = tempfile::tempdir().unwrap();
    let s = Fsd::start_on(
        dir.path(),
        &["--max-frame", "65536", "--chunk-size", "65536"],
    );
    let mut r = Raw::connect(s.addr);
    r.send_msg(
        Cmd::HELLO,
        0,
        flags::END,
        &msg::Hello {
            version: 1,
            chunk_size: 1 << 20,
            ..Default::default()
        },
    );
    let hello: msg::Hello = r.recv().unwrap().decode().unwrap();
    assert_eq!((hello.chunk_size, hello.max_frame), (65536, 65536));
    let auth = r.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!auth.header.is_error());
    let data = random_bytes(100_000, 5);
    let open = |r: &mut Raw, sid, size| {
        r.call(
            Cmd::OPEN,
            sid,
            &msg::OpenRequest {
                path: "f.bin".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size,
                resume_key: "k".into(),
                ..Default::default()
            },
        )
    };
    let f = open(&mut r, 3, data.len() as u64);
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let up: msg::OpenResponse = f.decode().unwrap();
    assert_eq!((up.chunk_size, up.chunk_count), (65536, 2));
    let too_big = open(&mut r, 5, (1 << 36) + 1);
    assert_eq!(
        code(&too_big),
        ErrorCode::LimitExceeded,
        "{:?}",
        error_of(&too_big)
    );
    // The same for reading: a (sparse) file over 2^20 chunks of the client's 64 KiB frames
    // needs 128 KiB chunks. It was BadRequest (review E, stop 30), which a client branching on
    // the documented code never took for "reconnect with a bigger max_frame".
    std::fs::File::create(dir.path().join("sparse"))
        .unwrap()
        .set_len((1 << 36) + 1)
        .unwrap();
    let mut small = Raw::connect(s.addr);
    small.send_msg(
        Cmd::HELLO,
        0,
        flags::END,
        &msg::Hello {
            version: 1,
            max_frame: 65536,
            ..Default::default()
        },
    );
    assert_eq!(small.recv().unwrap().cmd(), Cmd::HELLO);
    let auth = small.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!auth.header.is_error());
    let read = small.call(
        Cmd::OPEN,
        7,
        &msg::OpenRequest {
            path: "sparse".into(),
            ..Default::default()
        },
    );
    assert_eq!(
        code(&read),
        ErrorCode::LimitExceeded,
        "{:?}",
        error_of(&read)
    );
}
