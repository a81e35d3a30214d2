//! The reader task: opens the sensor, reads it as the [`ReadPolicy`] says, numbers the
//! readings, and tells the link about readings and about the sensor's availability.
//!
//! A sensor that cannot be opened (not a Pi, no /dev/gpiomem, no IIO device) or goes away does
//! not stop the process: the reader reports it `offline`, logs the reason once (then quietly
//! while it stays the same), and tries to open it again every `reopen_every`, so fixing the
//! node heals the publisher without a restart. `seq` lives here, so it continues across
//! reconnects to the broker and reopenings of the sensor.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k3sense_protocol::{Availability, Model, Reading, SensorId};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    link::Update,
    policy::{PolicyConfig, ReadCounters, ReadPolicy, Verdict},
    sensor::{OpenError, Sensor},
};

/// Opens the sensor; called again after every failure. Blocking.
pub type Opener = Box<dyn FnMut() -> Result<Box<dyn Sensor>, OpenError> + Send>;

/// How long after a failed open, or a lost device, the sensor is opened again.
pub const REOPEN_EVERY: Duration = Duration::from_secs(30);
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

enum Ended {
    Shutdown,
    Lost(String),
}

struct Reader {
    config: ReaderConfig,
    updates: mpsc::Sender<Update>,
    counters: watch::Sender<ReadCounters>,
    shutdown: CancellationToken,
    seq: u64,
    online: bool,
    last_open_error: Option<String>,
    next_summary: Instant,
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
        seq: 0,
        online: first.is_ok(),
        last_open_error: None,
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
            let at = Instant::now();
            let read_at = self.config.clock.now();
            let (returned, result) = match tokio::task::spawn_blocking(move || {
                let result = sensor.read();
                (sensor, result)
            })
            .await
            {
                Ok(pair) => pair,
                Err(e) => return Ended::Lost(format!("the sensor read failed: {e}")),
            };
            sensor = returned;
            let missed = policy.counters().missed_intervals;
            let verdict = policy.record(at, result.as_ref().copied());
            let counters = *policy.counters();
            self.counters.send_replace(counters);
            if counters.missed_intervals > missed {
                tracing::warn!(sensor_id = %self.config.id, missed = counters.missed_intervals, "no good read in a whole interval; nothing published for it");
            }
            self.maybe_summarise(&counters);
            match verdict {
                Verdict::Publish(m) => {
                    if !self.publish(m.temperature_c, m.humidity_pct, read_at).await {
                        return Ended::Shutdown;
                    }
                }
                Verdict::Held(m) => tracing::info!(
                    t = m.temperature_c,
                    rh = m.humidity_pct,
                    "a sudden jump; holding it until the next read confirms it"
                ),
                Verdict::Retry => {
                    if let Err(e) = &result {
                        tracing::debug!(error = %e, "sensor read failed; retrying");
                    }
                }
                Verdict::Lost => {
                    return Ended::Lost(match result {
                        Err(e) => e.to_string(),
                        Ok(_) => "the sensor went away".to_owned(),
                    });
                }
            }
        }
    }

    /// Numbers the reading and hands it to the link; false when the link is gone.
    async fn publish(&mut self, t: f64, rh: f64, read_at: DateTime<Utc>) -> bool {
        let seq = self.seq + 1;
        match Reading::new(
            self.config.id.clone(),
            self.config.model,
            t,
            rh,
            read_at,
            seq,
        ) {
            Ok(reading) => {
                self.seq = seq;
                tracing::debug!(seq, t, rh, "read");
                self.updates.send(Update::Reading(reading)).await.is_ok()
            }
            Err(e) => {
                tracing::warn!(error = %e, "discarding an invalid reading");
                true
            }
        }
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
            spike_held = c.spike_held,
            spike_confirmed = c.spike_confirmed,
            spike_discarded = c.spike_discarded,
            missed_intervals = c.missed_intervals,
            "sensor reads so far"
        );
    }
}
