//! `fsd`: command-line arguments -> server configuration -> `fsd::server::run`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;

use fsd::server::{self, Config, Credentials};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Serve a directory over the fsd protocol: resumable, verified, zero-copy file transfer.
///
/// Example:
///   fsd --root /data --listen 0.0.0.0:9000 --token-file /etc/fsd/tokens
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Directory to serve; nothing outside it is reachable.
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "0.0.0.0:9000")]
    listen: SocketAddr,
    /// Read-write token for the whole root (at least 16 bytes).
    #[arg(long, env = "FSD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Token file: one `NAME TOKEN read|rw [PREFIX]` per line; `#` starts a comment at a line's
    /// start or after whitespace. Keep it private (mode 600): fsd warns otherwise.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Server state (upload data, manifests). Default: ROOT/.fsd-state, hidden from clients.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Base chunk size in bytes (power of two, 64 KiB..16 MiB).
    #[arg(long, default_value_t = fsd::protocol::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    #[arg(long, default_value_t = server::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Per-credential quota of connections (default: --max-connections, or half of it when
    /// there are several credentials). A token-file line overrides it with `connections=N`.
    #[arg(long)]
    quota_connections: Option<usize>,
    /// Per-credential quota of open handles (default: the descriptors the open-file limit
    /// leaves, or half of them with several credentials); `handles=N` in the token file.
    #[arg(long)]
    quota_handles: Option<usize>,
    /// Per-credential quota of unfinished resumable uploads, kept across restarts until
    /// published or expired; `uploads=N` in the token file.
    #[arg(long, default_value_t = server::quotas::DEFAULT_UPLOADS)]
    quota_uploads: u64,
    /// Per-credential quota of the bytes those uploads declare (default: none for a lone
    /// credential; with several, half the state file system's size); `upload-bytes=N[KMGT]`.
    #[arg(long)]
    quota_upload_bytes: Option<u64>,
    /// Unauthenticated connections at once (default: a quarter of --max-connections); beyond,
    /// the one that has waited longest is closed.
    #[arg(long)]
    max_startups: Option<usize>,
    /// Unauthenticated connections at once from one address (an IPv6 /64).
    #[arg(long, default_value_t = server::MAX_STARTUPS_PER_SOURCE)]
    max_startups_per_source: usize,
    #[arg(long, default_value_t = server::MAX_STREAMS)]
    max_streams: usize,
    #[arg(long, default_value_t = server::MAX_HANDLES)]
    max_handles: usize,
    /// Largest DATA payload accepted, in bytes.
    #[arg(long, default_value_t = server::MAX_FRAME)]
    max_frame: u32,
    /// Highest zstd level a client may have chunks compressed at, for READ replies and its
    /// uploads (0: never compress; at most 19). Compression costs this server's CPU: the
    /// default, zstd's own default level, is several times cheaper than the top levels.
    #[arg(long, default_value_t = fsd::compress::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(0..=fsd::compress::MAX_LEVEL as i64))]
    max_compress_level: u32,
    /// Bytes of compressed chunks kept in the state directory for files downloaded again
    /// (least recently used go first; 0: keep none). Suffixes as --bwlimit: K, M, G, T decimal,
    /// Ki, Mi, Gi, Ti binary.
    #[arg(long, default_value = "1Gi", value_parser = fsd::net::parse_size)]
    compress_cache: u64,
    /// Bytes of chunk manifests (CRC32s and hashes of files served) kept in the state
    /// directory, counted in 4 KiB blocks; least recently used go first and are recomputed,
    /// by reading the file, when needed again. Suffixes as --compress-cache.
    #[arg(long, default_value = "1Gi", value_parser = fsd::net::parse_size)]
    manifest_cache: u64,
    /// Neither offer nor serve TREE_READ / TREE_WRITE, like a server that predates them
    /// (clients then move small files one request each).
    #[arg(long, hide = true)]
    no_tree_stream: bool,
    /// Ignore Hello `background` (clients asking to be paced as background traffic), like a
    /// server that predates it.
    #[arg(long, hide = true)]
    no_background: bool,
    /// Seconds an authenticated connection may sit idle.
    #[arg(long, default_value_t = server::IDLE_TIMEOUT.as_secs())]
    idle_timeout: u64,
    /// Seconds a new connection has to authenticate.
    #[arg(long, default_value_t = server::AUTH_TIMEOUT.as_secs())]
    auth_timeout: u64,
    /// Seconds an unfinished upload is kept after its last activity.
    #[arg(long, default_value_t = server::UPLOAD_TTL.as_secs())]
    upload_ttl: u64,
    /// Seconds after which an upload lock whose holder stopped renewing it (a dead or hung
    /// node sharing the state directory) is taken over; renewed every quarter of it. Node
    /// clocks must agree within a small part of it.
    #[arg(long, default_value_t = fsd::fs::lease::UPLOAD_LEASE.as_secs())]
    upload_lease: u64,
    /// Seconds in-flight transfers get to finish on SIGINT/SIGTERM.
    #[arg(long, default_value_t = server::SHUTDOWN_GRACE.as_secs())]
    shutdown_grace: u64,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// TLS 1.3 certificate chain (PEM); with --tls-key turns on TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. A token-file entry
    /// `NAME cert:COMMON_NAME rw` authenticates such a client by its certificate.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /transfers (JSON) and /healthz over HTTP on this address
    /// (port 0 picks a free port; the bound address is printed). Off by default. /transfers
    /// shows every open transfer's path, credential name and peer address, so a non-loopback
    /// address needs --metrics-token or --metrics-public.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` (at least 16 bytes) on every metrics endpoint but
    /// /healthz; otherwise 401.
    #[arg(
        long,
        env = "FSD_METRICS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    metrics_token: Option<String>,
    /// Serve metrics without a token on a non-loopback --metrics address: anyone who can reach
    /// it sees every transfer.
    #[arg(long, requires = "metrics")]
    metrics_public: bool,
    /// Threads for blocking file-system work (each may hold a chunk buffer): bounds memory when
    /// many clients open uncached files at once; further work queues. With several credentials
    /// each keeps at most half of them busy.
    #[arg(long, default_value_t = server::MAX_BLOCKING_THREADS)]
    max_blocking_threads: usize,
    /// How to treat the root's file system: `local` (O_TMPFILE for small uploads, one syncfs
    /// for many files), `shared` (named temporary files, an fsync per file: network, FUSE and
    /// distributed file systems), or `auto` (by statfs type: known local disks are local,
    /// anything else shared).
    #[arg(long, default_value = "auto", value_name = "auto|local|shared")]
    fs_kind: String,
    /// TCP congestion control of every connection: `auto` (BBR when the kernel offers it and
    /// this process may use it: it keeps long, lossy paths full where cubic collapses; on a
    /// path with an RTT under 1 ms the system default), `system` (the system default), or a name from
    /// /proc/sys/net/ipv4/tcp_available_congestion_control. A name that is not available, or
    /// not in tcp_allowed_congestion_control for an unprivileged process, falls back to the
    /// system default with a warning.
    #[arg(long, default_value = "auto", value_name = "auto|system|NAME")]
    congestion: String,
    /// Limit on the file data all connections together send and receive, bytes per second:
    /// `20M` = 20,000,000 (K, M, G, T decimal), `20Mi` = 20 × 2^20 (Ki, Mi, Gi, Ti binary).
    #[arg(long, value_name = "RATE", value_parser = fsd::net::parse_rate)]
    bwlimit: Option<u64>,
    /// Limit on what each connection sends (downloads), bytes per second, paced by the kernel
    /// (SO_MAX_PACING_RATE); same units as --bwlimit.
    #[arg(long, value_name = "RATE", value_parser = fsd::net::parse_rate)]
    bwlimit_conn: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    fsd::nofile::raise();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(args.max_blocking_threads.max(1))
        .build()?;
    let served = runtime.block_on(serve(args));
    // Dropping the runtime would wait for every blocking thread, and one stuck in a file system
    // that hangs (a dead FUSE or NFS server) would keep fsd from exiting whatever
    // --shutdown-grace says (review D, stop 30: alive 60 s after SIGTERM). In-flight work had
    // the grace period already.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

async fn serve(args: Args) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: in a log file they are escape sequences.
        .with_ansi(std::io::stderr().is_terminal())
        // A closed or broken stderr must not turn a log line into a panic (tracing reports
        // its own write errors with eprintln!, which panics on EPIPE).
        .log_internal_errors(false);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let (credentials, generated) = match (&args.token, &args.token_file) {
        (Some(t), _) => {
            // An empty or short token would start a server nobody, or anybody, can log in to.
            server::auth::check_token(t)
                .map_err(|e| anyhow::anyhow!("--token (or FSD_TOKEN): {e}"))?;
            (Credentials::single(t), false)
        }
        (None, Some(f)) => (Credentials::load(f).map_err(anyhow::Error::msg)?, false),
        (None, None) => (Credentials::random(), true),
    };
    let metrics_token = match &args.metrics_token {
        Some(t) => {
            server::auth::check_token(t)
                .map_err(|e| anyhow::anyhow!("--metrics-token (or FSD_METRICS_TOKEN): {e}"))?;
            Some(server::metrics::BearerToken::new(t))
        }
        None => None,
    };
    if let Some(a) = args
        .metrics
        .filter(|a| metrics_token.is_none() && !a.ip().is_loopback())
    {
        anyhow::ensure!(
            args.metrics_public,
            "--metrics {a} is not a loopback address: /transfers would show every transfer's \
             path, credential name and peer address to anyone who can reach it; give \
             --metrics-token (or FSD_METRICS_TOKEN), or --metrics-public to accept that"
        );
        tracing::warn!(
            "--metrics-public: metrics on {a} without a token; anyone who can reach it sees every transfer"
        );
    }
    anyhow::ensure!(
        args.chunk_size.is_power_of_two()
            && (fsd::protocol::MIN_CHUNK_SIZE..=fsd::protocol::MAX_CHUNK_SIZE)
                .contains(&args.chunk_size),
        "--chunk-size must be a power of two between 64 KiB and 16 MiB"
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            server::tls::server_config(cert, key, args.client_ca.as_deref())
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let (congestion, warning) = fsd::net::choose_congestion(&args.congestion);
    if let Some(w) = warning {
        tracing::warn!("--congestion: {w}");
    }
    let tuning = fsd::net::Tuning {
        congestion,
        long_paths_only: args.congestion == "auto",
        max_pacing_rate: args.bwlimit_conn,
    };
    let config = Config {
        tls: tls.clone(),
        state_dir: args.state_dir.clone(),
        chunk_size: args.chunk_size,
        max_connections: args.max_connections,
        max_startups: args.max_startups.unwrap_or(0),
        quota: server::quotas::Limits {
            connections: args.quota_connections.unwrap_or(0),
            handles: args.quota_handles.unwrap_or(0),
            uploads: args.quota_uploads,
            upload_bytes: args.quota_upload_bytes.unwrap_or(0),
        },
        max_startups_per_source: args.max_startups_per_source,
        max_streams: args.max_streams,
        max_handles: args.max_handles,
        max_blocking_threads: args.max_blocking_threads.max(1),
        max_frame: args.max_frame.max(args.chunk_size),
        max_compress_level: args.max_compress_level,
        tree: !args.no_tree_stream,
        background: !args.no_background,
        compress_cache: args.compress_cache,
        manifest_cache: args.manifest_cache,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        auth_timeout: Duration::from_secs(args.auth_timeout),
        upload_ttl: Duration::from_secs(args.upload_ttl),
        upload_lease: Duration::from_secs(args.upload_lease.max(1)),
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        fs_kind: fsd::fskind::FsKind::parse_override(&args.fs_kind)
            .map_err(|e| anyhow::anyhow!("--fs-kind {e}"))?,
        tuning: tuning.clone(),
        bwlimit: args
            .bwlimit
            .map(|r| std::sync::Arc::new(fsd::net::TokenBucket::new(r))),
        ..Config::new(args.root.clone(), credentials.clone())
    };
    let srv = server::Server::new(config)
        .with_context(|| format!("cannot serve {}", args.root.display()))?;
    let listener = fsd::net::listen(args.listen, &tuning)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Printed before the "listening on" line, which tells scripts that fsd is up.
    let metrics = match args.metrics {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot serve metrics on {a}"))?;
            eprintln!("fsd: metrics on {}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "TLS" } else { "plain TCP" };
    eprintln!(
        "fsd: listening on {addr}, serving {} ({scheme})",
        args.root.display()
    );
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            "serving without TLS on a non-loopback address: tokens and data travel in cleartext"
        );
    }
    if generated {
        let token = &credentials.entries()[0].token;
        let host = if addr.ip().is_unspecified() {
            "HOST".to_string()
        } else {
            addr.ip().to_string()
        };
        eprintln!("fsd: no credentials configured; generated a read-write token for this run:");
        eprintln!("  export FSC_TOKEN={token}");
        eprintln!("  fsc ls {host}:{}", addr.port());
    }

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
        tracing::info!("shutting down");
    });
    if let Some(l) = metrics {
        tokio::spawn(server::metrics::serve(
            l,
            srv.clone(),
            shutdown.clone(),
            metrics_token,
        ));
    }
    server::run(listener, srv, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
