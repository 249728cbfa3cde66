//! Feeds fuzzed requests straight to fsd's dispatcher over an in-memory connection: the input is
//! split into (command, flags, stream, payload) records, each sent as a *valid* frame (correct
//! length and checksum) after a real Hello and Auth, so every byte reaches a handler rather than
//! being stopped by the codec. A record whose first byte is 0xFF is sent as raw bytes instead,
//! so framing errors mid-connection are exercised too. Oracles: no panic, no hang (each input
//! must finish within the time libFuzzer allows), nothing written outside the temp root.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fsd::protocol::{flags, msg, Cmd, Frame};
use fsd::server::{run_connection, Config, Credentials, Server, WriteSide};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fuzz-token-0123456789";
const CMDS: [Cmd; 16] = [
    Cmd::HELLO, Cmd::AUTH, Cmd::PING, Cmd::LIST, Cmd::STAT, Cmd::OPEN, Cmd::MANIFEST, Cmd::READ,
    Cmd::WRITE, Cmd::COMMIT, Cmd::CLOSE, Cmd::CANCEL, Cmd::MKDIR, Cmd::REMOVE, Cmd::RENAME, Cmd(0x7777),
];

struct Env {
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("f"), vec![7u8; 300_000]).unwrap();
        std::fs::write(root.join("d/g"), b"hello").unwrap();
        let mut config = Config::new(root, Credentials::single(TOKEN));
        config.chunk_size = 64 * 1024;
        config.auth_timeout = std::time::Duration::from_millis(200);
        let server = Server::new(config).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        Env { rt, server, _dir: dir }
    })
}

fn peer() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff)), 1))
}

fn frames(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    fn push(out: &mut Vec<u8>, f: Frame) {
        f.header.encode(out);
        out.extend_from_slice(&f.payload);
    }
    let hello = msg::Hello { version: 1, chunk_size: 64 * 1024, ..Default::default() };
    push(&mut out, Frame::message(Cmd::HELLO, 0, flags::END, &hello));
    push(&mut out, Frame::message(Cmd::AUTH, 1, flags::END, &msg::Auth { token: TOKEN.into() }));
    let mut rest = data;
    while rest.len() >= 4 {
        let (head, tail) = rest.split_at(4);
        let len = (head[3] as usize).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        if head[0] == 0xFF {
            out.extend_from_slice(payload);
            continue;
        }
        let cmd = CMDS[head[0] as usize % CMDS.len()];
        push(&mut out, Frame::new(cmd, head[2] as u32 % 8, head[1] & flags::KNOWN, Bytes::copy_from_slice(payload)));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let input = frames(data);
    env.rt.block_on(async {
        let (client, server_end) = tokio::io::duplex(1 << 20);
        let (rd, wr) = tokio::io::split(server_end);
        let conn = tokio::spawn(run_connection(
            Box::new(rd),
            WriteSide::Stream(Box::new(wr)),
            None,
            // A fresh source address per input: failed AUTHs spend a per-address budget, which
            // must not run dry across inputs.
            peer(),
            env.server.clone(),
            CancellationToken::new(),
        ));
        let (mut crd, mut cwr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(crd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let _ = cwr.write_all(&input).await;
        let _ = cwr.shutdown().await;
        // Failed AUTHs are answered at once; the third makes the server hang up.
        let done = tokio::time::timeout(std::time::Duration::from_secs(8), conn).await;
        assert!(done.is_ok(), "connection did not end after the client hung up");
        drain.abort();
    });
});
