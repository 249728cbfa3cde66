//! The byte transport under a connection — plain TCP (file data by sendfile) or TLS — and
//! moving it between runtimes: connections from sources that never authenticated are served on
//! the startup runtime until their AUTH succeeds, then handed to the main runtime
//! ([`rebind`]), so that a flood of unauthenticated connections never queues ahead of an
//! authenticated client's requests (see `server::run`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::writer::{self, Outgoing, WriteSide};
use super::Server;
use crate::protocol::{Cmd, ErrorCode, Frame};

/// A TLS connection; its socket can be moved to another runtime.
pub type TlsStream = tokio_rustls::server::TlsStream<Socket>;

/// A TCP socket that can be re-registered with another runtime's reactor while a TLS stream
/// owns it (rustls' state cannot be taken out of a `TlsStream` and put into a new one).
pub struct Socket(Option<TcpStream>);

impl Socket {
    fn get(&mut self) -> io::Result<&mut TcpStream> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket lost in handover"))
    }

    /// Registers the socket with the reactor of the runtime this is called on.
    fn rebind(&mut self) -> io::Result<()> {
        let Some(s) = self.0.take() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "socket lost in handover",
            ));
        };
        self.0 = Some(TcpStream::from_std(s.into_std()?)?);
        Ok(())
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().get() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().get() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().get() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().get() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().get() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// The read half of a connection.
pub enum ReadSide {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream>),
    /// In-memory pipes of tests and fuzzers.
    Stream(Box<dyn AsyncRead + Send + Unpin>),
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Tls(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Stream(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// An established transport, ready to speak the protocol.
pub struct Transport {
    pub rd: ReadSide,
    pub wr: WriteSide,
    /// Subject of the verified TLS client certificate, if any.
    pub subject: Option<String>,
    /// The socket under `rd` on plain TCP (for the frame reader's wakeups).
    pub tcp: Option<RawFd>,
    /// The TCP socket under either transport (for the background controller, crate::ledbat);
    /// valid while `rd` and `wr` are.
    pub socket: Option<RawFd>,
}

/// Registers both halves of a connection with the reactor of the runtime this is called on
/// (they were the startup runtime's). Every byte already read stays in the caller's frame
/// reader and everything queued was written before, so nothing is lost or reordered.
pub fn rebind(rd: ReadSide, wr: WriteSide) -> io::Result<(ReadSide, WriteSide)> {
    match (rd, wr) {
        (ReadSide::Tcp(r), WriteSide::Tcp(w)) => {
            let s = r.reunite(w).map_err(io::Error::other)?;
            let s = TcpStream::from_std(s.into_std()?)?;
            let (r, w) = s.into_split();
            Ok((ReadSide::Tcp(r), WriteSide::Tcp(w)))
        }
        (ReadSide::Tls(r), WriteSide::Tls(w)) => {
            let mut s = r.unsplit(w);
            s.get_mut().0.rebind()?;
            let (r, w) = tokio::io::split(s);
            Ok((ReadSide::Tls(r), WriteSide::Tls(w)))
        }
        // Nothing to move: an in-memory pipe belongs to no reactor.
        (rd, wr) => Ok((rd, wr)),
    }
}

/// Sets up the transport: plain TCP (sendfile path) or TLS (copy path). Returns None when the
/// connection ends before it can speak the protocol.
/// `auth_deadline` bounds the TLS handshake (and the wait for its first bytes): it is the
/// one the client then has to authenticate by, not a timeout of its own.
pub async fn establish(
    stream: TcpStream,
    server: &Server,
    evicted: &CancellationToken,
    auth_deadline: tokio::time::Instant,
) -> Option<Transport> {
    let _ = stream.set_nodelay(true);
    server.config.tuning.connected(stream.as_raw_fd());
    let Some(tls) = server.config.tls.clone() else {
        let fd = stream.as_raw_fd();
        let (rd, wr) = stream.into_split();
        return Some(Transport {
            rd: ReadSide::Tcp(rd),
            wr: WriteSide::Tcp(wr),
            subject: None,
            tcp: Some(fd),
            socket: Some(fd),
        });
    };
    // A cleartext fsd client on a TLS port: tell it so in its own protocol, then close.
    let mut first = [0u8; 4];
    let peeked = tokio::time::timeout_at(auth_deadline, stream.peek(&mut first)).await;
    if matches!(peeked, Ok(Ok(4))) && u32::from_be_bytes(first) == crate::protocol::MAGIC {
        tracing::warn!("cleartext client on a TLS port");
        let (mut rd, wr) = stream.into_split();
        // Read what the client already sent (its Hello): closing with unread input would reset
        // the connection and could discard our reply before it arrives.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            use tokio::io::AsyncReadExt;
            let mut drained = 0;
            while drained < 64 * 1024 {
                match rd.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
        let f = Frame::error(
            Cmd::HELLO,
            0,
            &ErrorCode::BadRequest.msg("this server requires TLS (use fsc --tls)"),
        );
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(Outgoing::Frame(f)).await;
        drop(tx);
        let mut wr = WriteSide::Tcp(wr);
        if writer::run(&mut wr, rx, server.stats.clone(), None, Default::default())
            .await
            .is_ok()
        {
            let _ = wr.shutdown().await;
        }
        return None;
    }
    let socket = stream.as_raw_fd();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::time::timeout_at(auth_deadline, acceptor.accept(Socket(Some(stream))));
    let stream = tokio::select! {
        _ = evicted.cancelled() => {
            tracing::debug!("TLS handshake cut: newer unauthenticated connections need the place");
            return None;
        }
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::warn!("TLS handshake timed out");
                return None;
            }
        },
    };
    let subject = super::tls::peer_subject(stream.get_ref().1);
    let (rd, wr) = tokio::io::split(stream);
    Some(Transport {
        rd: ReadSide::Tls(rd),
        wr: WriteSide::Tls(wr),
        subject,
        tcp: None,
        socket: Some(socket),
    })
}
