//! The read policy: when to read the sensor, and which reads become published readings.
//!
//! Pure: it is told the time and the outcome of each read and answers with the time of the
//! next read and a [`Verdict`]; the reader (`reader.rs`) does the waiting and the I/O.
//!
//! - **Pacing.** Never two reads closer than the model allows (DHT11 1 s, DHT22 2 s); the first
//!   read only after the sensor has settled after power-up.
//! - **Interval with retries.** One reading is published per interval, on a fixed schedule
//!   (no drift). A failed read is retried at the model's minimum spacing until the interval
//!   ends; an interval without a good read publishes nothing (and is counted as missed).
//! - **Plausibility.** Values outside the model's range are refused. A jump from the last
//!   published value beyond [`SPIKE_TEMPERATURE_C`] or [`SPIKE_HUMIDITY_PCT`] is held until a
//!   second read confirms it; what is then published is the confirming read, with its own time.
//! - **Freshness.** Only the read just made is ever published, stamped with the time it was
//!   made: no old value is republished with a new time.

use std::time::Duration;

use k3sense_protocol::Model;
use tokio::time::Instant;

use crate::{dht::DecodeError, dht::Measurement, sensor::ReadError};

/// A temperature change (°C) from the last published value that needs a second read.
pub const SPIKE_TEMPERATURE_C: f64 = 5.0;
/// A humidity change (%RH) from the last published value that needs a second read.
pub const SPIKE_HUMIDITY_PCT: f64 = 15.0;

/// How fast a sensor may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// The shortest time between two reads.
    pub min_spacing: Duration,
    /// How long after power-up (here: after opening) the sensor is left alone.
    pub settle: Duration,
}

impl Pacing {
    /// The datasheets' limits: DHT11 once a second, DHT22 once every two seconds, and as long
    /// again after power-up before the first read.
    pub fn for_model(model: Model) -> Self {
        let min_spacing = match model {
            Model::Dht11 => Duration::from_secs(1),
            Model::Dht22 => Duration::from_secs(2),
        };
        Self {
            min_spacing,
            settle: min_spacing,
        }
    }
}

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
    /// Of the `ok` reads: jumps held for a second read.
    pub spike_held: u64,
    /// Held jumps a second read confirmed (the confirming read was published).
    pub spike_confirmed: u64,
    /// Held jumps the next read contradicted (never published).
    pub spike_discarded: u64,
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

/// What to do with one read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Publish this measurement, stamped with the time of the read.
    Publish(Measurement),
    /// A jump held until the next read confirms it; nothing to publish yet.
    Held(Measurement),
    /// The read failed or was implausible; it will be retried.
    Retry,
    /// The device is gone: stop reading it, report it offline, reopen it later.
    Lost,
}

/// The policy's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// The sensor model: its range and pacing.
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
    /// No read before this (settle time, then the minimum spacing after the last read).
    earliest: Instant,
    /// Start of the current interval.
    interval_start: Instant,
    published_this_interval: bool,
    last_published: Option<Measurement>,
    held: Option<Measurement>,
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
            earliest: first,
            interval_start: first,
            published_this_interval: false,
            last_published: None,
            held: None,
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

    /// Takes the outcome of the read made at `at` and says what to do with it.
    pub fn record(&mut self, at: Instant, outcome: Result<Measurement, &ReadError>) -> Verdict {
        self.advance_to(at);
        self.earliest = at + self.spacing;
        let m = match outcome {
            Ok(m) => m,
            Err(e) => {
                self.counters.count_failure(e);
                return match e {
                    ReadError::Unavailable(_) => Verdict::Lost,
                    _ => Verdict::Retry,
                };
            }
        };
        if !self.in_range(m) {
            self.counters.implausible += 1;
            return Verdict::Retry;
        }
        self.counters.ok += 1;
        if let Some(last) = self.last_published
            && is_jump(last, m)
        {
            if let Some(held) = self.held
                && !is_jump(held, m)
            {
                self.counters.spike_confirmed += 1;
            } else {
                self.counters.spike_held += 1;
                self.held = Some(m);
                return Verdict::Held(m);
            }
        } else if self.held.is_some() {
            self.counters.spike_discarded += 1;
        }
        self.held = None;
        self.last_published = Some(m);
        self.published_this_interval = true;
        self.counters.published += 1;
        Verdict::Publish(m)
    }

    /// Moves the interval forward to the one containing `at`, counting those that ended
    /// without a reading.
    fn advance_to(&mut self, at: Instant) {
        while at >= self.interval_start + self.interval {
            if !self.published_this_interval {
                self.counters.missed_intervals += 1;
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

fn is_jump(from: Measurement, to: Measurement) -> bool {
    (to.temperature_c - from.temperature_c).abs() > SPIKE_TEMPERATURE_C
        || (to.humidity_pct - from.humidity_pct).abs() > SPIKE_HUMIDITY_PCT
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

    fn policy(model: Model, interval_s: u64) -> (ReadPolicy, Instant) {
        let t0 = Instant::now();
        let p = ReadPolicy::new(
            PolicyConfig {
                model,
                interval: Duration::from_secs(interval_s),
                pacing: Pacing::for_model(model),
            },
            t0,
            ReadCounters::default(),
        );
        (p, t0)
    }

    fn checksum() -> ReadError {
        ReadError::Decode(DecodeError::Checksum {
            expected: 1,
            actual: 2,
            bytes: [0; 5],
        })
    }

    #[test]
    fn first_read_waits_for_the_settle_time_then_one_per_interval() {
        let (mut p, t0) = policy(Model::Dht22, 10);
        assert_eq!(p.next_read_at(), t0 + Duration::from_secs(2));
        let at = p.next_read_at();
        assert_eq!(
            p.record(at, Ok(m(20.0, 40.0))),
            Verdict::Publish(m(20.0, 40.0))
        );
        assert_eq!(p.next_read_at(), at + Duration::from_secs(10));
    }

    #[test]
    fn an_interval_shorter_than_the_model_allows_is_stretched() {
        let (p, _) = policy(Model::Dht22, 1);
        assert_eq!(p.interval(), Duration::from_secs(2));
    }

    #[test]
    fn the_unavailable_device_is_lost_and_counted() {
        let (mut p, t0) = policy(Model::Dht11, 10);
        let v = p.record(
            t0 + Duration::from_secs(1),
            Err(&ReadError::Unavailable("x".into())),
        );
        assert_eq!(v, Verdict::Lost);
        assert_eq!(p.counters().unavailable, 1);
    }

    #[test]
    fn out_of_range_is_refused() {
        let (mut p, t0) = policy(Model::Dht11, 10);
        assert_eq!(
            p.record(t0 + Duration::from_secs(1), Ok(m(70.0, 40.0))),
            Verdict::Retry
        );
        assert_eq!(p.counters().implausible, 1);
        assert_eq!(p.counters().published, 0);
    }

    #[test]
    fn failures_are_retried_at_the_minimum_spacing_and_counted_by_kind() {
        let (mut p, t0) = policy(Model::Dht11, 10);
        let first = p.next_read_at();
        assert_eq!(p.record(first, Err(&checksum())), Verdict::Retry);
        assert_eq!(p.next_read_at(), first + Duration::from_secs(1));
        let e = ReadError::Driver {
            timed_out: true,
            reason: String::new(),
        };
        assert_eq!(p.record(p.next_read_at(), Err(&e)), Verdict::Retry);
        let c = p.counters();
        assert_eq!((c.checksum, c.timeout, c.attempts()), (1, 1, 2));
        assert_eq!(p.next_read_at(), t0 + Duration::from_secs(3));
    }
}
