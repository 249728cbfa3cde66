//! [`Client`]: a pool of connections to one server, the retry policy, and the small commands
//! (list, stat, mkdir, remove, rename). Transfers live in `download`, `upload` and `tree`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fsd::protocol::{msg, Cmd, ErrorCode};
use serde::Serialize;
use tracing::debug;

use crate::conn::{Compress, Conn, ConnOptions};
use crate::error::{Error, Result};
use crate::grow::{self, Busy, Meter};
use crate::progress::{Event, EventFn};
use crate::tls::{self, Tls};

/// How a [`Client`] connects, retries and reports.
/// Which connections a file may use.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slots {
    /// Every connection of the pool (a big file is split across them).
    All,
    /// Just this one (small files in a tree are spread instead).
    One(usize),
}

/// The last component of a remote path ("" for the root).
/// Server nodes one client may be given (`HOST:PORT,HOST:PORT,...`).
pub const MAX_NODES: usize = 16;

pub(crate) fn remote_basename(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// A pool's connections share a window of this many connections' windows (4 × 32 MiB by
/// default): more connections spread it, they do not add to it.
const POOL_WINDOWS: usize = 4;

/// Most memory [`Client::list`] spends on one listing: names and link targets, plus 128 bytes
/// per entry.
pub const MAX_LIST_BYTES: u64 = 64 << 20;

/// What keeping an entry costs, roughly: its strings and a fixed overhead.
pub(crate) fn entry_cost(e: &Entry) -> u64 {
    let target = e.target.as_ref().map_or(0, String::len);
    (e.name.len() + target) as u64 + 128
}

#[derive(Clone)]
pub struct Options {
    /// Bearer token sent in Auth. Without one, a client that presents a TLS client certificate
    /// sends an empty token: the server's credential bound to that certificate.
    pub token: Option<String>,
    /// Speak TLS 1.3 to the server. An `fss://HOST:PORT` address selects TLS by itself (with
    /// the built-in web roots when this is `None`).
    pub tls: Option<Tls>,
    /// Parallel connections (`-j`): one big file is split across them, many files spread over
    /// them.
    pub connections: usize,
    /// `-j auto`: on a long path the run starts on one connection and adds connections, up
    /// to `connections`, while each addition raises its throughput (`grow.rs`).
    pub grow: bool,
    /// For tests and benchmarks of `grow` on loopback: take the path's RTT to be this rather
    /// than what TCP_INFO measured (fsc: the `FSC_ASSUME_RTT_MS` environment variable).
    #[doc(hidden)]
    pub assume_rtt: Option<Duration>,
    /// Retries after a recoverable failure (connection lost, stall, retryable server error),
    /// with exponential backoff; the count restarts whenever a retry made progress.
    pub retries: u32,
    /// First backoff delay; it doubles up to [`Options::max_backoff`].
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Drop a connection that received nothing for this long while requests were outstanding.
    pub stall_timeout: Duration,
    /// Per-connection window: bytes requested and not yet on disk (downloads) or sent and not
    /// yet acknowledged (uploads).
    pub window_bytes: u32,
    /// Downloads: give created files and directories the server's permission bits exactly
    /// (never setuid, setgid or sticky) instead of those bits less the umask.
    pub preserve: bool,
    /// Compression of chunks on the wire, both directions (`-z/--compress`; default auto).
    pub compress: Compress,
    /// TCP congestion control of every connection, already known to work (see
    /// `fsd::net::choose_congestion`); `None` keeps the system default.
    pub congestion: Option<String>,
    /// Use `congestion` on long paths only (RTT of 1 ms or more): `--congestion auto`.
    pub congestion_long_paths_only: bool,
    /// Limit on the whole run's DATA, sent and received over all connections together, in
    /// bytes per second.
    pub bwlimit: Option<u64>,
    /// Background transfer (`--background`, `fsd::ledbat`): what fsc sends is paced to yield
    /// to other traffic, and each connection asks the server (Hello `background`) to pace
    /// what it sends the same way.
    pub background: bool,
    /// Called with every [`Event`].
    pub on_event: Option<EventFn>,
    /// Change nothing, local or remote: every transfer is a dry run (as with
    /// [`SyncOptions::dry_run`](crate::SyncOptions)), and the entry points that write (a
    /// download into a file, an upload) refuse. The planning code decides what not to do; this
    /// makes sure that no path it gets wrong can write.
    pub dry_run: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: None,
            tls: None,
            connections: 1,
            grow: false,
            assume_rtt: None,
            retries: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            window_bytes: ConnOptions::default().window_bytes,
            preserve: false,
            compress: Compress::Auto,
            congestion: None,
            congestion_long_paths_only: false,
            bwlimit: None,
            background: false,
            on_event: None,
            dry_run: false,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("connections", &self.connections)
            .field("grow", &self.grow)
            .field("retries", &self.retries)
            .field("stall_timeout", &self.stall_timeout)
            .field("window_bytes", &self.window_bytes)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

/// Kind of a remote directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A remote file, directory or link, as listed or stat'ed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Base name (list) or the requested path (stat).
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits.
    pub mode: u32,
    /// Symlinks: the link text (never followed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl From<msg::Entry> for Entry {
    fn from(e: msg::Entry) -> Entry {
        let kind = match msg::Kind::try_from(e.kind) {
            Ok(msg::Kind::File) => Kind::File,
            Ok(msg::Kind::Dir) => Kind::Dir,
            Ok(msg::Kind::Symlink) => Kind::Symlink,
            _ => Kind::Other,
        };
        Entry {
            name: e.name,
            kind,
            size: e.size,
            mtime_ns: e.mtime_ns,
            mode: e.mode & 0o7777,
            target: (kind == Kind::Symlink).then_some(e.target),
        }
    }
}

/// The outcome of one verified file transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Remote path.
    pub path: String,
    /// File size.
    pub bytes: u64,
    /// Payload bytes moved over the network in this run (resumed chunks are not counted).
    pub transferred: u64,
    /// Whole-file BLAKE3, verified end to end.
    pub blake3: [u8; 32],
}

/// A client for one fsd server: a pool of `connections` multiplexed connections, opened on
/// demand and replaced when they fail.
///
/// ```no_run
/// # async fn demo() -> Result<(), fsc::Error> {
/// let opts = fsc::Options { token: Some("secret".into()), ..Default::default() };
/// let client = fsc::Client::connect("127.0.0.1:7070", opts).await?;
/// for e in client.list("").await? {
///     println!("{} {}", e.name, e.size);
/// }
/// let t = client.download("big.iso", std::path::Path::new("big.iso")).await?;
/// println!("{} bytes, {} over the network", t.bytes, t.transferred);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// The servers (several nodes serving one root, or one): `HOST:PORT` each.
    addrs: Vec<String>,
    pub(crate) opts: Options,
    conn_opts: ConnOptions,
    slots: Vec<tokio::sync::Mutex<Option<Conn>>>,
    /// Per slot, how many servers it has moved on from (a failed connect moves it to the next):
    /// slot `i` connects to `addrs[(i + failover[i]) % addrs.len()]`.
    failover: Vec<AtomicUsize>,
    /// Round-robin cursor for work that needs one connection.
    next_slot: AtomicUsize,
    /// With `grow`: how many of `slots` the run uses now.
    pub(crate) meter: Option<Arc<Meter>>,
    /// Set once one piece of work has retried a server's NoSpace until its retries ran out:
    /// the destination is full, and waiting out the same backoff again for every other file
    /// of a tree (thousands of them) would hold the run for hours. Later NoSpace failures are
    /// then final at once; each file is still tried once, since a smaller one may fit.
    server_full: AtomicBool,
}

impl Client {
    /// `sync` as this client runs it: one built for a dry run ([`Options::dry_run`]) makes
    /// every transfer a dry run.
    pub(crate) fn sync_options<'a>(
        &self,
        sync: &'a crate::SyncOptions,
    ) -> std::borrow::Cow<'a, crate::SyncOptions> {
        if self.shared.opts.dry_run && !sync.dry_run {
            let mut s = sync.clone();
            s.dry_run = true;
            return std::borrow::Cow::Owned(s);
        }
        std::borrow::Cow::Borrowed(sync)
    }

    /// Refuses a write on a client built for a dry run ([`Options::dry_run`]).
    pub(crate) fn may_write(&self, what: &str) -> Result<()> {
        if self.shared.opts.dry_run {
            return Err(Error::Usage(format!("{what}: a dry run writes nothing")));
        }
        Ok(())
    }

    /// Connects (with retries) and authenticates the first connection, so that a wrong address
    /// or token fails here; the others open when a transfer first needs them.
    ///
    /// `addr` is `HOST:PORT` (plain TCP, or TLS if [`Options::tls`] is set) or
    /// `fss://HOST:PORT` (TLS). With TLS the server's certificate must be valid for HOST, a DNS
    /// name or an IP address. A TLS handshake failure is not retried ([`Error::Tls`]).
    ///
    /// Several nodes serving one root: `HOST1:PORT,HOST2:PORT,...` (the scheme, if any, on the
    /// first). The pool has at least one connection per node, connection `i` goes to node
    /// `i mod nodes`, and a connection whose node cannot be reached moves to the next node:
    /// a big file's chunks are spread over the nodes, and a transfer survives a node's death.
    pub async fn connect(addr: &str, mut opts: Options) -> Result<Client> {
        let (list, scheme_tls) = tls::strip_scheme(addr);
        let addrs: Vec<&str> = list.split(',').map(str::trim).collect();
        if addrs.len() > MAX_NODES {
            return Err(Error::Usage(format!(
                "{} servers given; at most {MAX_NODES}",
                addrs.len()
            )));
        }
        for addr in &addrs {
            // Not HOST:PORT (e.g. arguments in the wrong order) is a usage error, never retried.
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => {
                    return Err(Error::Usage(format!(
                        "{addr:?} is not a server address: expected HOST:PORT or fss://HOST:PORT \
                         (several nodes: HOST:PORT,HOST:PORT)"
                    )))
                }
            }
        }
        if scheme_tls && opts.tls.is_none() {
            opts.tls = Some(Tls::new(None, None)?);
        }
        if opts.tls.is_some() {
            for addr in &addrs {
                // A bad server name is a usage error, found before any connection.
                tls::server_name(addr)?;
            }
        }
        let token = match (&opts.token, &opts.tls) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(t)) if t.has_client_certificate() => Some(String::new()),
            (None, _) => None,
        };
        let n = opts.connections.max(addrs.len()).max(1);
        // Growing, the run starts on one connection per node; the others join as it grows.
        let start = match opts.grow {
            true => addrs.len().max(1),
            false => n,
        };
        // One window for the whole pool: data in flight is bounded whatever -j is (it was
        // 32 MiB per connection, so -j 8 to a slow disk could hold 256 MiB). Growing, it grows
        // with the connections in use.
        let window_bytes = usize::try_from(opts.window_bytes).unwrap_or(usize::MAX);
        let pool_window = window_bytes.saturating_mul(start.min(POOL_WINDOWS));
        let pool_window = Arc::new(tokio::sync::Semaphore::new(pool_window));
        let conn_opts = ConnOptions {
            token,
            tls: opts.tls.clone(),
            stall_timeout: opts.stall_timeout,
            window_bytes: opts.window_bytes,
            shared_window: Some(pool_window.clone()),
            compress: opts.compress,
            // One socket never needs more than the whole limit: pacing it there in the kernel
            // smooths what the shared bucket grants in bursts.
            tuning: fsd::net::Tuning {
                congestion: opts.congestion.clone(),
                long_paths_only: opts.congestion_long_paths_only,
                max_pacing_rate: opts.bwlimit,
            },
            limit: opts
                .bwlimit
                .map(|r| Arc::new(fsd::net::TokenBucket::new(r))),
            background: opts.background,
        };
        let client = Client {
            shared: Arc::new(Shared {
                addrs: addrs.iter().map(|a| a.to_string()).collect(),
                opts,
                conn_opts,
                slots: (0..n).map(|_| tokio::sync::Mutex::new(None)).collect(),
                failover: (0..n).map(|_| AtomicUsize::new(0)).collect(),
                next_slot: AtomicUsize::new(0),
                meter: (start < n).then(|| Arc::new(Meter::new(start))),
                server_full: AtomicBool::new(false),
            }),
        };
        let mut backoff = client.backoff();
        let conn0 = loop {
            match client.conn(0).await {
                Ok(c) => break c,
                Err(e) => backoff.wait(e, list).await?,
            }
        };
        if let Some(meter) = &client.shared.meter {
            // The handshake's round trips give the path's minimum RTT; unknown is short.
            let opts = &client.shared.opts;
            let rtt = opts.assume_rtt.or_else(|| conn0.min_rtt());
            match rtt.filter(|&rtt| rtt >= fsd::net::SHORT_PATH_RTT) {
                Some(rtt) => grow::spawn(
                    meter,
                    n,
                    rtt,
                    pool_window,
                    window_bytes,
                    POOL_WINDOWS,
                    conn0.loss_probe(),
                ),
                None => debug!(?rtt, "-j auto: a short path, one connection"),
            }
        }
        Ok(client)
    }

    /// Number of connections the client uses: the pool's, or with `grow` those in use now.
    pub fn connections(&self) -> usize {
        match &self.shared.meter {
            Some(m) => m.active(),
            None => self.shared.slots.len(),
        }
    }

    /// With `grow`: counts `bytes` of file data moved (either way) towards the run's rate.
    pub(crate) fn moved(&self, bytes: u64) {
        if let Some(m) = &self.shared.meter {
            m.moved(bytes);
        }
    }

    /// With `grow`: a transfer moves data until the guard is dropped.
    pub(crate) fn busy(&self) -> Option<Busy> {
        self.shared.meter.as_ref().map(Meter::busy)
    }

    /// With `grow`: told when the run uses more connections (see [`grow::grown`]).
    pub(crate) fn watch_growth(&self) -> Option<tokio::sync::watch::Receiver<usize>> {
        self.shared.meter.as_ref().map(|m| m.subscribe())
    }

    /// Whether several server nodes were given (they may not all serve every file alike).
    pub(crate) fn several_nodes(&self) -> bool {
        self.shared.addrs.len() > 1
    }

    /// Connection `slot`, reconnecting if it failed. One attempt: callers own the retry loop.
    pub(crate) async fn conn(&self, slot: usize) -> Result<Conn> {
        let mut guard = self.shared.slots[slot % self.shared.slots.len()]
            .lock()
            .await;
        if let Some(c) = guard.as_ref().filter(|c| c.is_alive()) {
            return Ok(c.clone());
        }
        let slot = slot % self.shared.slots.len();
        let addrs = &self.shared.addrs;
        let moved = &self.shared.failover[slot];
        let addr = &addrs[(slot + moved.load(Ordering::Relaxed)) % addrs.len()];
        debug!(slot, %addr, "connecting");
        let c = match Conn::connect(addr, &self.shared.conn_opts).await {
            Ok(c) => c.in_slot(slot),
            Err(e) => {
                // The next attempt of this slot tries the next node.
                if addrs.len() > 1 && e.is_retryable() {
                    moved.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        *guard = Some(c.clone());
        Ok(c)
    }

    /// With `grow`: whether `conn`'s slot was retired (it did not raise the run's rate). Work
    /// spread over several connections stops giving it more; work it alone holds finishes.
    pub(crate) fn retired(&self, conn: &Conn) -> bool {
        self.shared
            .meter
            .as_ref()
            .is_some_and(|m| conn.slot() >= m.active())
    }

    /// The pool slots `slots` names.
    pub(crate) fn slot_list(&self, slots: Slots) -> Vec<usize> {
        match slots {
            Slots::One(s) => vec![s],
            Slots::All => (0..self.connections()).collect(),
        }
    }

    /// A slot for work that uses one connection, spreading such work over the pool.
    pub(crate) fn pick_slot(&self) -> usize {
        self.shared.next_slot.fetch_add(1, Ordering::Relaxed) % self.connections()
    }

    pub(crate) fn emit(&self, e: Event) {
        if let Some(f) = &self.shared.opts.on_event {
            f(&e);
        }
    }

    /// Whether a NoSpace of this server has already been retried until retries ran out
    /// ([`Shared::server_full`]): a NoSpace now is final, not worth a retry.
    pub(crate) fn server_full(&self) -> bool {
        self.shared.server_full.load(Ordering::Relaxed)
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            client: self.clone(),
            attempt: 0,
            delay: self.shared.opts.backoff,
            stalls: 0,
        }
    }

    /// A control request on connection 0, retried on recoverable failures.
    async fn control<Q, R>(&self, cmd: Cmd, req: &Q, what: &str) -> Result<R>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let mut backoff = self.backoff();
        loop {
            let r = match self.conn(0).await {
                Ok(c) => c.request(cmd, req).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) => backoff.wait(e, what).await?,
            }
        }
    }

    /// Lists a remote directory ("" is the root), all pages, sorted by name. At most
    /// [`MAX_LIST_BYTES`] of names and link targets are collected (a server can list without
    /// end); [`Client::list_each`] has no such limit.
    pub async fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut cost = 0u64;
        self.list_each(path, |e| {
            cost += entry_cost(&e);
            if cost > MAX_LIST_BYTES {
                return Err(Error::Protocol(format!(
                    "listing of {path:?} exceeds {} MiB",
                    MAX_LIST_BYTES >> 20
                )));
            }
            out.push(e);
            Ok(())
        })
        .await?;
        // Names the server cannot send are not in a listing of names.
        Ok(out)
    }

    /// Lists a remote directory page by page, calling `f` with each entry in order; memory
    /// stays one page however long the listing (an error from `f` stops it). Returns how many
    /// names the server left out because they are not UTF-8 (ListResponse `unlisted`, the
    /// most any page said): they exist and cannot be named, let alone copied.
    pub async fn list_each(
        &self,
        path: &str,
        mut f: impl FnMut(Entry) -> Result<()>,
    ) -> Result<u32> {
        let mut after = String::new();
        let mut unlisted = 0;
        loop {
            let req = msg::ListRequest {
                path: path.to_string(),
                after: after.clone(),
                limit: 0,
            };
            let page: msg::ListResponse = self.control(Cmd::LIST, &req, path).await?;
            unlisted = unlisted.max(page.unlisted);
            let n = page.entries.len();
            for e in page.entries {
                if e.name <= after && !after.is_empty() {
                    return Err(Error::Protocol(format!(
                        "list of {path:?} went backwards at {:?}",
                        e.name
                    )));
                }
                after.clone_from(&e.name);
                f(Entry::from(e))?;
            }
            if !page.more {
                return Ok(unlisted);
            }
            if n == 0 {
                return Err(Error::Protocol(format!(
                    "list of {path:?}: empty page with more=true"
                )));
            }
        }
    }

    /// Metadata of one remote path (a final symlink is not followed).
    pub async fn stat(&self, path: &str) -> Result<Entry> {
        let req = msg::StatRequest {
            path: path.to_string(),
        };
        let r: msg::StatResponse = self.control(Cmd::STAT, &req, path).await?;
        r.entry
            .map(Entry::from)
            .ok_or_else(|| Error::Protocol("stat reply without an entry".into()))
    }

    /// Creates a remote directory (`parents`: also missing parents, and no error if it exists).
    pub async fn mkdir(&self, path: &str, parents: bool, mode_bits: u32) -> Result<()> {
        let req = msg::MkdirRequest {
            path: path.to_string(),
            parents,
            mode_bits,
            mtime_ns: 0,
        };
        let _: msg::Ok = self.control(Cmd::MKDIR, &req, path).await?;
        Ok(())
    }

    /// Sets a remote directory's mtime (MKDIR with `parents` and `mtime_ns`: it is created if
    /// missing). A server older than this field leaves the mtime as it is.
    pub async fn set_dir_mtime(&self, path: &str, mtime_ns: i64) -> Result<()> {
        let req = msg::MkdirRequest {
            path: path.to_string(),
            parents: true,
            mode_bits: 0,
            mtime_ns,
        };
        let _: msg::Ok = self.control(Cmd::MKDIR, &req, path).await?;
        Ok(())
    }

    /// Makes the remote `path` a symlink to `target` (replacing a file or symlink there); the
    /// server refuses a target that is absolute or leaves its root.
    pub async fn symlink(&self, path: &str, target: &str) -> Result<()> {
        let req = msg::SymlinkRequest {
            path: path.to_string(),
            target: target.to_string(),
        };
        let _: msg::Ok = self.control(Cmd::SYMLINK, &req, path).await?;
        Ok(())
    }

    /// Removes a remote file or (empty, unless `recursive`) directory.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let req = msg::RemoveRequest {
            path: path.to_string(),
            recursive,
        };
        let _: msg::Ok = self.control(Cmd::REMOVE, &req, path).await?;
        Ok(())
    }

    /// Renames a remote path (`no_clobber`: fail if `to` exists).
    pub async fn rename(&self, from: &str, to: &str, no_clobber: bool) -> Result<()> {
        let req = msg::RenameRequest {
            from: from.to_string(),
            to: to.to_string(),
            no_clobber,
        };
        let _: msg::Ok = self.control(Cmd::RENAME, &req, from).await?;
        Ok(())
    }
}

/// Exponential backoff between retries of one piece of work.
pub(crate) struct Backoff {
    client: Client,
    attempt: u32,
    delay: Duration,
    /// Stalls since the last progress.
    stalls: u32,
}

/// Stalls in a row, with no progress between them, after which a server is given up on: one
/// is a network that went quiet (retried on a new connection); a second right after it is a
/// server that takes requests and answers none, and retrying it only multiplies the wait.
const MAX_STALLS_IN_A_ROW: u32 = 2;

impl Backoff {
    /// Sleeps before the next retry of `what` if `err` is recoverable and retries remain;
    /// otherwise returns `err`.
    pub async fn wait(&mut self, err: Error, what: &str) -> Result<()> {
        let opts = &self.client.shared.opts;
        if matches!(err, Error::Stalled(_)) {
            self.stalls += 1;
        }
        let full = err.remote_code() == Some(ErrorCode::NoSpace);
        if full && self.client.server_full() {
            return Err(err);
        }
        if !err.is_retryable() || self.attempt >= opts.retries || self.stalls >= MAX_STALLS_IN_A_ROW
        {
            if full {
                self.client
                    .shared
                    .server_full
                    .store(true, Ordering::Relaxed);
            }
            return Err(err);
        }
        self.attempt += 1;
        self.client.emit(Event::Retry {
            path: what.to_string(),
            attempt: self.attempt,
            delay_ms: self.delay.as_millis() as u64,
            error: err.to_string(),
        });
        debug!(
            what,
            attempt = self.attempt,
            "retry after {:?}: {err}",
            self.delay
        );
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(opts.max_backoff);
        Ok(())
    }

    /// The last attempt made progress: the next failure starts a fresh series of retries.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.stalls = 0;
        self.delay = self.client.shared.opts.backoff;
    }
}
