//! Observability over HTTP, on its own listener (`fsd --metrics ADDR:PORT`, off by default):
//! `/metrics` in the OpenMetrics text format that Prometheus scrapes, `/transfers` (JSON: every
//! open transfer and its progress) and `/healthz`.
//!
//! What each endpoint shows: `/metrics`, counts and latencies only (no paths, names or
//! addresses); `/transfers`, every open transfer's path, credential name and peer address;
//! `/healthz`, "ok". With a [`BearerToken`] (`--metrics-token`) every endpoint but `/healthz`
//! requires `Authorization: Bearer TOKEN`; without one, `fsd` serves metrics only on loopback
//! unless `--metrics-public` says otherwise.
//!
//! The hot paths keep plain atomics (`Stats`, `ManifestStats`); a scrape reads them into a
//! registry built for that scrape. Only what needs more than an atomic lives here: per-command
//! request counters and latency histograms, and the table of active transfers.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Server;
use crate::protocol::Cmd;

/// HTTP connections served at once; further ones wait in the listen backlog.
pub const MAX_HTTP_CONNECTIONS: usize = 16;
/// Of those, from one source (an IPv4 address or an IPv6 /64): one source holding every place
/// (16 keep-alive clients, or slow senders of headers) locked everyone out, `/healthz` and the
/// load balancer's probe included. A connection over it is closed at once.
pub const MAX_HTTP_PER_SOURCE: usize = 4;
/// An HTTP client must send a request's headers within this long.
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection lives, request and response included; each serves one request
/// (no keep-alive: a scraper asks every few seconds, and an idle kept-alive connection holds a
/// place).
pub const HTTP_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How far back `rate_bytes_per_sec_5s` looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Progress samples kept for the rate: at most one per this interval.
const RATE_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// OpenMetrics content type, as Prometheus negotiates it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label set of the per-command metrics: `command="open"`.
type Labels = [(&'static str, &'static str); 1];

/// Request latency buckets in seconds: 100 µs to 26 s in steps of 4.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// Metrics kept beside `Stats`: per-command requests and the active transfers.
pub struct Metrics {
    requests: Arc<Requests>,
    pub transfers: Arc<Transfers>,
}

struct Requests {
    count: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Arc::new(Requests {
                count: Family::default(),
                latency: Family::new_with_constructor(latency_histogram),
            }),
            transfers: Arc::default(),
        }
    }
}

impl Metrics {
    /// Counts a request of `cmd` now; its latency is observed when the timer is dropped, so a
    /// handler times itself by holding the timer until it has queued its last frame.
    pub fn request(&self, cmd: Cmd) -> RequestTimer {
        let labels = [("command", cmd.name().unwrap_or("unknown"))];
        self.requests.count.get_or_create(&labels).inc();
        RequestTimer {
            requests: self.requests.clone(),
            labels,
            start: Instant::now(),
        }
    }
}

/// Observes a request's latency when dropped.
pub struct RequestTimer {
    requests: Arc<Requests>,
    labels: Labels,
    start: Instant,
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        self.requests
            .latency
            .get_or_create(&self.labels)
            .observe(secs);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Download,
    Upload,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

/// What is known about a transfer when its handle is opened.
#[derive(Debug, Clone)]
pub struct TransferInfo {
    pub peer: SocketAddr,
    /// Name of the credential the connection authenticated with.
    pub token_name: String,
    /// The path as the client named it.
    pub path: String,
    pub direction: Direction,
    pub size: u64,
    /// Bytes already in place when the transfer starts (chunks present on a resumed upload).
    pub done: u64,
}

/// One open transfer: a handle opened for reading (download) or writing (upload).
pub struct Transfer {
    id: u64,
    info: TransferInfo,
    started: SystemTime,
    bytes: AtomicU64,
    /// (when, bytes done), at most one per RATE_SAMPLE_EVERY, reaching back just past
    /// RATE_WINDOW; the first is the start.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Transfer {
    /// Records `n` more bytes sent (queued for the socket) or stored.
    pub fn add(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let now = Instant::now();
        let mut s = self.samples.lock().unwrap();
        if s.back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= RATE_SAMPLE_EVERY)
        {
            s.push_back((now, total));
            // Keep exactly one sample older than the window: it is the window's base.
            while s.len() > 1 && now.saturating_duration_since(s[1].0) >= RATE_WINDOW {
                s.pop_front();
            }
        }
    }

    /// Bytes per second over about the last RATE_WINDOW (since the start if younger).
    fn rate(&self, now: Instant) -> f64 {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let s = self.samples.lock().unwrap();
        let base = s
            .iter()
            .rev()
            .find(|(t, _)| now.saturating_duration_since(*t) >= RATE_WINDOW)
            .or(s.front());
        let Some(&(t, b)) = base else { return 0.0 };
        let secs = now.saturating_duration_since(t).as_secs_f64();
        if secs < 0.001 {
            return 0.0;
        }
        bytes.saturating_sub(b) as f64 / secs
    }

    fn to_json(&self, now: Instant) -> serde_json::Value {
        let i = &self.info;
        let started_ms = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let elapsed = SystemTime::now()
            .duration_since(self.started)
            .unwrap_or_default();
        serde_json::json!({
            "id": self.id,
            "peer": i.peer.to_string(),
            "token_name": i.token_name,
            "path": i.path,
            "direction": i.direction.as_str(),
            "bytes_done": self.bytes.load(Ordering::Relaxed),
            "size": i.size,
            "rate_bytes_per_sec_5s": self.rate(now).round(),
            "started_unix_ms": started_ms,
            "elapsed_secs": elapsed.as_secs_f64(),
        })
    }
}

/// The server's active transfers, for `/transfers`.
#[derive(Default)]
pub struct Transfers {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Transfer>>>,
}

impl Transfers {
    /// Lists a transfer until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, info: TransferInfo) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let t = Arc::new(Transfer {
            id,
            bytes: AtomicU64::new(info.done),
            samples: Mutex::new(VecDeque::from([(now, info.done)])),
            info,
            started: SystemTime::now(),
        });
        self.live.lock().unwrap().insert(id, t.clone());
        Tracked {
            transfer: t,
            table: self.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `{"transfers": [...]}`, oldest first.
    pub fn to_json(&self) -> serde_json::Value {
        let mut all: Vec<Arc<Transfer>> = self.live.lock().unwrap().values().cloned().collect();
        all.sort_by_key(|t| t.id);
        let now = Instant::now();
        let list: Vec<_> = all.iter().map(|t| t.to_json(now)).collect();
        serde_json::json!({ "transfers": list })
    }
}

/// Keeps a transfer listed while it lives. Held beside its handle, so CLOSE, COMMIT and the
/// end of the connection (which drops every handle) unlist it.
pub struct Tracked {
    transfer: Arc<Transfer>,
    table: Arc<Transfers>,
}

impl Tracked {
    pub fn transfer(&self) -> &Arc<Transfer> {
        &self.transfer
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.table.live.lock().unwrap().remove(&self.transfer.id);
    }
}

/// The `/metrics` body: server counters read now, plus the request families.
pub fn render(server: &Server) -> String {
    let st = &server.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let ms = &server.manifests.stats;
    let mut reg = Registry::with_prefix("fsd");
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let g = Gauge::<i64>::default();
        g.set(v.min(i64::MAX as u64) as i64);
        reg.register(name, help, g);
    };
    let counter = |reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        match unit {
            Some(u) => reg.register_with_unit(name, help, u, c),
            None => reg.register(name, help, c),
        }
    };
    let family = |reg: &mut Registry, name: &str, help: &str, unit, vs: &[Labels], v: &[u64]| {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in vs.iter().zip(v) {
            f.get_or_create(l).inc_by(*v);
        }
        match unit {
            Some(u) => reg.register_with_unit(name, help, u, f),
            None => reg.register(name, help, f),
        }
    };

    gauge(
        &mut reg,
        "connections_open",
        "Protocol connections being served",
        load(&st.connections_open),
    );
    counter(
        &mut reg,
        "connections",
        "Protocol connections accepted",
        None,
        load(&st.connections_total),
    );
    counter(
        &mut reg,
        "connections_refused",
        "Connections refused at the --max-connections limit",
        None,
        load(&st.connections_refused),
    );
    counter(
        &mut reg,
        "connections_handed_over",
        "Connections from sources that never authenticated before, moved from the startup \
         runtime to the main one when their AUTH succeeded",
        None,
        load(&st.connections_handed_over),
    );
    counter(
        &mut reg,
        "auth_failures",
        "Failed AUTH attempts",
        None,
        load(&st.auth_failures),
    );
    family(
        &mut reg,
        "sent",
        "File bytes sent in DATA frames, by sendfile (plain TCP) or by copying (TLS)",
        Some(Unit::Bytes),
        &[[("method", "sendfile")], [("method", "copy")]],
        &[load(&st.bytes_sendfile), load(&st.bytes_copied)],
    );
    counter(
        &mut reg,
        "received",
        "Bytes received in DATA frames (upload payloads)",
        Some(Unit::Bytes),
        load(&st.bytes_received),
    );
    counter(
        &mut reg,
        "chunks_sent",
        "File chunks sent in DATA frames",
        None,
        load(&st.chunks_sent),
    );
    counter(
        &mut reg,
        "crc_failures",
        "Frames received whose payload failed its CRC32",
        None,
        load(&st.crc_failures),
    );
    reg.register(
        "requests",
        "Requests received, by command",
        server.metrics.requests.count.clone(),
    );
    reg.register_with_unit(
        "request_duration",
        "Time from a request's arrival until its last reply frame is queued, by command",
        Unit::Seconds,
        server.metrics.requests.latency.clone(),
    );
    gauge(
        &mut reg,
        "unauthenticated_connections",
        "Connections waiting to authenticate (--max-startups)",
        server.startups.waiting() as u64,
    );
    counter(
        &mut reg,
        "startups_evicted",
        "Unauthenticated connections closed to make room for newer ones",
        None,
        server.startups.evicted(),
    );
    counter(
        &mut reg,
        "startups_refused",
        "Connections refused at accept: their address had its share of unauthenticated ones",
        None,
        server.startups.refused(),
    );
    counter(
        &mut reg,
        "auth_refused",
        "AUTHs refused unchecked: their source's or the server's guess budget was spent",
        None,
        server.auth_limiter.refused(),
    );
    gauge(
        &mut reg,
        "uploads_in_progress",
        "Uploads open in this process",
        server.uploads.live_count() as u64,
    );
    counter(
        &mut reg,
        "uploads_committed",
        "Uploads verified and published",
        None,
        load(&st.uploads_committed),
    );
    counter(
        &mut reg,
        "uploads_expired",
        "Unfinished uploads removed after --upload-ttl",
        None,
        load(&st.uploads_expired),
    );
    gauge(
        &mut reg,
        "transfers_active",
        "Handles open for reading or writing (see /transfers)",
        server.metrics.transfers.len() as u64,
    );
    family(
        &mut reg,
        "manifest_cache_hits",
        "Manifests found in the cache, by tier",
        None,
        &[[("tier", "memory")], [("tier", "disk")]],
        &[load(&ms.memory_hits), load(&ms.disk_hits)],
    );
    counter(
        &mut reg,
        "manifest_cache_misses",
        "Manifests computed by reading the whole file",
        None,
        load(&ms.computed),
    );
    counter(
        &mut reg,
        "manifest_cache_evicted",
        "Manifests removed from the state directory to stay within its bound (recomputed when needed)",
        None,
        server.manifests.evicted(),
    );
    let zs = &server.zchunks.stats;
    counter(
        &mut reg,
        "compressed_chunk_cache_hits",
        "READ chunks whose compression result came from the state directory's cache",
        None,
        load(&zs.hits),
    );
    counter(
        &mut reg,
        "compressed_chunk_cache_stored",
        "Compression results stored in the cache (compressed chunks and chunks that did not shrink)",
        None,
        load(&zs.stored),
    );
    counter(
        &mut reg,
        "compressed_chunk_cache_evicted",
        "Cache entries removed to stay within --compress-cache",
        None,
        server.zchunks.evicted(),
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// The secret that guards the metrics endpoints, kept as its BLAKE3 hash: comparing hashes
/// takes the same time whatever the length or content of the guess.
#[derive(Clone, Copy)]
pub struct BearerToken(blake3::Hash);

impl BearerToken {
    pub fn new(token: &str) -> BearerToken {
        BearerToken(blake3::hash(token.as_bytes()))
    }

    /// Whether an `Authorization` header carries this token: `Bearer TOKEN` (scheme in any case).
    pub fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(v) = authorization.map(HeaderValue::as_bytes) else {
            return false;
        };
        let Some((scheme, given)) = v.split_at_checked(7) else {
            return false;
        };
        let given = given.trim_ascii_start();
        scheme.eq_ignore_ascii_case(b"bearer ")
            && bool::from(blake3::hash(given).as_bytes().ct_eq(self.0.as_bytes()))
    }
}

fn respond<B>(
    server: &Server,
    token: Option<&BearerToken>,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let reply = |status, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    };
    let (method, path) = (req.method(), req.uri().path());
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    // Health checkers (load balancers, orchestrators) rarely hold secrets, and "ok" tells nothing.
    if path == "/healthz" {
        return reply(StatusCode::OK, "text/plain", "ok\n".into());
    }
    // Before routing, so that without the token even the list of endpoints stays closed.
    if token.is_some_and(|t| !t.allows(req.headers().get(AUTHORIZATION))) {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "unauthorized: send Authorization: Bearer TOKEN (fsd --metrics-token)\n".into(),
        );
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"fsd metrics\""),
        );
        return r;
    }
    match path {
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, render(server)),
        "/transfers" => reply(
            StatusCode::OK,
            "application/json",
            server.metrics.transfers.to_json().to_string() + "\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /transfers or /healthz\n".into(),
        ),
    }
}

/// Serves `/metrics`, `/transfers` and `/healthz` on `listener` until `shutdown` is cancelled;
/// with `token`, all but `/healthz` only to requests that carry it.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: CancellationToken,
    token: Option<BearerToken>,
) {
    let permits = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let sources: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        // Take the permit before accepting: over the limit, connections wait in the backlog.
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(place) = SourcePlace::take(&sources, peer.ip()) else {
            tracing::debug!(%peer, "metrics: too many connections from this source");
            continue;
        };
        let server = server.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<_>| {
                let r = respond(&server, token.as_ref(), &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HTTP_HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = tokio::time::timeout(HTTP_CONNECTION_LIFETIME, conn) => match r {
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection failed"),
                    Err(_) => tracing::debug!(%peer, "metrics connection outlived its lifetime"),
                    Ok(Ok(())) => {}
                },
                _ = shutdown.cancelled() => {}
            }
            drop((place, permit));
        });
    }
}

/// A place among one source's [`MAX_HTTP_PER_SOURCE`] metrics connections, given back on drop.
struct SourcePlace {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl SourcePlace {
    fn take(sources: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<SourcePlace> {
        let source = super::limits::source_of(ip);
        let mut map = sources.lock().unwrap();
        let n = map.entry(source).or_default();
        if *n >= MAX_HTTP_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourcePlace {
            sources: sources.clone(),
            source,
        })
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut map = self.sources.lock().unwrap();
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TransferInfo {
        TransferInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            token_name: "t".into(),
            path: "a/b".into(),
            direction: Direction::Upload,
            size: 100,
            done: 10,
        }
    }

    #[test]
    fn tracked_transfers_are_listed_until_dropped() {
        let table = Arc::new(Transfers::default());
        let a = table.start(info());
        let b = table.start(info());
        a.transfer().add(5);
        let j = table.to_json();
        let list = j["transfers"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["bytes_done"], 15);
        assert_eq!(list[0]["direction"], "upload");
        assert_eq!(list[1]["bytes_done"], 10);
        drop(a);
        assert_eq!(table.len(), 1);
        drop(b);
        assert!(table.is_empty());
    }

    #[test]
    fn rate_is_over_the_recent_window() {
        let table = Arc::new(Transfers::default());
        let t = table.start(info());
        let t = t.transfer();
        let start = Instant::now();
        // 1000 bytes in the first second, then nothing for 10 s: the 5 s window sees none of it.
        {
            let mut s = t.samples.lock().unwrap();
            s.clear();
            s.push_back((start, 0));
            s.push_back((start + Duration::from_secs(1), 1000));
        }
        t.bytes.store(1000, Ordering::Relaxed);
        assert_eq!(t.rate(start + Duration::from_secs(1)), 1000.0);
        assert_eq!(t.rate(start + Duration::from_secs(11)), 0.0);
        assert!((t.rate(start + Duration::from_secs(4)) - 250.0).abs() < 1e-9);
    }

    #[test]
    fn bearer_token_needs_the_scheme_and_the_exact_token() {
        let t = BearerToken::new("0123456789abcdef");
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(t.allows(Some(&h("Bearer 0123456789abcdef"))));
        assert!(t.allows(Some(&h("bearer 0123456789abcdef"))));
        for wrong in [
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Bearer ",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
            "Bearer0123456789abcdef",
            "",
        ] {
            assert!(!t.allows(Some(&h(wrong))), "{wrong:?}");
        }
        assert!(!t.allows(None));
    }

    #[test]
    fn request_timer_counts_and_observes() {
        let m = Metrics::default();
        drop(m.request(Cmd::OPEN));
        drop(m.request(Cmd::OPEN));
        let labels = [("command", "open")];
        assert_eq!(m.requests.count.get_or_create(&labels).get(), 2);
    }
}
