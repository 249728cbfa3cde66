//! The writer task: the only owner of a connection's write half. Handlers hand it frames, or
//! file ranges that it sends with sendfile on plain TCP (header first, then exactly
//! payload_len bytes from the file) and by copying on other transports.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::quotas::Account;
use super::Stats;
use crate::net::TokenBucket;
use crate::protocol::{Frame, Header};

/// Small frames are batched up to this size before a write.
const BATCH_BYTES: usize = 64 * 1024;

/// File payloads that cannot go by sendfile (TLS, pipes) are read and written in pieces of at
/// most this size, one at a time: a 16 MiB chunk to a client that does not read holds 256 KiB.
pub const COPY_PIECE: u32 = 256 * 1024;

/// What copying a file payload through memory draws on: a piece's worth of its connection's
/// reply budget (reserved by the handler before it queues the payload, so the writer never
/// waits for budget that frames queued behind it hold), and the credential whose share of the
/// blocking threads reads it.
pub struct Copy {
    pub budget: OwnedSemaphorePermit,
    pub account: Arc<Account>,
}

impl std::fmt::Debug for Copy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copy")
            .field("budget", &self.budget.num_permits())
            .field("account", &self.account.name)
            .finish()
    }
}

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
        /// None on plain TCP (sendfile); else what copying it draws on.
        copy: Option<Copy>,
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
/// (`--bwlimit`), if any. `sent` counts the bytes handed to the transport: the client's
/// progress in taking its replies, which keeps the connection from idling out.
pub async fn run(
    out: &mut WriteSide,
    mut rx: mpsc::Receiver<Outgoing>,
    stats: Arc<Stats>,
    limit: Option<Arc<TokenBucket>>,
    sent: Arc<AtomicU64>,
) -> io::Result<()> {
    let sent = &*sent;
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
                    copy,
                } => {
                    if let Some(b) = &limit {
                        b.take(u64::from(header.payload_len)).await;
                    }
                    header.encode(&mut buf);
                    out.write_all(&buf).await?;
                    count(sent, buf.len());
                    buf.clear();
                    held.clear();
                    let len = usize::try_from(header.payload_len).expect("a u32 fits usize");
                    send_payload(out, &file, offset, len, copy, &stats, sent).await?;
                    stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            if buf.len() >= BATCH_BYTES {
                out.write_all(&buf).await?;
                count(sent, buf.len());
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
            count(sent, buf.len());
            buf.clear();
        }
        held.clear();
        out.stream().flush().await?;
    }
    Ok(())
}

fn count(sent: &AtomicU64, n: usize) {
    sent.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

async fn send_payload(
    out: &mut WriteSide,
    file: &Arc<File>,
    offset: u64,
    len: usize,
    copy: Option<Copy>,
    stats: &Stats,
    progress: &AtomicU64,
) -> io::Result<()> {
    let sent = match out {
        WriteSide::Tcp(w) => {
            let n = sendfile(w, file, offset, len, progress).await?;
            stats.bytes_sendfile.fetch_add(n as u64, Ordering::Relaxed);
            n
        }
        WriteSide::Tls(_) | WriteSide::Stream(_) => {
            copy_payload(out, file, offset, len, copy, stats, progress).await?
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

/// Reads `len` bytes of `file` at `offset` and writes them, a piece ([`COPY_PIECE`]) at a time
/// through one buffer, each read on a blocking thread within the credential's share. Returns
/// the bytes sent: fewer than `len` only if the file ended early.
async fn copy_payload(
    out: &mut WriteSide,
    file: &Arc<File>,
    offset: u64,
    len: usize,
    copy: Option<Copy>,
    stats: &Stats,
    progress: &AtomicU64,
) -> io::Result<usize> {
    let piece_max = usize::try_from(COPY_PIECE).expect("u32 fits usize");
    // The budget (held until this returns) covers the one buffer.
    let (_budget, account) = match copy {
        Some(c) => (Some(c.budget), Some(c.account)),
        None => (None, None),
    };
    let mut piece = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(piece_max);
        let slot = match &account {
            Some(a) => Some(a.blocking_slot().await),
            None => None,
        };
        let f = file.clone();
        let at = offset + u64::try_from(done).expect("usize fits u64");
        let mut buf = std::mem::take(&mut piece);
        let (buf, got) = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            buf.resize(n, 0);
            let got = read_up_to(&f, &mut buf, at);
            (buf, got)
        })
        .await
        .map_err(io::Error::other)?;
        piece = buf;
        let got = got?;
        out.write_all(&piece[..got]).await?;
        count(progress, got);
        stats
            .bytes_copied
            .fetch_add(u64::try_from(got).unwrap_or(u64::MAX), Ordering::Relaxed);
        done += got;
        if got < n {
            break;
        }
    }
    Ok(done)
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
async fn sendfile(
    w: &OwnedWriteHalf,
    file: &File,
    offset: u64,
    len: usize,
    progress: &AtomicU64,
) -> io::Result<usize> {
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
            Ok(n) => {
                sent += n;
                count(progress, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}
