//! One multiplexed connection to fsd.
//!
//! A reader task decodes frames and routes each, by stream id, to that stream's channel; a writer
//! task owns the write half and sends the frames queued by every stream; a watchdog task drops the
//! connection when nothing has arrived for the stall timeout while requests are outstanding.
//! Stream ids are handed out from 1 up and reused only after the server ended the stream (END or
//! ERROR seen), so a late frame can never be taken for a reply to a newer request.
//!
//! The transport is any `AsyncRead + AsyncWrite` pair: [`Conn::connect`] opens TCP and, when
//! TLS is configured, runs the TLS handshake over it; everything after that is the same code.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fsd::frame_reader::FrameReader;
use fsd::net::{TokenBucket, Tuning};
use fsd::protocol::{
    chunk_count, chunk_size_for, flags, msg, Cmd, CodecError, Frame, FrameCodec, Header,
    MAX_CHUNK_SIZE, MAX_UPLOADS_PER_CONNECTION, MIN_CHUNK_SIZE, VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::link::{Link, LossSign};
use crate::tls::{self, Tls};
use fsd::compress::Probe;

/// What the reader hands a stream: a frame, or a frame whose payload failed its CRC32 (the
/// header, and so the chunk it carried, is still known).
pub(crate) type Incoming = <FrameCodec as Decoder>::Item;

/// Largest DATA payload this client accepts (announced in Hello), and so the largest chunk it
/// downloads or uploads: 16 MiB, the protocol's largest base chunk size. It bounds what one
/// frame, and every buffer of chunks, may make us allocate; the price is that files beyond
/// 2^20 chunks of 16 MiB (16 TiB) cannot be transferred.
pub const MAX_DATA_FRAME: u32 = MAX_CHUNK_SIZE;
/// What a stream may receive unless told otherwise ([`Stream::expect`]): a reply, an inline
/// file of at most one small chunk, and room for an error.
const DEFAULT_STREAM_FRAMES: u32 = 4;
const DEFAULT_STREAM_BYTES: u64 = 1 << 20;
/// Streams used when the server's Hello does not say (and the most we ever use).
const DEFAULT_MAX_STREAMS: u32 = 64;
/// Frames queued for the writer task before senders wait.
const WRITE_QUEUE: usize = 256;
/// Small payloads are copied into the write buffer; larger ones are written straight from their
/// `Bytes` to avoid a copy.
const INLINE_PAYLOAD: usize = 16 * 1024;

/// Settings of one connection.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Bearer token for Auth; `None` skips Auth (the server will then refuse most commands).
    /// `Some("")` authenticates by the TLS client certificate.
    pub token: Option<String>,
    /// TLS over the TCP connection, or plain TCP.
    pub tls: Option<Tls>,
    /// Drop the connection when no frame arrived for this long while requests were outstanding.
    pub stall_timeout: Duration,
    /// Bytes of DATA requested but not yet written to disk (downloads), or sent but not yet
    /// acknowledged (uploads), per request at most.
    pub window_bytes: u32,
    /// A window shared with other connections (a client's pool), bounding what all of them
    /// have in flight together; `None`: this connection's own window of `window_bytes`.
    pub shared_window: Option<Arc<Semaphore>>,
    /// Whether chunks go compressed (PROTOCOL.md §8.3), in both directions.
    pub compress: Compress,
    /// Socket settings: congestion control, send buffer, pacing cap (`fsd::net`).
    pub tuning: Tuning,
    /// A rate limit shared by the client's connections (`--bwlimit`): DATA payloads sent and
    /// received take their bytes from it.
    pub limit: Option<Arc<TokenBucket>>,
    /// Background connection (`fsd::ledbat`): pace what this side sends to yield to other
    /// traffic, and ask the server in Hello to do the same with what it sends.
    pub background: bool,
}

/// What `-z/--compress` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    Off,
    /// zstd's fastest level, only on a long path slower than compression (crate::link), and
    /// only for data that shrinks (fsd::compress::Probe).
    Auto,
    /// This level (at most what the server allows) on any path, for data that shrinks.
    Level(u32),
}

impl Compress {
    /// The level asked for in Hello.
    fn level(self) -> u32 {
        match self {
            Compress::Off => 0,
            Compress::Auto => fsd::compress::AUTO_LEVEL,
            Compress::Level(n) => n.min(fsd::compress::MAX_LEVEL),
        }
    }
}

impl Default for ConnOptions {
    fn default() -> Self {
        ConnOptions {
            token: None,
            tls: None,
            stall_timeout: Duration::from_secs(30),
            window_bytes: 32 << 20,
            shared_window: None,
            compress: Compress::Off,
            tuning: Tuning::default(),
            limit: None,
            background: false,
        }
    }
}

/// A connection handle. Cloning is cheap; the connection closes when the last clone (and every
/// stream) is gone, or when it fails.
#[derive(Clone)]
pub(crate) struct Conn {
    inner: Arc<Inner>,
    _close: Arc<CloseOnDrop>,
    /// The client pool's slot that holds it (0 outside a pool): `-j auto` retires slots.
    slot: usize,
}

struct CloseOnDrop(CancellationToken);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

struct Inner {
    out: mpsc::Sender<Frame>,
    table: Mutex<Table>,
    /// One permit per stream the server allows; a stream's permit is returned when it ends.
    streams: Arc<Semaphore>,
    /// The server's limit on multi-chunk uploads open at once on this connection.
    uploads: Arc<Semaphore>,
    window: Arc<Semaphore>,
    /// The window is the pool's: never closed by this connection's death.
    window_shared: bool,
    window_total: u32,
    shutdown: CancellationToken,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last frame received on a stream we opened (or of the
    /// first request after idle). Frames on other streams do not count: a server must not keep
    /// the watchdog quiet with junk while the requests we wait for get no answer.
    activity: AtomicU64,
    /// Frames dropped because their stream is not open, for one rate-limited warning.
    junk: Throttle,
    /// Such frames since the last frame on one of our streams.
    junk_since_touch: AtomicU64,
    stall: Duration,
    /// Set once by the Hello exchange.
    server: Mutex<msg::Hello>,
    /// Host we connected to, for error messages.
    host: String,
    compress: Compress,
    /// The TCP path, when the transport is a TCP socket we can ask.
    link: Option<Link>,
    /// See [`ConnOptions::limit`].
    limit: Option<Arc<TokenBucket>>,
}

#[derive(Default)]
struct Table {
    routes: HashMap<u32, Route>,
    next_id: u32,
    dead: Option<Dead>,
}

struct Route {
    tx: mpsc::UnboundedSender<Incoming>,
    _permit: Option<OwnedSemaphorePermit>,
    /// Frames and payload bytes this stream may still receive. Its channel is unbounded (the
    /// reader never waits on one slow stream), so this is what bounds it: a server that sends
    /// more than was asked loses the connection.
    frames_left: u32,
    bytes_left: u64,
}

impl Route {
    fn new(tx: mpsc::UnboundedSender<Incoming>, permit: Option<OwnedSemaphorePermit>) -> Route {
        Route {
            tx,
            _permit: permit,
            frames_left: DEFAULT_STREAM_FRAMES,
            bytes_left: DEFAULT_STREAM_BYTES,
        }
    }
}

#[derive(Clone)]
enum Dead {
    Lost(String),
    Stalled(Duration),
    /// Stalled while the server kept sending frames on streams we never opened: not a network
    /// that went quiet but a server that is not answering, so not worth a retry.
    Junk(Duration),
    /// A TLS error from rustls (e.g. the server's alert refusing our client certificate, which
    /// in TLS 1.3 arrives after the client's side of the handshake has completed).
    Tls(String),
}

impl Dead {
    fn error(&self) -> Error {
        match self {
            Dead::Lost(why) => Error::ConnectionLost(why.clone()),
            Dead::Stalled(d) => Error::Stalled(*d),
            Dead::Junk(d) => Error::Protocol(format!(
                "no answer for {d:?}, only frames on streams that were not open"
            )),
            // Once the connection worked, a TLS failure is like any other lost connection.
            Dead::Tls(why) => Error::ConnectionLost(format!("TLS: {why}")),
        }
    }
}

impl Conn {
    /// This connection as the one in pool slot `slot`.
    pub(crate) fn in_slot(self, slot: usize) -> Conn {
        Conn { slot, ..self }
    }

    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    /// Connects over TCP (then TLS, if configured), exchanges Hello and authenticates. `addr` is
    /// `HOST:PORT`; with TLS the server's certificate must be valid for HOST.
    pub async fn connect(addr: &str, opts: &ConnOptions) -> Result<Conn> {
        let connect = fsd::net::connect(addr, &opts.tuning);
        let tcp = match tokio::time::timeout(opts.stall_timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )),
        }
        .map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })?;
        // Frames are batched by the writer task; never let Nagle delay a small request.
        let _ = tcp.set_nodelay(true);
        let host = tls::host_of(addr);
        let fd = tcp.as_raw_fd();
        let Some(tls) = &opts.tls else {
            let (r, w) = tcp.into_split();
            return Conn::handshake(r, w, opts, host, Some(fd), Some(fd)).await;
        };
        let name = tls::server_name(addr)?;
        let handshake = tls.connector().connect(name, tcp);
        let stream = match tokio::time::timeout(opts.stall_timeout, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(tls::handshake_error(host, &e)),
            Err(_) => return Err(Error::Stalled(opts.stall_timeout)),
        };
        let (r, w) = tokio::io::split(stream);
        // The TLS stream owns the socket: its fd is valid for as long as the connection.
        Conn::handshake(r, w, opts, host, None, Some(fd)).await
    }

    /// Starts the reader, writer and watchdog tasks over any transport, then Hello and Auth.
    /// `host` names the server in error messages; `tcp` is the socket when the transport is
    /// plain TCP (the reader tunes its wakeups through it); `socket` is the TCP socket under any
    /// transport (for TCP_INFO).
    async fn handshake<R, W>(
        r: R,
        w: W,
        opts: &ConnOptions,
        host: &str,
        tcp: Option<RawFd>,
        socket: Option<RawFd>,
    ) -> Result<Conn>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, out_rx) = mpsc::channel(WRITE_QUEUE);
        let window_total = opts.window_bytes.max(1);
        let inner = Arc::new(Inner {
            out,
            table: Mutex::new(Table {
                next_id: 1,
                ..Table::default()
            }),
            streams: Arc::new(Semaphore::new(0)),
            uploads: Arc::new(Semaphore::new(MAX_UPLOADS_PER_CONNECTION)),
            window: opts
                .shared_window
                .clone()
                .unwrap_or_else(|| Arc::new(Semaphore::new(window_total as usize))),
            window_shared: opts.shared_window.is_some(),
            window_total,
            shutdown: CancellationToken::new(),
            epoch: Instant::now(),
            activity: AtomicU64::new(0),
            stall: opts.stall_timeout,
            junk: Throttle::new(JUNK_REPORT_EVERY),
            junk_since_touch: AtomicU64::new(0),
            server: Mutex::new(msg::Hello::default()),
            host: host.to_string(),
            compress: opts.compress,
            link: socket.map(Link::new),
            limit: opts.limit.clone(),
        });
        tokio::spawn(reader(inner.clone(), r, tcp));
        tokio::spawn(writer(inner.clone(), w, out_rx));
        tokio::spawn(watchdog(inner.clone()));
        if let Some(fd) = socket.filter(|_| opts.background) {
            // What this side sends (uploads): the controller stops when the connection does.
            let limit = opts.tuning.max_pacing_rate;
            let on = tokio::runtime::Handle::current();
            if let Err(e) = fsd::ledbat::spawn(fd, limit, inner.shutdown.clone(), &on) {
                warn!(error = %e, "--background: cannot pace this connection");
            }
        }
        let conn = Conn {
            _close: Arc::new(CloseOnDrop(inner.shutdown.clone())),
            inner,
            slot: 0,
        };
        // The handshake must not hang on a silent peer either.
        match tokio::time::timeout(opts.stall_timeout, conn.hello_and_auth(opts)).await {
            Ok(Ok(())) => {}
            // The server refused the TLS session after our side of the handshake (in TLS 1.3
            // a refused client certificate shows up here): not a connection to retry.
            Ok(Err(e @ Error::ConnectionLost(_))) => match &conn.table().dead {
                Some(Dead::Tls(why)) => {
                    return Err(Error::Tls {
                        host: conn.inner.host.clone(),
                        reason: why.clone(),
                    })
                }
                _ => return Err(e),
            },
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Stalled(opts.stall_timeout)),
        }
        Ok(conn)
    }

    async fn hello_and_auth(&self, opts: &ConnOptions) -> Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.table().routes.insert(0, Route::new(tx, None));
        let mut s = Stream {
            conn: self.clone(),
            id: 0,
            rx,
            state: StreamState::Open,
        };
        let hello = msg::Hello {
            version: VERSION as u32,
            max_frame: MAX_DATA_FRAME,
            chunk_size: 0,
            max_streams: 0,
            agent: concat!("fsc/", env!("CARGO_PKG_VERSION")).to_string(),
            compress_level: opts.compress.level(),
            features: fsd::protocol::tree::FEATURE_TREE,
            background: opts.background,
        };
        s.send_msg(Cmd::HELLO, flags::END, &hello).await?;
        let server: msg::Hello = s.reply(Cmd::HELLO).await?;
        if server.version != VERSION as u32 {
            return Err(Error::Protocol(format!(
                "server speaks protocol version {}",
                server.version
            )));
        }
        let max_streams = match server.max_streams {
            0 => DEFAULT_MAX_STREAMS,
            n => n.min(DEFAULT_MAX_STREAMS),
        };
        debug!(?server, "hello");
        let mut server = server;
        // Never more than we asked for: a level we did not ask for would be a level we cannot
        // be held to.
        server.compress_level = server.compress_level.min(opts.compress.level());
        if opts.background && !server.background {
            // An older server ignores the field: what it sends goes at normal priority. Said
            // once per process, not per connection.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                warn!(
                    "--background: {} does not pace what it sends (an older fsd): downloads \
                     run at normal priority, uploads in the background",
                    self.inner.host
                )
            });
        }
        *self.inner.server.lock().unwrap() = server;
        self.inner.streams.add_permits(max_streams as usize);
        if let Some(token) = &opts.token {
            let ok: msg::AuthOk = self
                .request(
                    Cmd::AUTH,
                    &msg::Auth {
                        token: token.clone(),
                    },
                )
                .await?;
            debug!(name = %ok.name, writable = ok.writable, "authenticated");
        }
        Ok(())
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap()
    }

    /// Waits for one of the server's multi-chunk upload slots on this connection if an upload
    /// of `size` bytes needs one (more would be refused with LimitExceeded). Hold it until the
    /// upload's handle is closed.
    pub async fn upload_slot(&self, size: u64) -> Result<Option<OwnedSemaphorePermit>> {
        if self.is_single_chunk(size) {
            return Ok(None);
        }
        match self.inner.uploads.clone().acquire_owned().await {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(self.dead_error()),
        }
    }

    /// Whether a file of `size` bytes is at most one chunk on this server (§8.1 of
    /// docs/PROTOCOL.md, from the base chunk size in its Hello).
    pub fn is_single_chunk(&self, size: u64) -> bool {
        // The protocol's range of base chunk sizes, whatever the Hello said: a server claiming
        // 2^31 must not turn a 1 GiB file into one PUT held in memory.
        let base = self.inner.server.lock().unwrap().chunk_size;
        let base = base.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
        chunk_count(size, chunk_size_for(size, base)) <= 1
    }

    /// Largest DATA payload the server accepts.
    /// Whether COMPRESSED frames may travel on this connection (agreed in Hello).
    pub fn accepts_compressed(&self) -> bool {
        self.inner.server.lock().unwrap().compress_level > 0
    }

    /// The zstd level to ask for (READ, OPEN) or to compress at (WRITE, PUT) now; 0: none.
    /// `auto` asks for it only while the path is long and slower than compression.
    pub fn compress_level(&self) -> u32 {
        let agreed = self.inner.server.lock().unwrap().compress_level;
        match self.inner.compress {
            Compress::Auto if !self.inner.link.as_ref().is_some_and(Link::is_slow) => 0,
            _ => agreed,
        }
    }

    /// Whether the server speaks TREE_READ and TREE_WRITE (Hello `features`, PROTOCOL.md §12).
    pub fn has_tree(&self) -> bool {
        let features = self.inner.server.lock().unwrap().features;
        features & fsd::protocol::tree::FEATURE_TREE != 0
    }

    pub fn server_max_frame(&self) -> u32 {
        self.inner.server.lock().unwrap().max_frame
    }

    /// False once the connection failed or was dropped; a dead connection is replaced.
    pub fn is_alive(&self) -> bool {
        !self.inner.shutdown.is_cancelled()
    }

    /// Opens a new stream, waiting while the server's stream limit is reached.
    pub async fn open(&self) -> Result<Stream> {
        let permit = match self.inner.streams.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Err(self.dead_error()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut t = self.table();
        if let Some(d) = &t.dead {
            return Err(d.error());
        }
        if t.routes.is_empty() {
            // The stall clock starts with the first outstanding request, not at the last frame.
            self.inner.touch();
        }
        let id = loop {
            let id = t.next_id;
            t.next_id = t.next_id.checked_add(1).unwrap_or(1);
            if !t.routes.contains_key(&id) {
                break id;
            }
        };
        t.routes.insert(id, Route::new(tx, Some(permit)));
        Ok(Stream {
            conn: self.clone(),
            id,
            rx,
            state: StreamState::Unsent,
        })
    }

    /// Sends `req` on a new stream and returns the decoded reply.
    pub async fn request<Q, R>(&self, cmd: Cmd, req: &Q) -> Result<R>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let mut s = self.open().await?;
        s.send_msg(cmd, flags::END, req).await?;
        s.reply(cmd).await
    }

    /// Sends `req` without waiting for the reply (e.g. Close); the stream id is freed when the
    /// server ends the stream.
    pub async fn send_detached<Q: prost::Message>(&self, cmd: Cmd, req: &Q) -> Result<()> {
        let mut s = self.open().await?;
        s.send_msg(cmd, flags::END, req).await?;
        s.state = StreamState::Detached;
        Ok(())
    }

    /// The path's minimum RTT, from TCP_INFO (None: not a TCP socket we can ask).
    pub fn min_rtt(&self) -> Option<Duration> {
        self.inner.link.as_ref()?.min_rtt()
    }

    /// Reads this connection's [`LossSign`] for as long as the connection lives, without
    /// keeping it open: `-j auto` watches the first connection of a run with it.
    pub fn loss_probe(&self) -> impl FnMut() -> Option<LossSign> + Send + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || {
            let inner = inner.upgrade()?;
            // A connection shut down may have closed its socket (its fd number could name
            // another one by now).
            if inner.shutdown.is_cancelled() {
                return None;
            }
            inner.link.as_ref()?.loss_sign()
        }
    }

    /// Reserves `bytes` of this connection's window (capped at the whole window, so one huge
    /// chunk cannot wait forever).
    pub async fn window(&self, bytes: u64) -> Result<Window> {
        let n = bytes.min(self.inner.window_total as u64) as u32;
        match self.inner.window.clone().acquire_many_owned(n).await {
            Ok(p) => {
                p.forget();
                Ok(Window {
                    sem: self.inner.window.clone(),
                    held: n,
                })
            }
            Err(_) => Err(self.dead_error()),
        }
    }

    /// This connection's whole window, in bytes.
    pub fn window_total(&self) -> u32 {
        self.inner.window_total
    }

    fn dead_error(&self) -> Error {
        match &self.table().dead {
            Some(d) => d.error(),
            None => Error::ConnectionLost("connection closed".into()),
        }
    }
}

impl Inner {
    /// Waits until the rate limit lets `bytes` more of DATA go, if there is one. The wait is
    /// ours, not a stalled server's: it keeps the watchdog quiet. False if the connection
    /// closed meanwhile.
    async fn pace(&self, bytes: usize) -> bool {
        let Some(limit) = &self.limit else {
            return true;
        };
        let at = limit.reserve(bytes as u64);
        let tick = (self.stall / 4).max(Duration::from_millis(50));
        while tokio::time::Instant::now() < at {
            let until = at.min(tokio::time::Instant::now() + tick);
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => {}
            }
            self.touch();
        }
        true
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.activity.store(ms, Ordering::Relaxed);
        self.junk_since_touch.store(0, Ordering::Relaxed);
    }

    /// Marks the connection dead, wakes every stream with the reason and stops the tasks.
    fn kill(&self, why: Dead) {
        let routes = {
            let mut t = self.table.lock().unwrap();
            if t.dead.is_none() {
                match &why {
                    Dead::Lost(m) => debug!("connection closed: {m}"),
                    Dead::Tls(m) => debug!("connection closed: TLS: {m}"),
                    Dead::Stalled(d) => warn!("connection stalled for {d:?}; dropping it"),
                    Dead::Junk(d) => {
                        warn!("no answer for {d:?}, only junk; dropping the connection")
                    }
                }
                t.dead = Some(why);
            }
            std::mem::take(&mut t.routes)
        };
        drop(routes);
        if let Some(n) = self.junk.flush() {
            warn!(host = %self.host, "{n} more frame(s) on streams that were not open; dropped");
        }
        self.streams.close();
        if !self.window_shared {
            self.window.close();
        }
        self.shutdown.cancel();
    }

    fn route(&self, item: Incoming) {
        let h = match &item {
            Ok(f) => f.header,
            Err(bad) => bad.header,
        };
        let mut t = self.table.lock().unwrap();
        let Some(route) = t.routes.get_mut(&h.stream_id) else {
            drop(t);
            self.junk_since_touch.fetch_add(1, Ordering::Relaxed);
            // Not a stream we opened: bytes we did not ask for are dropped, never used, and
            // reported once, then summarized (one line per junk frame flooded stderr).
            if let Some(n) = self.junk.hit() {
                warn!(
                    host = %self.host,
                    stream = h.stream_id,
                    cmd = %h.cmd,
                    "{n} frame(s) on streams that are not open; dropped"
                );
            }
            return;
        };
        let len = u64::from(h.payload_len);
        if route.frames_left == 0 || route.bytes_left < len {
            drop(t);
            self.kill(Dead::Lost(format!(
                "the server sent more than was asked on stream {}",
                h.stream_id
            )));
            return;
        }
        route.frames_left -= 1;
        route.bytes_left -= len;
        self.touch();
        let _ = route.tx.send(item);
        if h.is_end() {
            t.routes.remove(&h.stream_id);
        }
    }
}

/// How often a repeated warning is summarized.
const JUNK_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits a repeated warning: the first occurrence is reported, later ones are counted
/// and reported as one number at most once per period (and once more at the end).
pub(crate) struct Throttle {
    period: Duration,
    st: Mutex<(u64, Option<Instant>)>,
}

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            st: Mutex::new((0, None)),
        }
    }

    /// Counts one occurrence; `Some(n)` when it is time to report the `n` not yet reported.
    pub fn hit(&self) -> Option<u64> {
        let mut st = self.st.lock().unwrap();
        st.0 += 1;
        match st.1 {
            Some(last) if last.elapsed() < self.period => None,
            _ => {
                st.1 = Some(Instant::now());
                Some(std::mem::take(&mut st.0))
            }
        }
    }

    /// The occurrences not yet reported, if any.
    pub fn flush(&self) -> Option<u64> {
        let n = std::mem::take(&mut self.st.lock().unwrap().0);
        (n > 0).then_some(n)
    }
}

/// Reads and routes frames (`tcp`: the socket under `r` when it is plain TCP; see
/// fsd::frame_reader for what it is used for).
async fn reader<R: AsyncRead + Unpin>(inner: Arc<Inner>, r: R, tcp: Option<RawFd>) {
    let mut codec = FrameCodec::new(MAX_DATA_FRAME);
    // Chunks are checked where they are hashed anyway: Sink::put (download.rs), off this task.
    codec.defer_data_checksums();
    let mut frames = FrameReader::new(r, codec, tcp);
    let why = loop {
        let item = tokio::select! {
            biased;
            _ = inner.shutdown.cancelled() => break Dead::Lost("connection closed".into()),
            item = frames.next() => item,
        };
        match item {
            Some(Ok(incoming)) => {
                let data = match &incoming {
                    Ok(f) if f.header.is_data() => f.payload.len(),
                    _ => 0,
                };
                // Held until the limit has paid for it; meanwhile not reading on stops the
                // sender through TCP's window.
                if data > 0 && !inner.pace(data).await {
                    break Dead::Lost("connection closed".into());
                }
                inner.route(incoming);
            }
            Some(Err(CodecError::Io(e))) if tls::rustls_error(&e).is_some() => {
                break Dead::Tls(tls::rustls_error(&e).map(tls::explain).unwrap_or_default())
            }
            Some(Err(e)) => break Dead::Lost(e.to_string()),
            None => break Dead::Lost("closed by the server".into()),
        }
    };
    inner.kill(why);
}

async fn writer<W: AsyncWrite + Unpin>(inner: Arc<Inner>, mut w: W, mut rx: mpsc::Receiver<Frame>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let result: std::io::Result<()> = async {
        loop {
            let frame = tokio::select! {
                biased;
                _ = inner.shutdown.cancelled() => return Ok(()),
                f = rx.recv() => match f { Some(f) => f, None => return Ok(()) },
            };
            put(&inner, &mut w, &mut buf, frame).await?;
            // Batch whatever else is queued into the same writes.
            while let Ok(f) = rx.try_recv() {
                put(&inner, &mut w, &mut buf, f).await?;
            }
            if !buf.is_empty() {
                w.write_all_buf(&mut buf).await?;
            }
            w.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        inner.kill(Dead::Lost(format!("write: {e}")));
    }
    let _ = w.shutdown().await;
}

async fn put<W: AsyncWrite + Unpin>(
    inner: &Inner,
    w: &mut W,
    buf: &mut BytesMut,
    f: Frame,
) -> std::io::Result<()> {
    if f.header.is_data() && inner.limit.is_some() {
        // Frames batched so far (requests, CANCELs) go now, not after the wait.
        if !buf.is_empty() {
            w.write_all_buf(buf).await?;
            w.flush().await?;
        }
        if !inner.pace(f.payload.len()).await {
            return Ok(());
        }
    }
    f.header.encode(buf);
    if f.payload.len() <= INLINE_PAYLOAD {
        buf.extend_from_slice(&f.payload);
    } else {
        w.write_all_buf(buf).await?;
        w.write_all(&f.payload).await?;
    }
    Ok(())
}

async fn watchdog(inner: Arc<Inner>) {
    let tick = (inner.stall / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let busy = !inner.table.lock().unwrap().routes.is_empty();
        let idle =
            inner.epoch.elapsed().as_millis() as u64 - inner.activity.load(Ordering::Relaxed);
        if busy && idle > inner.stall.as_millis() as u64 {
            let junk = inner.junk_since_touch.load(Ordering::Relaxed) > 0;
            inner.kill(match junk {
                true => Dead::Junk(inner.stall),
                false => Dead::Stalled(inner.stall),
            });
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// Nothing sent: dropping frees the id at once.
    Unsent,
    /// Request sent, END not yet seen: dropping sends CANCEL.
    Open,
    /// The server ended the stream.
    Ended,
    /// Fire and forget: the reader frees the id when the reply arrives.
    Detached,
}

/// One request/response exchange on a connection.
pub(crate) struct Stream {
    conn: Conn,
    id: u32,
    rx: mpsc::UnboundedReceiver<Incoming>,
    state: StreamState,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Allows this stream to receive up to `frames` frames of `bytes` payload in all (plus the
    /// default's room for an error reply), e.g. the chunks a READ asked for.
    pub fn expect(&self, frames: u32, bytes: u64) {
        if let Some(r) = self.conn.table().routes.get_mut(&self.id) {
            r.frames_left = frames.saturating_add(1);
            r.bytes_left = bytes.saturating_add(DEFAULT_STREAM_BYTES);
        }
    }

    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        debug_assert_eq!(frame.header.stream_id, self.id);
        if self.state == StreamState::Unsent {
            self.state = StreamState::Open;
        }
        // A server may answer and hang up before we get here (an Error frame, then close; or a
        // connection-level error on stream 0 sent unasked): when a frame is already queued on
        // this stream, let the caller read it rather than lose it to "connection lost".
        let sent = self.conn.inner.out.send(frame).await.is_ok();
        if (!sent || !self.conn.is_alive()) && self.rx.is_empty() {
            return Err(self.conn.dead_error());
        }
        Ok(())
    }

    pub async fn send_msg(&mut self, cmd: Cmd, fl: u8, m: &impl prost::Message) -> Result<()> {
        let f = Frame::message(cmd, self.id(), fl, m);
        self.send(f).await
    }

    /// Sends a DATA frame whose CRC32 is already known (no second pass over the payload).
    pub async fn send_data(&mut self, cmd: Cmd, payload: Bytes, crc: u32) -> Result<()> {
        let header = Header::data(cmd, self.id, payload.len() as u32, crc, true);
        self.send(Frame { header, payload }).await
    }

    /// Sends a chunk as its one DATA frame: compressed at `level` (on a blocking thread) when
    /// the probe picks it and that pays, else as it is. Returns the bytes put on the wire.
    pub async fn send_chunk(
        &mut self,
        cmd: Cmd,
        chunk: Bytes,
        crc: u32,
        level: u32,
        probe: &Arc<Probe>,
    ) -> Result<u64> {
        if level == 0 || !probe.should_try() {
            let n = chunk.len() as u64;
            self.send_data(cmd, chunk, crc).await?;
            return Ok(n);
        }
        let p = probe.clone();
        let c = chunk.clone();
        let packed = tokio::task::spawn_blocking(move || {
            let z = fsd::compress::compress(&c, crc, level);
            p.record(z.is_some());
            z.map(|z| (crc32fast::hash(&z), z))
        })
        .await
        .expect("compressing thread");
        let Some((wire_crc, z)) = packed else {
            let n = chunk.len() as u64;
            self.send_data(cmd, chunk, crc).await?;
            return Ok(n);
        };
        let n = z.len() as u64;
        let len = u32::try_from(z.len()).expect("a compressed chunk is shorter than the chunk");
        let mut header = Header::data(cmd, self.id, len, wire_crc, true);
        header.flags |= flags::COMPRESSED;
        self.send(Frame { header, payload: z }).await?;
        Ok(n)
    }

    /// The next frame on this stream, or the reason the connection died.
    pub async fn recv(&mut self) -> Result<Incoming> {
        if self.state == StreamState::Ended {
            return Err(Error::Protocol(format!("stream {} already ended", self.id)));
        }
        match self.rx.recv().await {
            Some(item) => {
                let h = match &item {
                    Ok(f) => f.header,
                    Err(bad) => bad.header,
                };
                if h.is_end() {
                    self.state = StreamState::Ended;
                }
                Ok(item)
            }
            None => Err(self.conn.dead_error()),
        }
    }

    /// The next frame, with ERROR frames turned into [`Error::Remote`] and a bad checksum into
    /// [`Error::Corrupt`].
    pub async fn recv_frame(&mut self, cmd: Cmd) -> Result<Frame> {
        let f = self.recv().await?.map_err(|_| Error::Corrupt(cmd))?;
        if f.header.is_error() {
            let e: msg::Error = f
                .decode()
                .map_err(|e| Error::Protocol(format!("{cmd} error reply: {e}")))?;
            return Err(Error::from_wire(e));
        }
        if f.cmd() != cmd {
            return Err(Error::Protocol(format!(
                "reply to {cmd} carries cmd {}",
                f.cmd()
            )));
        }
        Ok(f)
    }

    /// A single-frame reply: the next frame must end the stream and decode as `M`.
    pub async fn reply<M: prost::Message + Default>(&mut self, cmd: Cmd) -> Result<M> {
        let f = self.recv_frame(cmd).await?;
        if !f.header.is_end() || f.header.is_data() {
            return Err(Error::Protocol(format!("unexpected frame in {cmd} reply")));
        }
        f.decode()
            .map_err(|e| Error::Protocol(format!("{cmd} reply: {e}")))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        match self.state {
            StreamState::Ended | StreamState::Detached => {}
            StreamState::Unsent => {
                self.conn.table().routes.remove(&self.id);
            }
            StreamState::Open => {
                // Abandoned mid-reply: ask the server to stop. The id stays reserved until the
                // server's END or ERROR arrives.
                let f = Frame::message(Cmd::CANCEL, self.id, flags::END, &msg::Cancel {});
                if let Err(mpsc::error::TrySendError::Full(f)) = self.conn.inner.out.try_send(f) {
                    let out = self.conn.inner.out.clone();
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move { out.send(f).await });
                    }
                }
            }
        }
    }
}

/// Bytes reserved in a connection's window; released as chunks land, the rest on drop.
pub(crate) struct Window {
    sem: Arc<Semaphore>,
    held: u32,
}

impl Window {
    pub fn release(&mut self, bytes: u32) {
        let n = bytes.min(self.held);
        self.held -= n;
        self.sem.add_permits(n as usize);
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.sem.add_permits(self.held as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsd::protocol::ErrorCode;
    use futures::StreamExt;
    use tokio::io::{duplex, DuplexStream};
    use tokio_util::codec::Framed;

    type Peer = Framed<DuplexStream, FrameCodec>;

    /// A client connected to an in-memory fake server that has answered Hello.
    async fn pair(opts: ConnOptions) -> (Conn, Peer) {
        let (a, b) = duplex(1 << 20);
        let mut peer = Framed::new(b, FrameCodec::new(MAX_DATA_FRAME));
        let server = tokio::spawn(async move {
            let f = peer.next().await.unwrap().unwrap().unwrap();
            assert_eq!(f.cmd(), Cmd::HELLO);
            let hello = msg::Hello {
                version: 1,
                max_frame: 16 << 20,
                chunk_size: 1 << 20,
                max_streams: 4,
                agent: "fake".into(),
                compress_level: 0,
                features: 0,
                background: false,
            };
            use futures::SinkExt;
            peer.send(Frame::message(Cmd::HELLO, 0, flags::END, &hello))
                .await
                .unwrap();
            peer
        });
        let (r, w) = tokio::io::split(a);
        let conn = Conn::handshake(r, w, &opts, "fake", None, None)
            .await
            .unwrap();
        (conn, server.await.unwrap())
    }

    async fn next(peer: &mut Peer) -> Frame {
        peer.next().await.unwrap().unwrap().unwrap()
    }

    #[tokio::test]
    async fn requests_are_routed_by_stream_and_errors_decoded() {
        use futures::SinkExt;
        let (conn, mut peer) = pair(ConnOptions::default()).await;
        let c2 = conn.clone();
        let a = tokio::spawn(async move {
            c2.request::<_, msg::StatResponse>(Cmd::STAT, &msg::StatRequest { path: "a".into() })
                .await
        });
        let c3 = conn.clone();
        let b = tokio::spawn(async move {
            c3.request::<_, msg::StatResponse>(Cmd::STAT, &msg::StatRequest { path: "b".into() })
                .await
        });
        let f1 = next(&mut peer).await;
        let f2 = next(&mut peer).await;
        assert_ne!(f1.stream_id(), f2.stream_id());
        assert!(f1.stream_id() >= 1 && f2.stream_id() >= 1);
        // Answer in reverse order: one success, one error.
        for f in [f2, f1] {
            let req: msg::StatRequest = f.decode().unwrap();
            let reply = if req.path == "a" {
                Frame::message(
                    Cmd::STAT,
                    f.stream_id(),
                    flags::END,
                    &msg::StatResponse {
                        entry: Some(msg::Entry {
                            name: "a".into(),
                            ..Default::default()
                        }),
                    },
                )
            } else {
                Frame::error(Cmd::STAT, f.stream_id(), &ErrorCode::NotFound.msg("b"))
            };
            peer.send(reply).await.unwrap();
        }
        let ra = a.await.unwrap().unwrap();
        assert_eq!(ra.entry.unwrap().name, "a");
        let rb = b.await.unwrap().unwrap_err();
        assert_eq!(rb.remote_code(), Some(ErrorCode::NotFound));
        assert_eq!(rb.exit_code(), 2);
    }

    #[tokio::test]
    async fn stream_ids_are_reused_only_after_end() {
        use futures::SinkExt;
        let (conn, mut peer) = pair(ConnOptions::default()).await;
        let mut s1 = conn.open().await.unwrap();
        s1.send_msg(Cmd::PING, flags::END, &msg::Ping { nonce: 1 })
            .await
            .unwrap();
        let id1 = s1.id();
        drop(s1); // abandoned: a CANCEL goes out and the id stays reserved
        let f = next(&mut peer).await;
        assert_eq!(f.cmd(), Cmd::PING);
        let f = next(&mut peer).await;
        assert_eq!((f.cmd(), f.stream_id()), (Cmd::CANCEL, id1));
        let s2 = conn.open().await.unwrap();
        assert_ne!(s2.id(), id1);
        drop(s2); // unsent: freed at once
                  // id1 still holds one of the 4 streams: only 3 more open.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(conn.open().await.unwrap());
        }
        assert!(held.iter().all(|s| s.id() != id1));
        let fourth = tokio::time::timeout(Duration::from_millis(100), conn.open()).await;
        assert!(fourth.is_err(), "a 5th stream must wait");
        // Once the server ends id1, its slot is free again.
        peer.send(Frame::error(
            Cmd::PING,
            id1,
            &ErrorCode::Cancelled.msg("cancelled"),
        ))
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(2), conn.open())
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_reply_that_came_before_the_hangup_is_read_not_lost() {
        // Like fsd on a TLS port answering a cleartext client: an Error frame, then close, all
        // before the request's send() returned.
        use futures::SinkExt;
        let (conn, mut peer) = pair(ConnOptions::default()).await;
        let mut s = conn.open().await.unwrap();
        let msg = ErrorCode::BadRequest.msg("this server requires TLS (use fsc --tls)");
        peer.send(Frame::error(Cmd::PING, s.id(), &msg))
            .await
            .unwrap();
        drop(peer);
        while conn.is_alive() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.send_msg(Cmd::PING, flags::END, &msg::Ping { nonce: 1 })
            .await
            .unwrap();
        let err = s.reply::<msg::Ping>(Cmd::PING).await.unwrap_err();
        assert_eq!(err.remote_code(), Some(ErrorCode::BadRequest), "{err}");
        // A new request on the dead connection fails at once.
        assert!(conn.open().await.is_err());
    }

    #[tokio::test]
    async fn silent_peer_trips_the_watchdog() {
        let opts = ConnOptions {
            stall_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let (conn, _peer) = pair(opts).await;
        let err = conn
            .request::<_, msg::Ping>(Cmd::PING, &msg::Ping { nonce: 7 })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Stalled(_)), "{err}");
        assert!(err.is_retryable());
        assert!(!conn.is_alive());
    }

    #[tokio::test]
    async fn connections_sharing_a_window_share_its_bound() {
        let shared = Arc::new(Semaphore::new(1 << 20));
        let opts = ConnOptions {
            window_bytes: 1 << 20,
            shared_window: Some(shared.clone()),
            ..Default::default()
        };
        let (a, _pa) = pair(opts.clone()).await;
        let (b, pb) = pair(opts).await;
        let wa = a.window(1 << 20).await.unwrap();
        // The other connection has a window of its own size, but the pool's is taken.
        let wait = tokio::time::timeout(Duration::from_millis(100), b.window(1)).await;
        assert!(wait.is_err(), "b must wait for a's bytes");
        drop(wa);
        let wb = tokio::time::timeout(Duration::from_secs(2), b.window(1 << 20)).await;
        let wb = wb.unwrap().unwrap();
        // One connection dying does not close the pool's window.
        drop(pb);
        while b.is_alive() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(wb);
        assert!(a.window(1 << 20).await.is_ok());
    }

    #[tokio::test]
    async fn peer_hangup_fails_outstanding_requests() {
        let (conn, peer) = pair(ConnOptions::default()).await;
        let c = conn.clone();
        let t = tokio::spawn(async move {
            c.request::<_, msg::Ping>(Cmd::PING, &msg::Ping { nonce: 7 })
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(peer);
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::ConnectionLost(_)), "{err}");
    }
}
