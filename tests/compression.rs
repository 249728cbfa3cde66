//! Per-chunk zstd on the wire (PROTOCOL.md §8.3), real fsd and fsc on loopback: compressible
//! files move in a fraction of their bytes and land identical, both ways, big and small;
//! incompressible ones go as they are; a peer that does not negotiate compression is served as
//! before; hostile COMPRESSED frames are refused without harm.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use bytes::Bytes;
use common::inproc;
use common::*;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame, Header};

/// Text that compresses about 5:1 or better with zstd's fast levels: log lines with varying
/// numbers.
fn log_text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut n = 0u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        n += 1;
        let line = format!(
            "2026-12-01T23:{:02}:{:02}Z INFO fsd::server: request {n} path=projects/set-{}/part-{}.csv bytes={} status=ok\n",
            (x >> 8) % 60,
            (x >> 16) % 60,
            x % 7,
            (x >> 24) % 100,
            (x >> 32) % 1_000_000
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

fn done(stdout: &[u8]) -> serde_json::Value {
    events(stdout)
        .into_iter()
        .rev()
        .find(|e| e["event"] == "done")
        .unwrap_or_else(|| panic!("no done event in {}", String::from_utf8_lossy(stdout)))
}

/// Bytes on the wire of one fsc transfer (`transferred` of its done event).
fn download(s: &Fsd, remote: &str, to: &Path, extra: &[&str]) -> u64 {
    let addr = s.addr();
    let mut args = vec!["--json", "download"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&addr, remote, to.to_str().unwrap()]);
    let out = fsc_ok(&args);
    done(&out.stdout)["transferred"].as_u64().unwrap()
}

fn upload(s: &Fsd, from: &Path, remote: &str, extra: &[&str]) -> u64 {
    let addr = s.addr();
    let mut args = vec!["--json", "upload"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&addr, from.to_str().unwrap(), remote]);
    let out = fsc_ok(&args);
    done(&out.stdout)["transferred"].as_u64().unwrap()
}

#[test]
fn compressible_files_move_in_a_fraction_of_their_bytes_both_ways() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    // 9 chunks (READ and WRITE) and one small file (inline OPEN and PUT).
    for (name, len) in [
        ("big.log", 8 * 1024 * 1024 + 12_345),
        ("small.log", 100_000),
    ] {
        let data = log_text(len, len as u64);
        std::fs::write(s.root.join(name), &data).unwrap();
        let got = local.path().join(name);
        let wire = download(&s, name, &got, &["-z"]);
        assert_eq!(std::fs::read(&got).unwrap(), data, "{name} downloaded");
        assert!(
            wire < len as u64 / 4,
            "{name}: {wire} bytes on the wire for {len}"
        );

        let remote = format!("up-{name}");
        let wire = upload(&s, &got, &remote, &["--compress=6"]);
        assert_eq!(
            std::fs::read(s.root.join(&remote)).unwrap(),
            data,
            "{name} uploaded"
        );
        assert!(
            wire < len as u64 / 4,
            "{name}: {wire} bytes on the wire for {len}"
        );
    }
}

#[test]
fn incompressible_files_go_as_they_are_and_auto_stays_off_on_loopback() {
    let s = Fsd::start();
    let local = tempfile::tempdir().unwrap();
    let len = 5 * 1024 * 1024 + 3;
    let data = write_random(&s.root.join("noise.bin"), len, 7);
    let got = local.path().join("noise.bin");
    let wire = download(&s, "noise.bin", &got, &["-z"]);
    assert_eq!(std::fs::read(&got).unwrap(), data);
    assert_eq!(wire, len as u64, "noise is sent as it is");
    let wire = upload(&s, &got, "noise-up.bin", &["--compress=19"]);
    assert_eq!(wire, len as u64);
    assert_same_file(&got, &s.root.join("noise-up.bin"));

    // The default (auto) on loopback: a fast, short path, never compressed.
    let text = log_text(3 * 1024 * 1024, 1);
    std::fs::write(s.root.join("t.log"), &text).unwrap();
    let wire = download(&s, "t.log", &local.path().join("t.log"), &[]);
    assert_eq!(wire, text.len() as u64, "auto compressed on loopback");
}

#[test]
fn a_server_that_allows_no_compression_is_used_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = Fsd::start_on(&root, &["--max-compress-level", "0"]);
    let local = tempfile::tempdir().unwrap();
    let text = log_text(2 * 1024 * 1024 + 5, 3);
    std::fs::write(root.join("t.log"), &text).unwrap();
    let got = local.path().join("t.log");
    assert_eq!(download(&s, "t.log", &got, &["-z"]), text.len() as u64);
    assert_eq!(std::fs::read(&got).unwrap(), text);
    assert_eq!(upload(&s, &got, "u.log", &["-z"]), text.len() as u64);
    assert_eq!(std::fs::read(root.join("u.log")).unwrap(), text);
}

/// OPEN(READ) of `path` on stream `sid`: every frame of the reply.
fn open_read(r: &mut Raw, sid: u32, path: &str, inline_max: u32, level: u32) -> Vec<Frame> {
    r.send_msg(
        Cmd::OPEN,
        sid,
        flags::END,
        &msg::OpenRequest {
            path: path.into(),
            mode: msg::OpenMode::OpenRead as i32,
            inline_max,
            compress_level: level,
            ..Default::default()
        },
    );
    let mut frames = vec![r.recv().unwrap()];
    while !frames.last().unwrap().header.is_end() {
        frames.push(r.recv().unwrap());
    }
    frames
}

fn hello(r: &mut Raw, level: u32) -> msg::Hello {
    let f = r.call(
        Cmd::HELLO,
        0,
        &msg::Hello {
            version: 1,
            compress_level: level,
            ..Default::default()
        },
    );
    prost::Message::decode(f.payload).unwrap()
}

/// A client that never asks (an older one: no Hello field, or 0) never sees a COMPRESSED
/// frame, even when its READ or OPEN asks for a level; one that asks gets at most the server's
/// cap.
#[test]
fn only_a_client_that_negotiated_gets_compressed_frames() {
    let s = Fsd::start();
    let text = log_text(3 * 1024 * 1024, 9);
    std::fs::write(s.root.join("t.log"), &text).unwrap();
    std::fs::write(s.root.join("s.log"), &text[..50_000]).unwrap();
    for asked in [0u32, 19] {
        let mut r = Raw::connect(s.addr);
        let h = hello(&mut r, asked);
        assert_eq!(h.compress_level, asked.min(3), "asked {asked}");
        let f = r.call(
            Cmd::AUTH,
            1,
            &msg::Auth {
                token: TOKEN.into(),
            },
        );
        assert!(!f.header.is_error());
        // Inline, asking for level 3 in the OPEN.
        let frames = open_read(&mut r, 3, "s.log", 256 * 1024, 3);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].header.is_compressed(), asked > 0);
        // By handle.
        let frames = open_read(&mut r, 5, "t.log", 0, 0);
        let open: msg::OpenResponse = frames[0].decode().unwrap();
        r.send_msg(
            Cmd::READ,
            7,
            flags::END,
            &msg::ReadRequest {
                handle: open.handle,
                first_chunk: 0,
                count: open.chunk_count,
                compress_level: 3,
            },
        );
        let mut got = Vec::new();
        for i in 0..open.chunk_count {
            let d = r.recv().unwrap();
            assert!(d.header.is_data(), "chunk {i}");
            assert_eq!(d.header.is_compressed(), asked > 0, "chunk {i}");
            assert_eq!(crc32fast::hash(&d.payload), d.header.checksum);
            let len = fsd::protocol::chunk_len(open.size, open.chunk_size, i) as usize;
            let chunk = match d.header.is_compressed() {
                true => fsd::compress::decompress(&d.payload, len).unwrap().0,
                false => d.payload,
            };
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, text);
    }
}

/// COMPRESSED frames that lie: on a connection that did not agree on compression, a chunk that
/// decompresses to the wrong size, a bomb, garbage. Each is refused with a clear error and the
/// upload stays as it was; a good chunk afterwards completes it.
#[test]
fn hostile_compressed_writes_are_refused_and_lose_nothing() {
    let s = Fsd::start();
    let chunk = 64 * 1024;
    let text = log_text(2 * chunk, 4);
    let crc0 = crc32fast::hash(&text[..chunk]);
    let good = fsd::compress::compress(&text[..chunk], crc0, 3).unwrap();
    let upload = |r: &mut Raw| -> u32 {
        let f = r.call(
            Cmd::OPEN,
            3,
            &msg::OpenRequest {
                path: "h.log".into(),
                mode: msg::OpenMode::OpenWrite as i32,
                size: text.len() as u64,
                resume_key: "k".into(),
                ..Default::default()
            },
        );
        assert!(!f.header.is_error(), "{:?}", error_of(&f));
        let open: msg::OpenResponse = f.decode().unwrap();
        assert_eq!(open.chunk_size as usize, chunk);
        open.handle
    };
    let write = |r: &mut Raw, sid: u32, handle: u32, index: u32, payload: Bytes| -> Frame {
        r.send_msg(
            Cmd::WRITE,
            sid,
            0,
            &msg::WriteRequest {
                handle,
                chunk: index,
            },
        );
        let mut h = Header::data(
            Cmd::WRITE,
            sid,
            payload.len() as u32,
            crc32fast::hash(&payload),
            true,
        );
        h.flags |= flags::COMPRESSED;
        r.send(&Frame { header: h, payload }).unwrap();
        r.recv().unwrap()
    };

    // Not negotiated: BadRequest.
    let mut r = Raw::authed_as(s.addr, TOKEN, chunk as u32);
    let h = upload(&mut r);
    let f = write(&mut r, 5, h, 0, good.clone());
    assert_eq!(error_of(&f).code, ErrorCode::BadRequest as u32);
    drop(r);

    let mut r = Raw::connect(s.addr);
    let f = r.call(
        Cmd::HELLO,
        0,
        &msg::Hello {
            version: 1,
            chunk_size: chunk as u32,
            compress_level: 3,
            ..Default::default()
        },
    );
    assert!(!f.header.is_error());
    let f = r.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!f.header.is_error());
    let h = upload(&mut r);
    let short = fsd::compress::compress(&text[..chunk / 2], crc32fast::hash(&text[..chunk / 2]), 3)
        .unwrap();
    let bomb = {
        let z = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&z);
        Bytes::from(p)
    };
    let mut bad_crc = good.to_vec();
    bad_crc[1] ^= 0x40;
    let cases: [(&str, Bytes); 4] = [
        ("short", short),
        ("bomb", bomb),
        ("bad crc prefix", Bytes::from(bad_crc)),
        ("garbage", Bytes::from(random_bytes(5000, 1))),
    ];
    let mut sid = 7;
    for (what, payload) in cases {
        let f = write(&mut r, sid, h, 0, payload);
        assert_eq!(
            error_of(&f).code,
            ErrorCode::ChecksumMismatch as u32,
            "{what}: {:?}",
            error_of(&f)
        );
        sid += 2;
    }
    // Still one connection, nothing stored: both chunks go now, compressed, and it commits.
    let crc1 = crc32fast::hash(&text[chunk..]);
    let second = fsd::compress::compress(&text[chunk..], crc1, 3).unwrap();
    for (i, p) in [(0u32, good), (1, second)] {
        let f = write(&mut r, sid, h, i, p);
        assert!(!f.header.is_error(), "chunk {i}: {:?}", error_of(&f));
        sid += 2;
    }
    let f = r.call(
        Cmd::COMMIT,
        sid,
        &msg::CommitRequest {
            handle: h,
            blake3: blake3::hash(&text).as_bytes().to_vec(),
            ..Default::default()
        },
    );
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    assert_eq!(std::fs::read(s.root.join("h.log")).unwrap(), text);
}

/// A file downloaded again is served from the compressed-chunk cache: its chunks are not
/// compressed a second time, and the copy is exact.
#[test]
fn chunks_compressed_once_are_served_from_the_cache() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = inproc::start(&root);
    let z = &s.server.zchunks.stats;
    let data = log_text((6 << 20) - 1000, 5);
    std::fs::write(root.join("mixed.bin"), &data).unwrap();
    past_racy_window();
    let local = tempfile::tempdir().unwrap();
    let addr = s.addr.to_string();
    let mut wires = Vec::new();
    for run in 0..2 {
        let got = local.path().join(format!("run{run}"));
        let out = fsc_ok(&[
            "--json",
            "download",
            "-z",
            &addr,
            "mixed.bin",
            got.to_str().unwrap(),
        ]);
        assert_eq!(std::fs::read(&got).unwrap(), data, "run {run}");
        wires.push(done(&out.stdout)["transferred"].as_u64().unwrap());
        if run == 0 {
            assert_eq!(z.stored.load(Relaxed), 6);
            assert_eq!(z.hits.load(Relaxed), 0);
        }
    }
    assert_eq!(z.stored.load(Relaxed), 6, "compressed again");
    assert_eq!(z.hits.load(Relaxed), 6);
    assert_eq!(wires[0], wires[1]);
    assert!(wires[0] < (6 << 20) / 4, "{} bytes", wires[0]);
}

/// Compressed chunks bigger than the connection's reply budget (4 MiB; chunks go up to
/// 16 MiB) still count against it: a client that asks for many and never reads its socket
/// holds about one of them per connection in the server, not one per READ.
#[test]
fn unread_compressed_replies_are_bounded_in_bytes() {
    const CHUNK: usize = 16 << 20;
    let fsd = Fsd::start();
    // Each chunk: 10 MiB of noise, then zeros; it compresses to ~10 MiB, over the budget.
    let mut data = Vec::with_capacity(4 * CHUNK);
    for i in 0..4 {
        data.extend_from_slice(&random_bytes(10 << 20, i));
        data.resize((i as usize + 1) * CHUNK, 0);
    }
    std::fs::write(fsd.root.join("big"), &data).unwrap();
    drop(data);
    let base = proc_status_kib(fsd.pid(), "VmRSS:");
    let conns: Vec<Raw> = (0..3)
        .map(|_| {
            let mut r = Raw::connect(fsd.addr);
            let h = r.call(
                Cmd::HELLO,
                0,
                &msg::Hello {
                    version: 1,
                    chunk_size: CHUNK as u32,
                    compress_level: 1,
                    ..Default::default()
                },
            );
            let h: msg::Hello = h.decode().unwrap();
            assert_eq!((h.compress_level, h.chunk_size), (1, CHUNK as u32));
            let a = r.call(
                Cmd::AUTH,
                1,
                &msg::Auth {
                    token: TOKEN.into(),
                },
            );
            assert!(!a.header.is_error());
            let frames = open_read(&mut r, 3, "big", 0, 1);
            let open: msg::OpenResponse = frames[0].decode().unwrap();
            assert_eq!(open.chunk_count, 4);
            for sid in 0..24u32 {
                r.send_msg(
                    Cmd::READ,
                    5 + 2 * sid,
                    flags::END,
                    &msg::ReadRequest {
                        handle: open.handle,
                        first_chunk: 0,
                        count: 4,
                        compress_level: 1,
                    },
                );
            }
            r
        })
        .collect();
    // Time to compress (or take from its cache) all it is willing to.
    let grew_mib = rss_growth_mib(fsd.pid(), base);
    println!("3 connections x 24 unread READs of 4 x ~10 MiB compressed: fsd RSS +{grew_mib} MiB");
    // 3 x 24 x 40 MiB asked for. Allowed: per connection the frame being written and the
    // one waiting for the budget, plus each blocking thread's chunk buffer and zstd context
    // (measured +152 MiB; +1127 MiB when such frames bypassed the budget).
    assert!(
        grew_mib < 250,
        "fsd grew by {grew_mib} MiB for compressed replies nobody reads"
    );
    drop(conns);
}

/// A file rewritten in place with its size and mtime kept (rsync --inplace -t) after a client
/// opened it: the chunks whose bytes are no longer the manifest's are sent raw, as without
/// compression (the client finds their CRC32 wrong), and never compressed under the manifest's
/// CRC32 nor cached under the old version's key. Before, they were compressed, labelled with
/// the old CRC32 and cached: served again from the cache to every handle of that version.
#[test]
fn bytes_that_are_not_the_manifest_s_are_neither_compressed_nor_cached() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = inproc::start(&root);
    let path = root.join("t.log");
    let data = log_text(3 << 20, 11);
    std::fs::write(&path, &data).unwrap();
    past_racy_window();
    let mut r = Raw::connect(s.addr);
    assert_eq!(hello(&mut r, 3).compress_level, 3);
    let f = r.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!f.header.is_error());
    let frames = open_read(&mut r, 3, "t.log", 0, 0);
    let open: msg::OpenResponse = frames[0].decode().unwrap();
    assert_eq!(open.chunk_count, 3);
    // Chunk 0 rewritten in place with other text of the same length; the mtime put back.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &log_text(1 << 20, 12), 0).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    r.send_msg(
        Cmd::READ,
        5,
        flags::END,
        &msg::ReadRequest {
            handle: open.handle,
            first_chunk: 0,
            count: 3,
            compress_level: 3,
        },
    );
    let got: Vec<Option<Frame>> = (0..3).map(|_| r.recv()).collect();
    // Chunk 0 goes raw with the manifest's CRC32, which its new bytes fail: Raw's codec
    // refuses the frame (None), as fsc does.
    assert!(
        got[0].as_ref().is_none_or(|f| !f.header.is_compressed()),
        "the rewritten chunk was compressed"
    );
    assert!(got[1..]
        .iter()
        .all(|f| f.as_ref().is_some_and(|f| f.header.is_compressed())));
    assert_eq!(s.server.zchunks.stats.stored.load(Relaxed), 2);
}

/// Bytes fsd's process has passed to write calls (`wchar` of /proc/PID/io).
fn written_by(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A chunk written again costs fsd a write only when its bytes change, and only up to the
/// upload's size (plus 64 chunks) per opening: a compressed chunk of zeros is ~200 bytes on
/// the wire for 64 KiB on disk (16 MiB chunks: 534 bytes for 16 MiB), and a client sending it
/// again and again had fsd write without end (review: 72 KiB received, 2 GiB written).
#[test]
fn chunks_written_again_cost_a_write_only_when_they_change_and_only_so_often() {
    let s = Fsd::start();
    let chunk = 64 * 1024;
    let size = 2 * chunk;
    let mut r = Raw::connect(s.addr);
    let f = r.call(
        Cmd::HELLO,
        0,
        &msg::Hello {
            version: 1,
            chunk_size: u32::try_from(chunk).unwrap(),
            compress_level: 3,
            ..Default::default()
        },
    );
    assert!(!f.header.is_error());
    let f = r.call(
        Cmd::AUTH,
        1,
        &msg::Auth {
            token: TOKEN.into(),
        },
    );
    assert!(!f.header.is_error());
    let f = r.call(
        Cmd::OPEN,
        3,
        &msg::OpenRequest {
            path: "z.bin".into(),
            mode: msg::OpenMode::OpenWrite as i32,
            size: size as u64,
            resume_key: "k".into(),
            ..Default::default()
        },
    );
    let open: msg::OpenResponse = f.decode().unwrap();
    assert_eq!(open.chunk_count, 2);
    let packed = |fill: u8| {
        let data = vec![fill; chunk];
        let z = fsd::compress::compress(&data, crc32fast::hash(&data), 3).unwrap();
        (data, z)
    };
    let mut sid = 5;
    let mut write = |index: u32, payload: &Bytes| -> Frame {
        r.send_msg(
            Cmd::WRITE,
            sid,
            0,
            &msg::WriteRequest {
                handle: open.handle,
                chunk: index,
            },
        );
        let mut h = Header::data(
            Cmd::WRITE,
            sid,
            u32::try_from(payload.len()).unwrap(),
            crc32fast::hash(payload),
            true,
        );
        h.flags |= flags::COMPRESSED;
        r.send(&Frame {
            header: h,
            payload: payload.clone(),
        })
        .unwrap();
        sid += 2;
        r.recv().unwrap()
    };
    let (zeros, zeros_z) = packed(0);
    let (ones, ones_z) = packed(1);
    assert!(zeros_z.len() < 1024, "{} bytes", zeros_z.len());
    let f = write(0, &zeros_z);
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let before = written_by(s.pid());
    for _ in 0..50 {
        let f = write(0, &zeros_z);
        assert!(!f.header.is_error(), "{:?}", error_of(&f));
    }
    let same = written_by(s.pid()) - before;
    assert!(
        same < (chunk as u64) * 4,
        "the same chunk 50 times more: {same} bytes written"
    );
    // Other bytes each time: stored, up to the upload's size plus 64 chunks, then refused.
    let mut held = &zeros;
    let mut refused = 0;
    for i in 0..80 {
        let (data, z) = if i % 2 == 0 {
            (&ones, &ones_z)
        } else {
            (&zeros, &zeros_z)
        };
        let f = write(0, z);
        if f.header.is_error() {
            assert_eq!(error_of(&f).code, ErrorCode::LimitExceeded as u32);
            refused += 1;
        } else {
            held = data;
        }
    }
    // 66 fit (2 chunks of size + 64); of the 14 after them, the 7 with ones are refused and
    // the 7 with zeros, the bytes the chunk still holds, cost nothing.
    assert_eq!(refused, 7, "rewrites refused");
    // Nothing lost: the upload goes on and publishes what it holds.
    let f = write(1, &ones_z);
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    let whole: Vec<u8> = [held.as_slice(), ones.as_slice()].concat();
    let f = r.call(
        Cmd::COMMIT,
        sid,
        &msg::CommitRequest {
            handle: open.handle,
            blake3: blake3::hash(&whole).as_bytes().to_vec(),
            ..Default::default()
        },
    );
    assert!(!f.header.is_error(), "{:?}", error_of(&f));
    assert_eq!(std::fs::read(s.root.join("z.bin")).unwrap(), whole);
}
