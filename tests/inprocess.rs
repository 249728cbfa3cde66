//! fsd as a library, in-process: proves sendfile serves plain-TCP reads, that a second download
//! of the same file computes no CRC, that many clients with many streams each get identical
//! bytes, and that shutdown drains in-flight transfers.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::inproc::start;
use common::*;
use fsd::protocol::{flags, msg, Cmd};

/// Downloads several files at once over one connection, one stream per file, pulling every
/// chunk with one READ per file so the server interleaves them.
/// With `expect_interleaving`, asserts that the server alternated between streams.
fn download_many(
    r: &mut Raw,
    paths: &[String],
    expect_interleaving: bool,
) -> HashMap<String, Vec<u8>> {
    let mut opens = HashMap::new();
    for (i, p) in paths.iter().enumerate() {
        let sid = 100 + i as u32;
        let o: msg::OpenResponse = r
            .call(
                Cmd::OPEN,
                sid,
                &msg::OpenRequest {
                    path: p.clone(),
                    ..Default::default()
                },
            )
            .decode()
            .unwrap();
        opens.insert(sid, (p.clone(), o));
    }
    let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
    for (sid, (_, o)) in &opens {
        r.send_msg(
            Cmd::READ,
            *sid,
            flags::END,
            &msg::ReadRequest {
                handle: o.handle,
                first_chunk: 0,
                count: o.chunk_count,
                compress_level: 0,
            },
        );
    }
    let mut open_streams = opens.len();
    let mut interleaved = false;
    let mut last_sid = 0;
    while open_streams > 0 {
        let f = r.recv().expect("frame");
        assert!(f.header.is_data(), "{:?}", f.header);
        let sid = f.stream_id();
        interleaved |= last_sid != 0
            && sid != last_sid
            && data
                .get(&last_sid)
                .is_some_and(|d| (d.len() as u64) < opens[&last_sid].1.size);
        last_sid = sid;
        data.entry(sid).or_default().extend_from_slice(&f.payload);
        if f.header.is_end() {
            open_streams -= 1;
        }
    }
    if expect_interleaving {
        assert!(
            interleaved,
            "streams were served one after the other, not interleaved"
        );
    }
    opens
        .into_iter()
        .map(|(sid, (p, _))| (p, data.remove(&sid).unwrap()))
        .collect()
}

#[test]
fn reads_use_sendfile_and_the_manifest_is_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_random(&dir.path().join("f.bin"), 5 << 20, 7);
    past_racy_window();
    let s = start(dir.path());
    for _ in 0..2 {
        let mut r = Raw::authed(s.addr);
        let got = download_many(&mut r, &["f.bin".to_string()], false);
        assert!(got["f.bin"] == data);
    }
    let st = &s.server.stats;
    let want = 2 * data.len() as u64;
    assert_eq!(
        settled(want, || st.bytes_sendfile.load(Ordering::Relaxed)),
        want
    );
    assert_eq!(st.bytes_copied.load(Ordering::Relaxed), 0);
    let m = &s.server.manifests.stats;
    assert_eq!(
        m.computed.load(Ordering::Relaxed),
        1,
        "second download must not compute CRCs"
    );
    assert_eq!(m.memory_hits.load(Ordering::Relaxed), 1);
    s.shutdown.cancel();
    s.done.recv_timeout(Duration::from_secs(10)).unwrap();

    // A restarted server finds the manifest persisted in the state directory.
    let s2 = start(dir.path());
    let mut r = Raw::authed(s2.addr);
    assert!(download_many(&mut r, &["f.bin".to_string()], false)["f.bin"] == data);
    let m = &s2.server.manifests.stats;
    assert_eq!(
        (
            m.computed.load(Ordering::Relaxed),
            m.disk_hits.load(Ordering::Relaxed)
        ),
        (0, 1)
    );
}

/// OPEN with `inline_max`: a small file comes back with the reply (OpenResponse without END,
/// then one DATA|END frame), with no handle and no manifest; a bigger one gets a handle.
#[test]
fn small_files_are_read_inline_with_their_open() {
    let dir = tempfile::tempdir().unwrap();
    let small = write_random(&dir.path().join("small"), 4096, 11);
    std::fs::write(dir.path().join("empty"), b"").unwrap();
    write_random(&dir.path().join("big"), 70_000, 12);
    let s = start(dir.path());
    let mut r = Raw::authed(s.addr);
    let open = |path: &str| msg::OpenRequest {
        path: path.into(),
        inline_max: 65536,
        ..Default::default()
    };
    for (sid, path, want) in [(5, "small", &small[..]), (7, "empty", &[][..])] {
        let f = r.call(Cmd::OPEN, sid, &open(path));
        assert_eq!(f.header.flags, 0, "{path}: {:?}", f.header);
        let o: msg::OpenResponse = f.decode().unwrap();
        assert_eq!((o.handle, o.size), (0, want.len() as u64), "{path}");
        assert_eq!(o.blake3, blake3::hash(want).as_bytes().to_vec(), "{path}");
        let d = r.recv().expect("inline contents");
        assert_eq!(d.header.flags, flags::DATA | flags::END, "{path}");
        assert_eq!((d.stream_id(), d.cmd()), (sid, Cmd::OPEN), "{path}");
        assert_eq!(d.header.checksum, crc32fast::hash(want), "{path}");
        assert!(d.payload == want, "{path}");
    }
    // Over the limit asked for: an ordinary reply with a handle.
    let f = r.call(Cmd::OPEN, 9, &open("big"));
    assert_eq!(f.header.flags, flags::END);
    let o: msg::OpenResponse = f.decode().unwrap();
    assert!(o.handle >= 1 && o.size == 70_000);
    let m = &s.server.manifests.stats;
    assert_eq!(
        m.computed.load(Ordering::Relaxed),
        1,
        "only the big file has a manifest"
    );
    // The inline files left no handle behind: CLOSE of handle 0 is refused.
    let f = r.call(Cmd::CLOSE, 11, &msg::CloseRequest { handle: 0 });
    assert!(f.header.is_error());
}

#[test]
fn sixteen_clients_each_moving_several_files_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = HashMap::new();
    for i in 0..8 {
        let name = format!("d{}/f{i}.bin", i % 3);
        let len = [
            0,
            1,
            1 << 20,
            (1 << 20) + 1,
            3 << 20,
            12345,
            2 << 20,
            (4 << 20) - 1,
        ][i];
        files.insert(
            name.clone(),
            write_random(&dir.path().join(&name), len, i as u64),
        );
    }
    let s = start(dir.path());
    let files = Arc::new(files);
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let files = files.clone();
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut r = Raw::authed(addr);
                // Each client takes 4 different non-empty files at once.
                let mut names: Vec<String> = files
                    .keys()
                    .filter(|k| !files[*k].is_empty())
                    .cloned()
                    .collect();
                names.sort();
                let n = names.len();
                names.rotate_left(c % n);
                names.truncate(4);
                let got = download_many(&mut r, &names, false);
                for n in &names {
                    assert!(got[n] == files[n], "client {c}: {n} differs");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(s.server.stats.connections_total.load(Ordering::Relaxed), 16);
}

/// 64 chunks per file is more than the writer queue (32) holds, so the queue must fill and its
/// FIFO then alternates between the streams.
#[test]
fn big_reads_on_one_connection_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
    let data: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| write_random(&dir.path().join(n), 64 << 20, i as u64))
        .collect();
    let s = start(dir.path());
    let mut r = Raw::authed(s.addr);
    let got = download_many(&mut r, &names, true);
    for (n, d) in names.iter().zip(&data) {
        assert!(&got[n] == d);
    }
}

#[test]
fn shutdown_lets_in_flight_reads_finish() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_random(&dir.path().join("big"), 32 << 20, 9);
    let s = start(dir.path());
    let mut r = Raw::authed(s.addr);
    let o: msg::OpenResponse = r
        .call(
            Cmd::OPEN,
            1,
            &msg::OpenRequest {
                path: "big".into(),
                ..Default::default()
            },
        )
        .decode()
        .unwrap();
    r.send_msg(
        Cmd::READ,
        2,
        flags::END,
        &msg::ReadRequest {
            handle: o.handle,
            first_chunk: 0,
            count: o.chunk_count,
            compress_level: 0,
        },
    );
    let first = r.recv().unwrap();
    s.shutdown.cancel();
    let mut got = first.payload.to_vec();
    loop {
        let f = r.recv().expect("stream cut before its end");
        if f.stream_id() == 0 {
            continue; // the connection-level "shutting down" notice
        }
        got.extend_from_slice(&f.payload);
        if f.header.is_end() {
            break;
        }
    }
    assert!(got == data);
    s.done
        .recv_timeout(Duration::from_secs(10))
        .expect("run() returns after draining");
}
