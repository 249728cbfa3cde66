//! Background transfers (`fsc --background`, issue 15): a sender that yields to other traffic,
//! after LEDBAT (RFC 6817) and LEDBAT++, but over plain TCP.
//!
//! The sender of the data runs the [`Controller`] on its socket — fsc for uploads, fsd for
//! downloads (asked by Hello `background`, docs/PROTOCOL.md §5). It reads TCP_INFO about once
//! a few times per round trip, takes the queueing delay as the smallest smoothed RTT of the
//! last round trip (RFC 6817's filter: one late ACK is not a queue) above the path's minimum,
//! and sets the socket's `SO_MAX_PACING_RATE` (the kernel then paces the socket itself,
//! whatever its congestion control):
//!
//! - below [`TARGET`] the cap grows by up to [`GAIN`] of itself per RTT, in proportion to how
//!   far below the target the delay is (LEDBAT's increase, made multiplicative so that a
//!   1 Gbit/s path is filled in seconds, not minutes);
//! - above it the cap drops to the rate actually delivered, less `delay/TARGET − 1` of it (at
//!   most half), once per RTT at most (LEDBAT++'s multiplicative decrease);
//! - it never exceeds [`HEADROOM`] times the delivered rate (so it stays near what the flow
//!   does and bites at once when a queue appears) and never goes below [`FLOOR`]: a
//!   background transfer slows down, it never stalls.
//!
//! Alone on a link the flow keeps the queue under the target and the link nearly full; next to
//! a loss-based or window-limited flow it leaves that flow the bandwidth and adds at most about
//! [`TARGET`] to its RTT. Gaps left on purpose: the base RTT is the kernel's minimum over the
//! connection (`tcpi_min_rtt`), so a connection opened while another flow already keeps a
//! standing queue takes that queue for the path and yields less (LEDBAT's "latecomer"
//! problem; LEDBAT++ drains its own rate periodically to re-measure, which we do not); and it
//! cannot yield to a delay-based flow that keeps the queue below the target.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Queueing delay the controller aims at. At 50 ms RTT a flow limited by its window loses
/// `TARGET / (RTT + TARGET)` of its throughput to a queue this long (≈ 9 %); below a few
/// milliseconds the emulated path's own jitter would look like a queue.
pub const TARGET: Duration = Duration::from_millis(5);
/// Largest increase per RTT, as a fraction of the cap (when the delay is at the base RTT).
pub const GAIN: f64 = 0.5;
/// The cap never goes below this, bytes per second: progress even under a full queue.
pub const FLOOR: u64 = 250_000;
/// The cap never exceeds this multiple of the rate delivered (TCP's slow start doubles per
/// RTT, and so may the cap)...
pub const HEADROOM: f64 = 2.0;
/// ...nor, before anything was delivered (a new or idle connection), this many bytes per
/// second: TCP's own slow start is below it for the first round trips.
pub const RAMP_FROM: u64 = 2_000_000;
/// Below this many segments per base RTT the RTT says little about queues: a receiver that
/// gets one segment at a time delays its ACK (up to 40 ms on Linux), which looks like a queue
/// (on loopback, with 64 KB segments and a 5 µs RTT, always). There the delay is not trusted
/// and the cap may grow: an effective floor of a few segments per RTT, like LEDBAT's minimum
/// window.
pub const MIN_SEGMENTS_PER_RTT: f64 = 4.0;
/// Largest cap, bytes per second (100 Gbit/s).
pub const CEILING: u64 = 12_500_000_000;
/// Samples per base RTT; the delay is the smallest of the last RTT's.
const SAMPLES_PER_RTT: u32 = 4;
/// Samples kept for that filter (a bound; fewer are used on short paths).
const FILTER_LEN: usize = 16;
/// Sampling period bounds: a quarter of the base RTT, not more often than this...
pub const MIN_PERIOD: Duration = Duration::from_millis(10);
/// ...and not less often than this.
pub const MAX_PERIOD: Duration = Duration::from_millis(200);

/// `tcpi_state` of an established connection (include/net/tcp_states.h); not in libc.
const TCP_ESTABLISHED: u8 = 1;

/// What the controller needs from TCP_INFO, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When, from any fixed origin.
    pub at: Duration,
    /// Smoothed RTT (`tcpi_rtt`).
    pub srtt: Duration,
    /// Minimum RTT seen on the connection (`tcpi_min_rtt`); zero if unknown.
    pub min_rtt: Duration,
    /// Bytes acknowledged so far (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Segment size (`tcpi_snd_mss`).
    pub mss: u32,
}

/// The rate controller of one connection; feed it [`Sample`]s, apply what it returns.
#[derive(Debug, Clone)]
pub struct Controller {
    /// Current cap, bytes per second.
    rate: u64,
    /// Upper bound from elsewhere (`--bwlimit`), bytes per second.
    limit: u64,
    base: Option<Duration>,
    last: Option<Sample>,
    /// (when, smoothed RTT) of the recent samples, oldest first, at most [`FILTER_LEN`].
    recent: std::collections::VecDeque<(Duration, Duration)>,
    /// Delivered bytes per second, smoothed over two samples.
    delivered: f64,
    /// No decrease before this (one RTT after the last: its effect takes that long to show).
    hold_until: Duration,
}

impl Controller {
    /// A controller whose cap never exceeds `limit` (bytes per second; `None`: no limit).
    pub fn new(limit: Option<u64>) -> Controller {
        let limit = limit.unwrap_or(CEILING).clamp(FLOOR, CEILING);
        Controller {
            rate: RAMP_FROM.min(limit),
            limit,
            base: None,
            last: None,
            recent: std::collections::VecDeque::with_capacity(FILTER_LEN),
            delivered: 0.0,
            hold_until: Duration::ZERO,
        }
    }

    /// The cap, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The path's RTT without a queue, as far as known.
    pub fn base(&self) -> Option<Duration> {
        self.base
    }

    /// How long to wait before the next sample: a quarter of the base RTT.
    pub fn period(&self) -> Duration {
        (self.base.unwrap_or(MAX_PERIOD) / SAMPLES_PER_RTT).clamp(MIN_PERIOD, MAX_PERIOD)
    }

    /// Takes a sample and returns the new cap, bytes per second.
    pub fn update(&mut self, s: Sample) -> u64 {
        let mut base = self.base.unwrap_or(s.srtt).min(s.srtt);
        if !s.min_rtt.is_zero() {
            base = base.min(s.min_rtt);
        }
        self.base = Some(base);
        if self.recent.len() == FILTER_LEN {
            self.recent.pop_front();
        }
        self.recent.push_back((s.at, s.srtt));
        let since = s.at.saturating_sub(base);
        let current = self
            .recent
            .iter()
            .filter(|(at, _)| *at > since)
            .map(|(_, rtt)| *rtt)
            .min()
            .unwrap_or(s.srtt);
        let Some(last) = self.last.replace(s) else {
            return self.rate;
        };
        let dt = s.at.saturating_sub(last.at);
        if dt.is_zero() || s.srtt.is_zero() {
            return self.rate;
        }
        let now = s.acked.saturating_sub(last.acked) as f64 / dt.as_secs_f64();
        self.delivered = (self.delivered + now) / 2.0;
        let segments = self.delivered * base.as_secs_f64() / f64::from(s.mss.max(1));
        let qdelay = if segments >= MIN_SEGMENTS_PER_RTT {
            current.saturating_sub(base)
        } else {
            Duration::ZERO
        };
        let rate = self.rate as f64;
        let next = if qdelay > TARGET {
            if s.at < self.hold_until {
                rate
            } else {
                self.hold_until = s.at + s.srtt;
                let over = qdelay.as_secs_f64() / TARGET.as_secs_f64() - 1.0;
                rate.min(self.delivered) * (1.0 - over.min(0.5))
            }
        } else {
            let below = (TARGET - qdelay).as_secs_f64() / TARGET.as_secs_f64();
            let rtts = (dt.as_secs_f64() / s.srtt.as_secs_f64()).min(1.0);
            rate * (1.0 + GAIN * below * rtts)
        };
        let ceiling = (HEADROOM * self.delivered).max(RAMP_FROM as f64);
        self.rate = (next.min(ceiling) as u64).clamp(FLOOR, self.limit);
        self.rate
    }
}

/// The kernel's view of socket `fd` as a [`Sample`] taken at `at`, and whether the connection
/// is still established.
fn sample(fd: RawFd, at: Duration) -> io::Result<(Sample, bool)> {
    let info = crate::net::tcp_info(fd)?;
    Ok((
        Sample {
            at,
            srtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
            min_rtt: Duration::from_micros(u64::from(info.tcpi_min_rtt)),
            acked: info.tcpi_bytes_acked,
            mss: info.tcpi_snd_mss,
        },
        info.tcpi_state == TCP_ESTABLISHED,
    ))
}

/// Runs a [`Controller`] on socket `fd` until `stop` is cancelled or the connection ends.
/// The socket is duplicated, so the task never touches a descriptor number that was closed
/// and reused; the duplicate keeps the socket open only until the task notices.
pub fn spawn(
    fd: RawFd,
    limit: Option<u64>,
    stop: CancellationToken,
    on: &tokio::runtime::Handle,
) -> io::Result<()> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor the caller holds open; the result is
    // checked before it is owned.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(dup) };
    on.spawn(async move {
        let t0 = tokio::time::Instant::now();
        let mut c = Controller::new(limit);
        let mut applied = 0;
        loop {
            let (s, established) = match sample(sock.as_raw_fd(), t0.elapsed()) {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(error = %e, "background: no TCP_INFO; stopped");
                    return;
                }
            };
            if !established {
                return;
            }
            let rate = c.update(s);
            if rate != applied {
                if let Err(e) = crate::net::set_max_pacing_rate(sock.as_raw_fd(), rate) {
                    tracing::warn!(error = %e, "background: cannot set SO_MAX_PACING_RATE");
                    return;
                }
                applied = rate;
            }
            tracing::trace!(srtt = ?s.srtt, base = ?c.base(), rate, "background");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(c.period()) => {}
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(50);
    const MSS: u32 = 1448;

    /// Feeds `n` samples one RTT apart with `srtt` and `rate` bytes per second delivered.
    fn feed(
        c: &mut Controller,
        t: &mut Duration,
        acked: &mut u64,
        srtt: Duration,
        rate: f64,
        n: u32,
    ) {
        for _ in 0..n {
            *t += RTT;
            *acked += (rate * RTT.as_secs_f64()) as u64;
            c.update(Sample {
                at: *t,
                srtt,
                min_rtt: RTT,
                acked: *acked,
                mss: MSS,
            });
        }
    }

    #[test]
    fn delay_at_the_base_ramps_up_to_the_headroom() {
        let mut c = Controller::new(None);
        let (mut t, mut acked) = (Duration::ZERO, 0);
        feed(&mut c, &mut t, &mut acked, RTT, 100e6, 1);
        let start = c.rate();
        feed(&mut c, &mut t, &mut acked, RTT, 100e6, 40);
        assert!(c.rate() > start, "{} <= {start}", c.rate());
        // Never far above what the flow delivers.
        assert!(c.rate() <= 200_000_000, "{}", c.rate());
        assert!(c.rate() >= 150_000_000, "{}", c.rate());
    }

    #[test]
    fn queueing_delay_cuts_the_rate_and_respects_the_floor() {
        let mut c = Controller::new(None);
        let (mut t, mut acked) = (Duration::ZERO, 0);
        feed(&mut c, &mut t, &mut acked, RTT, 100e6, 40);
        let before = c.rate();
        // 10 ms of queue (twice the target): the cap drops below what was delivered.
        feed(&mut c, &mut t, &mut acked, RTT + 2 * TARGET, 100e6, 1);
        assert!(c.rate() < 100_000_000, "{} (was {before})", c.rate());
        // A standing 40 ms queue: down to the floor, never below, never zero.
        for _ in 0..200 {
            let r = c.rate() as f64;
            feed(
                &mut c,
                &mut t,
                &mut acked,
                RTT + Duration::from_millis(40),
                r,
                1,
            );
            assert!(c.rate() >= FLOOR);
        }
        assert_eq!(c.rate(), FLOOR);
        // The queue goes away (the other flow ended): back up within a few dozen RTTs.
        for _ in 0..60 {
            let r = c.rate() as f64;
            feed(&mut c, &mut t, &mut acked, RTT, r, 1);
        }
        assert!(c.rate() >= 50_000_000, "{}", c.rate());
    }

    #[test]
    fn one_cut_per_rtt_and_small_excess_cuts_little() {
        let mut c = Controller::new(None);
        let (mut t, mut acked) = (Duration::ZERO, 0);
        feed(&mut c, &mut t, &mut acked, RTT, 100e6, 40);
        // Half a target over: a cut of about half, not more.
        t += RTT;
        acked += 5_000_000;
        let srtt = RTT + TARGET + TARGET / 2;
        let r1 = c.update(Sample {
            at: t,
            srtt,
            min_rtt: RTT,
            acked,
            mss: MSS,
        });
        assert!((45_000_000..=55_000_000).contains(&r1), "{r1}");
        // 10 ms later, same delay: held (the cut has not shown yet).
        t += Duration::from_millis(10);
        acked += 1_000_000;
        assert_eq!(
            c.update(Sample {
                at: t,
                srtt,
                min_rtt: RTT,
                acked,
                mss: MSS,
            }),
            r1
        );
    }

    /// Loopback: 64 KB segments, a 5 µs RTT, and delayed ACKs that add up to 40 ms. Far
    /// fewer than MIN_SEGMENTS_PER_RTT segments per RTT: the delay is not taken for a queue.
    #[test]
    fn delay_is_ignored_when_too_few_segments_fly() {
        let mut c = Controller::new(None);
        let mut t = Duration::ZERO;
        let mut acked = 0;
        for _ in 0..100 {
            t += MIN_PERIOD;
            acked += 40_000; // 4 MB/s
            c.update(Sample {
                at: t,
                srtt: Duration::from_millis(30),
                min_rtt: Duration::from_micros(5),
                acked,
                mss: 65_483,
            });
        }
        assert!(c.rate() >= 7_000_000, "{}", c.rate());
    }

    /// One late sample within an RTT of one at the base is noise, not a queue; a late RTT
    /// throughout is.
    #[test]
    fn one_late_sample_is_not_a_queue() {
        let mut c = Controller::new(None);
        let (mut t, mut acked) = (Duration::ZERO, 0);
        feed(&mut c, &mut t, &mut acked, RTT, 100e6, 40);
        let before = c.rate();
        let step = RTT / 4;
        let mut at = |c: &mut Controller, srtt| {
            t += step;
            acked += 1_250_000;
            c.update(Sample {
                at: t,
                srtt,
                min_rtt: RTT,
                acked,
                mss: MSS,
            })
        };
        at(&mut c, RTT);
        assert!(at(&mut c, RTT + 4 * TARGET) >= before);
        for _ in 0..4 {
            at(&mut c, RTT + 4 * TARGET);
        }
        assert!(c.rate() < 100_000_000, "{}", c.rate());
    }

    #[test]
    fn the_limit_and_the_ceiling_bound_the_cap() {
        let mut c = Controller::new(Some(3_000_000));
        let (mut t, mut acked) = (Duration::ZERO, 0);
        feed(&mut c, &mut t, &mut acked, RTT, 100e6, 40);
        assert_eq!(c.rate(), 3_000_000);
        // A limit below the floor is raised to it: the floor holds whatever.
        assert_eq!(Controller::new(Some(1)).rate(), FLOOR);
        // Nothing delivered (idle): the cap stays where slow start begins.
        let mut c = Controller::new(None);
        let (mut t, mut acked) = (Duration::ZERO, 0);
        feed(&mut c, &mut t, &mut acked, RTT, 0.0, 20);
        assert_eq!(c.rate(), RAMP_FROM);
        assert_eq!(c.period(), RTT / 4);
    }
}
