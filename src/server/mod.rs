//! The server: accept loop, per-connection reader and writer tasks, the dispatcher and one
//! handler module per command family.
//!
//! Data flows one way: socket -> codec -> frame -> dispatcher -> handler -> fs -> reply
//! (a frame, or a file range) -> writer task -> socket.

pub mod auth;
mod connection;
mod files;
pub mod limits;
pub mod metrics;
pub mod quotas;
mod seed;
pub mod tls;
mod transfer;
mod transport;
mod tree;
mod writer;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{Credential, Credentials};
#[doc(hidden)]
pub use connection::run as run_connection;
pub use writer::WriteSide;

use crate::fs::identity::RootId;
use crate::fs::manifest::ManifestCache;
use crate::fs::root::Root;
use crate::fs::upload::UploadStore;
use crate::fs::zcache::ChunkCache;
use crate::fskind::FsKind;
use crate::payload_pool::PayloadPool;
use crate::protocol::{ErrorCode, Frame, MAX_CHUNK_SIZE};

/// Default limits; each has a flag on `fsd`.
pub const MAX_CONNECTIONS: usize = 1024;
pub const MAX_STREAMS: usize = 64;
pub const MAX_HANDLES: usize = 128;
pub const MAX_FRAME: u32 = MAX_CHUNK_SIZE;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
pub const UPLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long in-flight streams may run after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Blocking-pool threads of the fsd binary (tokio's default is 512): 100 clients opening
/// uncached files at once reached 105 threads and 109 MiB before this bound.
pub const MAX_BLOCKING_THREADS: usize = 16;
/// Failed Auth attempts per connection before it is closed.
pub const MAX_AUTH_FAILURES: u32 = 3;
/// Unauthenticated connections from one source address at once (`--max-startups-per-source`).
pub const MAX_STARTUPS_PER_SOURCE: usize = 32;
/// Refusals (over `--max-connections`) being written at once; beyond, a refused connection is
/// closed without a word, so a flood cannot hold descriptors for refusals.
const MAX_REFUSALS: usize = 64;
/// Default bytes of compressed chunks kept for files served again.
pub const COMPRESS_CACHE: u64 = 1 << 30;
/// Name of the state directory when it lives inside the root (then invisible to clients).
pub const STATE_DIR_NAME: &str = ".fsd-state";

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    /// Defaults to `root/.fsd-state`.
    pub state_dir: Option<PathBuf>,
    pub credentials: Credentials,
    /// Base chunk size offered to clients that do not ask for one.
    pub chunk_size: u32,
    pub max_connections: usize,
    /// Per-credential limits; a 0 field means the default derived from the server's capacity
    /// (with several credentials, half of it).
    pub quota: quotas::Limits,
    /// Unauthenticated connections at once; 0 = a quarter of `max_connections`.
    pub max_startups: usize,
    pub max_startups_per_source: usize,
    pub max_streams: usize,
    pub max_handles: usize,
    /// Threads of the runtime's blocking pool (`--max-blocking-threads`): with several
    /// credentials, each may keep at most half of them busy.
    pub max_blocking_threads: usize,
    pub max_frame: u32,
    /// Highest zstd level fsd compresses at or accepts (crate::compress); 0: no compression.
    pub max_compress_level: u32,
    /// Bytes of compressed chunks kept in the state directory (crate::fs::zcache); 0: none.
    pub compress_cache: u64,
    /// Bytes of chunk manifests kept in the state directory (crate::fs::manifest).
    pub manifest_cache: u64,
    /// Offer and serve TREE_READ / TREE_WRITE (server::tree). Off: answered UnknownCommand and
    /// not in Hello, as by a server that predates them (to test clients' fallback).
    pub tree: bool,
    /// Serve Hello `background` (crate::ledbat): pace what is sent on connections that ask.
    /// Off: the field is ignored and not answered, as by a server that predates it.
    pub background: bool,
    pub idle_timeout: Duration,
    pub auth_timeout: Duration,
    pub upload_ttl: Duration,
    /// How long an upload lock of a dead node keeps others out (fs::lease); renewed every
    /// quarter of it.
    pub upload_lease: Duration,
    pub shutdown_grace: Duration,
    /// TLS settings; None serves plain TCP (and file data by sendfile).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How the root's file system is treated; None detects it (crate::fskind).
    pub fs_kind: Option<FsKind>,
    /// Settings for each accepted socket (the congestion control is set on the listener, see
    /// `crate::net::listen`; the send buffer and a per-connection pacing cap here).
    pub tuning: crate::net::Tuning,
    /// Rate limit on file data sent by all connections together (`--bwlimit`).
    pub bwlimit: Option<Arc<crate::net::TokenBucket>>,
}

impl Config {
    pub fn new(root: PathBuf, credentials: Credentials) -> Config {
        Config {
            root,
            state_dir: None,
            credentials,
            chunk_size: crate::protocol::DEFAULT_CHUNK_SIZE,
            max_connections: MAX_CONNECTIONS,
            quota: quotas::Limits {
                connections: 0,
                handles: 0,
                uploads: 0,
                upload_bytes: 0,
            },
            max_startups: 0,
            max_startups_per_source: MAX_STARTUPS_PER_SOURCE,
            max_streams: MAX_STREAMS,
            max_handles: MAX_HANDLES,
            max_blocking_threads: MAX_BLOCKING_THREADS,
            max_frame: MAX_FRAME,
            max_compress_level: crate::compress::DEFAULT_LEVEL,
            compress_cache: COMPRESS_CACHE,
            manifest_cache: crate::fs::manifest::DISK_BYTES,
            tree: true,
            background: true,
            idle_timeout: IDLE_TIMEOUT,
            auth_timeout: AUTH_TIMEOUT,
            upload_ttl: UPLOAD_TTL,
            upload_lease: crate::fs::lease::UPLOAD_LEASE,
            shutdown_grace: SHUTDOWN_GRACE,
            tls: None,
            fs_kind: None,
            tuning: crate::net::Tuning::default(),
            bwlimit: None,
        }
    }
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections that authenticated on the startup runtime and moved to the main one.
    pub connections_handed_over: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bytes_sendfile: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub bytes_received: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub crc_failures: AtomicU64,
    pub uploads_committed: AtomicU64,
    pub uploads_expired: AtomicU64,
}

/// State shared by all connections.
pub struct Server {
    pub config: Config,
    pub root: Root,
    pub manifests: ManifestCache,
    /// Compressed chunks for the next download of the same file version.
    pub zchunks: ChunkCache,
    /// Names file versions the same on every node serving this root (fs::identity).
    pub ids: RootId,
    pub uploads: UploadStore,
    pub stats: Arc<Stats>,
    /// Request counters and latencies, active transfers (for --metrics).
    pub metrics: metrics::Metrics,
    /// Unauthenticated connections, per source and in total.
    pub startups: Arc<limits::Startups>,
    /// Budgets of wrong tokens, per source and server-wide.
    pub auth_limiter: limits::AuthLimiter,
    /// New connections per source that never authenticated.
    pub accept_rate: limits::AcceptRate,
    /// Connections served at once: `--max-connections`, lowered to what the descriptors allow.
    pub max_connections: usize,
    /// The descriptors connections and handles may hold (RLIMIT_NOFILE less a reserve).
    pub fds: Arc<Semaphore>,
    /// Every credential's quotas and usage.
    pub accounts: quotas::Accounts,
    /// Bytes of received DATA all connections may have waiting to be stored
    /// ([`quotas::inbound_budgets`]); each credential has its share too.
    pub inbound: Arc<Semaphore>,
    /// Buffers of received DATA payloads, used again once stored: a quarter of `inbound`, at
    /// most [`MAX_POOLED_PAYLOADS`].
    pub payloads: Arc<PayloadPool>,
}

/// Most bytes of free payload buffers fsd keeps (crate::payload_pool).
const MAX_POOLED_PAYLOADS: usize = 32 * 1024 * 1024;

impl Server {
    /// Opens the root and the state directory. Fails if the kernel lacks openat2, or if the
    /// state directory could be reached by clients: it must be outside the root (on the same
    /// file system) or exactly `ROOT/.fsd-state`, which is hidden. Paths are compared resolved,
    /// so a symlink cannot dress one up as the other.
    #[allow(clippy::disallowed_methods)] // the state dir is the server's own, not a client path
    pub fn new(config: Config) -> io::Result<Arc<Server>> {
        /// `p` resolved, though its last components may not exist yet: its deepest existing
        /// ancestor canonicalized, plus the missing names (which create_dir_all will make).
        fn resolve(p: &std::path::Path) -> io::Result<PathBuf> {
            let p = std::path::absolute(p)?;
            let mut missing = Vec::new();
            let mut at = p.as_path();
            loop {
                match std::fs::canonicalize(at) {
                    Ok(base) => return Ok(missing.iter().rev().fold(base, |b, n| b.join(n))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                // `..` after a missing directory has no meaning yet (file_name is None).
                let (Some(name), Some(parent)) = (at.file_name(), at.parent()) else {
                    return Err(io::Error::other(format!(
                        "--state-dir {}: cannot resolve",
                        p.display()
                    )));
                };
                missing.push(name.to_owned());
                at = parent;
            }
        }
        let given = config
            .state_dir
            .clone()
            .unwrap_or_else(|| config.root.join(STATE_DIR_NAME));
        let root_abs = std::fs::canonicalize(&config.root)?;
        let hidden = root_abs.join(STATE_DIR_NAME);
        // Checked before anything is created, so a refused start leaves nothing in the root.
        let state_abs = resolve(&given)?;
        let refuse = |why: String| {
            Err(io::Error::other(format!(
                "--state-dir {} (resolved: {}) {why}",
                given.display(),
                state_abs.display()
            )))
        };
        // Equal: the root would be hidden from itself, so every request is refused. Above the
        // root: the state files would sit beside or above the served files.
        if root_abs.starts_with(&state_abs) {
            let is = if root_abs == state_abs { "is" } else { "holds" };
            return refuse(format!(
                "{is} the root {}: keep server state apart from served files",
                root_abs.display()
            ));
        }
        if state_abs.starts_with(&root_abs) && state_abs != hidden {
            // Only the top-level name is hidden; anywhere deeper a client could REMOVE or
            // RENAME a directory above it and then read other users' upload data.
            return refuse(format!(
                "is inside the root {}: clients could reach it; use the default {} (hidden \
                 from clients) or a directory outside the root",
                root_abs.display(),
                hidden.display()
            ));
        }
        std::fs::create_dir_all(&state_abs)?;
        // Created through the resolved path; a symlink planted meanwhile would show here.
        if std::fs::canonicalize(&state_abs)? != state_abs {
            return refuse("changed while it was being created".into());
        }
        // Uploads are published by rename(2), which cannot cross file systems.
        {
            use std::os::unix::fs::MetadataExt;
            if std::fs::metadata(&root_abs)?.dev() != std::fs::metadata(&state_abs)?.dev() {
                return Err(io::Error::other(format!(
                    "--state-dir {} must be on the same file system as --root {} (uploads are published by rename)",
                    state_abs.display(),
                    root_abs.display()
                )));
            }
        }
        // Inside the root the state dir is ROOT/.fsd-state: that name is refused as any path
        // component and left out of listings, at every depth (over-broad, never leaky).
        let inside = state_abs == hidden;
        let reserved = inside.then(|| STATE_DIR_NAME.to_string());
        let mut root = Root::open(&config.root, reserved).map_err(io::Error::other)?;
        if inside {
            root = root.hide(state_abs.clone());
        }
        // The resolved path from here on: renaming a symlink on the given path later must not
        // move the server's state.
        let (detected, fs_name) = crate::fskind::detect(std::fs::File::open(&state_abs)?)?;
        let fs_kind = config.fs_kind.unwrap_or(detected);
        // Said only when it changes behaviour: scripts read fsd's first line ("listening on").
        if fs_kind == FsKind::Shared {
            tracing::info!(
                file_system = %fs_name,
                overridden = config.fs_kind.is_some(),
                "shared file system: named temporary files and an fsync per file"
            );
        }
        let uploads = UploadStore::new(
            state_abs.join("uploads"),
            config.upload_ttl,
            config.upload_lease,
            fs_kind,
        )?;
        let root_dev = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&root_abs)?.dev()
        };
        let ids = RootId::load_or_create(&state_abs, root_dev)?;
        let manifests =
            ManifestCache::new(state_abs.join("manifests"), ids, config.manifest_cache)?;
        let zchunks = ChunkCache::new(state_abs.join("zchunks"), config.compress_cache)?;
        let nofile = crate::nofile::limit();
        let fd_budget = nofile.saturating_sub(quotas::FD_RESERVE).max(64);
        // At least half the descriptors stay for the handles of the connections.
        let max_connections = config.max_connections.min(fd_budget / 2).max(1);
        if max_connections < config.max_connections {
            tracing::warn!(
                nofile,
                max_connections,
                "--max-connections {} lowered to what the open-file limit allows",
                config.max_connections
            );
        }
        let max_startups = match config.max_startups {
            0 => (max_connections / 4).max(1),
            n => n,
        };
        let accounts = account_limits(&config, max_connections, fd_budget, &state_abs);
        let (inbound, _) = inbound_budgets(&config, 1);
        let startups = limits::Startups::new(max_startups, config.max_startups_per_source);
        Ok(Arc::new(Server {
            config,
            root,
            manifests,
            zchunks,
            ids,
            uploads,
            stats: Arc::new(Stats::default()),
            metrics: metrics::Metrics::default(),
            startups,
            auth_limiter: limits::AuthLimiter::default(),
            accept_rate: limits::AcceptRate::default(),
            max_connections,
            fds: Arc::new(Semaphore::new(fd_budget)),
            accounts,
            payloads: Arc::new(PayloadPool::new((inbound / 4).min(MAX_POOLED_PAYLOADS))),
            inbound: Arc::new(Semaphore::new(inbound)),
        }))
    }
}

/// Each credential's limits: its token-file overrides, else `--quota-*`, else a share of the
/// server's capacity (all of it for a lone credential, half of it when there are several, so
/// that no credential can take everything from the others).
fn account_limits(
    config: &Config,
    max_connections: usize,
    fd_budget: usize,
    state_dir: &std::path::Path,
) -> quotas::Accounts {
    let entries = config.credentials.entries();
    let share = if entries.len() > 1 { 2 } else { 1 };
    let disk = nix::sys::statvfs::statvfs(state_dir)
        .map(|v| v.blocks().saturating_mul(v.fragment_size()))
        .unwrap_or(u64::MAX);
    let q = config.quota;
    let or = |set: usize, default: usize| if set == 0 { default } else { set };
    let or64 = |set: u64, default: u64| if set == 0 { default } else { set };
    let defaults = quotas::Limits {
        connections: or(q.connections, (max_connections / share).max(1)),
        handles: or(q.handles, (fd_budget / share).max(1)),
        uploads: or64(q.uploads, quotas::DEFAULT_UPLOADS),
        // A lone credential is bounded by the free space alone (checked at OPEN).
        upload_bytes: or64(q.upload_bytes, if share > 1 { disk / 2 } else { u64::MAX }),
    };
    quotas::Accounts::new(entries.iter().map(|c| {
        let o = c.quota;
        let limits = quotas::Limits {
            connections: or(o.connections, defaults.connections),
            handles: or(o.handles, defaults.handles),
            uploads: or64(o.uploads, defaults.uploads),
            upload_bytes: or64(o.upload_bytes, defaults.upload_bytes),
        };
        // Handles hold up to 1025 descriptors each, so the handle quota alone would not keep
        // a credential from the others' descriptors: each gets the same share of those too.
        quotas::Account::new(
            &c.name,
            limits,
            (fd_budget / share).max(1),
            (config.max_blocking_threads / share).max(1),
            share > 1,
            inbound_budgets(config, share).1,
        )
    }))
}

/// The server-wide and per-credential budgets of received DATA, from the blocking threads
/// (split in `share` with several credentials) and `--max-frame`.
fn inbound_budgets(config: &Config, share: usize) -> (usize, usize) {
    quotas::inbound_budgets(
        config.max_blocking_threads,
        (config.max_blocking_threads / share).max(1),
        config.max_frame,
        connection::INBOUND_BUDGET,
    )
}

/// Serves `listener` until `shutdown` is cancelled, then lets in-flight streams finish within
/// the grace period.
pub async fn run(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // Connection places: most for anyone, a reserve only for sources that authenticated before,
    // so that a flood of new connections (which fsd may not get to close as fast as they come)
    // cannot keep known clients out.
    let reserved = (server.max_connections / 8)
        .max(1)
        .min(server.max_connections - 1);
    let permits = Arc::new(Semaphore::new(server.max_connections - reserved));
    let reserve = Arc::new(Semaphore::new(reserved));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut accept_failures = 0u32;
    let tracker = TaskTracker::new();
    let main_runtime = tokio::runtime::Handle::current();
    let startup_runtime = StartupRuntime::start()?;
    let gc = {
        let server = server.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let every = (server.config.upload_ttl / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(600));
            loop {
                let s = server.clone();
                if let Ok(n) =
                    tokio::task::spawn_blocking(move || s.uploads.collect_garbage()).await
                {
                    server
                        .stats
                        .uploads_expired
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        })
    };
    let leases = {
        let server = server.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let every = (server.config.upload_lease / 4).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let s = server.clone();
                let _ = tokio::task::spawn_blocking(move || s.uploads.renew_leases()).await;
            }
        })
    };
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off (doubling, up to 1 s) instead of spinning,
                    // and say so once per run of failures, not once per failure.
                    if accept_failures == 0 {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    accept_failures += 1;
                    let wait = Duration::from_millis(10 << accept_failures.min(7));
                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                    continue;
                }
            },
        };
        if accept_failures > 0 {
            tracing::warn!(failures = accept_failures, "accepting again");
            accept_failures = 0;
        }
        let trusted = server.auth_limiter.is_trusted(peer.ip());
        if !server.accept_rate.allow(peer.ip(), trusted) {
            // Closed at once: a flood of connections costs fsd an accept and a close each.
            server
                .stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        // A connection's socket counts against the descriptors, like its handles.
        let place = permits.clone().try_acquire_owned().ok().or_else(|| {
            trusted
                .then(|| reserve.clone().try_acquire_owned().ok())
                .flatten()
        });
        let slot = place.zip(server.fds.clone().try_acquire_owned().ok());
        let Some(permit) = slot else {
            server
                .stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            // A TLS client could not read a cleartext refusal: just close.
            if server.config.tls.is_none() {
                if let Ok(p) = refusals.clone().try_acquire_owned() {
                    tracker.spawn(async move {
                        refuse(stream, peer, "too many connections").await;
                        drop(p);
                    });
                }
            }
            continue;
        };
        // Decided here, in accept order: who waits to authenticate, and who has waited longest.
        let Some(startup) = server.startups.admit(peer.ip(), trusted) else {
            if server.config.tls.is_none() {
                if let Ok(p) = refusals.clone().try_acquire_owned() {
                    let why = "too many unauthenticated connections from your address";
                    tracker.spawn(async move {
                        refuse(stream, peer, why).await;
                        drop(p);
                    });
                }
            }
            continue;
        };
        server
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let server = server.clone();
        let shutdown = shutdown.clone();
        let connection = move |stream, handover| async move {
            server
                .stats
                .connections_open
                .fetch_add(1, Ordering::Relaxed);
            connection::serve(stream, peer, server.clone(), shutdown, startup, handover).await;
            server
                .stats
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        };
        if trusted {
            tracker.spawn(connection(stream, None));
            continue;
        }
        // A source that never authenticated is served on the startup runtime until it does.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let main = main_runtime.clone();
        startup_runtime.spawn(tracker.track_future(async move {
            if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                connection(stream, Some(main)).await;
            }
        }));
    }
    drop(gc);
    drop(leases);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// The runtime that serves connections from sources that never authenticated, from accept to
/// their first successful AUTH (then `connection::serve` moves them to the main runtime): its
/// own threads, so that however many such connections arrive, and however much CPU their
/// handshakes take, the main runtime's threads are free for authenticated clients' requests —
/// an authenticated client's STAT does not queue behind a flood of unauthenticated work.
struct StartupRuntime(Option<tokio::runtime::Runtime>);

impl StartupRuntime {
    fn start() -> io::Result<StartupRuntime> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(4)
            .thread_name("fsd-startup")
            .enable_all()
            .build()?;
        Ok(StartupRuntime(Some(rt)))
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.0 {
            rt.spawn(f);
        }
    }
}

impl Drop for StartupRuntime {
    fn drop(&mut self) {
        // Dropped from async code: a blocking shutdown would panic there.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Over a connection limit: say so, then close.
async fn refuse(mut stream: tokio::net::TcpStream, peer: SocketAddr, why: &'static str) {
    use tokio::io::AsyncWriteExt;
    tracing::debug!(%peer, why, "connection refused");
    let f = Frame::error(
        crate::protocol::Cmd::HELLO,
        0,
        &ErrorCode::LimitExceeded.msg(why),
    );
    let mut buf = bytes::BytesMut::new();
    f.header.encode(&mut buf);
    buf.extend_from_slice(&f.payload);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
}
