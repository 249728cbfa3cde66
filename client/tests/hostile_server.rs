//! fsc against a fake, hostile server (SECURITY.md, "The client is attacked too"): names that
//! try to escape the destination, replies with more or other bytes than were asked for.

use std::net::SocketAddr;

use bytes::Bytes;
use fsd::protocol::{flags, msg, Cmd, ErrorCode, Frame, FrameCodec, Header};
use futures::{SinkExt, StreamExt};
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

/// How the fake server misbehaves.
#[derive(Clone, Copy)]
enum Evil {
    /// Lists names that escape the destination, next to one honest file.
    Names,
    /// Answers READ with one chunk more than asked.
    ExtraChunk,
    /// Sends a chunk whose content differs from what it announced (frame CRC still valid).
    WrongContent,
}

const CONTENT: &[u8] = b"hello";

fn entry(name: &str, kind: msg::Kind, size: u64) -> msg::Entry {
    msg::Entry {
        name: name.into(),
        kind: kind as i32,
        size,
        mtime_ns: 1_000_000_000,
        mode: 0o644,
        target: String::new(),
    }
}

async fn fake_server(evil: Evil) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(Framed::new(sock, FrameCodec::new(1 << 24)), evil));
        }
    });
    addr
}

async fn serve(mut io: Framed<tokio::net::TcpStream, FrameCodec>, evil: Evil) {
    while let Some(Ok(Ok(f))) = io.next().await {
        let sid = f.stream_id();
        let reply = |m: &dyn Fn() -> Bytes| Frame::new(f.cmd(), sid, flags::END, m());
        let frames: Vec<Frame> = match f.cmd() {
            Cmd::HELLO => vec![Frame::message(
                Cmd::HELLO,
                0,
                flags::END,
                &msg::Hello {
                    version: 1,
                    max_frame: 1 << 24,
                    chunk_size: 1 << 20,
                    max_streams: 16,
                    agent: "evil".into(),
                },
            )],
            Cmd::STAT => vec![reply(&|| {
                msg::StatResponse {
                    entry: Some(entry("d", msg::Kind::Dir, 0)),
                }
                .encode_to_vec()
                .into()
            })],
            Cmd::LIST => vec![reply(&|| {
                let mut entries = vec![entry("ok", msg::Kind::File, 5)];
                if let Evil::Names = evil {
                    for bad in ["../evil", "a/b", "..", "x\0y"] {
                        entries.push(entry(bad, msg::Kind::File, 5));
                    }
                }
                // Sorted, as the protocol promises (the client refuses lists going backwards).
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                msg::ListResponse {
                    entries,
                    more: false,
                }
                .encode_to_vec()
                .into()
            })],
            Cmd::OPEN => {
                let req: msg::OpenRequest = f.decode().unwrap();
                if req.path != "d/ok" && req.path != "ok" {
                    vec![Frame::error(
                        Cmd::OPEN,
                        sid,
                        &ErrorCode::NotFound.msg(req.path),
                    )]
                } else {
                    vec![Frame::message(
                        Cmd::OPEN,
                        sid,
                        flags::END,
                        &msg::OpenResponse {
                            handle: 1,
                            size: 5,
                            mtime_ns: 1_000_000_000,
                            identity: "v1".into(),
                            chunk_size: 1 << 20,
                            chunk_count: 1,
                            blake3: blake3::hash(CONTENT).as_bytes().to_vec(),
                            mode: 0o644,
                            ..Default::default()
                        },
                    )]
                }
            }
            Cmd::READ => match evil {
                Evil::ExtraChunk => vec![
                    Frame::new(Cmd::READ, sid, flags::DATA, Bytes::from_static(CONTENT)),
                    Frame::new(
                        Cmd::READ,
                        sid,
                        flags::DATA | flags::END,
                        Bytes::from_static(b"more!"),
                    ),
                ],
                Evil::WrongContent => vec![Frame::new(
                    Cmd::READ,
                    sid,
                    flags::DATA | flags::END,
                    Bytes::from_static(b"HELLO"),
                )],
                Evil::Names => vec![Frame {
                    header: Header::data(Cmd::READ, sid, 5, crc32fast::hash(CONTENT), true),
                    payload: Bytes::from_static(CONTENT),
                }],
            },
            Cmd::CLOSE => vec![Frame::message(Cmd::CLOSE, sid, flags::END, &msg::Ok {})],
            _ => vec![Frame::error(
                f.cmd(),
                sid,
                &ErrorCode::UnknownCommand.msg("no"),
            )],
        };
        for fr in frames {
            if io.send(fr).await.is_err() {
                return;
            }
        }
    }
}

fn opts() -> fsc::Options {
    fsc::Options {
        retries: 1,
        backoff: std::time::Duration::from_millis(10),
        ..Default::default()
    }
}

#[tokio::test]
async fn names_that_escape_the_destination_are_refused() {
    let addr = fake_server(Evil::Names).await;
    let client = fsc::Client::connect(&addr.to_string(), opts())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("inner").join("dest");
    let s = client.download_tree("d", &dest).await.unwrap();
    assert_eq!(s.files, 1, "the honest file arrives");
    assert_eq!(std::fs::read(dest.join("ok")).unwrap(), CONTENT);
    assert_eq!(s.failed.len(), 4, "{:?}", s.failed);
    assert!(s
        .failed
        .iter()
        .all(|(_, e)| matches!(e, fsc::Error::UnsafeName(_))));
    assert_eq!(s.exit_code(), 2);
    // Nothing was written anywhere but `dest/ok`.
    let mut seen = Vec::new();
    for e in walk(tmp.path()) {
        seen.push(e.strip_prefix(tmp.path()).unwrap().display().to_string());
    }
    seen.sort();
    assert_eq!(seen, ["inner", "inner/dest", "inner/dest/ok"]);
}

#[tokio::test]
async fn a_reply_with_more_chunks_than_asked_is_refused() {
    let addr = fake_server(Evil::ExtraChunk).await;
    let client = fsc::Client::connect(&addr.to_string(), opts())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = client
        .download("ok", &tmp.path().join("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, fsc::Error::Protocol(_)), "{err}");
    assert!(!tmp.path().join("ok").exists());
}

#[tokio::test]
async fn content_that_does_not_match_the_announced_hash_never_lands() {
    let addr = fake_server(Evil::WrongContent).await;
    let client = fsc::Client::connect(&addr.to_string(), opts())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = client
        .download("ok", &tmp.path().join("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, fsc::Error::Integrity { .. }), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert!(!tmp.path().join("ok").exists());
    assert!(!tmp.path().join("ok.fsc-part").exists());
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}
