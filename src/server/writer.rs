//! The writer task: the only owner of a connection's write half. Handlers hand it frames, or
//! file ranges that it sends with sendfile on plain TCP (header first, then exactly
//! payload_len bytes from the file) and by copying on other transports.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::Stats;
use crate::net::TokenBucket;
use crate::protocol::{Frame, Header};

/// Small frames are batched up to this size before a write.
const BATCH_BYTES: usize = 64 * 1024;

/// What handlers ask the writer to send.
#[derive(Debug)]
pub enum Outgoing {
    Frame(Frame),
    /// A frame whose payload counts against its connection's reply budget until it is written
    /// (big replies: inline file contents, listings, manifests).
    Held(Frame, OwnedSemaphorePermit),
    /// A DATA frame whose payload is `header.payload_len` bytes of `file` at `offset`, with the
    /// checksum already in the header.
    File {
        header: Header,
        file: Arc<File>,
        offset: u64,
    },
}

/// The write half of a connection.
pub enum WriteSide {
    /// Plain TCP: file payloads go by sendfile.
    Tcp(OwnedWriteHalf),
    /// TLS over TCP: file payloads are read and copied.
    Tls(tokio::io::WriteHalf<super::transport::TlsStream>),
    /// Anything else (in-memory pipes of tests and fuzzers): file payloads are read and copied.
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

impl WriteSide {
    fn stream(&mut self) -> &mut (dyn AsyncWrite + Send + Unpin) {
        match self {
            WriteSide::Tcp(w) => w,
            WriteSide::Tls(w) => w,
            WriteSide::Stream(w) => w.as_mut(),
        }
    }

    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.stream().write_all(buf).await
    }

    /// Ends the sending direction (FIN, or TLS close_notify then FIN).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.stream().shutdown().await
    }
}

/// Runs until every sender is dropped (everything queued written and flushed, the socket left
/// open: the caller shuts it down, or hands the connection to another runtime) or the socket
/// fails. File payloads first take their bytes from `limit`, the server-wide rate limit
/// (`--bwlimit`), if any.
pub async fn run(
    out: &mut WriteSide,
    mut rx: mpsc::Receiver<Outgoing>,
    stats: Arc<Stats>,
    limit: Option<Arc<TokenBucket>>,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    // Budget of the frames in `buf`: given back once they are written.
    let mut held = Vec::new();
    while let Some(mut item) = rx.recv().await {
        loop {
            match item {
                Outgoing::Frame(f) => {
                    f.header.encode(&mut buf);
                    buf.extend_from_slice(&f.payload);
                }
                Outgoing::Held(f, permit) => {
                    f.header.encode(&mut buf);
                    buf.extend_from_slice(&f.payload);
                    held.push(permit);
                }
                Outgoing::File {
                    header,
                    file,
                    offset,
                } => {
                    if let Some(b) = &limit {
                        b.take(u64::from(header.payload_len)).await;
                    }
                    header.encode(&mut buf);
                    out.write_all(&buf).await?;
                    buf.clear();
                    held.clear();
                    send_payload(out, &file, offset, header.payload_len as usize, &stats).await?;
                    stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            if buf.len() >= BATCH_BYTES {
                out.write_all(&buf).await?;
                buf.clear();
                held.clear();
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            out.write_all(&buf).await?;
            buf.clear();
        }
        held.clear();
        out.stream().flush().await?;
    }
    Ok(())
}

async fn send_payload(
    out: &mut WriteSide,
    file: &Arc<File>,
    offset: u64,
    len: usize,
    stats: &Stats,
) -> io::Result<()> {
    let sent = match out {
        WriteSide::Tcp(w) => {
            let n = sendfile(w, file, offset, len).await?;
            stats.bytes_sendfile.fetch_add(n as u64, Ordering::Relaxed);
            n
        }
        WriteSide::Tls(_) | WriteSide::Stream(_) => {
            let f = file.clone();
            let data = tokio::task::spawn_blocking(move || {
                let mut data = vec![0u8; len];
                let n = read_up_to(&f, &mut data, offset)?;
                data.truncate(n);
                Ok::<_, io::Error>(data)
            })
            .await
            .map_err(io::Error::other)??;
            out.write_all(&data).await?;
            stats
                .bytes_copied
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            data.len()
        }
    };
    if sent < len {
        // The file shrank after its header promised `len` bytes. Keep the framing intact with
        // zeros; the checksum in the header no longer matches, so the client discards the chunk
        // and its next Read sees the change.
        tracing::warn!(offset, len, sent, "file shrank while being sent");
        let zeros = vec![0u8; (len - sent).min(1 << 20)];
        let mut left = len - sent;
        while left > 0 {
            let n = left.min(zeros.len());
            out.write_all(&zeros[..n]).await?;
            left -= n;
        }
    }
    Ok(())
}

pub(super) fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// sendfile(2) from `file` to the socket, waiting for writability through tokio on EAGAIN and
/// continuing after partial sends. Uses 64-bit offsets, so files over 4 GiB are fine. Returns
/// the bytes sent: fewer than `len` only if the file ended early.
async fn sendfile(w: &OwnedWriteHalf, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    let sock = w.as_ref();
    let mut off = offset as libc::off64_t;
    let mut sent = 0;
    while sent < len {
        sock.writable().await?;
        let res = sock.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(sock.as_fd(), file.as_fd(), Some(&mut off), len - sent)
                .map_err(io::Error::from)
        });
        match res {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}
