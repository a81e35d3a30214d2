//! The read policy: when to read the sensor, and which reads become published readings.
//!
//! Pure: it is told the time and the outcome of each read and answers with the time of the
//! next read and a [`Verdict`]; the reader (`reader.rs`) does the waiting and the I/O.
//!
//! - **Pacing.** Never two reads closer than the backend allows ([`Pacing::min_spacing`]: DHT11
//!   1 s, DHT22 2 s, the kernel driver 2.1 s after the end of a read, because it answers from a
//!   2 s cache); the first read only after the sensor has settled after power-up.
//! - **Confirmation.** No single read is ever published. A good read (decoded, in the model's
//!   range) is published only when the previous good read agrees with it within the model's
//!   [`Tolerance`] and was taken at least `min_spacing` and at most `confirm_within` before it:
//!   two independent samples that say the same. What is published is the newer read, stamped
//!   with its own time. A decoder that lets a wrong frame through (double-bit flips that keep
//!   the checksum, a glitch) would need a second, independent wrong frame with nearly the same
//!   values for it to reach a subscriber. The old "spike hold" is the special case of a big jump:
//!   it is published one read later, once a second read agrees.
//! - **Interval with retries.** One reading is published per interval, on a fixed schedule (no
//!   drift). Intervals longer than `Pacing::confirm_within` (2 × the spacing: DHT11 2 s, DHT22 4 s)
//!   take two reads, `min_spacing` apart; shorter ones read once, confirmed by the previous
//!   interval's read (its first reading comes one interval later). A read that fails, or a
//!   confirmation that fails, is retried at the minimum spacing until the interval ends; an
//!   interval without a confirmed read publishes nothing (and is counted as missed).
//! - **Freshness.** Only the read just made is ever published, stamped with the time the sample
//!   was taken: no old value is republished with a new time.
//! - **Health.** Intervals missed in a row, and why their reads failed, so the reader can say
//!   "not answering" with the most frequent reason.

use std::{collections::BTreeMap, time::Duration};

use k3sense_protocol::{FailureKind, Model};
use tokio::time::Instant;

pub use crate::dht::Tolerance;
use crate::{
    dht::{DecodeError, Measurement},
    sensor::{Pacing, ReadError},
};

/// Reads by outcome, and what became of them: the publisher's sensor health, for logs and
/// metrics. Every read attempt lands in exactly one of the outcome counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounters {
    /// Reads that gave a plausible value.
    pub ok: u64,
    /// The sensor did not answer the start pulse.
    pub no_response: u64,
    /// The line stopped changing mid-frame, or the kernel driver timed out.
    pub timeout: u64,
    /// Fewer than 40 bits arrived.
    pub short_frame: u64,
    /// A pulse no sensor sends (edges lost).
    pub bad_pulse: u64,
    /// The checksum did not match.
    pub checksum: u64,
    /// A frame of the wrong format, or values outside the model's range.
    pub implausible: u64,
    /// The kernel driver reported a bad frame (EIO) or was busy (EAGAIN).
    pub driver_error: u64,
    /// The device was not there.
    pub unavailable: u64,
    /// Of the `ok` reads: confirmed by the previous good read (each one was published).
    pub confirmed: u64,
    /// Of the `ok` reads: a previous good read was near enough in time but disagreed.
    pub disagreed: u64,
    /// Readings published.
    pub published: u64,
    /// Intervals that ended without a reading to publish.
    pub missed_intervals: u64,
}

impl ReadCounters {
    /// All read attempts.
    pub fn attempts(&self) -> u64 {
        self.ok
            + self.no_response
            + self.timeout
            + self.short_frame
            + self.bad_pulse
            + self.checksum
            + self.implausible
            + self.driver_error
            + self.unavailable
    }

    /// Failures by the kind the sensor topic names (kinds never seen are left out).
    pub fn errors(&self) -> BTreeMap<String, u64> {
        [
            (FailureKind::NoResponse, self.no_response),
            (FailureKind::Timeout, self.timeout),
            (FailureKind::ShortFrame, self.short_frame),
            (FailureKind::PulseWidth, self.bad_pulse),
            (FailureKind::Checksum, self.checksum),
            (FailureKind::Implausible, self.implausible),
            (FailureKind::Driver, self.driver_error),
            (FailureKind::Unconfirmed, self.disagreed),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(k, n)| (k.as_str().to_owned(), n))
        .collect()
    }

    fn count_failure(&mut self, error: &ReadError) {
        let counter = match error {
            ReadError::Decode(DecodeError::NoResponse) => &mut self.no_response,
            ReadError::Decode(DecodeError::Timeout { .. })
            | ReadError::Driver {
                timed_out: true, ..
            } => &mut self.timeout,
            ReadError::Decode(DecodeError::ShortFrame { .. }) => &mut self.short_frame,
            ReadError::Decode(DecodeError::PulseWidth { .. }) => &mut self.bad_pulse,
            ReadError::Decode(DecodeError::Checksum { .. }) => &mut self.checksum,
            ReadError::Decode(DecodeError::Format { .. } | DecodeError::Implausible { .. }) => {
                &mut self.implausible
            }
            ReadError::Driver {
                timed_out: false, ..
            } => &mut self.driver_error,
            ReadError::Unavailable(_) => &mut self.unavailable,
        };
        *counter += 1;
    }
}

/// The kind of a failed read, as the sensor topic names it; `None` for a device that is gone
/// (reported as `offline`, not as a failed read).
pub fn failure_kind(error: &ReadError) -> Option<FailureKind> {
    Some(match error {
        ReadError::Decode(DecodeError::NoResponse) => FailureKind::NoResponse,
        ReadError::Decode(DecodeError::Timeout { .. })
        | ReadError::Driver {
            timed_out: true, ..
        } => FailureKind::Timeout,
        ReadError::Decode(DecodeError::ShortFrame { .. }) => FailureKind::ShortFrame,
        ReadError::Decode(DecodeError::PulseWidth { .. }) => FailureKind::PulseWidth,
        ReadError::Decode(DecodeError::Checksum { .. }) => FailureKind::Checksum,
        ReadError::Decode(DecodeError::Format { .. } | DecodeError::Implausible { .. }) => {
            FailureKind::Implausible
        }
        ReadError::Driver {
            timed_out: false, ..
        } => FailureKind::Driver,
        ReadError::Unavailable(_) => return None,
    })
}

/// What to do with one read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Publish this measurement, stamped with the time of the read: the previous good read
    /// agreed with it.
    Publish(Measurement),
    /// A good read that nothing confirms yet (the first of a pair, or one that disagreed with
    /// the read before it); the next read may confirm it.
    Unconfirmed(Measurement),
    /// The read failed or was implausible; it will be retried.
    Retry,
    /// The device is gone: stop reading it, report it offline, reopen it later.
    Lost,
}

/// The policy's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// The sensor model: its range and tolerance.
    pub model: Model,
    /// One reading is published per interval (at least the minimum spacing).
    pub interval: Duration,
    /// How fast the sensor may be read: [`Pacing::for_model`] for real sensors.
    pub pacing: Pacing,
}

/// The state of the read policy for one opened sensor.
#[derive(Debug, Clone)]
pub struct ReadPolicy {
    model: Model,
    interval: Duration,
    spacing: Duration,
    confirm_within: Duration,
    tolerance: Tolerance,
    /// No read before this (settle time, then the minimum spacing after the last read).
    earliest: Instant,
    /// Start of the current interval.
    interval_start: Instant,
    published_this_interval: bool,
    /// The newest good read and when its sample was taken: what the next read is checked against.
    last_good: Option<(Measurement, Instant)>,
    /// Intervals in a row that ended without a reading.
    missed_in_row: u32,
    /// Failures since the last published reading, by kind.
    spell: BTreeMap<FailureKind, u64>,
    counters: ReadCounters,
}

impl ReadPolicy {
    /// The policy for a sensor opened (powered up) at `opened_at`; `counters` carry over from
    /// an earlier opening of the same sensor.
    pub fn new(config: PolicyConfig, opened_at: Instant, counters: ReadCounters) -> Self {
        let spacing = config.pacing.min_spacing;
        let first = opened_at + config.pacing.settle;
        Self {
            model: config.model,
            interval: config.interval.max(spacing),
            spacing,
            confirm_within: config.pacing.confirm_within,
            tolerance: Tolerance::for_model(config.model),
            earliest: first,
            interval_start: first,
            published_this_interval: false,
            last_good: None,
            missed_in_row: 0,
            spell: BTreeMap::new(),
            counters,
        }
    }

    /// The interval in use: the one asked for, but never shorter than the model allows.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The counters so far.
    pub fn counters(&self) -> &ReadCounters {
        &self.counters
    }

    /// Intervals in a row that ended without a reading.
    pub fn missed_in_row(&self) -> u32 {
        self.missed_in_row
    }

    /// The most frequent failure since the last published reading (ties: the first in
    /// [`FailureKind::ALL`] order).
    pub fn spell_reason(&self) -> Option<FailureKind> {
        let mut best: Option<(FailureKind, u64)> = None;
        for kind in FailureKind::ALL {
            let n = self.spell.get(&kind).copied().unwrap_or(0);
            if n > 0 && best.is_none_or(|(_, b)| n > b) {
                best = Some((kind, n));
            }
        }
        best.map(|(k, _)| k)
    }

    /// When to read next: at the start of the next interval once this one has published,
    /// else as soon as the minimum spacing allows.
    pub fn next_read_at(&self) -> Instant {
        let target = if self.published_this_interval {
            self.interval_start + self.interval
        } else {
            self.interval_start
        };
        target.max(self.earliest)
    }

    /// Takes the outcome of the read whose sample was taken at `at` and says what to do with it.
    pub fn record(&mut self, at: Instant, outcome: Result<Measurement, &ReadError>) -> Verdict {
        self.advance_to(at);
        self.earliest = at + self.spacing;
        let m = match outcome {
            Ok(m) => m,
            Err(e) => {
                self.counters.count_failure(e);
                if let Some(kind) = failure_kind(e) {
                    *self.spell.entry(kind).or_default() += 1;
                }
                return match e {
                    ReadError::Unavailable(_) => Verdict::Lost,
                    _ => Verdict::Retry,
                };
            }
        };
        if !self.in_range(m) {
            self.counters.implausible += 1;
            *self.spell.entry(FailureKind::Implausible).or_default() += 1;
            return Verdict::Retry;
        }
        self.counters.ok += 1;
        let previous = self.last_good.replace((m, at));
        let comparable = previous.filter(|&(_, then)| {
            let gap = at.saturating_duration_since(then);
            gap >= self.spacing && gap <= self.confirm_within
        });
        match comparable {
            Some((p, _)) if self.tolerance.agree(p, m) && !self.published_this_interval => {
                self.counters.confirmed += 1;
                self.counters.published += 1;
                self.published_this_interval = true;
                self.missed_in_row = 0;
                self.spell.clear();
                Verdict::Publish(m)
            }
            Some((p, _)) if !self.tolerance.agree(p, m) => {
                self.counters.disagreed += 1;
                *self.spell.entry(FailureKind::Unconfirmed).or_default() += 1;
                Verdict::Unconfirmed(m)
            }
            _ => Verdict::Unconfirmed(m),
        }
    }

    /// Moves the interval forward to the one containing `at`, counting those that ended
    /// without a reading.
    fn advance_to(&mut self, at: Instant) {
        while at >= self.interval_start + self.interval {
            if !self.published_this_interval {
                self.counters.missed_intervals += 1;
                self.missed_in_row = self.missed_in_row.saturating_add(1);
            }
            self.interval_start += self.interval;
            self.published_this_interval = false;
        }
    }

    fn in_range(&self, m: Measurement) -> bool {
        let (t_lo, t_hi) = self.model.temperature_range();
        let (h_lo, h_hi) = self.model.humidity_range();
        (t_lo..=t_hi).contains(&m.temperature_c) && (h_lo..=h_hi).contains(&m.humidity_pct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: f64, h: f64) -> Measurement {
        Measurement {
            temperature_c: t,
            humidity_pct: h,
        }
    }

    fn policy(model: Model, interval: Duration) -> (ReadPolicy, Instant) {
        let t0 = Instant::now();
        let p = ReadPolicy::new(
            PolicyConfig {
                model,
                interval,
                pacing: Pacing::for_model(model),
            },
            t0,
            ReadCounters::default(),
        );
        (p, t0)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn checksum() -> ReadError {
        ReadError::Decode(DecodeError::Checksum {
            expected: 1,
            actual: 2,
            bytes: [0; 5],
        })
    }

    /// Reads at the times the policy asks for, answering from `answers` (seconds after t0 of
    /// each read, and its verdict), under the paused clock.
    async fn drive(
        p: &mut ReadPolicy,
        t0: Instant,
        answers: Vec<Result<Measurement, ReadError>>,
    ) -> Vec<(f64, Verdict)> {
        let mut out = Vec::new();
        for answer in answers {
            tokio::time::sleep_until(p.next_read_at()).await;
            let at = Instant::now();
            let v = p.record(at, answer.as_ref().copied());
            out.push(((at - t0).as_secs_f64(), v));
        }
        out
    }

    fn published(run: &[(f64, Verdict)]) -> Vec<(f64, f64)> {
        run.iter()
            .filter_map(|(at, v)| match v {
                Verdict::Publish(m) => Some((*at, m.temperature_c)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_interval_takes_two_reads_one_spacing_apart_and_publishes_the_second() {
        let (mut p, t0) = policy(Model::Dht11, secs(10));
        assert_eq!(p.next_read_at(), t0 + secs(1), "settle time");
        let run = drive(&mut p, t0, (0..6).map(|_| Ok(m(20.0, 40.0))).collect()).await;
        let times: Vec<f64> = run.iter().map(|(at, _)| *at).collect();
        assert_eq!(times, [1.0, 2.0, 11.0, 12.0, 21.0, 22.0]);
        assert_eq!(published(&run), [(2.0, 20.0), (12.0, 20.0), (22.0, 20.0)]);
        assert!(matches!(run[0].1, Verdict::Unconfirmed(_)));
        // The read at 11 s does not lean on the one at 2 s: 9 s is beyond two spacings.
        assert!(matches!(run[2].1, Verdict::Unconfirmed(_)));
        let c = p.counters();
        assert_eq!((c.ok, c.confirmed, c.published, c.disagreed), (6, 3, 3, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_interval_reads_once_confirmed_by_the_previous_intervals_read() {
        // DHT11 at 2 s: two reads do not fit in one interval (1 s spacing needs 2 s for two
        // plus the next interval's first), so each read is confirmed by the one before.
        let (mut p, t0) = policy(Model::Dht11, secs(2));
        let run = drive(&mut p, t0, (0..5).map(|_| Ok(m(20.0, 40.0))).collect()).await;
        let times: Vec<f64> = run.iter().map(|(at, _)| *at).collect();
        assert_eq!(times, [1.0, 2.0, 3.0, 5.0, 7.0]);
        assert_eq!(
            published(&run),
            [(2.0, 20.0), (3.0, 20.0), (5.0, 20.0), (7.0, 20.0)]
        );
        // DHT22 asked for 1 s: stretched to its 2 s; the first interval has no pair yet and is
        // missed, every later one publishes its single read.
        let (mut p, t0) = policy(Model::Dht22, secs(1));
        assert_eq!(p.interval(), secs(2));
        let run = drive(&mut p, t0, (0..4).map(|_| Ok(m(20.0, 40.0))).collect()).await;
        assert_eq!(
            published(&run),
            [(4.0, 20.0), (6.0, 20.0), (8.0, 20.0)],
            "{run:?}"
        );
        assert_eq!(p.counters().missed_intervals, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_read_is_never_published_and_a_real_jump_is_published_once_confirmed() {
        let (mut p, t0) = policy(Model::Dht11, secs(10));
        let answers = vec![
            Ok(m(20.0, 40.0)),
            Ok(m(20.0, 40.0)), // 2 s: published
            Ok(m(20.0, 40.0)), // 11 s
            Ok(m(45.0, 40.0)), // 12 s: a wrong frame that passed the checksum
            Ok(m(20.0, 40.0)), // 13 s: disagrees with it
            Ok(m(21.0, 41.0)), // 14 s: agrees with 13 s within ±1 °C / ±2 %: published
            Ok(m(30.0, 41.0)), // 21 s: the room really got warmer…
            Ok(m(30.0, 41.0)), // 22 s: …and a second read says so
        ];
        let run = drive(&mut p, t0, answers).await;
        assert_eq!(published(&run), [(2.0, 20.0), (14.0, 21.0), (22.0, 30.0)]);
        assert!(
            run.iter()
                .all(|(_, v)| *v != Verdict::Publish(m(45.0, 40.0)))
        );
        assert_eq!(p.counters().disagreed, 2, "45 vs 20 and 20 vs 45");
    }

    #[tokio::test(start_paused = true)]
    async fn reads_closer_than_the_spacing_or_further_than_two_spacings_confirm_nothing() {
        let (mut p, t0) = policy(Model::Dht22, secs(60));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A cached copy of the same sample 1 s later is not a second sample.
        assert!(matches!(
            p.record(at(2_000), Ok(m(45.0, 40.0))),
            Verdict::Unconfirmed(_)
        ));
        assert!(matches!(
            p.record(at(3_000), Ok(m(45.0, 40.0))),
            Verdict::Unconfirmed(_)
        ));
        // 4.5 s after the last: beyond 2 × 2 s, too far apart to vouch for each other.
        assert!(matches!(
            p.record(at(7_500), Ok(m(20.0, 40.0))),
            Verdict::Unconfirmed(_)
        ));
        assert_eq!(
            p.record(at(9_500), Ok(m(20.4, 41.9))),
            Verdict::Publish(m(20.4, 41.9))
        );
    }

    #[test]
    fn tolerances_are_resolution_plus_a_margin() {
        let t11 = Tolerance::for_model(Model::Dht11);
        assert!(t11.agree(m(20.0, 40.0), m(21.0, 42.0)));
        assert!(!t11.agree(m(20.0, 40.0), m(22.0, 40.0)));
        assert!(!t11.agree(m(20.0, 40.0), m(20.0, 43.0)));
        let t22 = Tolerance::for_model(Model::Dht22);
        assert!(t22.agree(m(19.6, 40.0), m(20.1, 42.0)));
        assert!(!t22.agree(m(19.6, 40.0), m(20.2, 40.0)));
        assert!(!t22.agree(m(19.6, 40.0), m(19.6, 42.1)));
    }

    #[tokio::test(start_paused = true)]
    async fn missed_intervals_in_a_row_and_the_reason_of_the_spell() {
        let (mut p, t0) = policy(Model::Dht11, secs(5));
        let mut answers: Vec<Result<Measurement, ReadError>> =
            vec![Ok(m(20.0, 40.0)), Ok(m(20.0, 40.0))];
        answers.extend((0..12).map(|_| Err(ReadError::Decode(DecodeError::NoResponse))));
        answers.push(Err(checksum()));
        let run = drive(&mut p, t0, answers).await;
        assert_eq!(published(&run), [(2.0, 20.0)]);
        // Reads at 6…17 s failed: the intervals 6–11 and 11–16 ended without a reading.
        assert_eq!(p.missed_in_row(), 2);
        assert_eq!(p.spell_reason(), Some(FailureKind::NoResponse));
        let errors = p.counters().errors();
        assert_eq!(errors.get("no_response"), Some(&12));
        assert_eq!(errors.get("checksum"), Some(&1));
        // The first confirmed reading ends the spell.
        drive(&mut p, t0, vec![Ok(m(20.0, 40.0)), Ok(m(20.0, 40.0))]).await;
        assert_eq!((p.missed_in_row(), p.spell_reason()), (0, None));
    }

    #[test]
    fn the_unavailable_device_is_lost_and_counted() {
        let (mut p, t0) = policy(Model::Dht11, secs(10));
        let v = p.record(t0 + secs(1), Err(&ReadError::Unavailable("x".into())));
        assert_eq!(v, Verdict::Lost);
        assert_eq!(p.counters().unavailable, 1);
    }

    #[test]
    fn out_of_range_is_refused() {
        let (mut p, t0) = policy(Model::Dht11, secs(10));
        assert_eq!(p.record(t0 + secs(1), Ok(m(70.0, 40.0))), Verdict::Retry);
        assert_eq!(p.record(t0 + secs(2), Ok(m(70.0, 40.0))), Verdict::Retry);
        assert_eq!(p.counters().implausible, 2);
        assert_eq!(p.counters().published, 0);
    }

    #[test]
    fn failures_are_retried_at_the_minimum_spacing_and_counted_by_kind() {
        let (mut p, t0) = policy(Model::Dht11, secs(10));
        let first = p.next_read_at();
        assert_eq!(p.record(first, Err(&checksum())), Verdict::Retry);
        assert_eq!(p.next_read_at(), first + secs(1));
        let e = ReadError::Driver {
            timed_out: true,
            reason: String::new(),
        };
        assert_eq!(p.record(p.next_read_at(), Err(&e)), Verdict::Retry);
        let c = p.counters();
        assert_eq!((c.checksum, c.timeout, c.attempts()), (1, 1, 2));
        assert_eq!(p.next_read_at(), t0 + secs(3));
    }
}
