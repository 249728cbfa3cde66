//! One connection: the reader loop (decode, authenticate, dispatch) and the streams it runs.
//! Each request runs as its own task; replies go through the writer task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::limits::Startup;
use super::quotas::{Account, Held};
use super::transport::{self, ReadSide};
use super::writer::{self, Outgoing, WriteSide};
use super::{files, transfer, tree, Credential, Server, MAX_AUTH_FAILURES};
use crate::frame_reader::FrameReader;
use crate::fs::root::{FsError, Root};
use crate::fs::upload::UploadError;
use crate::protocol::{
    flags, msg, Cmd, CodecError, ErrorCode, Frame, FrameCodec, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
    VERSION,
};

/// Largest payload of any frame before Auth succeeds, whatever Hello says (Hello and Auth are
/// tiny): an unauthenticated peer cannot make the server buffer more.
const PRE_AUTH_PAYLOAD: u32 = 16 * 1024;

/// Why the reader of a connection on the startup runtime stopped: it authenticated, and goes
/// on on the main runtime.
const HANDED_OVER: &str = "authenticated: handed to the main runtime";

/// Why the reader stopped when the client made no progress for the idle timeout.
const IDLE: &str = "idle timeout";

/// Why the reader stopped at the server's shutdown.
const SHUTDOWN: &str = "shutdown";

/// Why the reader stopped when a frame of its own found no room in the writer's queue
/// ([`Conn::send`]).
const STALLED: &str = "client not reading its replies";

/// Refused WRITE or PUT requests whose DATA frame is still to be dropped, per connection.
const MAX_DISCARDS: usize = 1024;

/// Frames queued for the writer per connection: bounds memory, and its FIFO interleaves streams.
const WRITER_QUEUE: usize = 32;

/// Bytes of big replies (inline contents, listings, manifests) one connection may have read or
/// built and not yet written: a client that stops reading stalls its own requests, holding no
/// more than this.
pub const REPLY_BUDGET: u32 = 4 * 1024 * 1024;

/// Bytes of received DATA (WRITE, PUT) one connection may have waiting to be stored, at least
/// one frame: beyond, the server stops reading from the socket until the disk catches up. The
/// credential's and the server's budgets bound all connections together
/// (quotas::inbound_budgets).
pub const INBOUND_BUDGET: u32 = 16 * 1024 * 1024;

/// Received DATA waiting to be stored, counted against its connection's, its credential's and
/// the server's inbound budgets until dropped.
pub struct Received {
    _permits: [OwnedSemaphorePermit; 3],
}

/// Takes `n` bytes from the connection's, then the credential's, then the server's inbound
/// budget, waiting (the connection reads nothing meanwhile) while any is spent. Each is at least
/// one connection's budget, so `n` (capped by it) always fits.
async fn admit(budgets: [Arc<Semaphore>; 3], n: u32) -> Received {
    let mut permits = Vec::with_capacity(3);
    for budget in budgets {
        let permit = budget
            .acquire_many_owned(n)
            .await
            .expect("the inbound budgets are never closed");
        permits.push(permit);
    }
    Received {
        _permits: permits.try_into().expect("three budgets"),
    }
}

/// A request that failed: the one place a server error becomes a wire status.
#[derive(Debug)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<FsError> for Failure {
    fn from(e: FsError) -> Failure {
        Failure::new(e.code(), e.to_string())
    }
}

impl From<UploadError> for Failure {
    fn from(e: UploadError) -> Failure {
        Failure::new(e.code(), e.to_string())
    }
}

impl From<prost::DecodeError> for Failure {
    fn from(e: prost::DecodeError) -> Failure {
        Failure::new(ErrorCode::BadRequest, format!("malformed message: {e}"))
    }
}

impl From<tokio::task::JoinError> for Failure {
    fn from(e: tokio::task::JoinError) -> Failure {
        Failure::new(ErrorCode::Internal, format!("handler failed: {e}"))
    }
}

/// A request whose DATA frame is still to come.
enum Pending {
    Write(msg::WriteRequest),
    Put(msg::PutRequest),
    Tree(msg::TreeWriteRequest),
}

impl Pending {
    fn cmd(&self) -> Cmd {
        match self {
            Pending::Write(_) => Cmd::WRITE,
            Pending::Put(_) => Cmd::PUT,
            Pending::Tree(_) => Cmd::TREE_WRITE,
        }
    }
}

/// Requests whose DATA frame follows them on the same stream.
fn takes_data(cmd: Cmd) -> bool {
    matches!(cmd, Cmd::WRITE | Cmd::PUT | Cmd::TREE_WRITE)
}

/// Streams in use on a connection, each with the token that cancels it.
type Streams = Arc<Mutex<HashMap<u32, CancellationToken>>>;

/// The sending side of one stream. `finish` releases the stream id *before* queueing the final
/// frame, so a client that reuses the id as soon as it sees END never races the bookkeeping.
pub struct StreamTx {
    pub stream_id: u32,
    pub cmd: Cmd,
    pub cancel: CancellationToken,
    tx: mpsc::Sender<Outgoing>,
    streams: Streams,
}

impl StreamTx {
    /// Queues an intermediate item. False if the connection is gone.
    pub async fn send(&self, item: Outgoing) -> bool {
        self.tx.send(item).await.is_ok()
    }

    pub async fn finish(self, item: Outgoing) {
        self.streams.lock().unwrap().remove(&self.stream_id);
        let _ = self.tx.send(item).await;
    }

    pub async fn reply(self, m: &impl prost::Message) {
        let f = Frame::message(self.cmd, self.stream_id, flags::END, m);
        self.finish(Outgoing::Frame(f)).await
    }

    pub async fn fail(self, e: Failure) {
        tracing::debug!(code = ?e.code, message = ?e.message, "request failed");
        let f = Frame::error(self.cmd, self.stream_id, &e.code.msg(e.message));
        self.finish(Outgoing::Frame(f)).await
    }
}

impl Drop for StreamTx {
    /// A handler that ended without finishing (panic, abort) still frees its id.
    fn drop(&mut self) {
        self.streams.lock().unwrap().remove(&self.stream_id);
    }
}

/// What an authenticated connection may do and where.
pub struct Session {
    pub server: Arc<Server>,
    pub cred: Credential,
    pub peer: SocketAddr,
    /// The credential's prefix directory, when it has one.
    sub_root: Option<Root>,
    pub base_chunk_size: u32,
    /// Largest DATA payload the client accepts.
    pub client_max_frame: u32,
    /// Highest zstd level agreed in Hello (crate::compress); 0: no COMPRESSED frames either way.
    pub compress_level: u32,
    pub handles: Mutex<transfer::Handles>,
    /// [`REPLY_BUDGET`] of this connection.
    pub replies: Arc<Semaphore>,
    /// The credential's quotas and usage; this connection counts in it while it lives.
    pub account: Arc<Account>,
    _connected: Held,
    /// Listing cursors for the next pages (crate::fs::listing). The async lock also runs this
    /// connection's LISTs one at a time: one client cannot hold more than one blocking thread
    /// reading directories, however many LIST streams it opens.
    pub lists: Arc<tokio::sync::Mutex<crate::fs::listing::ListCursors>>,
    /// The transport is plain TCP: file payloads go by sendfile, else they are copied in
    /// pieces ([`Session::copy_share`]).
    pub sendfile: bool,
    /// File-system jobs of this connection running on the blocking pool ([`files::blocking`]):
    /// work fsd does for the client, during which the connection is not idle.
    pub working: AtomicUsize,
}

impl Session {
    /// What a file payload of `len` bytes queued for the writer needs to be copied (None: it
    /// goes by sendfile): a piece's worth of the reply budget, waited for here, in the handler,
    /// and the credential's blocking share.
    pub async fn copy_share(&self, len: u32) -> Option<writer::Copy> {
        if self.sendfile {
            return None;
        }
        let budget = self.reserve_reply(len.clamp(1, writer::COPY_PIECE)).await;
        Some(writer::Copy {
            budget,
            account: self.account.clone(),
        })
    }

    /// File-system jobs of this connection running now.
    pub fn working(&self) -> usize {
        self.working.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` of the reply budget, waiting while the client has not read enough of
    /// what it was sent.
    pub async fn reserve_reply(&self, bytes: u32) -> OwnedSemaphorePermit {
        let bytes = bytes.min(REPLY_BUDGET);
        self.replies
            .clone()
            .acquire_many_owned(bytes)
            .await
            .expect("the reply budget is never closed")
    }

    /// Where this session's paths resolve: the root, or the credential's prefix beneath it.
    pub fn root(&self) -> &Root {
        self.sub_root.as_ref().unwrap_or(&self.server.root)
    }

    /// Maps a client path (relative to the server root) to one relative to `self.root`,
    /// refusing paths outside the credential's prefix.
    pub fn path<'a>(&self, path: &'a str) -> Result<&'a str, Failure> {
        self.server.root.check(path)?;
        let prefix = &self.cred.prefix;
        if prefix.is_empty() {
            return Ok(path);
        }
        if path == prefix.as_str() {
            return Ok("");
        }
        path.strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| {
                Failure::new(
                    ErrorCode::PermissionDenied,
                    format!("{path:?} is outside this credential's prefix {prefix:?}"),
                )
            })
    }

    pub fn require_write(&self) -> Result<(), Failure> {
        if self.cred.writable {
            Ok(())
        } else {
            Err(Failure::new(
                ErrorCode::PermissionDenied,
                format!("credential {:?} is read-only", self.cred.name),
            ))
        }
    }
}

struct Conn {
    server: Arc<Server>,
    peer: SocketAddr,
    tx: mpsc::Sender<Outgoing>,
    streams: Streams,
    /// WRITE and PUT requests waiting for their DATA frame.
    pending_writes: HashMap<u32, Pending>,
    /// Streams whose WRITE request failed its checksum: their DATA frame is dropped unanswered.
    discard_data: std::collections::HashSet<u32>,
    session: Option<Arc<Session>>,
    /// Subject of the verified TLS client certificate, if any.
    subject: Option<String>,
    base_chunk_size: u32,
    client_max_frame: u32,
    compress_level: u32,
    /// The TCP socket, when there is one (not over an in-memory pipe).
    socket: Option<RawFd>,
    /// The client asked in Hello for a background connection (crate::ledbat), and this
    /// server serves that: the controller starts when AUTH first succeeds.
    background: bool,
    /// The controller runs (once per connection, whatever the number of AUTHs).
    background_started: bool,
    auth_failures: u32,
    /// This connection's place among the unauthenticated ones, until it authenticates.
    startup: Startup,
    /// The main runtime, while this connection is served on the startup runtime: it moves
    /// there once it authenticates.
    handover: Option<Handle>,
    /// [`INBOUND_BUDGET`] of this connection.
    inbound: Arc<Semaphore>,
    /// Plain TCP: file payloads go by sendfile.
    sendfile: bool,
    /// Bytes the writer has handed to the transport. The client's progress where there is no
    /// socket to ask what it acknowledged ([`Conn::client_progress`]).
    sent: Arc<AtomicU64>,
    /// When the client must have authenticated: `--auth-timeout` after the connection was
    /// accepted, TLS handshake included.
    auth_deadline: Instant,
    /// Cancelled when the connection ends: stops every stream.
    done: CancellationToken,
    /// The server's shutdown.
    shutdown: CancellationToken,
    /// A frame of the read loop's found no room in the writer's queue within the idle timeout
    /// (or before shutdown): the client does not read, and the connection is given up.
    stalled: AtomicBool,
}

/// Serves one accepted connection. `handover` is the main runtime when this runs on the startup
/// runtime (a source that never authenticated): once AUTH succeeds the connection moves there.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    server: Arc<Server>,
    shutdown: CancellationToken,
    startup: Startup,
    handover: Option<Handle>,
) {
    let span = tracing::info_span!("conn", %peer);
    async move {
        tracing::debug!("connected");
        let auth_deadline = Instant::now() + server.config.auth_timeout;
        let t = transport::establish(stream, &server, startup.evicted(), auth_deadline).await;
        if let Some(t) = t {
            let mut conn = Conn::new(t.subject, peer, server, startup, handover, &shutdown);
            conn.socket = t.socket;
            conn.auth_deadline = auth_deadline;
            speak(conn, t.rd, t.wr, t.tcp, shutdown).await;
        }
    }
    .instrument(span)
    .await
}

/// Speaks the protocol over an established transport until either side ends it. Public so that
/// fuzzers and tests can drive a connection over an in-memory pipe.
#[doc(hidden)]
pub async fn run(
    rd: impl AsyncRead + Send + Unpin + 'static,
    wr: WriteSide,
    subject: Option<String>,
    peer: SocketAddr,
    server: Arc<Server>,
    shutdown: CancellationToken,
) {
    let trusted = server.auth_limiter.is_trusted(peer.ip());
    let Some(startup) = server.startups.admit(peer.ip(), trusted) else {
        return;
    };
    let conn = Conn::new(subject, peer, server, startup, None, &shutdown);
    speak(conn, ReadSide::Stream(Box::new(rd)), wr, None, shutdown).await
}

/// The writer task of a connection; it hands its write side back when every sender is gone.
type Writer = JoinHandle<(WriteSide, std::io::Result<()>)>;

fn spawn_writer(
    mut wr: WriteSide,
    rx: mpsc::Receiver<Outgoing>,
    server: &Server,
    sent: Arc<AtomicU64>,
) -> Writer {
    let stats = server.stats.clone();
    let limit = server.config.bwlimit.clone();
    tokio::spawn(async move {
        let r = writer::run(&mut wr, rx, stats, limit, sent).await;
        (wr, r)
    })
}

/// Runs `conn` over `rd`/`wr`: on the startup runtime until AUTH succeeds, then (or from the
/// start) where the authenticated connections are served. `tcp` is the socket under `rd` on
/// plain TCP (for the frame reader's wakeups).
async fn speak(
    mut conn: Conn,
    rd: ReadSide,
    wr: WriteSide,
    tcp: Option<RawFd>,
    shutdown: CancellationToken,
) {
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    conn.tx = tx;
    conn.sendfile = tcp.is_some();
    let writer = spawn_writer(wr, rx, &conn.server, conn.sent.clone());
    // Until Auth succeeds only small frames, so an unauthenticated peer cannot make the server
    // buffer anything big.
    let mut codec = FrameCodec::new(PRE_AUTH_PAYLOAD);
    codec.set_max_control(PRE_AUTH_PAYLOAD);
    let mut frames = FrameReader::new(rd, codec, tcp);
    let reason = conn.read_loop(&mut frames, &shutdown).await;
    let Some(main) = conn.handover.take().filter(|_| reason == HANDED_OVER) else {
        return finish(conn, writer, reason, &shutdown).await;
    };
    // Authenticated: let the writer drain what it was given (the AUTH reply), take both halves
    // back and go on with the authenticated connections. Nothing else runs on this connection
    // yet: no stream was opened before AUTH.
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    drop(std::mem::replace(&mut conn.tx, tx));
    let wr = match writer.await {
        Ok((wr, Ok(()))) => wr,
        _ => return,
    };
    let (rd, codec, buffered) = frames.into_parts();
    let span = tracing::Span::current();
    let moved = main.spawn(
        async move {
            let (rd, wr) = match transport::rebind(rd, wr) {
                Ok(halves) => halves,
                Err(e) => {
                    tracing::warn!(error = %e, "connection lost while moving to the main runtime");
                    return;
                }
            };
            conn.server
                .stats
                .connections_handed_over
                .fetch_add(1, Ordering::Relaxed);
            let writer = spawn_writer(wr, rx, &conn.server, conn.sent.clone());
            let mut frames = FrameReader::with_buffer(rd, codec, tcp, buffered)
                .with_pool(conn.server.payloads.clone());
            let reason = conn.read_loop(&mut frames, &shutdown).await;
            finish(conn, writer, reason, &shutdown).await
        }
        .instrument(span),
    );
    let _ = moved.await;
}

/// After the reader stopped: lets streams finish (on shutdown, within the grace period), ends
/// them, and flushes and closes the write side.
async fn finish(
    mut conn: Conn,
    writer: Writer,
    reason: &'static str,
    shutdown: &CancellationToken,
) {
    tracing::debug!(reason, "closing");
    let server = conn.server.clone();
    if shutdown.is_cancelled() {
        // Let in-flight streams finish within the grace period, then cut them.
        let deadline = Instant::now() + server.config.shutdown_grace;
        while !conn.streams.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    conn.done.cancel();
    let session = conn.session.take();
    drop(conn);
    // The last reference to an open upload syncs it on drop: keep that off the reactor.
    tokio::task::spawn_blocking(move || drop(session));
    // A client that took nothing for the idle timeout will not take the rest either; on
    // shutdown the streams had the grace period already.
    let flush = match reason {
        IDLE | STALLED | SHUTDOWN => Duration::from_secs(1),
        _ => Duration::from_secs(10),
    };
    let mut writer = writer;
    let ended = tokio::time::timeout(flush, async {
        let (mut wr, r) = (&mut writer).await.map_err(std::io::Error::other)?;
        r?;
        wr.shutdown().await
    })
    .await;
    if ended.is_err() {
        // The writer is stuck on a client that does not read: closing its socket frees it,
        // and dropping its queue gives back the budgets that queued replies hold.
        writer.abort();
    }
    match ended {
        Ok(Err(e)) if !is_disconnect(&e) => tracing::warn!(error = %e, "write failed"),
        Ok(Err(e)) => tracing::debug!(error = %e, "peer went away"),
        _ => {}
    }
}

/// A peer hanging up is normal: log it at debug, not as an error.
fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    )
}

impl Conn {
    fn new(
        subject: Option<String>,
        peer: SocketAddr,
        server: Arc<Server>,
        startup: Startup,
        handover: Option<Handle>,
        shutdown: &CancellationToken,
    ) -> Conn {
        Conn {
            shutdown: shutdown.clone(),
            stalled: AtomicBool::new(false),
            base_chunk_size: server.config.chunk_size,
            client_max_frame: MAX_CHUNK_SIZE,
            compress_level: 0,
            socket: None,
            background: false,
            background_started: false,
            peer,
            // Replaced by the writer's channel once it runs.
            tx: mpsc::channel(1).0,
            streams: Arc::default(),
            pending_writes: HashMap::new(),
            discard_data: Default::default(),
            session: None,
            subject,
            auth_failures: 0,
            startup,
            handover,
            inbound: Arc::new(Semaphore::new(
                INBOUND_BUDGET.max(server.config.max_frame) as usize
            )),
            sent: Arc::default(),
            auth_deadline: Instant::now() + server.config.auth_timeout,
            sendfile: false,
            done: CancellationToken::new(),
            server,
        }
    }

    async fn read_loop(
        &mut self,
        frames: &mut FrameReader<ReadSide>,
        shutdown: &CancellationToken,
    ) -> &'static str {
        let server = self.server.clone();
        let cfg = &server.config;
        // Idle is measured by the client's progress, not by what it left open: a request
        // waiting for the client (its DATA frame, room in the reply budget, the client reading
        // its socket) does not keep the connection; work fsd itself is doing for it (a long
        // manifest, a commit) does. Progress is a frame from the client, reply bytes it
        // acknowledged, or such work, seen at one of the checks every quarter of the timeout:
        // a silent connection is closed between 1 and 1.25 idle timeouts after its last
        // progress. (Before stop 30 the check came once per timeout: up to twice the timeout.)
        let mut progress_seen = self.client_progress();
        let mut last_progress = Instant::now();
        // A connection handed over from the startup runtime arrives authenticated.
        let mut deadline = if self.session.is_some() {
            last_progress + cfg.idle_timeout
        } else {
            self.auth_deadline
        };
        let evicted = self.startup.evicted().clone();
        // Idle uploads give their descriptors back (transfer::Handles::expire_idle), and the
        // client's progress is looked at.
        let mut sweep = tokio::time::interval(
            (cfg.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
        );
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The inbound budget taken for the DATA frame being read, before its payload is.
        let mut admitted: Option<Received> = None;
        loop {
            if self.stalled.load(Ordering::Relaxed) {
                return STALLED;
            }
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.send_error(Cmd::PING, 0, ErrorCode::ShuttingDown, "server shutting down").await;
                    return SHUTDOWN;
                }
                // Only ever cancelled before Auth: an authenticated connection has left the queue.
                _ = evicted.cancelled(), if self.session.is_none() => {
                    self.send_error(Cmd::AUTH, 0, ErrorCode::LimitExceeded,
                        "too many unauthenticated connections: authenticate promptly").await;
                    return "evicted before auth";
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if self.session.is_none() {
                        self.send_error(Cmd::AUTH, 0, ErrorCode::Timeout, "authentication timed out").await;
                        return "auth timeout";
                    }
                    if self.progressed(&mut progress_seen, admitted.is_none(), frames) {
                        last_progress = Instant::now();
                    }
                    deadline = last_progress + cfg.idle_timeout;
                    if deadline <= Instant::now() {
                        // Best effort: the writer may be stuck on a client that does not read.
                        let f = Frame::error(Cmd::PING, 0, &ErrorCode::Timeout.msg("idle timeout"));
                        let _ = self.tx.try_send(Outgoing::Frame(f));
                        return IDLE;
                    }
                    continue;
                }
                _ = sweep.tick(), if self.session.is_some() => {
                    if self.progressed(&mut progress_seen, admitted.is_none(), frames) {
                        last_progress = Instant::now();
                        deadline = last_progress + cfg.idle_timeout;
                    }
                    if let Some(session) = &self.session {
                        let gone = session.handles.lock().unwrap().expire_idle(cfg.idle_timeout);
                        if !gone.is_empty() {
                            tracing::debug!(uploads = gone.len(), "idle upload handles closed");
                            // The last reference to an upload syncs it: off the reactor.
                            tokio::task::spawn_blocking(move || drop(gone));
                        }
                    }
                    continue;
                }
                f = frames.next_admitted(&mut admitted, |h| self.admission(h)) => f,
            };
            let permit = admitted.take();
            match next {
                None => return "eof",
                Some(Err(e)) => {
                    if !matches!(e, CodecError::Io(_)) {
                        tracing::warn!(error = %e, "protocol violation");
                    }
                    if let Some((cmd, sid)) = e.reply_to() {
                        let code = match e {
                            CodecError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                            CodecError::TooLarge { .. } => ErrorCode::LimitExceeded,
                            _ => ErrorCode::BadRequest,
                        };
                        self.send_error(cmd, sid, code, e.to_string()).await;
                    } else if let CodecError::BadMagic(m) = e {
                        if m >> 24 == 0x16 {
                            // A TLS ClientHello: anything we send would only confuse its parser.
                            tracing::warn!("TLS client on a cleartext port");
                            return "tls on plain port";
                        }
                        self.send_error(Cmd::HELLO, 0, ErrorCode::BadRequest, e.to_string())
                            .await;
                    }
                    return "bad frame";
                }
                Some(Ok(Err(bad))) => {
                    self.server
                        .stats
                        .crc_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let sid = bad.header.stream_id;
                    tracing::warn!(stream = sid, "payload checksum mismatch");
                    // The error ends the pending request, if any: it carries its cmd.
                    let mut reply_cmd = bad.header.cmd;
                    let running = self.streams.lock().unwrap().get(&sid).cloned();
                    if let Some(p) = self.pending_writes.remove(&sid) {
                        self.streams.lock().unwrap().remove(&sid);
                        reply_cmd = p.cmd();
                    } else if let Some(t) = running {
                        // A request is running on this stream: it sends the final frame.
                        t.cancel();
                        continue;
                    } else if takes_data(bad.header.cmd) && !bad.header.is_data() {
                        // Its DATA frame follows: drop it quietly, this error ends the stream.
                        if let Some(why) = self.discard_next_data(sid) {
                            return why;
                        }
                    }
                    self.send_error(
                        reply_cmd,
                        sid,
                        ErrorCode::ChecksumMismatch,
                        "payload checksum mismatch",
                    )
                    .await;
                }
                Some(Ok(Ok(frame))) => {
                    if let Some(why) = self.dispatch(frame, frames.codec_mut(), permit).await {
                        return why;
                    }
                    // After Auth, any frame restarts the idle clock (the Auth frame included).
                    if self.session.is_some() {
                        last_progress = Instant::now();
                        deadline = last_progress + cfg.idle_timeout;
                    }
                }
            }
        }
    }

    /// How far the client got taking its replies: the bytes it acknowledged (TCP_INFO), or,
    /// without a socket, the bytes handed to the transport. Bytes that only filled this side's
    /// send buffer are not progress: the kernel takes megabytes from a client that reads
    /// nothing (seen: 2.9 MB unsent to a client with a zero window).
    fn client_progress(&self) -> u64 {
        match self.socket.map(crate::net::tcp_info) {
            Some(Ok(info)) => info.tcpi_bytes_acked,
            _ => self.sent.load(Ordering::Relaxed),
        }
    }

    /// Whether the client progressed since `seen` (updated), or fsd is working for it: a job
    /// runs for it, or (`unadmitted`) a DATA frame waits for inbound budget, so fsd is not
    /// reading and the client is not idle.
    fn progressed(&self, seen: &mut u64, unadmitted: bool, frames: &FrameReader<ReadSide>) -> bool {
        let now = self.client_progress();
        let acked = std::mem::replace(seen, now) != now;
        let working = self.session.as_ref().is_some_and(|s| s.working() > 0)
            || (unadmitted && frames.awaiting_data().is_some());
        acked || working
    }

    async fn send_error(&self, cmd: Cmd, sid: u32, code: ErrorCode, message: impl Into<String>) {
        self.send(Frame::error(cmd, sid, &code.msg(message))).await
    }

    /// Queues a frame of the read loop's own (an error reply, a refusal). The loop waits for
    /// room in the writer's queue, so a client that does not read its replies is not read from
    /// either; but not past the idle timeout nor the server's shutdown: then the frame is
    /// dropped and the connection is [`Conn::stalled`], which ends the read loop. Before, the
    /// loop waited for ever, its timers with it: a client that stopped reading kept its
    /// connection, and fsd from exiting on SIGTERM (review E, stop 30).
    async fn send(&self, f: Frame) {
        let give_up = tokio::time::sleep(self.server.config.idle_timeout);
        tokio::select! {
            biased;
            _ = self.tx.send(Outgoing::Frame(f)) => {}
            _ = self.shutdown.cancelled() => self.stalled.store(true, Ordering::Relaxed),
            _ = give_up => self.stalled.store(true, Ordering::Relaxed),
        }
    }

    /// Routes one frame. Returns a reason when the connection must close.
    /// What a DATA frame with header `h` must wait for before its payload is read: its bytes
    /// (a compressed chunk's at its decompressed size) from the connection's, the credential's
    /// and the server's inbound budgets, and the --bwlimit. None before AUTH (frames are tiny).
    fn admission(
        &self,
        h: &crate::protocol::Header,
    ) -> Option<impl std::future::Future<Output = Received> + 'static> {
        let session = self.session.as_ref()?;
        let n = match (h.is_compressed(), self.pending_writes.get(&h.stream_id)) {
            (true, Some(Pending::Write(req))) => transfer::chunk_room(session, req),
            (true, Some(Pending::Put(req))) => {
                u32::try_from(req.size).map_or(MAX_CHUNK_SIZE, |n| n.min(MAX_CHUNK_SIZE))
            }
            _ => 0,
        };
        let n = n
            .max(h.payload_len)
            .min(INBOUND_BUDGET.max(self.server.config.max_frame));
        let budgets = [
            self.inbound.clone(),
            session.account.inbound().clone(),
            self.server.inbound.clone(),
        ];
        let bwlimit = self.server.config.bwlimit.clone();
        let wire = u64::from(h.payload_len);
        Some(async move {
            // Received data counts against the server-wide --bwlimit too (bytes on the wire):
            // waiting here stops reading, so TCP's window slows the sender.
            if let Some(b) = bwlimit {
                b.take(wire).await;
            }
            admit(budgets, n).await
        })
    }

    async fn dispatch(
        &mut self,
        f: Frame,
        codec: &mut FrameCodec,
        admitted: Option<Received>,
    ) -> Option<&'static str> {
        let (cmd, sid) = (f.cmd(), f.stream_id());
        if f.header.is_data() {
            self.server
                .stats
                .bytes_received
                .fetch_add(f.payload.len() as u64, Ordering::Relaxed);
            if self.discard_data.remove(&sid) {
                return None;
            }
            // The payload is held until stored: waiting here for the budget stops reading
            // from the socket, so the client's sending is paced by the disk.
            let held = match (cmd, self.pending_writes.contains_key(&sid), &self.session) {
                // Admitted before its payload was read (FrameReader::next_admitted).
                (Cmd::WRITE | Cmd::PUT | Cmd::TREE_WRITE, true, Some(_)) if admitted.is_some() => {
                    admitted
                }
                // Read whole with its header (small): admitted now.
                (Cmd::WRITE | Cmd::PUT | Cmd::TREE_WRITE, true, Some(session)) => {
                    // A compressed chunk takes its decompressed size once it is stored.
                    let n = match f.header.is_compressed() {
                        true => self.pending_writes.get(&sid).map_or(0, |p| match p {
                            Pending::Write(req) => transfer::chunk_room(session, req),
                            Pending::Put(req) => u32::try_from(req.size)
                                .map_or(MAX_CHUNK_SIZE, |n| n.min(MAX_CHUNK_SIZE)),
                            // Refused if compressed: only its bytes on the wire count.
                            Pending::Tree(_) => 0,
                        }),
                        false => 0,
                    };
                    let n = n
                        .max(u32::try_from(f.payload.len()).unwrap_or(u32::MAX))
                        .min(INBOUND_BUDGET.max(self.server.config.max_frame));
                    // Received data counts against the server-wide --bwlimit too (bytes on
                    // the wire): waiting here stops reading, so TCP's window slows the sender.
                    if let Some(b) = &self.server.config.bwlimit {
                        b.take(f.payload.len() as u64).await;
                    }
                    let budgets = [
                        self.inbound.clone(),
                        session.account.inbound().clone(),
                        self.server.inbound.clone(),
                    ];
                    Some(admit(budgets, n).await)
                }
                _ => None,
            };
            match (cmd, self.pending_writes.remove(&sid), &self.session, held) {
                (Cmd::WRITE, Some(Pending::Write(req)), Some(session), Some(held)) => {
                    let st = self.stream_tx(sid, cmd);
                    let session = session.clone();
                    let span = tracing::debug_span!("stream", id = sid, %cmd);
                    let begun = transfer::begin_write(&session, &req);
                    tokio::spawn(
                        transfer::write(session, req, f, st, begun, held).instrument(span),
                    );
                }
                (Cmd::PUT, Some(Pending::Put(req)), Some(session), Some(held)) => {
                    let st = self.stream_tx(sid, cmd);
                    let session = session.clone();
                    let span = tracing::debug_span!("stream", id = sid, %cmd);
                    tokio::spawn(transfer::put(session, req, f, st, held).instrument(span));
                }
                (Cmd::TREE_WRITE, Some(Pending::Tree(req)), Some(session), Some(held)) => {
                    let st = self.stream_tx(sid, cmd);
                    let session = session.clone();
                    let span = tracing::debug_span!("stream", id = sid, %cmd);
                    tokio::spawn(tree::write(session, req, f, st, held).instrument(span));
                }
                (_, pending, _, _) => {
                    // The error ends the pending request, if any: it carries that request's cmd.
                    let reply_cmd = pending.as_ref().map_or(cmd, Pending::cmd);
                    if pending.is_some() {
                        self.streams.lock().unwrap().remove(&sid);
                    }
                    self.send_error(
                        reply_cmd,
                        sid,
                        ErrorCode::BadStream,
                        "DATA frame without a pending WRITE or PUT on this stream",
                    )
                    .await
                }
            }
            return None;
        }
        // Requests handled here are timed here; the others time themselves in their tasks.
        let _timer = matches!(cmd, Cmd::HELLO | Cmd::AUTH | Cmd::PING | Cmd::CANCEL)
            .then(|| self.server.metrics.request(cmd));
        match cmd {
            Cmd::HELLO if self.session.is_some() => {
                self.send_error(
                    cmd,
                    sid,
                    ErrorCode::BadRequest,
                    "Hello must come before Auth",
                )
                .await
            }
            Cmd::HELLO => self.hello(f).await,
            Cmd::AUTH if self.session.is_some() => {
                // Switching credentials mid-connection would strand the old session's handles
                // and transfers: one credential per connection.
                self.send_error(
                    cmd,
                    sid,
                    ErrorCode::BadRequest,
                    "already authenticated (one credential per connection)",
                )
                .await
            }
            Cmd::AUTH => {
                let close = self.auth(f).await;
                if self.session.is_some() {
                    self.startup.authenticated();
                    codec.set_max_control(crate::protocol::MAX_CONTROL_PAYLOAD);
                    codec.set_max_data(self.server.config.max_frame);
                    if self.handover.is_some() {
                        return Some(HANDED_OVER);
                    }
                }
                return close;
            }
            Cmd::PING => match f.decode::<msg::Ping>() {
                Ok(p) => {
                    self.send(Frame::message(Cmd::PING, sid, flags::END, &p))
                        .await
                }
                Err(e) => {
                    self.send_error(cmd, sid, ErrorCode::BadRequest, e.to_string())
                        .await
                }
            },
            Cmd::CANCEL => {
                if let Some(p) = self.pending_writes.remove(&sid) {
                    self.streams.lock().unwrap().remove(&sid);
                    self.send_error(p.cmd(), sid, ErrorCode::Cancelled, "cancelled")
                        .await;
                    // Its DATA frame may be on the way already: dropped unanswered, as a
                    // refused WRITE's is, so that the stream gets one final frame only.
                    return self.discard_next_data(sid);
                } else if let Some(t) = self.streams.lock().unwrap().get(&sid) {
                    t.cancel();
                }
            }
            _ if cmd.name().is_none()
                || (!self.server.config.tree
                    && matches!(cmd, Cmd::TREE_READ | Cmd::TREE_WRITE)) =>
            {
                tracing::warn!(%cmd, "unknown command");
                self.send_error(
                    cmd,
                    sid,
                    ErrorCode::UnknownCommand,
                    format!("unknown command {cmd}"),
                )
                .await
            }
            _ => {
                // A WRITE or PUT refused here leaves nothing pending: its DATA frame, which
                // follows, is dropped unanswered, so that the refusal is the stream's one final
                // frame.
                let refused_write = takes_data(cmd);
                let Some(session) = self.session.clone() else {
                    self.send_error(cmd, sid, ErrorCode::NotAuthenticated, "authenticate first")
                        .await;
                    return if refused_write {
                        self.discard_next_data(sid)
                    } else {
                        None
                    };
                };
                if let Err(e) = self.open_stream(sid) {
                    // Never answer on a stream that is in use: that would corrupt it.
                    if e.code != ErrorCode::BadStream || sid == 0 {
                        self.send_error(cmd, sid, e.code, e.message).await;
                    } else {
                        tracing::warn!(stream = sid, "request on a stream in use; closing");
                        return Some("stream reuse");
                    }
                    return if refused_write {
                        self.discard_next_data(sid)
                    } else {
                        None
                    };
                }
                // A new request on the stream: a DATA frame still awaited from an earlier
                // refusal will not come.
                self.discard_data.remove(&sid);
                if takes_data(cmd) {
                    let pending = match cmd {
                        Cmd::WRITE => f.decode().map(Pending::Write),
                        Cmd::PUT => f.decode().map(Pending::Put),
                        _ => f.decode().map(Pending::Tree),
                    };
                    match pending {
                        Ok(p) => {
                            self.pending_writes.insert(sid, p);
                        }
                        Err(e) => {
                            self.streams.lock().unwrap().remove(&sid);
                            self.send_error(cmd, sid, ErrorCode::BadRequest, e.to_string())
                                .await;
                            return self.discard_next_data(sid);
                        }
                    }
                    return None;
                }
                let st = self.stream_tx(sid, cmd);
                let span = tracing::debug_span!("stream", id = sid, %cmd);
                tokio::spawn(handle(session, f, st).instrument(span));
            }
        }
        None
    }

    /// Drops the next DATA frame on `sid` unanswered. A peer that keeps leaving such marks
    /// (refused WRITEs whose DATA never comes) is cut off before they cost real memory.
    fn discard_next_data(&mut self, sid: u32) -> Option<&'static str> {
        if self.discard_data.len() >= MAX_DISCARDS && !self.discard_data.contains(&sid) {
            tracing::warn!("too many refused WRITE or PUT requests without their DATA; closing");
            return Some("too many refused writes");
        }
        self.discard_data.insert(sid);
        None
    }

    fn open_stream(&self, sid: u32) -> Result<(), Failure> {
        let mut streams = self.streams.lock().unwrap();
        if sid == 0 || streams.contains_key(&sid) {
            return Err(Failure::new(
                ErrorCode::BadStream,
                format!("stream {sid} is in use or reserved"),
            ));
        }
        if streams.len() >= self.server.config.max_streams {
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!(
                    "more than {} concurrent streams",
                    self.server.config.max_streams
                ),
            ));
        }
        streams.insert(sid, self.done.child_token());
        Ok(())
    }

    fn stream_tx(&self, sid: u32, cmd: Cmd) -> StreamTx {
        let cancel = self
            .streams
            .lock()
            .unwrap()
            .get(&sid)
            .cloned()
            .unwrap_or_else(|| self.done.child_token());
        StreamTx {
            stream_id: sid,
            cmd,
            cancel,
            tx: self.tx.clone(),
            streams: self.streams.clone(),
        }
    }

    async fn hello(&mut self, f: Frame) {
        let h = match f.decode::<msg::Hello>() {
            Ok(h) => h,
            Err(e) => {
                return self
                    .send_error(
                        Cmd::HELLO,
                        f.stream_id(),
                        ErrorCode::BadRequest,
                        e.to_string(),
                    )
                    .await
            }
        };
        if h.version < VERSION as u32 {
            return self
                .send_error(
                    Cmd::HELLO,
                    f.stream_id(),
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "version {} unsupported; this server speaks {VERSION}",
                        h.version
                    ),
                )
                .await;
        }
        if h.max_frame > 0 && h.max_frame < MIN_CHUNK_SIZE {
            return self
                .send_error(
                    Cmd::HELLO,
                    f.stream_id(),
                    ErrorCode::BadRequest,
                    format!(
                        "max_frame {} is below the smallest chunk size {MIN_CHUNK_SIZE}",
                        h.max_frame
                    ),
                )
                .await;
        }
        let cs = h.chunk_size;
        if cs.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            self.base_chunk_size = cs;
        }
        if h.max_frame > 0 {
            self.client_max_frame = h.max_frame;
        }
        // Every chunk must fit in one DATA frame of either side: the base chunk size is at most
        // the largest power of two within both max_frames (a client asking for 1 MiB chunks of
        // a server with a 64 KiB max_frame could otherwise upload nothing).
        let max_frame = self.client_max_frame.min(self.server.config.max_frame);
        let fits = 1u32 << (31 - max_frame.leading_zeros());
        self.base_chunk_size = self.base_chunk_size.min(fits);
        self.compress_level = h
            .compress_level
            .min(self.server.config.max_compress_level)
            .min(crate::compress::MAX_LEVEL);
        self.background = h.background && self.server.config.background && self.socket.is_some();
        let reply = msg::Hello {
            version: VERSION as u32,
            max_frame: self.server.config.max_frame,
            chunk_size: self.base_chunk_size,
            max_streams: self.server.config.max_streams as u32,
            agent: concat!("fsd/", env!("CARGO_PKG_VERSION")).into(),
            compress_level: self.compress_level,
            features: match self.server.config.tree {
                true => crate::protocol::tree::FEATURE_TREE,
                false => 0,
            },
            background: self.background,
        };
        self.send(Frame::message(
            Cmd::HELLO,
            f.stream_id(),
            flags::END,
            &reply,
        ))
        .await;
    }

    /// Runs the background controller (crate::ledbat) on this connection's socket, if the
    /// client asked for it, on the runtime authenticated connections are served on (not the
    /// startup runtime this may still run on). It stops when the connection ends.
    fn start_background(&mut self) {
        let Some(fd) = self
            .socket
            .filter(|_| self.background && !self.background_started)
        else {
            return;
        };
        self.background_started = true;
        let on = self.handover.clone().unwrap_or_else(Handle::current);
        let limit = self.server.config.tuning.max_pacing_rate;
        match crate::ledbat::spawn(fd, limit, self.done.clone(), &on) {
            Ok(()) => tracing::debug!("background connection: pacing what it is sent"),
            Err(e) => tracing::warn!(error = %e, "background connection: cannot pace"),
        }
    }

    async fn auth(&mut self, f: Frame) -> Option<&'static str> {
        let sid = f.stream_id();
        let token = match f.decode::<msg::Auth>() {
            Ok(a) => a.token,
            Err(e) => {
                self.send_error(Cmd::AUTH, sid, ErrorCode::BadRequest, e.to_string())
                    .await;
                return None;
            }
        };
        let creds = &self.server.config.credentials;
        let limiter = &self.server.auth_limiter;
        // Taken before the token is looked at, so every wrong guess is paid for even when the
        // peer hangs up at once.
        let attempt = match limiter.attempt(self.peer.ip()) {
            Ok(a) => a,
            Err(wait) => {
                self.auth_failures += 1;
                tracing::warn!(?wait, "authentication refused: too many failures");
                self.send_error(
                    Cmd::AUTH,
                    sid,
                    ErrorCode::AuthFailed,
                    format!(
                        "too many failed authentications; not checked, try again in {} s",
                        wait.as_secs()
                    ),
                )
                .await;
                return (self.auth_failures >= MAX_AUTH_FAILURES)
                    .then_some("too many auth failures");
            }
        };
        let cred = match (&self.subject, token.is_empty()) {
            (Some(subject), true) => creds.check_subject(subject),
            _ => creds.check(&token),
        }
        .cloned();
        let Some(cred) = cred else {
            self.server
                .stats
                .auth_failures
                .fetch_add(1, Ordering::Relaxed);
            self.auth_failures += 1;
            tracing::warn!(failures = self.auth_failures, "authentication failed");
            self.send_error(
                Cmd::AUTH,
                sid,
                ErrorCode::AuthFailed,
                "authentication failed",
            )
            .await;
            return (self.auth_failures >= MAX_AUTH_FAILURES).then_some("too many auth failures");
        };
        limiter.succeeded(attempt);
        let sub_root = if cred.prefix.is_empty() {
            Ok(None)
        } else {
            self.server.root.sub(&cred.prefix).map(Some)
        };
        let sub_root = match sub_root {
            Ok(r) => r,
            Err(e) => {
                let e = Failure::from(e);
                self.send_error(
                    Cmd::AUTH,
                    sid,
                    e.code,
                    format!("credential prefix unusable: {}", e.message),
                )
                .await;
                return None;
            }
        };
        let account = self.server.accounts.get(&cred.name).cloned();
        let connected = account.as_ref().map(|a| a.connect());
        let (account, connected) = match (account, connected) {
            (Some(a), Some(Ok(held))) => (a, held),
            (_, Some(Err(e))) => {
                tracing::warn!(name = %cred.name, "authenticated, but over its connection quota");
                self.send_error(Cmd::AUTH, sid, e.code, e.message).await;
                return None;
            }
            _ => {
                let e = format!("credential {:?} has no account", cred.name);
                self.send_error(Cmd::AUTH, sid, ErrorCode::Internal, e)
                    .await;
                return None;
            }
        };
        tracing::info!(name = %cred.name, "authenticated");
        self.start_background();
        let ok = msg::AuthOk {
            name: cred.name.clone(),
            writable: cred.writable,
            prefix: cred.prefix.clone(),
        };
        self.session = Some(Arc::new(Session {
            server: self.server.clone(),
            cred,
            peer: self.peer,
            sub_root,
            base_chunk_size: self.base_chunk_size,
            client_max_frame: self.client_max_frame,
            compress_level: self.compress_level,
            handles: Mutex::new(transfer::Handles::default()),
            replies: Arc::new(Semaphore::new(REPLY_BUDGET as usize)),
            account,
            _connected: connected,
            lists: Default::default(),
            working: AtomicUsize::new(0),
            sendfile: self.sendfile,
        }));
        self.send(Frame::message(Cmd::AUTH, sid, flags::END, &ok))
            .await;
        None
    }
}

/// Runs one request to completion and sends its final frame.
async fn handle(session: Arc<Session>, f: Frame, st: StreamTx) {
    let cmd = f.cmd();
    let _timer = session.server.metrics.request(cmd);
    // Only the payload is kept (its own small allocation: protocol::codec), not the frame.
    let payload: Bytes = f.payload;
    // Replies that can be big are built only within the connection's reply budget.
    let held = match cmd {
        Cmd::LIST | Cmd::MANIFEST => Some(
            session
                .reserve_reply(crate::protocol::MAX_CONTROL_PAYLOAD)
                .await,
        ),
        _ => None,
    };
    let result = match cmd {
        Cmd::LIST => files::list(&session, payload).await,
        Cmd::STAT => files::stat(&session, payload).await,
        Cmd::MKDIR => files::mkdir(&session, payload).await,
        Cmd::REMOVE => files::remove(&session, payload).await,
        Cmd::RENAME => files::rename(&session, payload).await,
        Cmd::SYMLINK => files::symlink(&session, payload).await,
        Cmd::OPEN => return transfer::open(&session, payload, st).await,
        Cmd::MANIFEST => transfer::manifest(&session, payload).await,
        Cmd::SEED => super::seed::seed(&session, payload).await,
        Cmd::COMMIT => transfer::commit(&session, payload).await,
        Cmd::CLOSE => transfer::close(&session, payload).await,
        Cmd::READ => return transfer::read(&session, payload, st).await,
        Cmd::TREE_READ => return tree::read(&session, payload, st).await,
        _ => Err(Failure::new(
            ErrorCode::UnknownCommand,
            format!("{cmd} is not a request"),
        )),
    };
    match result {
        Ok(frame_payload) => {
            let f = Frame::new(st.cmd, st.stream_id, flags::END, frame_payload);
            let item = match held {
                Some(h) => Outgoing::Held(f, h),
                None => Outgoing::Frame(f),
            };
            st.finish(item).await
        }
        Err(e) => st.fail(e).await,
    }
}
