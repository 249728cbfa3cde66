//! fsd against an attacker who holds a credential, or none: a published file is never written
//! again, credentials never share uploads, nothing is left in the state directory by a refused
//! OPEN, and an unauthenticated peer is bounded in what it can make the server buffer or hold.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::inproc::start_with;
use common::*;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame};
use fsd::server::{Config, Credential, Credentials};

/// Chunk size the tests ask for, so that a few hundred KiB make a multi-chunk upload.
const CHUNK: u32 = 64 * 1024;

fn open_write(r: &mut Raw, sid: u32, path: &str, size: u64, key: &str) -> Frame {
    r.call(
        Cmd::OPEN,
        sid,
        &msg::OpenRequest {
            path: path.into(),
            mode: msg::OpenMode::OpenWrite as i32,
            size,
            resume_key: key.into(),
            ..Default::default()
        },
    )
}

fn opened(f: &Frame, what: &str) -> msg::OpenResponse {
    assert!(!f.header.is_error(), "{what}: {:?}", error_of(f));
    f.decode().unwrap()
}

fn write(r: &mut Raw, sid: u32, handle: u32, chunk: u32, data: &[u8]) -> Frame {
    r.send_msg(Cmd::WRITE, sid, 0, &msg::WriteRequest { handle, chunk });
    r.send(&Frame::new(
        Cmd::WRITE,
        sid,
        flags::DATA | flags::END,
        Bytes::copy_from_slice(data),
    ))
    .unwrap();
    r.recv().expect("write reply")
}

fn write_all(r: &mut Raw, sid: u32, handle: u32, data: &[u8]) {
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        let ack = write(r, sid, handle, i as u32, c);
        assert!(!ack.header.is_error(), "write {i}: {:?}", error_of(&ack));
    }
}

fn commit(r: &mut Raw, sid: u32, handle: u32, data: &[u8]) -> Frame {
    r.call(
        Cmd::COMMIT,
        sid,
        &msg::CommitRequest {
            handle,
            upload_id: String::new(),
            blake3: blake3::hash(data).as_bytes().to_vec(),
        },
    )
}

fn state_files(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("uploads"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Two handles on one upload (same path, size and resume key), on one connection and on two:
/// after A's COMMIT, B can neither write nor commit, the published file keeps the verified
/// bytes, and a new OPEN WRITE starts afresh.
#[test]
fn a_committed_upload_is_sealed_for_every_handle() {
    let fsd = Fsd::start();
    let data = random_bytes(4 * CHUNK as usize, 1);
    let evil = vec![0xEE; CHUNK as usize];
    for same_connection in [true, false] {
        let path = format!("sealed-{same_connection}.bin");
        let mut a = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
        let mut b_conn = (!same_connection).then(|| Raw::authed_as(fsd.addr, TOKEN, CHUNK));
        let ha = opened(&open_write(&mut a, 2, &path, data.len() as u64, "k"), "A").handle;
        let b = b_conn.as_mut().unwrap_or(&mut a);
        let hb = opened(&open_write(b, 3, &path, data.len() as u64, "k"), "B").handle;
        write_all(&mut a, 4, ha, &data);
        let c = commit(&mut a, 5, ha, &data);
        assert!(!c.header.is_error(), "A's commit: {:?}", error_of(&c));
        let published = fsd.root.join(&path);
        assert_eq!(std::fs::read(&published).unwrap(), data);

        let b = b_conn.as_mut().unwrap_or(&mut a);
        let w = write(b, 6, hb, 0, &evil);
        assert!(
            w.header.is_error(),
            "B's WRITE after A's COMMIT was acknowledged (same connection: {same_connection})"
        );
        let c = commit(b, 7, hb, &data);
        assert!(c.header.is_error(), "B's COMMIT after A's COMMIT succeeded");
        assert_eq!(
            std::fs::read(&published).unwrap(),
            data,
            "the published file changed"
        );
        // A new upload with the same parameters starts empty: it never joins the committed one.
        let fresh = opened(&open_write(b, 8, &path, data.len() as u64, "k"), "again");
        assert!(
            fresh.bitmap.iter().all(|b| *b == 0),
            "a new OPEN WRITE joined the committed upload: bitmap {:?}",
            fresh.bitmap
        );
        let w = write(b, 9, fresh.handle, 0, &evil);
        assert!(!w.header.is_error(), "fresh upload: {:?}", error_of(&w));
        assert_eq!(
            std::fs::read(&published).unwrap(),
            data,
            "a write to a fresh upload reached the published file"
        );
        // Downloaders are served the verified content and its hash.
        let o = opened(
            &a.call(
                Cmd::OPEN,
                10,
                &msg::OpenRequest {
                    path: path.clone(),
                    ..Default::default()
                },
            ),
            "open read",
        );
        assert_eq!(o.blake3, blake3::hash(&data).as_bytes().to_vec());
    }
}

/// Two token-file lines with the same NAME and different prefixes (the binary refuses that
/// file; the library is handed it anyway): the same relative upload under each prefix is two
/// uploads, each published under its own prefix.
#[test]
fn same_named_credentials_never_share_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    for p in ["pa", "pb"] {
        std::fs::create_dir(dir.path().join(p)).unwrap();
    }
    let cred = |token: &str, prefix: &str| Credential {
        name: "dup".into(),
        token: token.into(),
        subject: None,
        writable: true,
        prefix: prefix.into(),
        quota: Default::default(),
    };
    let (ta, tb) = ("token-a-0123456789abcdef", "token-b-0123456789abcdef");
    let s = start_with(Config::new(
        dir.path().to_path_buf(),
        Credentials::new(vec![cred(ta, "pa"), cred(tb, "pb")]),
    ));
    let da = random_bytes(3 * CHUNK as usize, 2);
    let db = random_bytes(3 * CHUNK as usize, 3);
    let mut a = Raw::authed_as(s.addr, ta, CHUNK);
    let mut b = Raw::authed_as(s.addr, tb, CHUNK);
    let ha = opened(
        &open_write(&mut a, 2, "pa/f.bin", da.len() as u64, "k"),
        "A",
    )
    .handle;
    write_all(&mut a, 3, ha, &da);
    let ob = opened(
        &open_write(&mut b, 2, "pb/f.bin", db.len() as u64, "k"),
        "B",
    );
    assert!(
        ob.bitmap.iter().all(|b| *b == 0),
        "B's upload to pb/ joined A's upload to pa/"
    );
    write_all(&mut b, 3, ob.handle, &db);
    for (r, h, d) in [(&mut a, ha, &da), (&mut b, ob.handle, &db)] {
        let c = commit(r, 4, h, d);
        assert!(!c.header.is_error(), "commit: {:?}", error_of(&c));
    }
    assert_eq!(std::fs::read(dir.path().join("pa/f.bin")).unwrap(), da);
    assert_eq!(std::fs::read(dir.path().join("pb/f.bin")).unwrap(), db);
    s.shutdown.cancel();
}

/// OPEN WRITE and PUT of the root (as "", ".", or a prefix's own directory) and of an existing
/// directory are refused at OPEN and leave nothing in the state directory.
#[test]
fn uploads_onto_the_root_or_a_directory_are_refused_at_open() {
    let fsd = Fsd::start();
    std::fs::create_dir(fsd.root.join("dir")).unwrap();
    let before = state_files(&fsd.state);
    let mut r = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
    let mut sid = 2;
    for path in ["", ".", "dir"] {
        for size in [5u64, 3 * CHUNK as u64] {
            let f = open_write(&mut r, sid, path, size, "k");
            assert!(
                f.header.is_error(),
                "OPEN WRITE {path:?} of {size} bytes accepted"
            );
            sid += 1;
        }
        let put = msg::PutRequest {
            path: path.into(),
            size: 5,
            blake3: blake3::hash(b"hello").as_bytes().to_vec(),
            ..Default::default()
        };
        r.send_msg(Cmd::PUT, sid, 0, &put);
        r.send(&Frame::new(
            Cmd::PUT,
            sid,
            flags::DATA | flags::END,
            Bytes::from_static(b"hello"),
        ))
        .unwrap();
        let f = r.recv().unwrap();
        assert!(f.header.is_error(), "PUT {path:?} accepted");
        sid += 1;
    }
    assert_eq!(
        state_files(&fsd.state),
        before,
        "a refused OPEN left state behind"
    );
    assert!(fsd.root.join("dir").is_dir());
}

/// Hello may announce any frame size: until Auth succeeds a frame over 16 KiB is refused from
/// its header (LimitExceeded, then close), never buffered.
#[test]
fn before_auth_no_frame_over_16_kib_is_buffered_whatever_hello_says() {
    let fsd = Fsd::start();
    for len in [16 * 1024 + 1, 16 << 20] {
        let mut r = Raw::connect(fsd.addr);
        r.send_msg(
            Cmd::HELLO,
            0,
            flags::END,
            &msg::Hello {
                version: 1,
                max_frame: 16 << 20,
                ..Default::default()
            },
        );
        assert!(!r.recv().unwrap().header.is_error());
        // Only the header: a server that waits for the payload answers nothing.
        let h = fsd::protocol::Header::data(Cmd::WRITE, 3, len, 0, true);
        let mut b = bytes::BytesMut::new();
        h.encode(&mut b);
        r.send_bytes(&b).unwrap();
        r.sock
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let f = r
            .recv()
            .unwrap_or_else(|| panic!("a {len}-byte DATA header before Auth went unanswered"));
        assert_eq!(
            ErrorCode::from_u32(error_of(&f).code),
            Some(ErrorCode::LimitExceeded)
        );
        assert!(r.closed(), "not closed after an oversized pre-auth frame");
    }
}

/// Silent connections from one address, beyond its share and beyond `--max-connections`, lock
/// nobody out: a client on another address authenticates at once, and one on the flooding
/// address too once the flood's places have outlived their grace (the oldest gives way).
#[test]
fn silent_connections_do_not_lock_out_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let fsd = Fsd::start_on(dir.path(), &["--max-connections", "64"]);
    let attacker: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let mut silent: Vec<Raw> = (0..100)
        .map(|_| Raw::connect_from(fsd.addr, attacker))
        .collect();
    std::thread::sleep(fsd::server::limits::STARTUP_GRACE + Duration::from_millis(200));
    for from in ["127.0.0.1", "127.0.0.3"] {
        let t = Instant::now();
        let mut r = Raw::connect_from(fsd.addr, from.parse().unwrap());
        let f = r.login(TOKEN);
        assert!(
            !f.header.is_error(),
            "client on {from} refused during a flood: {:?}",
            error_of(&f)
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "auth on {from} took {:?}",
            t.elapsed()
        );
        let s = r.call(Cmd::STAT, 2, &msg::StatRequest { path: ".".into() });
        assert!(!s.header.is_error());
    }
    // The flood was refused beyond its share (and its oldest place taken back), long before
    // the auth timeout.
    let closed = silent
        .iter_mut()
        .take(80)
        .map(|r| {
            r.sock
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            r.closed()
        })
        .filter(|closed| *closed)
        .count();
    assert!(
        closed >= 60,
        "only {closed} of the 80 oldest silent connections closed"
    );
}

/// A source that never authenticated is served apart from the authenticated clients (on the
/// startup runtime) until its AUTH succeeds, so a flood of unauthenticated work cannot queue
/// ahead of their requests; then its connection moves, keeping every byte the client sent
/// after AUTH without waiting for the reply. A source that authenticated before starts where
/// authenticated clients are served.
#[test]
fn a_connection_moves_to_the_authenticated_clients_when_its_auth_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
    let s = common::inproc::start(dir.path());
    let moved = || {
        s.server
            .stats
            .connections_handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let from: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    for (round, want_moved) in [(0, 1), (1, 1)] {
        let mut r = Raw::connect_from(s.addr, from);
        // Hello, Auth and two requests in one write: the requests arrive with the Auth.
        let mut bytes = Vec::new();
        let hello = msg::Hello {
            version: 1,
            ..Default::default()
        };
        let auth = msg::Auth {
            token: TOKEN.into(),
        };
        let stat = msg::StatRequest { path: "f".into() };
        for f in [
            Frame::message(Cmd::HELLO, 0, flags::END, &hello),
            Frame::message(Cmd::AUTH, 1, flags::END, &auth),
            Frame::message(Cmd::STAT, 3, flags::END, &stat),
            Frame::message(Cmd::PING, 5, flags::END, &msg::Ping::default()),
        ] {
            let mut b = bytes::BytesMut::new();
            f.header.encode(&mut b);
            bytes.extend_from_slice(&b);
            bytes.extend_from_slice(&f.payload);
        }
        r.send_bytes(&bytes).unwrap();
        let replies: Vec<Frame> = (0..4).map(|_| r.recv().expect("a reply")).collect();
        // Hello and Auth in order; the two requests' replies in either (PING is answered inline,
        // STAT after a file-system hop).
        let mut cmds: Vec<(Cmd, u32)> = replies.iter().map(|f| (f.cmd(), f.stream_id())).collect();
        cmds[2..].sort_by_key(|&(_, sid)| sid);
        assert_eq!(
            cmds,
            [
                (Cmd::HELLO, 0),
                (Cmd::AUTH, 1),
                (Cmd::STAT, 3),
                (Cmd::PING, 5)
            ],
            "round {round}"
        );
        assert!(
            replies.iter().all(|f| !f.header.is_error()),
            "round {round}"
        );
        let stat_reply = replies.iter().find(|f| f.cmd() == Cmd::STAT).unwrap();
        let st: msg::StatResponse = stat_reply.decode().unwrap();
        assert_eq!(st.entry.unwrap().size, 10);
        // Still served after the move.
        let again = r.call(Cmd::STAT, 7, &stat);
        assert!(!again.header.is_error());
        assert_eq!(moved(), want_moved, "round {round}");
    }
}

/// Wrong tokens are paid for before they are checked: from one address, hundreds of AUTHs on
/// connections that hang up at once get at most a burst evaluated; a client on another address
/// still logs in at once, and a user's single typo costs nothing.
#[test]
fn token_guessing_is_bounded_even_when_guessers_hang_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::inproc::start(dir.path());
    let guesser: std::net::IpAddr = "127.0.0.4".parse().unwrap();
    let hello = Frame::message(
        Cmd::HELLO,
        0,
        flags::END,
        &msg::Hello {
            version: 1,
            ..Default::default()
        },
    );
    let t = Instant::now();
    let mut sent = 0;
    while sent < 300 && t.elapsed() < Duration::from_secs(20) {
        let mut r = Raw::connect_from(s.addr, guesser);
        // Sends may fail: beyond its share of unauthenticated places the source is refused.
        let auth = msg::Auth {
            token: format!("guess-{sent:020}"),
        };
        let _ = r
            .send(&hello)
            .and_then(|_| r.send(&Frame::message(Cmd::AUTH, 1, flags::END, &auth)));
        drop(r); // no waiting for the answer
        sent += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    let evaluated = s
        .server
        .stats
        .auth_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    let limit = fsd::server::limits::GUESS_BURST_PER_SOURCE as u64
        + (t.elapsed().as_secs_f64() * fsd::server::limits::GUESSES_PER_SEC_PER_SOURCE).ceil()
            as u64;
    assert!(
        evaluated <= limit,
        "{evaluated} of {sent} guesses from one address were evaluated (limit {limit})"
    );
    // The guesser is now refused unevaluated, even with the right token (or its connection
    // is closed at accept, over its connection rate)...
    let mut late = Raw::connect_from(s.addr, guesser);
    let greeted = late.send(&hello).ok().and_then(|_| late.recv());
    if greeted.is_some_and(|h| !h.header.is_error()) {
        let a = late.call(
            Cmd::AUTH,
            1,
            &msg::Auth {
                token: TOKEN.into(),
            },
        );
        assert!(
            a.header.is_error(),
            "a refused source got its token checked"
        );
    }
    // ...while another address types one wrong token, then the right one, at once.
    let t = Instant::now();
    let mut r = Raw::connect_from(s.addr, "127.0.0.5".parse().unwrap());
    let typo = r.login("a-typo-0123456789abcdef");
    assert!(typo.header.is_error());
    let ok = r.call(
        Cmd::AUTH,
        2,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!ok.header.is_error(), "after a typo: {:?}", error_of(&ok));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a typo and a login took {:?}",
        t.elapsed()
    );
    s.shutdown.cancel();
}

/// A client that asks for many inline files and never reads its socket holds at most its
/// connection's reply budget in the server, however many requests it sends.
#[test]
fn replies_a_client_does_not_read_are_bounded_in_bytes() {
    let fsd = Fsd::start();
    for i in 0..64 {
        write_random(&fsd.root.join(format!("f{i}")), 256 * 1024, i);
    }
    let base = proc_status_kib(fsd.pid(), "VmRSS:");
    let conns: Vec<Raw> = (0..12)
        .map(|_| {
            let mut r = Raw::authed(fsd.addr);
            // Small receive buffer: the socket fills early and the server must hold the rest.
            for i in 0..64u32 {
                r.send_msg(
                    Cmd::OPEN,
                    2 + i,
                    flags::END,
                    &msg::OpenRequest {
                        path: format!("f{i}"),
                        inline_max: 256 * 1024,
                        ..Default::default()
                    },
                );
            }
            r
        })
        .collect();
    // Time to read every file it is willing to (bounded wait).
    let grew_mib = rss_growth_mib(fsd.pid(), base);
    println!("12 connections x 64 unread inline OPENs of 256 KiB: fsd RSS +{grew_mib} MiB");
    // 12 x 16 MiB asked for; the budget is 4 MiB per connection (plus what sits in socket
    // buffers, which is kernel memory).
    assert!(
        grew_mib < 80,
        "fsd grew by {grew_mib} MiB for replies nobody reads"
    );
    drop(conns);
}

const TOKEN_A: &str = "alice-token-0123456789abcdef";
const TOKEN_B: &str = "bob-token-0123456789abcdef";

/// A token file with two read-write credentials on the whole root (`extra_a`: alice's quota
/// overrides); returns its path inside `dir`.
fn two_credentials(dir: &Path, extra_a: &str) -> String {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!("alice {TOKEN_A} rw {extra_a}\nbob {TOKEN_B} rw\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_string()
}

fn try_login(addr: std::net::SocketAddr, token: &str) -> Result<Raw, msg::Error> {
    let mut r = Raw::connect(addr);
    let f = r.login(token);
    if f.header.is_error() {
        return Err(error_of(&f));
    }
    Ok(r)
}

/// One credential taking every connection it can gets only its share; the other still
/// connects, and so does the first again once it lets go.
#[test]
fn one_credential_cannot_take_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tokens = two_credentials(dir.path(), "");
    let fsd = Fsd::start_on(&root, &["--token-file", &tokens, "--max-connections", "8"]);
    let mut hogs = Vec::new();
    for _ in 0..8 {
        match try_login(fsd.addr, TOKEN_A) {
            Ok(r) => hogs.push(r),
            Err(e) => {
                assert_eq!(ErrorCode::from_u32(e.code), Some(ErrorCode::LimitExceeded));
                break;
            }
        }
    }
    assert!(hogs.len() < 8, "alice holds all {} connections", hogs.len());
    let bob = try_login(fsd.addr, TOKEN_B);
    assert!(bob.is_ok(), "bob locked out: {:?}", bob.err());
    hogs.pop();
    // The server learns of the close asynchronously: give it up to 2 s.
    let t = Instant::now();
    let again = loop {
        match try_login(fsd.addr, TOKEN_A) {
            Ok(_) => break true,
            Err(_) if t.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(_) => break false,
        }
    };
    assert!(again, "alice's freed place not reusable");
}

/// With few descriptors (RLIMIT_NOFILE 512), one credential opening every read handle it can
/// gets LimitExceeded, never a hang, and the other credential still opens and reads a file.
#[test]
fn handles_are_bounded_per_credential_and_by_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    write_random(&root.join("f"), 4 * CHUNK as usize, 9);
    let tokens = two_credentials(dir.path(), "");
    let fsd = Fsd::start_wrapped_with(
        &["prlimit", "--nofile=512:512", "--"],
        &root,
        &["--token-file", &tokens],
    );
    let open_read = |r: &mut Raw, sid: u32| {
        r.call(
            Cmd::OPEN,
            sid,
            &msg::OpenRequest {
                path: "f".into(),
                ..Default::default()
            },
        )
    };
    let mut conns = Vec::new();
    let mut handles = 0;
    let mut refused = None;
    'hog: for _ in 0..40 {
        let Ok(mut r) = try_login(fsd.addr, TOKEN_A) else {
            break;
        };
        for sid in 2..130 {
            let f = open_read(&mut r, sid);
            if f.header.is_error() {
                refused = Some(error_of(&f));
                conns.push(r);
                break 'hog;
            }
            handles += 1;
        }
        conns.push(r);
    }
    let refused = refused.expect("alice was never refused a handle");
    assert_eq!(
        ErrorCode::from_u32(refused.code),
        Some(ErrorCode::LimitExceeded),
        "{refused:?}"
    );
    println!("alice opened {handles} handles, then: {}", refused.message);
    let mut bob = try_login(fsd.addr, TOKEN_B).expect("bob connects");
    bob.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let o = opened(&open_read(&mut bob, 2), "bob's OPEN");
    bob.send_msg(
        Cmd::READ,
        3,
        flags::END,
        &msg::ReadRequest {
            handle: o.handle,
            first_chunk: 0,
            count: 1,
            compress_level: 0,
        },
    );
    let d = bob.recv().expect("bob's READ answered");
    assert!(d.header.is_data(), "bob's READ: {:?}", d.header);
}

/// A TREE_WRITE of n records is one handle holding n + 1 descriptors until it answers. The
/// credential's share used to count handles, so a credential keeping TREE_WRITEs in flight
/// took every descriptor and the other credential's OPEN got "server out of file
/// descriptors". Charged by descriptors, it gets half of them (RLIMIT_NOFILE 512: 256 in the
/// budget, a share of 128) and the other credential keeps working.
#[test]
fn tree_writes_in_flight_leave_the_other_credential_its_descriptors() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    write_random(&root.join("f"), 1000, 9);
    let tokens = two_credentials(dir.path(), "");
    let fsd = Fsd::start_wrapped_with(
        &["prlimit", "--nofile=512:512", "--"],
        &root,
        &["--token-file", &tokens],
    );
    let mut bob = try_login(fsd.addr, TOKEN_B).expect("bob connects");
    // Thirteen empty files: 14 descriptors. Four connections hold 4 of the 256, so the 252 left
    // are 18 such TREE_WRITEs: before, alice's flood could take every one.
    let mut frame = Vec::new();
    for i in 0..13 {
        let e = msg::TreeEntry {
            path: format!("f{i}"),
            data: true,
            blake3: blake3::hash(b"").as_bytes().to_vec(),
            ..Default::default()
        };
        fsd::protocol::tree::push(&mut frame, &e, b"");
    }
    let frame = Bytes::from(frame);
    let stop = Arc::new(AtomicBool::new(false));
    // Alice: three connections, each keeping 16 TREE_WRITEs in flight until told to stop.
    let hogs: Vec<_> = (0..3)
        .map(|c| {
            let dir = format!("c{c}");
            std::fs::create_dir(root.join(&dir)).unwrap();
            let mut r = try_login(fsd.addr, TOKEN_A).expect("alice connects");
            let (stop, frame) = (stop.clone(), frame.clone());
            std::thread::spawn(move || {
                let req = msg::TreeWriteRequest {
                    path: dir,
                    count: 13,
                    no_clobber: false,
                };
                let send = |r: &mut Raw, sid: u32| {
                    r.send_msg(Cmd::TREE_WRITE, sid, 0, &req);
                    let data = Frame::new(
                        Cmd::TREE_WRITE,
                        sid,
                        flags::DATA | flags::END,
                        frame.clone(),
                    );
                    r.send(&data).unwrap();
                };
                for sid in 2..18 {
                    send(&mut r, sid);
                }
                let (mut written, mut refused) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let f = r.recv().expect("alice's TREE_WRITE answered");
                    if f.header.is_error() {
                        refused.push(error_of(&f));
                    } else {
                        written += 1;
                    }
                    send(&mut r, f.stream_id());
                }
                (written, refused)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (mut opens, mut failed) = (0, Vec::new());
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let f = bob.call(
            Cmd::OPEN,
            2,
            &msg::OpenRequest {
                path: "f".into(),
                ..Default::default()
            },
        );
        if f.header.is_error() {
            failed.push(error_of(&f).message);
            continue;
        }
        opens += 1;
        let o: msg::OpenResponse = f.decode().unwrap();
        let c = bob.call(Cmd::CLOSE, 3, &msg::CloseRequest { handle: o.handle });
        assert!(!c.header.is_error(), "bob's CLOSE: {:?}", error_of(&c));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut written, mut refused) = (0, Vec::new());
    for h in hogs {
        let (w, r) = h.join().unwrap();
        written += w;
        refused.extend(r);
    }
    println!(
        "alice: {written} TREE_WRITEs answered, {} refused ({:?}); bob: {opens} OPENs, {} failed",
        refused.len(),
        refused.first().map(|e| &e.message),
        failed.len()
    );
    assert!(written > 0, "alice's TREE_WRITEs never went through");
    assert!(!refused.is_empty(), "alice was never at her limit");
    for e in &refused {
        assert_eq!(
            ErrorCode::from_u32(e.code),
            Some(ErrorCode::LimitExceeded),
            "{e:?}"
        );
    }
    assert!(
        failed.is_empty(),
        "{} of bob's {} OPENs failed, first: {}",
        failed.len(),
        opens + failed.len(),
        failed[0]
    );
}

/// Unfinished resumable uploads count against their owner's quota until published or
/// expired, across connections and restarts; the other credential is not affected.
#[test]
fn unfinished_uploads_count_against_their_owner_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tokens = two_credentials(dir.path(), "uploads=3 upload-bytes=1G");
    let mut fsd = Fsd::start_on(&root, &["--token-file", &tokens]);
    let size = 3 * CHUNK as u64;
    let open = |addr, token: &str, name: &str, size: u64| {
        let mut r = Raw::authed_as(addr, token, CHUNK);
        let f = open_write(&mut r, 2, name, size, "k");
        (!f.header.is_error())
            .then_some(())
            .ok_or_else(|| error_of(&f))
    };
    for i in 0..3 {
        open(fsd.addr, TOKEN_A, &format!("a{i}"), size).expect("within quota");
    }
    let e = open(fsd.addr, TOKEN_A, "a3", size).expect_err("a 4th unfinished upload");
    assert_eq!(ErrorCode::from_u32(e.code), Some(ErrorCode::LimitExceeded));
    let e = open(fsd.addr, TOKEN_A, "a0", 2 << 30).expect_err("over the byte quota");
    assert_eq!(ErrorCode::from_u32(e.code), Some(ErrorCode::LimitExceeded));
    open(fsd.addr, TOKEN_B, "b0", size).expect("bob is not alice");
    fsd.restart();
    let e = open(fsd.addr, TOKEN_A, "a3", size).expect_err("quota forgotten by a restart");
    assert_eq!(ErrorCode::from_u32(e.code), Some(ErrorCode::LimitExceeded));
    // Resuming one of them is not a new upload.
    open(fsd.addr, TOKEN_A, "a1", size).expect("resume within quota");
}

/// What counts against an owner's unfinished uploads is what the state directory holds: a
/// record whose data file is gone (a publish cut off before its cleanup, on this node or
/// another sharing the directory) holds nothing and no longer counts; it used to, after every
/// restart, for good.
#[test]
fn a_record_without_its_data_does_not_count_against_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tokens = two_credentials(dir.path(), "uploads=1");
    let mut fsd = Fsd::start_on(&root, &["--token-file", &tokens]);
    let size = 3 * CHUNK as u64;
    let open = |addr, name: &str| {
        let mut r = Raw::authed_as(addr, TOKEN_A, CHUNK);
        let f = open_write(&mut r, 2, name, size, "k");
        if f.header.is_error() {
            return Err(error_of(&f));
        }
        let o: msg::OpenResponse = f.decode().unwrap();
        Ok(o.upload_id)
    };
    let id = open(fsd.addr, "a0").expect("within quota");
    let e = open(fsd.addr, "a1").expect_err("a 2nd unfinished upload");
    assert_eq!(ErrorCode::from_u32(e.code), Some(ErrorCode::LimitExceeded));
    fsd.kill9();
    // What a publish cut off after its rename and before its cleanup leaves: the record.
    std::fs::remove_file(fsd.state.join("uploads").join(format!("{id}.data"))).unwrap();
    fsd.restart();
    open(fsd.addr, "a1").expect("the upload without data still counted");
}

/// A client whose frames are smaller than the server's chunk size gets chunks that fit them
/// (it used to get a retryable LimitExceeded on every OPEN READ, even of a 1-byte file); one
/// whose frames cannot hold the smallest chunk is refused at Hello.
#[test]
fn chunks_fit_the_clients_frames() {
    let fsd = Fsd::start();
    let data = random_bytes(300 * 1024, 5);
    std::fs::write(fsd.root.join("f"), &data).unwrap();
    std::fs::write(fsd.root.join("one"), b"x").unwrap();
    let hello = |max_frame| msg::Hello {
        version: 1,
        max_frame,
        ..Default::default()
    };
    let mut r = Raw::connect(fsd.addr);
    let h = r.call(Cmd::HELLO, 0, &hello(100_000));
    let h: msg::Hello = h.decode().unwrap();
    assert_eq!(
        h.chunk_size,
        64 * 1024,
        "base chunk not clamped to the client's frames"
    );
    let a = r.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!a.header.is_error());
    for (path, want) in [("one", &b"x"[..]), ("f", &data[..])] {
        let o = opened(
            &r.call(
                Cmd::OPEN,
                2,
                &msg::OpenRequest {
                    path: path.into(),
                    ..Default::default()
                },
            ),
            path,
        );
        assert!(o.chunk_size <= 100_000);
        r.send_msg(
            Cmd::READ,
            3,
            flags::END,
            &msg::ReadRequest {
                handle: o.handle,
                first_chunk: 0,
                count: o.chunk_count,
                compress_level: 0,
            },
        );
        let mut got = Vec::new();
        for _ in 0..o.chunk_count {
            let d = r.recv().unwrap();
            assert!(d.header.is_data() && d.payload.len() <= 100_000);
            got.extend_from_slice(&d.payload);
        }
        assert_eq!(got, want);
    }
    let mut r = Raw::connect(fsd.addr);
    let h = r.call(Cmd::HELLO, 0, &hello(1000));
    assert_eq!(
        ErrorCode::from_u32(error_of(&h).code),
        Some(ErrorCode::BadRequest)
    );
}

/// One credential per connection: a second AUTH is refused and the session is unchanged.
#[test]
fn a_second_auth_is_refused() {
    let fsd = Fsd::start();
    let mut r = Raw::authed(fsd.addr);
    for token in [TOKEN, "wrong-token-0123456789abcdef"] {
        let f = r.call(
            Cmd::AUTH,
            5,
            &msg::Auth {
                token: token.into(),
            },
        );
        assert_eq!(
            ErrorCode::from_u32(error_of(&f).code),
            Some(ErrorCode::BadRequest)
        );
    }
    let s = r.call(Cmd::STAT, 6, &msg::StatRequest { path: ".".into() });
    assert!(!s.header.is_error(), "session lost after refused re-AUTHs");
}

/// What fsd holds in memory per unfinished upload is its bitmaps, not its declared size: 16
/// uploads declaring 16 GiB in 64 KiB chunks (262,144 chunks each) on one connection.
#[test]
fn memory_per_upload_does_not_follow_its_declared_size() {
    let fsd = Fsd::start();
    let mut r = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
    let base = proc_status_kib(fsd.pid(), "VmRSS:");
    for i in 0..16u32 {
        let o = opened(
            &open_write(&mut r, 2 + i, &format!("huge{i}"), 16 << 30, "k"),
            "open 16 GiB",
        );
        assert_eq!(o.chunk_count, 262_144);
        // One chunk each, so that every upload has state to keep.
        let w = write(
            &mut r,
            100 + i,
            o.handle,
            i,
            &random_bytes(CHUNK as usize, i as u64),
        );
        assert!(!w.header.is_error(), "{:?}", error_of(&w));
    }
    let grew_mib = proc_status_kib(fsd.pid(), "VmRSS:").saturating_sub(base) / 1024;
    println!("16 open uploads of 16 GiB in 64 KiB chunks: fsd RSS +{grew_mib} MiB");
    // 36 bytes of sums per chunk would be 144 MiB; the two bitmaps are 1 MiB in all.
    assert!(grew_mib < 48, "fsd grew by {grew_mib} MiB");
}

/// Every request ends with exactly one final frame carrying its own cmd: a WRITE refused
/// before its DATA frame arrives does not draw a second error for that frame, and a DATA frame
/// of the wrong cmd ends the pending WRITE with an error that says WRITE.
#[test]
fn a_refused_write_gets_exactly_one_final_frame() {
    let fsd = Fsd::start();
    let mut r = Raw::authed(fsd.addr);
    let data = || {
        Frame::new(
            Cmd::WRITE,
            5,
            flags::DATA | flags::END,
            Bytes::from_static(b"chunk"),
        )
    };
    // Undecodable WriteRequest, then its DATA frame, then a PING on the same stream.
    r.send(&Frame::new(
        Cmd::WRITE,
        5,
        0,
        Bytes::from_static(&[0xff, 0xff, 0xff]),
    ))
    .unwrap();
    r.send(&data()).unwrap();
    r.send_msg(Cmd::PING, 5, flags::END, &msg::Ping { nonce: 9 });
    let refusal = r.recv().unwrap();
    assert_eq!((refusal.cmd(), refusal.stream_id()), (Cmd::WRITE, 5));
    assert!(refusal.header.is_error());
    let next = r.recv().unwrap();
    assert_eq!(
        next.cmd(),
        Cmd::PING,
        "a second final frame for the refused WRITE: {:?}",
        next.header
    );
    // A pending WRITE, then a DATA frame with cmd READ on its stream.
    r.send_msg(
        Cmd::WRITE,
        7,
        0,
        &msg::WriteRequest {
            handle: 99,
            chunk: 0,
        },
    );
    r.send(&Frame::new(
        Cmd::READ,
        7,
        flags::DATA | flags::END,
        Bytes::from_static(b"x"),
    ))
    .unwrap();
    let end = r.recv().unwrap();
    assert!(end.header.is_error() && end.stream_id() == 7);
    assert_eq!(
        end.cmd(),
        Cmd::WRITE,
        "the error does not name the request it ends"
    );
}

/// Abandoned uploads hold no file descriptors: 40 multi-chunk uploads opened, partly written and
/// left (their connections dropped) leave fsd's descriptor count where it was, and each is
/// still resumable. An upload holds descriptors only while a handle on it is open, and a handle
/// only as long as its connection, which the idle timeout ends.
#[test]
fn abandoned_uploads_hold_no_descriptors() {
    let fsd = Fsd::start();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", fsd.pid()))
            .unwrap()
            .count()
    };
    // One upload first, so that lazily created things (the state dirs, pools) exist.
    let chunk = random_bytes(CHUNK as usize, 1);
    let warm = |name: &str| {
        let mut r = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
        let o = opened(&open_write(&mut r, 2, name, 3 * CHUNK as u64, "k"), "open");
        let ack = write(&mut r, 3, o.handle, 0, &chunk);
        assert!(!ack.header.is_error(), "{:?}", error_of(&ack));
    };
    warm("warm");
    let settle = |want: usize| {
        let t = Instant::now();
        loop {
            let now = fds();
            if now <= want || t.elapsed() > Duration::from_secs(10) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The warm-up connection's descriptors go when fsd sees it closed.
    std::thread::sleep(Duration::from_millis(300));
    let before = fds();
    for i in 0..40 {
        warm(&format!("u{i}"));
    }
    let after = settle(before + 2);
    assert!(
        after <= before + 2,
        "40 abandoned uploads still hold {} descriptors",
        after - before
    );
    // Still there, resumable: chunk 0 is present.
    let mut r = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
    let o = opened(
        &open_write(&mut r, 2, "u7", 3 * CHUNK as u64, "k"),
        "reopen",
    );
    assert_eq!(
        o.bitmap.first().map(|b| b & 1),
        Some(1),
        "the abandoned upload lost its chunk"
    );
}

fn seed(r: &mut Raw, sid: u32, handle: u32, first_chunk: u32, cvs: &[[u8; 32]]) -> Frame {
    r.call(
        Cmd::SEED,
        sid,
        &msg::SeedRequest {
            handle,
            first_chunk,
            cvs: cvs.concat(),
        },
    )
}

/// SEED (delta upload) takes from the destination only the chunks whose BLAKE3 chaining value
/// the client names, is bounded per request, never follows a symlink at the destination, and
/// cannot make a wrong file publish: COMMIT still checks the whole-file hash.
#[test]
fn seeding_takes_only_matching_chunks_and_is_bounded() {
    use fsd::integrity::hash_chunk;
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let size = 4 * CHUNK as usize;
    let old = random_bytes(size, 1);
    std::fs::write(dir.path().join("f"), &old).unwrap();
    std::fs::write(outside.path().join("secret"), &old).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("lnk")).unwrap();
    let s = common::inproc::start(dir.path());
    let mut r = Raw::authed_as(s.addr, TOKEN, CHUNK);
    let cv_of = |data: &[u8], i: u32| {
        let c = &data[i as usize * CHUNK as usize..][..CHUNK as usize];
        hash_chunk(c, i, CHUNK, size as u64).1
    };
    // The new version differs from the old in chunk 2 only.
    let mut new = old.clone();
    new[2 * CHUNK as usize + 10] ^= 0xff;
    let cvs: Vec<[u8; 32]> = (0..4).map(|i| cv_of(&new, i)).collect();

    let up = opened(&open_write(&mut r, 1, "f", size as u64, "k"), "open f");
    let code = |f: &Frame| ErrorCode::from_u32(error_of(f).code);
    // Bounds: whole 32-byte values, at most 64, within the upload; a write handle.
    let mut odd = seed(&mut r, 3, up.handle, 0, &cvs[..1]);
    assert!(!odd.header.is_error());
    let bad = msg::SeedRequest {
        handle: up.handle,
        first_chunk: 0,
        cvs: vec![0; 33],
    };
    odd = r.call(Cmd::SEED, 3, &bad);
    assert_eq!(code(&odd), Some(ErrorCode::BadRequest));
    let many = vec![[0u8; 32]; 65];
    assert_eq!(
        code(&seed(&mut r, 3, up.handle, 0, &many)),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        code(&seed(&mut r, 3, up.handle, 3, &cvs[..2])),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        code(&seed(&mut r, 3, 999, 0, &cvs)),
        Some(ErrorCode::BadHandle)
    );

    // Chunk 0 was seeded by the first call; chunk 1 matches.
    let got: msg::SeedResponse = seed(&mut r, 5, up.handle, 0, &cvs[..2]).decode().unwrap();
    assert_eq!(got.seeded, vec![0b10], "chunk 0 already present, 1 taken");
    // A value for the old chunk 2 takes the old bytes (the client asked for them).
    let got: msg::SeedResponse = seed(&mut r, 5, up.handle, 2, &[cv_of(&old, 2)])
        .decode()
        .unwrap();
    assert_eq!(got.seeded, vec![1]);
    // Each chunk is read from the destination once: a wrong value, then the right one, for
    // chunk 3 seeds nothing; the client sends it.
    let got: msg::SeedResponse = seed(&mut r, 5, up.handle, 3, &[[0; 32]]).decode().unwrap();
    assert_eq!(got.seeded, vec![0]);
    let got: msg::SeedResponse = seed(&mut r, 5, up.handle, 3, &cvs[3..]).decode().unwrap();
    assert_eq!(got.seeded, vec![0], "tried once already");
    let ack = write(
        &mut r,
        9,
        up.handle,
        3,
        &new[3 * CHUNK as usize..][..CHUNK as usize],
    );
    assert!(!ack.header.is_error(), "{:?}", error_of(&ack));
    // Chunk 2 holds the old bytes: COMMIT refuses the new hash, nothing is published.
    assert_eq!(
        code(&commit(&mut r, 7, up.handle, &new)),
        Some(ErrorCode::HashMismatch)
    );
    assert_eq!(
        std::fs::read(dir.path().join("f")).unwrap(),
        old,
        "nothing published"
    );
    // The right chunk 2, written, and the new version publishes.
    let ack = write(
        &mut r,
        9,
        up.handle,
        2,
        &new[2 * CHUNK as usize..][..CHUNK as usize],
    );
    assert!(!ack.header.is_error(), "{:?}", error_of(&ack));
    let c = commit(&mut r, 11, up.handle, &new);
    assert!(!c.header.is_error(), "{:?}", error_of(&c));
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), new);

    // A symlink at the destination is never followed, in the root or out of it.
    let up = opened(&open_write(&mut r, 13, "lnk", size as u64, "k"), "open lnk");
    let old_cvs: Vec<[u8; 32]> = (0..4).map(|i| cv_of(&old, i)).collect();
    let got: msg::SeedResponse = seed(&mut r, 15, up.handle, 0, &old_cvs).decode().unwrap();
    assert_eq!(got.seeded, vec![0], "nothing read through the symlink");
    assert_eq!(
        opened(&open_write(&mut r, 17, "lnk", size as u64, "k"), "again").bitmap,
        vec![0]
    );
}

/// The disk an upload holds follows what it received or took from the destination, never its
/// declared size: on a 64 MiB tmpfs, an upload replacing a one-chunk file declares most of the
/// free space, and a SEED naming chunks that match nothing leaves that space free (a matching
/// chunk takes about one chunk). Before, the first SEED reserved the whole declared size
/// (fallocate) until the upload expired, with no data sent: a few such uploads filled the disk.
#[test]
fn a_seed_reserves_only_what_it_takes() {
    use fsd::integrity::hash_chunk;
    let probe = std::process::Command::new("unshare")
        .args(["-Urm", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot create a user+mount namespace here (unshare -Urm), so no small tmpfs to fill");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("small");
    std::fs::create_dir(&root).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=64m none {} && exec \"$0\" \"$@\"",
        root.display()
    );
    let fsd = Fsd::start_wrapped(&["unshare", "-Urm", "sh", "-c", &script], &root);
    // fsd's tmpfs, seen from outside its mount namespace.
    let seen = format!("/proc/{}/root{}", fsd.pid(), root.display());
    let free = || {
        let f = std::fs::File::open(&seen).unwrap();
        fsd::fskind::free_bytes(&f).unwrap().unwrap()
    };
    let mut r = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
    let old = random_bytes(CHUNK as usize, 5);
    let put = msg::PutRequest {
        path: "x".into(),
        size: old.len() as u64,
        blake3: blake3::hash(&old).as_bytes().to_vec(),
        ..Default::default()
    };
    r.send_msg(Cmd::PUT, 2, 0, &put);
    r.send(&Frame::new(
        Cmd::PUT,
        2,
        flags::DATA | flags::END,
        Bytes::from(old.clone()),
    ))
    .unwrap();
    let f = r.recv().unwrap();
    assert!(!f.header.is_error(), "PUT: {:?}", error_of(&f));

    let before = free();
    let size = before - (8 << 20);
    let up = opened(&open_write(&mut r, 3, "x", size, "k"), "open");
    assert_eq!(up.chunk_size, CHUNK);
    // Chunk 0 lies inside the old file and is compared; the rest lie past its end.
    let got: msg::SeedResponse = seed(&mut r, 5, up.handle, 0, &[[7; 32]; 64])
        .decode()
        .unwrap();
    assert_eq!(got.seeded, vec![0; 8]);
    let held = before.saturating_sub(free());
    println!("upload declaring {size} bytes, SEED matching nothing: {held} bytes held");
    assert!(
        held < 1 << 20,
        "a SEED that matched nothing holds {held} bytes of the {size} declared"
    );
    // A second upload, whose chunk 0 matches, takes about that chunk.
    let up = opened(&open_write(&mut r, 7, "x", size - 1, "k2"), "open 2");
    let cv = hash_chunk(&old, 0, CHUNK, size - 1).1;
    let got: msg::SeedResponse = seed(&mut r, 9, up.handle, 0, &[cv]).decode().unwrap();
    assert_eq!(got.seeded, vec![1]);
    let held = before.saturating_sub(free());
    assert!(
        held < 2 << 20,
        "two uploads, one chunk seeded, hold {held} bytes"
    );
}

/// An upload whose handle stays open but unused gives its descriptors back after the idle
/// timeout, even while its connection is kept alive; a late request on the handle gets a
/// retryable Timeout, and a new OPEN resumes the upload with what it had.
#[test]
fn idle_upload_handles_give_their_descriptors_back() {
    let dir = tempfile::tempdir().unwrap();
    let fsd = Fsd::start_on(dir.path(), &["--idle-timeout", "2"]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", fsd.pid()))
            .unwrap()
            .count()
    };
    let mut r = Raw::authed_as(fsd.addr, TOKEN, CHUNK);
    let data = random_bytes(4 * CHUNK as usize, 7);
    let before = fds();
    let up = opened(&open_write(&mut r, 1, "f", data.len() as u64, "k"), "open");
    let ack = write(&mut r, 3, up.handle, 0, &data[..CHUNK as usize]);
    assert!(!ack.header.is_error(), "{:?}", error_of(&ack));
    let open = fds();
    assert!(
        open >= before + 3,
        "an open upload holds its files: {before} -> {open}"
    );
    // The connection stays busy (PINGs), the handle unused, past the idle timeout.
    let t = Instant::now();
    let mut released = false;
    while t.elapsed() < Duration::from_secs(8) {
        let p = r.call(Cmd::PING, 5, &msg::Ping { nonce: 1 });
        assert!(!p.header.is_error());
        if fds() <= before {
            released = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        released,
        "descriptors still held: {} (before the upload {before})",
        fds()
    );
    let late = write(
        &mut r,
        7,
        up.handle,
        1,
        &data[CHUNK as usize..2 * CHUNK as usize],
    );
    let e = error_of(&late);
    assert_eq!(
        ErrorCode::from_u32(e.code),
        Some(ErrorCode::Timeout),
        "{e:?}"
    );
    assert!(e.retryable);
    let again = opened(
        &open_write(&mut r, 9, "f", data.len() as u64, "k"),
        "reopen",
    );
    assert_eq!(
        again.bitmap.first().map(|b| b & 1),
        Some(1),
        "chunk 0 kept for resume"
    );
}

/// Names a client chooses reach fsd's log escaped: a newline in a path cannot start a line
/// of its own that looks like fsd's (a forged "authenticated" entry, say).
#[test]
fn client_names_cannot_forge_log_lines() {
    let fsd = Fsd::start();
    let forged = "2026-12-03T00:00:00.000000Z  INFO fsd::server: authenticated name=\"admin\"";
    let name = format!("x\n{forged}");
    std::fs::write(fsd.root.join(&name), b"data").unwrap();
    let mut r = Raw::authed(fsd.addr);
    let mkdir = msg::MkdirRequest {
        path: format!("d\n{forged}"),
        ..Default::default()
    };
    let rename = msg::RenameRequest {
        from: format!("d\n{forged}"),
        to: format!("e\n{forged}"),
        ..Default::default()
    };
    let open = msg::OpenRequest {
        path: name.clone(),
        mode: msg::OpenMode::OpenRead as i32,
        ..Default::default()
    };
    let remove = msg::RemoveRequest {
        path: format!("e\n{forged}"),
        recursive: false,
    };
    assert!(!r.call(Cmd::MKDIR, 3, &mkdir).header.is_error());
    assert!(!r.call(Cmd::RENAME, 5, &rename).header.is_error());
    assert!(!r.call(Cmd::OPEN, 7, &open).header.is_error());
    assert!(!r.call(Cmd::REMOVE, 9, &remove).header.is_error());
    // The log is written as it happens; the last request was answered.
    std::thread::sleep(Duration::from_millis(200));
    let log = fsd.log_text();
    assert!(log.contains("mkdir"), "nothing logged: {log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with(forged)).collect();
    assert!(lines.is_empty(), "forged log lines: {lines:?}");
    // Nor terminal escapes in a log that goes to a file (colours are for terminals).
    assert!(
        !log.contains('\u{1b}'),
        "escape sequences in the log: {log:?}"
    );
}

/// With several credentials, each keeps at most half of the blocking pool busy: one whose
/// OPENs need long file-system work (here manifests of big files not seen before, each a
/// read of the whole file) leaves the other's requests a thread. `--max-blocking-threads 2`.
#[test]
fn one_credential_s_slow_file_work_leaves_the_other_a_thread() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for i in 0..4 {
        let f = std::fs::File::create(root.join(format!("big{i}"))).unwrap();
        f.set_len(128 << 20).unwrap(); // a hole: read and hashed, not stored
    }
    std::fs::write(root.join("small"), b"x").unwrap();
    let tokens = two_credentials(dir.path(), "");
    let fsd = Fsd::start_on(
        &root,
        &["--token-file", &tokens, "--max-blocking-threads", "2"],
    );
    // Alice opens the four big files at once, on four connections: four manifests to compute,
    // each a whole read.
    let mut alice: Vec<Raw> = (0..4)
        .map(|_| try_login(fsd.addr, TOKEN_A).unwrap())
        .collect();
    let started = Instant::now();
    for (i, a) in alice.iter_mut().enumerate() {
        a.send_msg(
            Cmd::OPEN,
            3,
            flags::END,
            &msg::OpenRequest {
                path: format!("big{i}"),
                mode: msg::OpenMode::OpenRead as i32,
                ..Default::default()
            },
        );
    }
    // Meanwhile Bob's STATs (each a blocking job) are answered at once. Sharing the pool first
    // come first served, they would wait for one of Alice's jobs (half her total, with two
    // threads) whatever this machine's speed.
    let mut bob = try_login(fsd.addr, TOKEN_B).unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..5u32 {
        let t = Instant::now();
        let f = bob.call(
            Cmd::STAT,
            3 + 2 * i,
            &msg::StatRequest {
                path: "small".into(),
            },
        );
        assert!(!f.header.is_error(), "{:?}", error_of(&f));
        slowest = slowest.max(t.elapsed());
    }
    // Alice's OPENs, for scale: what Bob would have queued behind.
    for a in &mut alice {
        let f = a.recv().expect("open reply");
        assert!(!f.header.is_error(), "{:?}", error_of(&f));
    }
    let alice_took = started.elapsed();
    println!("alice's 4 manifests: {alice_took:?}; bob's slowest STAT meanwhile: {slowest:?}");
    assert!(
        slowest < alice_took / 4,
        "bob's STAT took {slowest:?} while alice's OPENs took {alice_took:?}"
    );
}

/// With several credentials, one credential's manifest fetches (each a read and hash of a whole
/// file) go one at a time, so the other's OPEN of a big file not seen before competes with one
/// of them, not with all: the hashing of every fetch shares one thread pool chunk by chunk. A
/// credential can make any file need a new manifest (RENAME changes its ctime, so its version),
/// so before, alice's four fetches at once left bob a fifth of the hashing until hers were all
/// done (review: bob's OPEN 0.15 s alone, 0.90 s beside eight).
#[test]
fn one_credential_s_manifest_fetches_leave_the_other_its_share_of_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for name in (0..8).map(|i| format!("a{i}")).chain(["b".to_string()]) {
        let f = std::fs::File::create(root.join(name)).unwrap();
        f.set_len(96 << 20).unwrap(); // a hole: read and hashed, not stored
    }
    let tokens = two_credentials(dir.path(), "");
    let fsd = Fsd::start_on(&root, &["--token-file", &tokens]);
    let open = |r: &mut Raw, path: &str| {
        r.send_msg(
            Cmd::OPEN,
            3,
            flags::END,
            &msg::OpenRequest {
                path: path.into(),
                mode: msg::OpenMode::OpenRead as i32,
                ..Default::default()
            },
        );
    };
    let mut alice: Vec<Raw> = (0..8)
        .map(|_| try_login(fsd.addr, TOKEN_A).unwrap())
        .collect();
    let mut bob = try_login(fsd.addr, TOKEN_B).unwrap();
    let started = Instant::now();
    for (i, a) in alice.iter_mut().enumerate() {
        open(a, &format!("a{i}"));
    }
    std::thread::sleep(Duration::from_millis(50));
    let bob_started = Instant::now();
    open(&mut bob, "b");
    let f = bob.recv().expect("bob's open reply");
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let bob_took = bob_started.elapsed();
    for a in &mut alice {
        let f = a.recv().expect("open reply");
        assert!(!f.header.is_error(), "{:?}", error_of(&f));
    }
    let alice_took = started.elapsed();
    println!("alice's 8 manifests: {alice_took:?}; bob's one meanwhile: {bob_took:?}");
    // Beside one of alice's at a time bob's takes about two fetches' time of the nine
    // (~0.25 of alice's total); beside all eight at once it ends with them (~1.0).
    assert!(
        bob_took < alice_took.mul_f64(0.5),
        "bob's OPEN took {bob_took:?} while alice's eight took {alice_took:?}"
    );
}

/// Fills a connection's reply budget with one stream: a TREE_READ of the 256 KiB files
/// `f0`..`f63`, inline (16 MiB), that the client never reads.
fn fill_reply_budget(r: &mut Raw) {
    r.send_msg(
        Cmd::TREE_READ,
        1000,
        flags::END,
        &msg::TreeReadRequest {
            path: String::new(),
            files: (0..64).map(|i| format!("f{i}")).collect(),
            ..Default::default()
        },
    );
}

/// A DATA frame of `len` bytes whose checksum is wrong, on stream `sid`.
fn bad_crc_data(sid: u32, len: usize) -> Frame {
    let mut f = Frame::new(
        Cmd::WRITE,
        sid,
        flags::DATA | flags::END,
        Bytes::from(vec![7u8; len]),
    );
    f.header.checksum ^= 1;
    f
}

/// No payload fsd keeps is a slice of the connection's read buffer: a small request waiting
/// for its turn (a LIST waiting for the reply budget of a client that stopped reading) holds
/// its own few bytes, not the big allocation a large frame read next to it made. Before, each
/// waiting LIST pinned the allocation of the big DATA frame that followed it (dropped: bad
/// checksum on a running stream) — review E6: one connection, 60 rounds of 16 MiB, 1.2 GB.
#[test]
fn waiting_requests_do_not_pin_the_read_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for i in 0..64 {
        write_random(&root.join(format!("f{i}")), 256 * 1024, i);
    }
    // 4 MiB frames keep the attack small on the old code (~40 x 4 MiB).
    let fsd = Fsd::start_on(&root, &["--max-frame", "4194304"]);
    let mut r = Raw::authed_small_window(fsd.addr);
    fill_reply_budget(&mut r);
    std::thread::sleep(Duration::from_millis(500));
    let base = proc_status_kib(fsd.pid(), "VmRSS:");
    for k in 0..40u32 {
        let sid = 100 + k;
        r.send_msg(
            Cmd::LIST,
            sid,
            flags::END,
            &msg::ListRequest {
                path: ".".into(),
                ..Default::default()
            },
        );
        r.send(&bad_crc_data(sid, 4 << 20)).unwrap();
    }
    let grew_mib = rss_growth_mib(fsd.pid(), base);
    println!("40 waiting LISTs, each followed by a dropped 4 MiB frame: fsd RSS +{grew_mib} MiB");
    assert!(
        grew_mib < 48,
        "fsd grew by {grew_mib} MiB: waiting requests pin the read buffer"
    );
    drop(r);
}

/// The idle timeout measures the client's progress, not what it left open: a WRITE whose DATA
/// frame never comes, and a request waiting for a client that stopped reading, no longer keep
/// a silent connection (and what it holds) for ever. Before, any open stream pushed the
/// timeout back (review E6: 389 MB still held after 15 s of silence with --idle-timeout 3).
#[test]
fn silent_connections_with_waiting_streams_idle_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for i in 0..64 {
        write_random(&root.join(format!("f{i}")), 256 * 1024, i);
    }
    let fsd = Fsd::start_on(&root, &["--idle-timeout", "2"]);
    let before = socket_inodes(fsd.pid());
    let new_sockets = || socket_inodes(fsd.pid()).difference(&before).count();
    // A WRITE request whose DATA frame never comes.
    let mut w = Raw::authed(fsd.addr);
    w.send_msg(
        Cmd::WRITE,
        5,
        flags::END,
        &msg::WriteRequest {
            handle: 1,
            chunk: 0,
        },
    );
    // A LIST waiting for the reply budget of a client that stopped reading.
    let mut l = Raw::authed_small_window(fsd.addr);
    fill_reply_budget(&mut l);
    l.send_msg(
        Cmd::LIST,
        7,
        flags::END,
        &msg::ListRequest {
            path: ".".into(),
            ..Default::default()
        },
    );
    assert_eq!(new_sockets(), 2, "both connections open");
    // Silence from both clients for up to four idle timeouts.
    let silent = Instant::now();
    while new_sockets() > 0 && silent.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = new_sockets();
    println!(
        "{left} of the 2 connections open after {:?} of silence",
        silent.elapsed()
    );
    assert_eq!(left, 0, "silent connections with waiting streams were kept");
    drop((w, l));
}

/// Refusals the read loop sends itself (here LimitExceeded for streams over --max-streams) to
/// a client that stopped reading wait for room in the writer's queue, but not for ever: the
/// connection is closed once one has waited for the idle timeout. Before, the read loop waited
/// without end, its idle timer with it, and the connection was kept for good
/// (docs/SECURITY.md §11 listed it as a known gap).
#[test]
fn refusals_to_a_client_that_does_not_read_do_not_keep_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    write_random(&root.join("big"), 64 << 20, 3);
    let fsd = Fsd::start_on(&root, &["--idle-timeout", "2", "--max-streams", "2"]);
    let before = socket_inodes(fsd.pid());
    let new_sockets = || socket_inodes(fsd.pid()).difference(&before).count();
    let mut l = Raw::authed_small_window(fsd.addr);
    let open = l.call(
        Cmd::OPEN,
        1,
        &msg::OpenRequest {
            path: "big".into(),
            ..Default::default()
        },
    );
    let handle = opened(&open, "OPEN").handle;
    // Two READs of 32 chunks each take both streams and fill the writer's queue (sendfile
    // frames hold no budget) behind the client's closed window.
    for sid in [3, 5] {
        l.send_msg(
            Cmd::READ,
            sid,
            flags::END,
            &msg::ReadRequest {
                handle,
                first_chunk: 0,
                count: 32,
                compress_level: 0,
            },
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    // Each STAT is refused by the read loop: 100 refusals for a queue of 32.
    for sid in 0..100u32 {
        l.send_msg(
            Cmd::STAT,
            2000 + sid,
            flags::END,
            &msg::StatRequest { path: ".".into() },
        );
    }
    assert_eq!(new_sockets(), 1, "the connection is open");
    let silent = Instant::now();
    while new_sockets() > 0 && silent.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = new_sockets();
    println!("connection open: {left} after {:?}", silent.elapsed());
    assert_eq!(left, 0, "a read loop waiting to refuse kept the connection");
    drop(l);
}

/// Received DATA is bounded per credential and server-wide, not only per connection: one
/// credential opening many connections, each sending PUTs faster than fsd stores them, makes
/// fsd hold at most its credential's inbound budget; the others wait, their sockets unread
/// (backpressure), and every PUT still succeeds. Before, each connection could hold 16 MiB
/// (review E1: 120 connections x three 16 MiB PUTs, 2,512 MB peak).
#[test]
fn received_data_is_bounded_per_credential() {
    const FRAME: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // One blocking thread stores one PUT at a time, so PUTs queue; 4 MiB frames keep the old
    // code's peak (~24 x 12 MiB) well under 1 GiB. Budgets: max(threads x frame, 16 MiB).
    let fsd = Fsd::start_on(
        &root,
        &["--max-blocking-threads", "1", "--max-frame", "4194304"],
    );
    let data = Bytes::from(random_bytes(FRAME, 11));
    let blake3 = blake3::hash(&data).as_bytes().to_vec();
    let base = proc_status_kib(fsd.pid(), "VmHWM:");
    let mut conns: Vec<Raw> = (0..24)
        .map(|_| Raw::authed_as(fsd.addr, TOKEN, 4 << 20))
        .collect();
    std::thread::scope(|s| {
        for (c, r) in conns.iter_mut().enumerate() {
            let (data, blake3) = (data.clone(), blake3.clone());
            s.spawn(move || {
                for k in 0..3u32 {
                    let sid = 10 + k;
                    let put = msg::PutRequest {
                        path: format!("c{c}-{k}"),
                        size: FRAME as u64,
                        blake3: blake3.clone(),
                        ..Default::default()
                    };
                    r.send_msg(Cmd::PUT, sid, 0, &put);
                    let f = Frame::new(Cmd::PUT, sid, flags::DATA | flags::END, data.clone());
                    r.send(&f).unwrap();
                }
                for _ in 0..3 {
                    let f = r.recv().expect("PUT reply");
                    assert!(!f.header.is_error(), "PUT failed: {:?}", error_of(&f));
                }
            });
        }
    });
    let grew_mib = proc_status_kib(fsd.pid(), "VmHWM:").saturating_sub(base) / 1024;
    println!("24 connections x three 4 MiB PUTs, one credential: fsd peak RSS +{grew_mib} MiB");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        72 + 1,
        "every PUT stored"
    );
    assert!(
        grew_mib < 100,
        "fsd's peak grew by {grew_mib} MiB holding one credential's received DATA"
    );
}
