//! Admission before authentication: how many unauthenticated connections may wait (per source
//! address and in total), and how many wrong tokens may be tried (per source and server-wide).
//!
//! The policy, after OpenSSH's MaxStartups / PerSourcePenalties and fail2ban:
//! - Startups: an unauthenticated connection holds one of `max_startups` places, at most
//!   `max_startups_per_source` of them per source. A source at its limit gets a place only by
//!   closing its own oldest waiting connection, and only one that has waited [`STARTUP_GRACE`]
//!   (a client that authenticates promptly keeps its place); otherwise the newcomer is refused
//!   (LimitExceeded, retryable). When all places are taken, the oldest waiting connection of
//!   the source holding the most places is closed, sparing sources that authenticated before: a
//!   flood, from one address or many, loses its own places, and a known client keeps its own.
//! - Guesses: every AUTH that is evaluated takes a token from its source's bucket and, unless
//!   the source authenticated successfully before, from a server-wide bucket; a success gives
//!   them back. With a bucket empty the AUTH is refused at once, unevaluated. No failure is
//!   answered late, so none holds a connection, and closing early saves the attacker nothing:
//!   the token was taken before the answer.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Wrong tokens a source may try in a burst, and how fast that allowance comes back.
pub const GUESS_BURST_PER_SOURCE: f64 = 10.0;
pub const GUESSES_PER_SEC_PER_SOURCE: f64 = 0.5;
/// The same, server-wide, for sources that never authenticated (an attacker rotating addresses).
pub const GUESS_BURST_GLOBAL: f64 = 100.0;
pub const GUESSES_PER_SEC_GLOBAL: f64 = 20.0;
/// How long a source that authenticated stays exempt from the server-wide bucket.
const TRUSTED_FOR: Duration = Duration::from_secs(24 * 3600);
/// Sources remembered at most (buckets and trusted marks each); beyond, refilled buckets are
/// forgotten first, and a new source is judged by the server-wide bucket alone.
const MAX_SOURCES: usize = 65_536;

/// How long an unauthenticated connection keeps its place against newer ones of its source.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);

/// Addresses that count as one source: an IPv4 address, or an IPv6 /64 (one host's share).
pub(super) fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Unauthenticated connections, oldest first.
pub struct Startups {
    max_total: usize,
    max_per_source: usize,
    inner: Mutex<StartupsInner>,
}

#[derive(Default)]
struct StartupsInner {
    next: u64,
    /// Admission number -> (source, admitted at, token that closes the connection).
    waiting: BTreeMap<u64, (IpAddr, Instant, CancellationToken)>,
    /// Admission numbers of connections from sources that authenticated before: a flood from
    /// other sources never takes their places.
    trusted: std::collections::HashSet<u64>,
    per_source: HashMap<IpAddr, usize>,
    evicted: u64,
    refused: u64,
}

impl Startups {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Startups> {
        Arc::new(Startups {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            inner: Mutex::default(),
        })
    }

    /// Admits a new connection from `ip` (see the module's policy), or None: refused. The
    /// returned place is given up when the connection authenticates or ends.
    pub fn admit(self: &Arc<Startups>, ip: IpAddr, trusted: bool) -> Option<Startup> {
        let source = source_of(ip);
        let now = Instant::now();
        let mut s = self.inner.lock().unwrap();
        if s.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            let (n, since) = s
                .waiting
                .iter()
                .find(|(_, (src, _, _))| *src == source)
                .map(|(n, (_, t, _))| (*n, *t))?;
            if now.saturating_duration_since(since) < STARTUP_GRACE {
                s.refused += 1;
                return None;
            }
            s.evict(n);
        }
        if s.waiting.len() >= self.max_total {
            // The oldest connection of any source holding the most places, sparing sources
            // that authenticated before while there are others: with a flood spread one per
            // address, that is the flood's oldest.
            let spare = s.trusted.len() < s.waiting.len();
            let most = s
                .waiting
                .iter()
                .filter(|(n, _)| !(spare && s.trusted.contains(n)))
                .filter_map(|(_, (src, _, _))| s.per_source.get(src).copied())
                .max()
                .unwrap_or(0);
            let oldest = s
                .waiting
                .iter()
                .filter(|(n, _)| !(spare && s.trusted.contains(n)))
                .find(|(_, (src, _, _))| s.per_source.get(src) == Some(&most))
                .map(|(n, _)| *n);
            if let Some(n) = oldest {
                s.evict(n);
            }
        }
        let n = s.next;
        s.next += 1;
        let evicted = CancellationToken::new();
        s.waiting.insert(n, (source, now, evicted.clone()));
        if trusted {
            s.trusted.insert(n);
        }
        *s.per_source.entry(source).or_default() += 1;
        Some(Startup {
            startups: self.clone(),
            n: Some(n),
            evicted,
        })
    }

    /// Unauthenticated connections now.
    pub fn waiting(&self) -> usize {
        self.inner.lock().unwrap().waiting.len()
    }

    /// Unauthenticated connections closed to make room, and refused, since start.
    pub fn evicted(&self) -> u64 {
        self.inner.lock().unwrap().evicted
    }

    pub fn refused(&self) -> u64 {
        self.inner.lock().unwrap().refused
    }

    fn release(&self, n: u64) {
        self.inner.lock().unwrap().remove(n);
    }
}

impl StartupsInner {
    fn evict(&mut self, n: u64) {
        if let Some(token) = self.remove(n) {
            token.cancel();
            self.evicted += 1;
        }
    }

    fn remove(&mut self, n: u64) -> Option<CancellationToken> {
        let (source, _, token) = self.waiting.remove(&n)?;
        self.trusted.remove(&n);
        if let Some(c) = self.per_source.get_mut(&source) {
            *c -= 1;
            if *c == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(token)
    }
}

/// One unauthenticated connection's place.
pub struct Startup {
    startups: Arc<Startups>,
    n: Option<u64>,
    evicted: CancellationToken,
}

impl Startup {
    /// Cancelled when the connection lost its place to a newer one.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// The connection authenticated: it no longer counts.
    pub fn authenticated(&mut self) {
        if let Some(n) = self.n.take() {
            self.startups.release(n);
        }
    }
}

impl Drop for Startup {
    fn drop(&mut self) {
        self.authenticated();
    }
}

/// A token bucket: `tokens` of at most `burst`, refilled at `rate` per second.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, burst: f64, rate: f64, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * rate).min(burst);
        self.at = now;
    }

    /// How long until one token is there.
    fn wait(&self, rate: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / rate).max(0.0))
    }
}

/// New connections a source that never authenticated may open: a burst, then a rate. Beyond,
/// fsd closes them at accept, before spending a task, a buffer or a handshake on them, so that a
/// flood of connections from one address cannot take the CPU the server's users need. Sources
/// that authenticated in the last 24 h are not limited.
pub const CONNECTIONS_BURST_PER_SOURCE: f64 = 64.0;
pub const CONNECTIONS_PER_SEC_PER_SOURCE: f64 = 32.0;

/// [`CONNECTIONS_PER_SEC_PER_SOURCE`]'s buckets.
#[derive(Default)]
pub struct AcceptRate {
    sources: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AcceptRate {
    /// Whether a new connection from `ip` may be served. `trusted`: the source authenticated
    /// successfully before ([`AuthLimiter::is_trusted`]).
    pub fn allow(&self, ip: IpAddr, trusted: bool) -> bool {
        if trusted {
            return true;
        }
        let (burst, rate) = (CONNECTIONS_BURST_PER_SOURCE, CONNECTIONS_PER_SEC_PER_SOURCE);
        let now = Instant::now();
        let source = source_of(ip);
        let mut sources = self.sources.lock().unwrap();
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            sources.retain(|_, b| {
                b.refill(burst, rate, now);
                b.tokens < burst
            });
            if sources.len() >= MAX_SOURCES {
                return true; // a sweep of sources: each one opens few connections anyway
            }
        }
        let b = sources
            .entry(source)
            .or_insert_with(|| Bucket::full(burst, now));
        b.refill(burst, rate, now);
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }
}

/// Budgets of wrong tokens.
pub struct AuthLimiter {
    inner: Mutex<LimiterInner>,
}

struct LimiterInner {
    sources: HashMap<IpAddr, Bucket>,
    global: Bucket,
    /// Sources that authenticated, and when they last did.
    trusted: HashMap<IpAddr, Instant>,
    refused: u64,
}

/// An AUTH that may be evaluated: its tokens are taken; [`AuthLimiter::succeeded`] returns
/// them.
pub struct Attempt {
    source: IpAddr,
    took_global: bool,
    took_source: bool,
}

impl Default for AuthLimiter {
    fn default() -> AuthLimiter {
        AuthLimiter {
            inner: Mutex::new(LimiterInner {
                sources: HashMap::new(),
                global: Bucket::full(GUESS_BURST_GLOBAL, Instant::now()),
                trusted: HashMap::new(),
                refused: 0,
            }),
        }
    }
}

impl AuthLimiter {
    /// Takes the tokens an AUTH from `ip` needs, or says how long until it may try.
    pub fn attempt(&self, ip: IpAddr) -> Result<Attempt, Duration> {
        let now = Instant::now();
        let source = source_of(ip);
        let mut s = self.inner.lock().unwrap();
        let trusted = s
            .trusted
            .get(&source)
            .is_some_and(|t| now.saturating_duration_since(*t) < TRUSTED_FOR);
        s.global
            .refill(GUESS_BURST_GLOBAL, GUESSES_PER_SEC_GLOBAL, now);
        if s.sources.len() >= MAX_SOURCES && !s.sources.contains_key(&source) {
            s.sources.retain(|_, b| {
                b.refill(GUESS_BURST_PER_SOURCE, GUESSES_PER_SEC_PER_SOURCE, now);
                b.tokens < GUESS_BURST_PER_SOURCE
            });
        }
        let tracked = s.sources.len() < MAX_SOURCES || s.sources.contains_key(&source);
        let mut bucket = s
            .sources
            .get(&source)
            .copied()
            .unwrap_or(Bucket::full(GUESS_BURST_PER_SOURCE, now));
        bucket.refill(GUESS_BURST_PER_SOURCE, GUESSES_PER_SEC_PER_SOURCE, now);
        let mut refuse = None;
        if bucket.tokens < 1.0 {
            refuse = Some(bucket.wait(GUESSES_PER_SEC_PER_SOURCE));
        } else if !trusted && s.global.tokens < 1.0 {
            refuse = Some(s.global.wait(GUESSES_PER_SEC_GLOBAL));
        }
        if let Some(wait) = refuse {
            s.refused += 1;
            if tracked {
                s.sources.insert(source, bucket);
            }
            return Err(wait.max(Duration::from_secs(1)));
        }
        bucket.tokens -= 1.0;
        if tracked {
            s.sources.insert(source, bucket);
        }
        if !trusted {
            s.global.tokens -= 1.0;
        }
        Ok(Attempt {
            source,
            took_global: !trusted,
            took_source: tracked,
        })
    }

    /// The attempt's token was right: give back what it took, and trust its source.
    pub fn succeeded(&self, a: Attempt) {
        let now = Instant::now();
        let mut s = self.inner.lock().unwrap();
        if a.took_global {
            s.global.tokens = (s.global.tokens + 1.0).min(GUESS_BURST_GLOBAL);
        }
        if a.took_source {
            if let Some(b) = s.sources.get_mut(&a.source) {
                b.tokens = (b.tokens + 1.0).min(GUESS_BURST_PER_SOURCE);
            }
        }
        if s.trusted.len() >= MAX_SOURCES && !s.trusted.contains_key(&a.source) {
            s.trusted
                .retain(|_, t| now.saturating_duration_since(*t) < TRUSTED_FOR);
            if s.trusted.len() >= MAX_SOURCES {
                return;
            }
        }
        s.trusted.insert(a.source, now);
    }

    /// Whether `ip`'s source authenticated successfully in the last 24 h.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let s = self.inner.lock().unwrap();
        s.trusted
            .get(&source_of(ip))
            .is_some_and(|t| t.elapsed() < TRUSTED_FOR)
    }

    /// AUTHs refused unevaluated, since start.
    pub fn refused(&self) -> u64 {
        self.inner.lock().unwrap().refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    impl Startups {
        fn admit_t(self: &Arc<Startups>, ip: IpAddr) -> Option<Startup> {
            self.admit(ip, false)
        }
    }

    #[test]
    fn connections_from_a_never_authenticated_source_are_rate_limited() {
        let r = AcceptRate::default();
        let burst = CONNECTIONS_BURST_PER_SOURCE as usize;
        let allowed = (0..2 * burst)
            .filter(|_| r.allow(ip("10.0.0.1"), false))
            .count();
        assert!((burst..burst + 4).contains(&allowed), "{allowed}");
        assert!(
            r.allow(ip("10.0.0.2"), false),
            "another source has its own bucket"
        );
        assert!(
            r.allow(ip("10.0.0.1"), true),
            "a trusted source is not limited"
        );
    }

    #[test]
    fn a_full_house_spares_sources_that_authenticated_before() {
        let s = Startups::new(3, 8);
        let known = s.admit(ip("10.0.0.9"), true).unwrap();
        let a1 = s.admit_t(ip("10.0.0.1")).unwrap();
        let _a2 = s.admit_t(ip("10.0.0.2")).unwrap();
        let _a3 = s.admit_t(ip("10.0.0.3")).unwrap();
        assert!(
            !known.evicted().is_cancelled(),
            "the known client lost its place"
        );
        assert!(a1.evicted().is_cancelled());
    }

    #[test]
    fn startups_evict_the_oldest_of_the_source_then_of_the_most_crowded() {
        let s = Startups::new(4, 2);
        let a1 = s.admit_t(ip("10.0.0.1")).unwrap();
        let _a2 = s.admit_t(ip("10.0.0.1")).unwrap();
        assert!(
            s.admit_t(ip("10.0.0.1")).is_none(),
            "source at its limit, its oldest within the grace: the newcomer is refused"
        );
        assert!(!a1.evicted().is_cancelled());
        let mut b1 = s.admit_t(ip("10.0.0.2")).unwrap();
        b1.authenticated();
        let b2 = s.admit_t(ip("10.0.0.2")).unwrap();
        let c1 = s.admit_t(ip("10.0.0.3")).unwrap();
        assert_eq!(s.waiting(), 4);
        let _d1 = s.admit_t(ip("10.0.0.4")).unwrap();
        assert!(
            a1.evicted().is_cancelled(),
            "full: the crowded source's oldest goes"
        );
        assert!(!b2.evicted().is_cancelled() && !c1.evicted().is_cancelled());
        drop((b2, c1));
        assert_eq!(s.waiting(), 2);
        assert_eq!((s.evicted(), s.refused()), (1, 1));
    }

    #[test]
    fn a_source_at_its_limit_reclaims_places_held_past_the_grace() {
        let s = Startups::new(8, 1);
        let a1 = s.admit_t(ip("10.0.0.1")).unwrap();
        std::thread::sleep(STARTUP_GRACE + Duration::from_millis(50));
        let _a2 = s.admit_t(ip("10.0.0.1")).unwrap();
        assert!(a1.evicted().is_cancelled());
    }

    #[test]
    fn guesses_are_bounded_per_source_and_globally_and_success_is_free() {
        let l = AuthLimiter::default();
        let burst = GUESS_BURST_PER_SOURCE as usize;
        for _ in 0..burst {
            assert!(l.attempt(ip("10.0.0.1")).is_ok());
        }
        assert!(l.attempt(ip("10.0.0.1")).is_err(), "source over its burst");
        // A right token costs nothing and makes the source trusted.
        for _ in 0..3 * burst {
            let a = l.attempt(ip("10.0.0.2")).unwrap();
            l.succeeded(a);
        }
        // Rotating sources drain the global bucket...
        let mut ok = 0;
        for i in 0..1000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            ok += l.attempt(addr).is_ok() as u32;
        }
        assert!(ok <= GUESS_BURST_GLOBAL as u32 + 5, "{ok} rotating guesses");
        // ...but a trusted source is still heard.
        assert!(l.attempt(ip("10.0.0.2")).is_ok());
        // An IPv6 /64 is one source.
        let l = AuthLimiter::default();
        let v6 = (0..2 * burst)
            .filter(|i| {
                l.attempt(format!("2001:db8::{i:x}").parse().unwrap())
                    .is_ok()
            })
            .count();
        assert!(v6 <= burst);
    }
}
