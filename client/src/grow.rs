//! `-j auto`, the default: how many of the pool's connections a run uses, decided live.
//!
//! On a long path one connection is held back by its send buffer (at most what
//! `net.core.wmem_max` allows, often 8 MiB: ~80 MB/s at 50 ms RTT, and less under loss, where
//! everything sent after a lost segment waits a second RTT in that buffer). A few connections
//! fill the link; how many depends on the link, the loss and the other end, so the run finds
//! out: it starts on one connection and adds one at a time while the run's throughput rises
//! with each, then keeps what it has. Connections added stay for the rest of the run, so the
//! next files use them from their start.
//!
//! - Never on a short path (minimum RTT under [`fsd::net::SHORT_PATH_RTT`]: loopback, a LAN):
//!   one connection is not held back there, and more only cost CPU on both ends.
//! - The rate is the whole run's (every connection, every file), over windows of
//!   [`WINDOW_RTTS`] round trips: half a BBR gain cycle, so a window is not one probe's burst.
//!   A window counts only if a transfer moved data all through it (not the gap between files).
//! - A new connection may pay from [`SETTLE`] windows (8 RTTs) after it was asked for, but
//!   is given up on only after [`TRIES`] more (24 RTTs): its connect, Hello, Auth and OPEN
//!   (~4 RTTs) and BBR's startup (~10 RTTs) must not make it look useless. A ramp-up or a loss
//!   can spoil one window; the first window that pays adds the next connection.
//! - It pays if the run's rate rose by [`SHARE`] of what one connection carried before (so the
//!   bar falls as connections are added), and by at least [`MIN_GAIN`].
//!
//! Why the rate and not TCP_INFO's `sndbuf_limited` (the direct sign that one more connection
//! would help): only the sender sees it, and for downloads that is fsd.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tracing::debug;

/// Round trips per measuring window.
const WINDOW_RTTS: u32 = 4;
/// Window bounds: enough bytes to count on a short long path, not forever on a satellite one.
const MIN_WINDOW: Duration = Duration::from_millis(200);
const MAX_WINDOW: Duration = Duration::from_secs(2);
/// Windows skipped after a connection is asked for (8 RTTs).
const SETTLE: u32 = 2;
/// Windows skipped at the start, after the first transfer began: one, so that the first
/// measurement is past its first round trips (still in BBR's startup, which only makes the
/// second connection look better).
const SETTLE_START: u32 = 1;
/// Windows in which a new connection may show that it pays.
const TRIES: u32 = 4;
/// A new connection pays if the run gained this share of one connection's rate before it…
const SHARE: f64 = 0.2;
/// …and at least this much of the whole.
const MIN_GAIN: f64 = 0.05;

/// What the run's transfers share with the controller: bytes moved, whether a transfer is
/// moving data, and the connections to use.
pub(crate) struct Meter {
    moved: AtomicU64,
    busy: AtomicUsize,
    /// Set when `busy` fell to 0: the window it fell in does not count.
    idled: AtomicBool,
    active: watch::Sender<usize>,
}

impl Meter {
    pub fn new(active: usize) -> Meter {
        Meter {
            moved: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            idled: AtomicBool::new(false),
            active: watch::Sender::new(active),
        }
    }

    /// File data moved over the network (either way).
    pub fn moved(&self, bytes: u64) {
        self.moved.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Marks a transfer as moving data until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Connections the run uses now.
    pub fn active(&self) -> usize {
        *self.active.borrow()
    }

    /// Told when `active` grows.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.active.subscribe()
    }
}

pub(crate) struct Busy(Arc<Meter>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idled.store(true, Ordering::SeqCst);
        }
    }
}

/// Waits until `active` grows; never, without a meter or once the client is gone.
pub(crate) async fn grown(rx: &mut Option<watch::Receiver<usize>>) {
    if let Some(rx) = rx {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// What to do after a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Wait,
    Grow,
    Stop,
}

/// The decision, apart from the clock and the network (see the module doc).
#[derive(Debug)]
pub(crate) struct Growth {
    conns: usize,
    cap: usize,
    skip: u32,
    tries: u32,
    /// The run's rate with `conns - 1` connections (None before the first measurement).
    before: Option<f64>,
}

impl Growth {
    pub fn new(conns: usize, cap: usize) -> Growth {
        Growth {
            conns,
            cap,
            skip: SETTLE_START,
            tries: 0,
            before: None,
        }
    }

    /// One window's rate, `None` if the window does not count.
    pub fn sample(&mut self, rate: Option<f64>) -> Step {
        let Some(rate) = rate else {
            return Step::Wait;
        };
        if self.skip > 0 {
            self.skip -= 1;
            return Step::Wait;
        }
        let pays = self.before.is_none_or(|b| {
            let per_conn = b / (self.conns - 1).max(1) as f64;
            rate - b >= (SHARE * per_conn).max(MIN_GAIN * b)
        });
        if pays {
            if self.conns >= self.cap {
                return Step::Stop;
            }
            self.before = Some(rate);
            self.conns += 1;
            self.skip = SETTLE;
            self.tries = 0;
            return Step::Grow;
        }
        self.tries += 1;
        match self.tries >= TRIES {
            true => Step::Stop,
            false => Step::Wait,
        }
    }
}

/// The measuring window for a path of this RTT.
pub(crate) fn window(rtt: Duration) -> Duration {
    (rtt * WINDOW_RTTS).clamp(MIN_WINDOW, MAX_WINDOW)
}

/// Runs the controller of `meter` for a path of `rtt` until growth stops or the client is
/// gone. Each connection added brings `window_bytes` more of the pool's shared `window`, up
/// to `max_windows` connections' worth (as a fixed `-j N` pool has).
pub(crate) fn spawn(
    meter: &Arc<Meter>,
    cap: usize,
    rtt: Duration,
    window: Arc<Semaphore>,
    window_bytes: usize,
    max_windows: usize,
) {
    let weak: Weak<Meter> = Arc::downgrade(meter);
    let mut growth = Growth::new(meter.active(), cap);
    let every = self::window(rtt);
    debug!(?rtt, ?every, cap, "-j auto: growing while it pays");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        let (mut at, mut moved, mut was_busy) = (Instant::now(), 0u64, false);
        loop {
            tick.tick().await;
            let Some(m) = weak.upgrade() else { return };
            let now = Instant::now();
            let total = m.moved.load(Ordering::Relaxed);
            // Busy from the window's start to its end, and never idle in between.
            let idled = m.idled.swap(false, Ordering::SeqCst);
            let busy = m.busy.load(Ordering::SeqCst) > 0;
            let counts = was_busy && busy && !idled;
            let rate = total.saturating_sub(moved) as f64 / (now - at).as_secs_f64();
            (at, moved, was_busy) = (now, total, busy);
            let rate = counts.then_some(rate);
            match growth.sample(rate) {
                Step::Wait => {}
                Step::Grow => {
                    let n = m.active() + 1;
                    debug!(connections = n, rate = ?rate, "-j auto: one more connection");
                    if n <= max_windows {
                        window.add_permits(window_bytes);
                    }
                    m.active.send_replace(n);
                }
                Step::Stop => {
                    debug!(connections = m.active(), rate = ?rate, "-j auto: done growing");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds rates until a decision other than Wait, returning it and how many windows it took.
    fn run(g: &mut Growth, rates: &mut impl Iterator<Item = Option<f64>>) -> (Step, usize) {
        for (i, r) in rates.enumerate() {
            let s = g.sample(r);
            if s != Step::Wait {
                return (s, i + 1);
            }
        }
        (Step::Wait, usize::MAX)
    }

    fn settled(rate: f64, n: u32) -> impl Iterator<Item = Option<f64>> {
        std::iter::repeat_n(Some(rate), n as usize)
    }

    #[test]
    fn grows_while_each_connection_pays_then_stops() {
        // One connection held at 75 by its send buffer, a link of 115: the second pays,
        // the third does not.
        let mut g = Growth::new(1, 8);
        let mut rates = settled(75.0, SETTLE_START + 1)
            .chain(settled(110.0, SETTLE + 1))
            .chain(settled(114.0, SETTLE + TRIES));
        let (settle, start, tries) = (SETTLE as usize, SETTLE_START as usize, TRIES as usize);
        assert_eq!(run(&mut g, &mut rates), (Step::Grow, start + 1));
        assert_eq!(run(&mut g, &mut rates), (Step::Grow, settle + 1));
        assert_eq!(run(&mut g, &mut rates), (Step::Stop, settle + tries));
        assert_eq!(g.conns, 3);
    }

    #[test]
    fn under_loss_it_keeps_growing_up_to_the_cap() {
        // Each connection brings ~40: always worth another, until the cap.
        let mut g = Growth::new(1, 4);
        let mut n = 1;
        let mut rates = settled(40.0, SETTLE_START + 1);
        loop {
            match run(&mut g, &mut rates).0 {
                Step::Grow => {
                    n += 1;
                    rates = settled(40.0 * n as f64, SETTLE + 1);
                }
                s => {
                    assert_eq!(s, Step::Stop);
                    break;
                }
            }
        }
        assert_eq!(g.conns, 4);
    }

    #[test]
    fn a_new_connection_is_not_judged_while_it_ramps_up() {
        // During its settling windows the run looks no faster (the new connection is still
        // connecting and starting): no verdict; then one poor window, then it pays.
        let mut g = Growth::new(1, 8);
        let mut rates = settled(50.0, SETTLE_START + 1)
            .chain(settled(20.0, SETTLE))
            .chain([Some(52.0), Some(90.0)]);
        assert_eq!(run(&mut g, &mut rates).0, Step::Grow);
        assert_eq!(run(&mut g, &mut rates), (Step::Grow, SETTLE as usize + 2));
    }

    #[test]
    fn windows_that_do_not_count_change_nothing() {
        let mut g = Growth::new(1, 8);
        let mut rates = [None, None]
            .into_iter()
            .chain(settled(1.0, SETTLE_START - 1))
            .chain(
                // A gap between files reads as nothing, not as a loss of throughput.
                std::iter::repeat_n(None, 10),
            );
        assert_eq!(run(&mut g, &mut rates).0, Step::Wait);
        assert_eq!((g.conns, g.skip, g.before), (1, 1, None));
    }

    #[test]
    fn the_bar_falls_with_more_connections_but_not_below_min_gain() {
        let mut g = Growth::new(1, 16);
        let mut grow_at = |before: f64, conns: usize, rate: f64| {
            g.before = Some(before);
            g.conns = conns;
            (g.skip, g.tries) = (0, 0);
            g.sample(Some(rate))
        };
        // From 1 to 2 connections: +20 % needed.
        assert_eq!(grow_at(100.0, 2, 119.0), Step::Wait);
        assert_eq!(grow_at(100.0, 2, 121.0), Step::Grow);
        // From 2 to 3: +10 %.
        assert_eq!(grow_at(100.0, 3, 109.0), Step::Wait);
        assert_eq!(grow_at(100.0, 3, 111.0), Step::Grow);
        // From 8 to 9: 20 % of 12.5 is 2.5, but MIN_GAIN is 5.
        assert_eq!(grow_at(100.0, 9, 104.0), Step::Wait);
        assert_eq!(grow_at(100.0, 9, 106.0), Step::Grow);
    }

    #[test]
    fn windows_follow_the_rtt_within_bounds() {
        assert_eq!(window(Duration::from_micros(20)), MIN_WINDOW);
        assert_eq!(
            window(Duration::from_millis(50)),
            Duration::from_millis(200)
        );
        assert_eq!(
            window(Duration::from_millis(100)),
            Duration::from_millis(400)
        );
        assert_eq!(window(Duration::from_secs(1)), MAX_WINDOW);
    }
}
