//! The reader task: opens the sensor, reads it as the [`ReadPolicy`] says, numbers the
//! readings, and tells the link about readings and about the sensor's availability.
//!
//! A sensor that cannot be opened (not a Pi, no /dev/gpiomem, no IIO device) or goes away does
//! not stop the process: the reader reports it `offline`, logs the reason once (then quietly
//! while it stays the same), and tries to open it again every `reopen_every`, so fixing the
//! node heals the publisher without a restart. The link numbers what it hands over
//! (`crate::numbering`), so `seq` continues across reopenings of the sensor.
//!
//! It also keeps the sensor's own health (`<prefix>/<id>/sensor`): after
//! [`ReaderConfig::unhealthy_after`] intervals in a row without a reading the sensor is
//! `not_answering`, with the most frequent failure as the reason; the first published reading
//! makes it `ok` again. The publisher's availability stays `online` throughout: its process and
//! its connection are fine, and a gateway or Home Assistant can tell the two apart.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use k3sense_protocol::{Availability, HealthStatus, Model, SensorHealth, SensorId};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    dht::Measurement,
    link::Update,
    numbering::Measured,
    policy::{PolicyConfig, ReadCounters, ReadPolicy, Verdict},
    sensor::{OpenError, ReadError, Sensor},
};

/// Opens the sensor; called again after every failure. Blocking.
pub type Opener = Box<dyn FnMut() -> Result<Box<dyn Sensor>, OpenError> + Send>;

/// How long after a failed open, or a lost device, the sensor is opened again.
pub const REOPEN_EVERY: Duration = Duration::from_secs(30);
pub use crate::config::UNHEALTHY_AFTER;
/// How often the read counters are logged.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(600);

/// Where `read_at` comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's UTC clock at the moment of the read.
    System,
    /// `utc` at `at`, advancing with tokio's clock: deterministic under `tokio::time::pause`.
    Anchored {
        /// The wall time at `at`.
        utc: DateTime<Utc>,
        /// The instant `utc` was taken.
        at: Instant,
    },
}

impl Clock {
    fn now(&self) -> DateTime<Utc> {
        match *self {
            Self::System => Utc::now(),
            Self::Anchored { utc, at } => {
                let since = Instant::now().saturating_duration_since(at);
                utc + chrono::Duration::from_std(since).unwrap_or_default()
            }
        }
    }
}

/// The reader's settings.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// The sensor's id in readings.
    pub id: SensorId,
    /// The sensor model.
    pub model: Model,
    /// One reading per interval.
    pub interval: Duration,
    /// See [`REOPEN_EVERY`].
    pub reopen_every: Duration,
    /// See [`SUMMARY_EVERY`].
    pub summary_every: Duration,
    /// Where `read_at` comes from.
    pub clock: Clock,
    /// See [`UNHEALTHY_AFTER`]; at least 1.
    pub unhealthy_after: u32,
}

impl ReaderConfig {
    /// The defaults for sensor `id` of `model`, one reading per `interval`.
    pub fn new(id: SensorId, model: Model, interval: Duration) -> Self {
        Self {
            id,
            model,
            interval,
            reopen_every: REOPEN_EVERY,
            summary_every: SUMMARY_EVERY,
            clock: Clock::System,
            unhealthy_after: UNHEALTHY_AFTER,
        }
    }
}

/// Opens the sensor off the async runtime.
pub async fn open(opener: Opener) -> (Opener, Result<Box<dyn Sensor>, OpenError>) {
    let mut opener = opener;
    match tokio::task::spawn_blocking(move || {
        let result = opener();
        (opener, result)
    })
    .await
    {
        Ok(pair) => pair,
        // The opener panicked and is lost with its thread; a stand-in keeps saying why.
        Err(e) => {
            let why = OpenError(format!("opening the sensor failed: {e}"));
            let again = why.clone();
            (Box::new(move || Err(again.clone())), Err(why))
        }
    }
}

/// One read attempt, stamped with when its sample was taken.
struct Attempt {
    result: Result<Measurement, ReadError>,
    /// For the policy's pacing.
    at: Instant,
    /// For the reading.
    read_at: DateTime<Utc>,
}

enum Ended {
    Shutdown,
    Lost(String),
}

struct Reader {
    config: ReaderConfig,
    updates: mpsc::Sender<Update>,
    counters: watch::Sender<ReadCounters>,
    shutdown: CancellationToken,
    online: bool,
    last_open_error: Option<String>,
    next_summary: Instant,
    /// The health last told to the link (`None` before the first reading or verdict).
    health: Option<HealthStatus>,
    /// When the current spell of failed reads began (wall clock), until a reading ends it.
    failing_since: Option<DateTime<Utc>>,
    /// Whether the two's-complement clone message was logged.
    clone_warned: bool,
}

/// Reads until `shutdown` (or until the link is gone). `first` is the result of the first
/// [`open`]: the link was started with `online` if it succeeded, `offline` if not. Counters
/// are published on `counters` after every read.
pub async fn run(
    opener: Opener,
    first: Result<Box<dyn Sensor>, OpenError>,
    config: ReaderConfig,
    updates: mpsc::Sender<Update>,
    counters: watch::Sender<ReadCounters>,
    shutdown: CancellationToken,
) {
    let mut reader = Reader {
        next_summary: Instant::now() + config.summary_every,
        config,
        updates,
        counters,
        shutdown,
        online: first.is_ok(),
        last_open_error: None,
        health: None,
        failing_since: None,
        clone_warned: false,
    };
    let mut opener = opener;
    let mut current = first;
    loop {
        match current {
            Ok(sensor) => {
                if !reader.online && !reader.set_online(true).await {
                    return;
                }
                if reader.last_open_error.take().is_some() {
                    tracing::info!(sensor_id = %reader.config.id, "the sensor is readable again");
                }
                match reader.read_until_lost(sensor).await {
                    Ended::Shutdown => return,
                    Ended::Lost(why) => {
                        tracing::error!(sensor_id = %reader.config.id, "{why}; reopening it in {:?}", reader.config.reopen_every);
                        if !reader.set_online(false).await {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                reader.open_failed(&e);
                if reader.online && !reader.set_online(false).await {
                    return;
                }
            }
        }
        if !reader.pause(reader.config.reopen_every).await {
            return;
        }
        let (returned, result) = open(opener).await;
        opener = returned;
        current = result;
    }
}

impl Reader {
    /// Logs why the sensor cannot be opened: loudly the first time (and when the reason
    /// changes), quietly while it stays the same.
    fn open_failed(&mut self, e: &OpenError) {
        let message = e.to_string();
        if self.last_open_error.as_deref() == Some(message.as_str()) {
            tracing::debug!(sensor_id = %self.config.id, "{message}");
        } else {
            tracing::error!(
                sensor_id = %self.config.id,
                "{message}. The sensor is reported offline; retrying every {}s",
                self.config.reopen_every.as_secs()
            );
            self.last_open_error = Some(message);
        }
    }

    /// Tells the link the sensor's availability; false when the link is gone.
    async fn set_online(&mut self, online: bool) -> bool {
        self.online = online;
        let a = if online {
            Availability::Online
        } else {
            Availability::Offline
        };
        self.updates.send(Update::Sensor(a)).await.is_ok()
    }

    /// Waits `d`; false on shutdown.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep(d) => true,
        }
    }

    /// One blocking read off the runtime; the sensor back, the result, and when the sample
    /// was taken: the start of a read that makes the sensor measure (GPIO: the frame follows
    /// the start pulse within ~25 ms), the end of one that returns what a driver measured
    /// during it (IIO).
    async fn read_once(
        &self,
        mut sensor: Box<dyn Sensor>,
    ) -> Result<(Box<dyn Sensor>, Attempt), String> {
        let at_start = Instant::now();
        let read_at_start = self.config.clock.now();
        let at_end_of_read = sensor.sampled_at_end();
        let (sensor, result) = tokio::task::spawn_blocking(move || {
            let result = sensor.read();
            (sensor, result)
        })
        .await
        .map_err(|e| format!("the sensor read failed: {e}"))?;
        let (at, read_at) = if at_end_of_read {
            (Instant::now(), self.config.clock.now())
        } else {
            (at_start, read_at_start)
        };
        Ok((
            sensor,
            Attempt {
                result,
                at,
                read_at,
            },
        ))
    }

    async fn read_until_lost(&mut self, sensor: Box<dyn Sensor>) -> Ended {
        let config = PolicyConfig {
            model: self.config.model,
            interval: self.config.interval,
            pacing: sensor.pacing(),
        };
        let mut policy = ReadPolicy::new(config, Instant::now(), *self.counters.borrow());
        if policy.interval() != self.config.interval {
            tracing::warn!(asked = ?self.config.interval, using = ?policy.interval(), model = %self.config.model, "the interval is shorter than the sensor allows");
        }
        tracing::info!(sensor_id = %self.config.id, model = %self.config.model, interval = ?policy.interval(), "reading the sensor");
        let mut sensor = sensor;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ended::Shutdown,
                () = tokio::time::sleep_until(policy.next_read_at()) => {}
            }
            let (returned, attempt) = match self.read_once(sensor).await {
                Ok(read) => read,
                Err(why) => return Ended::Lost(why),
            };
            sensor = returned;
            let Attempt {
                result,
                at,
                read_at,
            } = attempt;
            let missed = policy.counters().missed_intervals;
            let verdict = policy.record(at, result.as_ref().copied());
            let counters = *policy.counters();
            self.counters.send_replace(counters);
            if counters.missed_intervals > missed {
                tracing::warn!(sensor_id = %self.config.id, missed = counters.missed_intervals, "no good read in a whole interval; nothing published for it");
            }
            self.maybe_summarise(&counters);
            if !self.track_health(&policy, &verdict, read_at).await {
                return Ended::Shutdown;
            }
            match verdict {
                Verdict::Publish(m) => {
                    if !self.publish(m, read_at).await {
                        return Ended::Shutdown;
                    }
                }
                Verdict::Unconfirmed(m) => tracing::debug!(
                    t = m.temperature_c,
                    rh = m.humidity_pct,
                    "a good read; waiting for an independent second read to confirm it"
                ),
                Verdict::Retry => match &result {
                    // Not noise: every read of this sensor will say it. Say it once, loudly.
                    Err(e) if e.is_twos_complement_clone() && !self.clone_warned => {
                        self.clone_warned = true;
                        tracing::error!(sensor_id = %self.config.id, "{e}");
                    }
                    Err(e) => tracing::debug!(error = %e, "sensor read failed; retrying"),
                    Ok(_) => {}
                },
                Verdict::Lost => {
                    return Ended::Lost(match result {
                        Err(e) => e.to_string(),
                        Ok(_) => "the sensor went away".to_owned(),
                    });
                }
            }
        }
    }

    /// Updates the sensor's health after a verdict and tells the link when it changed; false
    /// when the link is gone. `ok` goes out before the reading that ends a spell, so a
    /// subscriber sees the sensor live again together with its first value.
    async fn track_health(
        &mut self,
        policy: &ReadPolicy,
        verdict: &Verdict,
        read_at: DateTime<Utc>,
    ) -> bool {
        let status = match verdict {
            Verdict::Publish(_) => {
                self.failing_since = None;
                if self.health == Some(HealthStatus::Ok) {
                    return true;
                }
                if self.health == Some(HealthStatus::NotAnswering) {
                    tracing::info!(sensor_id = %self.config.id, "the sensor answers again");
                }
                HealthStatus::Ok
            }
            Verdict::Lost => return true,
            Verdict::Retry | Verdict::Unconfirmed(_) => {
                if matches!(verdict, Verdict::Retry) && self.failing_since.is_none() {
                    self.failing_since = Some(read_at);
                }
                if policy.missed_in_row() < self.config.unhealthy_after.max(1)
                    || self.health == Some(HealthStatus::NotAnswering)
                {
                    return true;
                }
                HealthStatus::NotAnswering
            }
        };
        self.health = Some(status);
        let reason = (status == HealthStatus::NotAnswering)
            .then(|| policy.spell_reason())
            .flatten();
        let since = match status {
            HealthStatus::Ok => read_at,
            HealthStatus::NotAnswering => self.failing_since.unwrap_or(read_at),
        };
        if status == HealthStatus::NotAnswering {
            tracing::warn!(
                sensor_id = %self.config.id,
                intervals = policy.missed_in_row(),
                reason = reason.map_or("unknown", |r| r.as_str()),
                "the sensor is not answering: no reading for {} intervals in a row ({})",
                policy.missed_in_row(),
                reason.map_or("no reason counted", |r| r.hint())
            );
        }
        let health = SensorHealth {
            sensor_id: self.config.id.clone(),
            status,
            since: since.trunc_subsecs(3),
            reason,
            errors: policy.counters().errors(),
        };
        self.updates.send(Update::Health(health)).await.is_ok()
    }

    /// Hands a confirmed measurement to the link, which numbers it; false when the link is gone.
    async fn publish(&mut self, measurement: Measurement, read_at: DateTime<Utc>) -> bool {
        tracing::debug!(
            t = measurement.temperature_c,
            rh = measurement.humidity_pct,
            "read"
        );
        let measured = Measured {
            measurement,
            read_at,
        };
        self.updates.send(Update::Measured(measured)).await.is_ok()
    }

    fn maybe_summarise(&mut self, c: &ReadCounters) {
        let now = Instant::now();
        if now < self.next_summary {
            return;
        }
        self.next_summary = now + self.config.summary_every;
        tracing::info!(
            sensor_id = %self.config.id,
            attempts = c.attempts(),
            ok = c.ok,
            published = c.published,
            no_response = c.no_response,
            timeout = c.timeout,
            short_frame = c.short_frame,
            bad_pulse = c.bad_pulse,
            checksum = c.checksum,
            implausible = c.implausible,
            driver_error = c.driver_error,
            unavailable = c.unavailable,
            confirmed = c.confirmed,
            disagreed = c.disagreed,
            missed_intervals = c.missed_intervals,
            "sensor reads so far"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use chrono::TimeZone;

    use super::*;
    use crate::{
        dht::{DecodeError, Measurement},
        sensor::ReadError,
    };

    /// Answers reads from a script (then keeps giving the last value), noting when it was read.
    struct Scripted {
        model: Model,
        script: VecDeque<Result<Measurement, ReadError>>,
        last: Measurement,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl Sensor for Scripted {
        fn model(&self) -> Model {
            self.model
        }
        fn read(&mut self) -> Result<Measurement, ReadError> {
            self.calls.lock().unwrap().push(Instant::now());
            match self.script.pop_front() {
                Some(Ok(m)) => {
                    self.last = m;
                    Ok(m)
                }
                Some(Err(e)) => Err(e),
                None => Ok(self.last),
            }
        }
    }

    fn ok(t: f64, h: f64) -> Result<Measurement, ReadError> {
        Ok(Measurement {
            temperature_c: t,
            humidity_pct: h,
        })
    }

    fn checksum() -> Result<Measurement, ReadError> {
        Err(ReadError::Decode(DecodeError::Checksum {
            expected: 0,
            actual: 1,
            bytes: [0; 5],
        }))
    }

    fn epoch() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 4, 0, 0).unwrap()
    }

    struct Run {
        t0: Instant,
        updates: Vec<Update>,
        calls: Vec<Duration>,
        counters: ReadCounters,
    }

    impl Run {
        /// (seconds after t0 of read_at, temperature) of each published measurement, in order.
        fn readings(&self) -> Vec<(f64, f64)> {
            self.updates
                .iter()
                .filter_map(|u| match u {
                    Update::Measured(m) => Some((
                        (m.read_at - epoch()).as_seconds_f64(),
                        m.measurement.temperature_c,
                    )),
                    Update::Sensor(_) | Update::Health(_) => None,
                })
                .collect()
        }

        fn call_secs(&self) -> Vec<u64> {
            self.calls.iter().map(Duration::as_secs).collect()
        }
    }

    /// Runs the reader for `for_s` virtual seconds. `opens` are the results of the opener's
    /// calls after the first (`first_ok`: whether the first open gives the scripted sensor).
    async fn run_reader(
        model: Model,
        interval_s: u64,
        script: Vec<Result<Measurement, ReadError>>,
        first_ok: bool,
        failed_reopens: usize,
        for_s: u64,
    ) -> Run {
        let t0 = Instant::now();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let sensor = Scripted {
            model,
            script: script.into(),
            last: Measurement {
                temperature_c: 20.0,
                humidity_pct: 40.0,
            },
            calls: calls.clone(),
        };
        let mut spare: Option<Box<dyn Sensor>> = None;
        let first: Result<Box<dyn Sensor>, OpenError> = if first_ok {
            Ok(Box::new(sensor))
        } else {
            spare = Some(Box::new(sensor));
            Err(OpenError("no sensor here".into()))
        };
        let mut failures = failed_reopens;
        let opener: Opener = Box::new(move || {
            if failures > 0 {
                failures -= 1;
                return Err(OpenError("no sensor here".into()));
            }
            spare.take().ok_or_else(|| OpenError("opened twice".into()))
        });
        let mut config = ReaderConfig::new(
            SensorId::new("pi-1").unwrap(),
            model,
            Duration::from_secs(interval_s),
        );
        config.clock = Clock::Anchored {
            utc: epoch(),
            at: t0,
        };
        let (tx, mut rx) = mpsc::channel(1000);
        let (counters, watch_rx) = watch::channel(ReadCounters::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(opener, first, config, tx, counters, shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(for_s)).await;
        shutdown.cancel();
        task.await.unwrap();
        let mut updates = Vec::new();
        while let Ok(u) = rx.try_recv() {
            updates.push(u);
        }
        let calls = calls.lock().unwrap().iter().map(|c| *c - t0).collect();
        let counters = *watch_rx.borrow();
        Run {
            t0,
            updates,
            calls,
            counters,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reads_twice_per_interval_and_publishes_the_confirmed_second_read() {
        let run = run_reader(Model::Dht11, 10, vec![], true, 0, 35).await;
        assert_eq!(run.call_secs(), [1, 2, 11, 12, 21, 22, 31, 32]);
        assert_eq!(
            run.readings(),
            [(2.0, 20.0), (12.0, 20.0), (22.0, 20.0), (32.0, 20.0)]
        );
        // An interval shorter than a DHT22 allows is stretched to its 2 s, and each read is
        // confirmed by the previous interval's.
        let run = run_reader(Model::Dht22, 1, vec![], true, 0, 9).await;
        assert_eq!(run.call_secs(), [2, 4, 6, 8]);
        assert_eq!(run.readings().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_reads_are_retried_at_the_model_spacing_within_the_interval() {
        let script = vec![checksum(), checksum(), checksum(), ok(21.0, 41.0)];
        let run = run_reader(Model::Dht22, 10, script, true, 0, 15).await;
        // 8 s: the first good read; 10 s confirms it. The next interval's read at 12 s is only
        // 2 s after that one, so it is confirmed by it and needs no second read.
        assert_eq!(run.call_secs(), [2, 4, 6, 8, 10, 12]);
        assert_eq!(run.readings(), [(10.0, 21.0), (12.0, 21.0)]);
        let c = run.counters;
        assert_eq!((c.checksum, c.ok, c.published, c.attempts()), (3, 3, 2, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn an_interval_without_a_good_read_publishes_nothing_and_old_values_are_never_restamped()
    {
        let mut script = vec![ok(20.0, 40.0), ok(20.0, 40.0)];
        script.extend((0..5).map(|_| checksum()));
        script.push(ok(21.0, 41.0));
        let run = run_reader(Model::Dht22, 10, script, true, 0, 25).await;
        assert_eq!(run.call_secs(), [2, 4, 12, 14, 16, 18, 20, 22, 24]);
        // Nothing for the interval 12–22 s; the next reading is the read at 24 s (confirmed by
        // the one at 22 s): the 20 °C read at 4 s was not sent again.
        assert_eq!(run.readings(), [(4.0, 20.0), (24.0, 21.0)]);
        assert_eq!(run.counters.missed_intervals, 1);
        assert!(run.t0 <= Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_sensor_is_not_answering_after_three_intervals_and_ok_with_the_next_reading() {
        let mut script = vec![ok(20.0, 40.0), ok(20.0, 40.0)];
        script.extend((0..20).map(|_| Err(ReadError::Decode(DecodeError::NoResponse))));
        // Then the sensor answers again (the script repeats its last good value).
        let run = run_reader(Model::Dht11, 5, script, true, 0, 28).await;
        let events: Vec<String> = run
            .updates
            .iter()
            .map(|u| match u {
                Update::Measured(m) => format!("r@{}", (m.read_at - epoch()).as_seconds_f64()),
                Update::Sensor(a) => a.to_string(),
                Update::Health(h) => format!(
                    "{}@{}:{}",
                    h.status,
                    (h.since - epoch()).as_seconds_f64(),
                    h.reason.map_or("-", |r| r.as_str())
                ),
            })
            .collect();
        // Reads fail from 6 s; the intervals 6–11, 11–16 and 16–21 end without a reading, so
        // the read at 21 s says `not_answering` (since the first failure, 6 s). The reads at 26
        // and 27 s agree: `ok` again, then the reading. The publisher never said `offline`.
        assert_eq!(
            events,
            [
                "ok@2:-",
                "r@2",
                "not_answering@6:no_response",
                "ok@27:-",
                "r@27"
            ]
        );
        let Some(Update::Health(h)) = run.updates.get(2) else {
            panic!("{events:?}")
        };
        // The failed reads at 6, 7, … 21 s.
        assert_eq!(h.errors.get("no_response"), Some(&16));
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_sensor_is_reopened_periodically_and_comes_online_when_fixed() {
        let run = run_reader(Model::Dht11, 10, vec![], false, 1, 63).await;
        // Opened at 0 s (failed), 30 s (failed), 60 s (worked): online, then read at 61 s and
        // 62 s (which confirms it and is published).
        assert!(matches!(
            run.updates.first(),
            Some(Update::Sensor(Availability::Online))
        ));
        assert_eq!(run.readings(), [(62.0, 20.0)]);
        assert_eq!(run.call_secs(), [61, 62]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sensor_that_goes_away_is_reported_offline() {
        let script = vec![
            ok(20.0, 40.0),
            ok(20.0, 40.0),
            Err(ReadError::Unavailable("gone".into())),
        ];
        // The opener has no sensor to give back: the reader keeps reporting offline.
        let run = run_reader(Model::Dht11, 10, script, true, 0, 45).await;
        let kinds: Vec<String> = run
            .updates
            .iter()
            .map(|u| match u {
                Update::Measured(_) => "r".to_owned(),
                Update::Sensor(a) => a.to_string(),
                Update::Health(h) => h.status.to_string(),
            })
            .collect();
        assert_eq!(kinds, ["ok", "r", "offline"]);
        assert_eq!(run.counters.unavailable, 1);
    }
}
