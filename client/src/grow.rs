//! `-j auto`: how many of the pool's connections a run uses, decided live.
//!
//! On a long path one connection is held back by its send buffer (at most what
//! `net.core.wmem_max` allows, often 8 MiB: ~80 MB/s at 50 ms RTT, and less under loss, where
//! everything sent after a lost segment waits a second RTT in that buffer). A few connections
//! fill the link; how many depends on the link, the loss and the other end, so the run finds
//! out: it starts on one connection and adds one at a time while the run's throughput rises
//! with each. The first one that does not raise it is retired (its lanes take no more work;
//! the file it helped is finished by the others) and the run keeps the rest: they serve it to
//! the end, so the next files use them from their start.
//!
//! - Never on a short path (minimum RTT under [`fsd::net::SHORT_PATH_RTT`]: loopback, a LAN):
//!   one connection is not held back there, and more only cost CPU on both ends.
//! - The rate is the whole run's (every connection, every file), over windows of
//!   [`WINDOW_RTTS`] round trips: half a BBR gain cycle, so a window is not one probe's burst.
//!   A window counts only if a transfer moved data all through it (not the gap between files).
//! - Rates are compared between plateaus, as BBR finds its own: after a change the run's rate
//!   is judged once it stopped rising ([`FLAT`] windows in a row without a rise of [`RISE`]),
//!   or after [`MAX_PHASE`] windows. Judged during a ramp-up, one connection still in BBR's
//!   startup looks slow and a second one looks like a gain: at no loss, where one connection
//!   nearly fills the link, that grew a run to 3–5 connections and cost 3–17 % (the first
//!   version, docs/BENCHMARKS.md).
//! - A new connection's plateau is looked for only [`SETTLE`] windows (8 RTTs) after it was
//!   asked for: its connect, Hello, Auth and OPEN (~4 RTTs) and first round trips would
//!   otherwise read as "no rise". After that BBR's startup doubles its rate every RTT, so a
//!   connection that adds anything shows as a rise. Nothing moved at all is no plateau either
//!   (seen at 1 % loss: a first window without a byte).
//! - It pays if the run's level rose by [`SHARE`] of what one connection carried before (so
//!   the bar falls as connections are added), and by at least [`MIN_GAIN`]; then the next is
//!   added, otherwise it is retired and growth stops.
//!
//! - A lossy start: where the first connection sees packets lost at random — a loss in
//!   [`LOSSY_TICKS`] windows of its first phase while the bottleneck's queue was empty (the
//!   data's RTT near the path's minimum; [`crate::link::LossSign`]) — the run goes to
//!   [`LOSSY_START`] connections at once, as aria2c and iperf3 -P start with several, and
//!   grows from there as above. Added one phase at a time, connections arrive too late for a
//!   transfer of a few seconds: at 1 % loss a 256 MiB download took its first 2 s on one
//!   connection. A full queue's losses come with the RTT a queue's length above the minimum,
//!   and one connection held by its send buffer does not fill this link's: at no loss the
//!   first loss was seen only after a second connection had joined (BENCHMARKS.md, case w).
//!
//! Why the rate and not TCP_INFO's `sndbuf_limited` (the direct sign that one more connection
//! would help): only the sender sees it, and for downloads that is fsd. A standing queue
//! (smoothed RTT above the minimum) as the sign of a full link was tried and dropped: fsc's
//! RTT samples carry the busy receiver's ACK delays too (docs/BENCHMARKS.md, case w). What
//! the probe costs where one connection already fills the link: the second one's startup and
//! the plateau it is judged on (two connections overfill the bottleneck's queue meanwhile),
//! then it is retired. Kept for the rest of the run it cost 7–15 % of a 1 GiB transfer at no
//! loss on the emulated link (docs/BENCHMARKS.md, case w).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::link::LossSign;

/// Connections a run on a path with random loss starts with (see the module doc)…
const LOSSY_START: usize = 4;
/// …once the first connection saw a loss in this many windows of its first phase.
const LOSSY_TICKS: u32 = 2;
/// Round trips per measuring window.
const WINDOW_RTTS: u32 = 4;
/// Window bounds: enough bytes to count on a short long path, not forever on a satellite one.
const MIN_WINDOW: Duration = Duration::from_millis(200);
const MAX_WINDOW: Duration = Duration::from_secs(2);
/// Windows skipped after a connection is asked for (8 RTTs).
const SETTLE: u32 = 2;
/// A window rises if its rate beats the best so far by this much…
const RISE: f64 = 0.1;
/// …and the rate is at a plateau after this many windows that did not.
const FLAT: u32 = 2;
/// Windows after which a phase is judged even without a plateau (noise can keep "rising").
const MAX_PHASE: u32 = 10;
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
    /// The last connection added did not pay: the run goes back to one fewer, for good.
    Retire,
    /// Growing paid up to the cap.
    Stop,
}

/// The decision, apart from the clock and the network (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Growth {
    conns: usize,
    cap: usize,
    skip: u32,
    /// The run's level with `conns - 1` connections (None before the first plateau).
    before: Option<f64>,
    /// This phase (since the last change): windows seen, the best rate, windows since it
    /// last rose, the previous window's rate.
    windows: u32,
    best: f64,
    flat: u32,
    last: f64,
    /// Windows of the first phase in which the first connection saw random loss; whether the
    /// run went to [`LOSSY_START`] for it.
    lossy_windows: u32,
    jumped: bool,
}

impl Growth {
    pub fn new(conns: usize, cap: usize) -> Growth {
        Growth {
            conns,
            cap,
            ..Growth::default()
        }
    }

    /// Whether a loss sign can still start the run with more connections: only in the first
    /// phase, once, and where that is more than the run has.
    pub fn may_start_lossy(&self) -> bool {
        self.before.is_none() && !self.jumped && self.conns < LOSSY_START.min(self.cap)
    }

    /// A window's loss sign from the first connection: `random` when it lost packets in the
    /// window while the queue was empty. Returns the count to go to when it is time.
    pub fn loss(&mut self, random: bool) -> Option<usize> {
        if !random || !self.may_start_lossy() {
            return None;
        }
        self.lossy_windows += 1;
        if self.lossy_windows < LOSSY_TICKS {
            return None;
        }
        // The new connections' plateau is the first one judged (nothing was before it).
        *self = Growth {
            conns: LOSSY_START.min(self.cap),
            cap: self.cap,
            skip: SETTLE,
            jumped: true,
            ..Growth::default()
        };
        Some(self.conns)
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
        self.windows += 1;
        if rate > self.best * (1.0 + RISE) || self.best == 0.0 {
            (self.best, self.flat) = (rate, 0);
        } else {
            self.flat += 1;
        }
        let last = std::mem::replace(&mut self.last, rate);
        if self.flat < FLAT && self.windows < MAX_PHASE {
            return Step::Wait;
        }
        // The level: the last two windows, so that one burst does not make it.
        let level = (rate + last) / 2.0;
        let pays = self.before.is_none_or(|b| {
            let per_conn = b / (self.conns - 1).max(1) as f64;
            level - b >= (SHARE * per_conn).max(MIN_GAIN * b)
        });
        if !pays {
            self.conns -= 1;
            return Step::Retire;
        }
        if self.conns >= self.cap {
            return Step::Stop;
        }
        *self = Growth {
            conns: self.conns + 1,
            cap: self.cap,
            skip: SETTLE,
            before: Some(level),
            ..Growth::default()
        };
        Step::Grow
    }
}

/// The measuring window for a path of this RTT.
pub(crate) fn window(rtt: Duration) -> Duration {
    (rtt * WINDOW_RTTS).clamp(MIN_WINDOW, MAX_WINDOW)
}

/// Runs the controller of `meter` for a path of `rtt` until growth stops or the client is
/// gone. Each connection added brings `window_bytes` more of the pool's shared `window`, up
/// to `max_windows` connections' worth (as a fixed `-j N` pool has). `loss` reads the first
/// connection's [`LossSign`] (for the lossy start).
pub(crate) fn spawn(
    meter: &Arc<Meter>,
    cap: usize,
    rtt: Duration,
    window: Arc<Semaphore>,
    window_bytes: usize,
    max_windows: usize,
    loss: impl FnMut() -> Option<LossSign> + Send + 'static,
) {
    let weak: Weak<Meter> = Arc::downgrade(meter);
    let mut growth = Growth::new(meter.active(), cap);
    let every = self::window(rtt);
    debug!(?rtt, ?every, cap, "-j auto: growing while it pays");
    let mut loss = Some(loss);
    let grow_to = move |m: &Meter, n: usize| {
        for k in m.active() + 1..=n {
            if k <= max_windows {
                window.add_permits(window_bytes);
            }
        }
        m.active.send_replace(n);
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        let (mut at, mut moved, mut was_busy) = (Instant::now(), 0u64, false);
        let mut lost = 0u64;
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
            if !growth.may_start_lossy() {
                loss = None;
            }
            if let Some(sign) = loss.as_mut().and_then(|read| read()) {
                let random = sign.lost > lost && sign.queue_empty;
                lost = sign.lost;
                if let Some(n) = growth.loss(random) {
                    debug!(connections = n, rate = ?rate, "-j auto: random loss on the path; several connections at once");
                    grow_to(&m, n);
                    continue;
                }
            }
            match growth.sample(rate) {
                Step::Wait => {}
                Step::Grow => {
                    let n = m.active() + 1;
                    debug!(connections = n, rate = ?rate, "-j auto: one more connection");
                    grow_to(&m, n);
                }
                Step::Retire => {
                    // Its share of the pool's window stays: the connections left may use it,
                    // and the bound on what is in flight is the one a -j N pool has.
                    let n = m.active() - 1;
                    debug!(connections = n, rate = ?rate, "-j auto: the last one did not pay; retired");
                    m.active.send_replace(n);
                    return;
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

    /// Windows skipped after a connection is asked for, as a count of rates fed.
    fn settle() -> usize {
        usize::try_from(SETTLE).unwrap()
    }

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

    fn rates(r: &[f64]) -> impl Iterator<Item = Option<f64>> + '_ {
        r.iter().map(|&r| Some(r))
    }

    /// A connection's ramp: BBR's startup, then its level (noise of a few %).
    fn ramp(level: f64) -> Vec<f64> {
        vec![level / 8.0, level / 2.0, level, level * 1.03, level * 0.98]
    }

    #[test]
    fn grows_while_each_connection_pays_then_stops() {
        // One connection held at 75 by its send buffer, a link of 115: the second pays,
        // the third does not.
        let mut g = Growth::new(1, 8);
        let one = ramp(75.0);
        let two: Vec<f64> = vec![75.0; settle()]
            .into_iter()
            .chain(ramp(112.0))
            .collect();
        let three: Vec<f64> = vec![112.0; settle()]
            .into_iter()
            .chain(ramp(115.0))
            .collect();
        let mut r = rates(&one).chain(rates(&two)).chain(rates(&three));
        // Judged at the plateau: the level after two windows that did not rise.
        assert_eq!(run(&mut g, &mut r), (Step::Grow, 5));
        assert_eq!(g.before, Some((75.0 * 1.03 + 75.0 * 0.98) / 2.0));
        assert_eq!(run(&mut g, &mut r), (Step::Grow, settle() + 5));
        assert_eq!(run(&mut g, &mut r), (Step::Retire, settle() + 5));
        assert_eq!(g.conns, 2);
    }

    #[test]
    fn under_loss_it_keeps_growing_up_to_the_cap() {
        // Each connection brings ~40: always worth another, until the cap.
        let mut g = Growth::new(1, 4);
        let mut n = 1;
        let mut phase = ramp(40.0);
        loop {
            let s = run(&mut g, &mut rates(&phase)).0;
            if s != Step::Grow {
                assert_eq!(s, Step::Stop);
                break;
            }
            n += 1;
            phase = vec![40.0 * (n - 1) as f64; settle()]
                .into_iter()
                .chain(ramp(40.0 * n as f64))
                .collect();
        }
        assert_eq!(g.conns, 4);
    }

    #[test]
    fn a_ramp_up_is_not_a_plateau() {
        // No loss: one connection ramps to ~105 and the link holds ~118. Judged on its ramp
        // (40) the second connection would look like a gain; at the plateau it is not
        // (+13 < 20 % of 105): two connections, not more.
        let mut g = Growth::new(1, 8);
        let one = [10.0, 40.0, 80.0, 100.0, 105.0, 104.0];
        let opening = vec![105.0; settle()];
        let two = [110.0, 118.0, 117.0, 118.0];
        let mut r = rates(&one).chain(rates(&opening)).chain(rates(&two));
        assert_eq!(run(&mut g, &mut r), (Step::Grow, 6));
        assert_eq!(run(&mut g, &mut r), (Step::Retire, settle() + 3));
        assert_eq!(g.conns, 1);
    }

    #[test]
    fn a_new_connection_is_not_judged_while_it_opens() {
        // While it connects the run looks no faster: those windows are skipped, not taken
        // for a plateau.
        let mut g = Growth::new(1, 8);
        let mut r = rates(&[50.0, 50.0, 50.0, 50.0]);
        assert_eq!(run(&mut g, &mut r).0, Step::Grow);
        let mut r = rates(&[50.0, 50.0, 60.0, 90.0, 100.0, 100.0, 100.0]);
        assert_eq!(run(&mut g, &mut r), (Step::Grow, 7));
    }

    #[test]
    fn noise_cannot_hold_off_a_verdict() {
        // A rate that keeps "rising" is judged after MAX_PHASE windows anyway.
        let mut g = Growth::new(1, 8);
        let rising: Vec<f64> = (0..20).map(|i| 1.2f64.powi(i)).collect();
        assert_eq!(
            run(&mut g, &mut rates(&rising)),
            (Step::Grow, MAX_PHASE as usize)
        );
    }

    #[test]
    fn nothing_moved_is_not_a_plateau() {
        let mut g = Growth::new(1, 8);
        let mut r = rates(&[0.0, 0.0, 0.0, 30.0, 60.0, 61.0, 60.0]);
        assert_eq!(run(&mut g, &mut r), (Step::Grow, 7));
        assert_eq!(g.before, Some(60.5));
    }

    #[test]
    fn windows_that_do_not_count_change_nothing() {
        let mut g = Growth::new(1, 8);
        let mut r = [Some(50.0)].into_iter().chain(
            // A gap between files reads as nothing, not as a loss of throughput.
            std::iter::repeat_n(None, 10),
        );
        assert_eq!(run(&mut g, &mut r).0, Step::Wait);
        assert_eq!((g.conns, g.windows, g.before), (1, 1, None));
    }

    #[test]
    fn the_bar_falls_with_more_connections_but_not_below_min_gain() {
        let mut g = Growth::new(1, 16);
        let mut grow_at = |before: f64, conns: usize, level: f64| {
            g = Growth {
                conns,
                cap: 16,
                before: Some(before),
                ..Growth::default()
            };
            run(&mut g, &mut rates(&[level; 3])).0
        };
        // From 1 to 2 connections: +20 % needed.
        assert_eq!(grow_at(100.0, 2, 119.0), Step::Retire);
        assert_eq!(grow_at(100.0, 2, 121.0), Step::Grow);
        // From 2 to 3: +10 %.
        assert_eq!(grow_at(100.0, 3, 109.0), Step::Retire);
        assert_eq!(grow_at(100.0, 3, 111.0), Step::Grow);
        // From 8 to 9: 20 % of 12.5 is 2.5, but MIN_GAIN is 5.
        assert_eq!(grow_at(100.0, 9, 104.0), Step::Retire);
        assert_eq!(grow_at(100.0, 9, 106.0), Step::Grow);
    }

    #[test]
    fn random_loss_in_the_first_phase_starts_several_connections_once() {
        let mut g = Growth::new(1, 8);
        // A loss while the queue was full, or a window without a loss: no sign.
        assert_eq!(g.loss(false), None);
        assert_eq!(g.sample(Some(10.0)), Step::Wait);
        // Random loss in LOSSY_TICKS windows (not necessarily in a row).
        assert_eq!(g.loss(true), None);
        assert_eq!(g.loss(false), None);
        assert_eq!(g.loss(true), Some(LOSSY_START));
        assert_eq!(g.conns, LOSSY_START);
        assert!(!g.may_start_lossy());
        assert_eq!((g.loss(true), g.loss(true)), (None, None), "once");
        // From there it grows as before: the new connections settle, their plateau is the
        // first judged, and one more is tried.
        let phase: Vec<f64> = vec![20.0; settle()].into_iter().chain(ramp(90.0)).collect();
        assert_eq!(run(&mut g, &mut rates(&phase)), (Step::Grow, settle() + 5));
        assert_eq!(g.conns, LOSSY_START + 1);
        assert_eq!(run(&mut g, &mut rates(&[91.0; 10])).0, Step::Retire);
        assert_eq!(g.conns, LOSSY_START);
    }

    #[test]
    fn loss_after_the_first_plateau_or_under_a_small_cap_changes_nothing() {
        let mut g = Growth::new(1, 8);
        assert_eq!(run(&mut g, &mut rates(&ramp(75.0))).0, Step::Grow);
        assert!(!g.may_start_lossy());
        assert_eq!((g.loss(true), g.loss(true)), (None, None));
        assert_eq!(g.conns, 2);
        // -j auto capped at 2 (e.g. two nodes): never more than the cap.
        let mut g = Growth::new(1, 2);
        assert_eq!((g.loss(true), g.loss(true)), (None, Some(2)));
        let g = Growth::new(2, 2);
        assert!(!g.may_start_lossy());
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
