//! The publisher's Prometheus metrics, served at `/metrics` (see `http.rs`) in the OpenMetrics
//! text format. docs/metrics.md lists every one.
//!
//! Names follow Prometheus conventions: `k3sense_publisher_` prefix, `_total` on counters, base
//! units (`_celsius`, `_ratio`, `_seconds`). Every series carries a `sensor_id` label (one
//! publisher reads one sensor), so dashboards can tell sensors apart without relabelling.
//!
//! The read counters are not copied into counters: a collector reads the latest
//! [`ReadCounters`] from the reader's watch channel at scrape time, so they can never drift. The
//! value gauges appear only once a reading exists, so a scrape never shows a made-up 0 °C.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
};

use k3sense_protocol::{Reading, SensorId};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use tokio::sync::watch;

use crate::policy::ReadCounters;

/// Every metric of the publisher. Cheap to clone: the handles share their values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// 1 while connected to the MQTT broker.
    pub broker_connected: Gauge,
    /// 1 while the sensor is readable (what the availability topic says).
    pub sensor_available: Gauge,
    /// 1 while the sensor answers (the sensor topic says `ok`), 0 while `not_answering`.
    pub sensor_answering: Gauge,
    /// Readings kept until the broker acknowledges them.
    pub buffered_readings: Gauge,
    /// The most readings the buffer keeps.
    pub buffer_capacity: Gauge,
    /// Readings dropped because the buffer was full.
    pub dropped_readings: Counter,
    /// Readings the broker acknowledged (PUBACK).
    pub acknowledged_readings: Counter,
    /// MQTT (re)connections.
    pub broker_connects: Counter,
    /// Home Assistant discovery announcements (each one publishes every entity's config).
    pub ha_announcements: Counter,
    /// Replay requests received from gateways.
    pub replay_requests: Counter,
    /// Readings sent again on the replay topic.
    pub replayed_readings: Counter,
    /// Readings a replay request asked for that had been replayed within the last 2 s (not
    /// sent again: one answer serves every gateway).
    pub replays_coalesced: Counter,
    /// Signs of another client impersonating this sensor, by reason
    /// (`retained_seq_refused`, `foreign_offline`).
    pub anomalies: Family<Vec<(&'static str, &'static str)>, Counter>,
    latest: Arc<Mutex<Option<Latest>>>,
}

/// The newest reading, as the value gauges show it.
#[derive(Debug, Clone, Copy)]
struct Latest {
    temperature_c: f64,
    humidity_pct: f64,
    read_at_seconds: f64,
}

impl Metrics {
    /// Registers every metric of the publisher reading `id`; the read counters come from
    /// `counters`.
    pub fn new(id: &SensorId, counters: watch::Receiver<ReadCounters>) -> Self {
        let labels = [(
            Cow::Borrowed("sensor_id"),
            Cow::Owned(id.as_str().to_owned()),
        )];
        let mut registry =
            Registry::with_prefix_and_labels("k3sense_publisher", labels.into_iter());
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            broker_connected: Gauge::default(),
            sensor_available: Gauge::default(),
            sensor_answering: Gauge::default(),
            buffered_readings: Gauge::default(),
            buffer_capacity: Gauge::default(),
            dropped_readings: Counter::default(),
            acknowledged_readings: Counter::default(),
            broker_connects: Counter::default(),
            ha_announcements: Counter::default(),
            replay_requests: Counter::default(),
            replayed_readings: Counter::default(),
            replays_coalesced: Counter::default(),
            anomalies: Family::default(),
            latest: Arc::new(Mutex::new(None)),
        };
        metrics.register_gauges(&mut registry);
        metrics.register_counters(&mut registry);
        registry.register_collector(Box::new(ReadCollector {
            counters,
            latest: Arc::clone(&metrics.latest),
        }));
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    fn register_gauges(&self, registry: &mut Registry) {
        registry.register(
            "broker_connected",
            "1 while connected to the MQTT broker",
            self.broker_connected.clone(),
        );
        registry.register(
            "sensor_available",
            "1 while the sensor is readable (the availability topic says online)",
            self.sensor_available.clone(),
        );
        registry.register(
            "sensor_answering",
            "1 while the sensor gives readings, 0 once it is not answering (the sensor topic's status)",
            self.sensor_answering.clone(),
        );
        registry.register(
            "buffered_readings",
            "Readings kept until the broker acknowledges them",
            self.buffered_readings.clone(),
        );
        registry.register(
            "buffer_capacity_readings",
            "The most readings kept while the broker is away (--buffer)",
            self.buffer_capacity.clone(),
        );
    }

    fn register_counters(&self, registry: &mut Registry) {
        registry.register(
            "dropped_readings",
            "Readings dropped because the buffer was full",
            self.dropped_readings.clone(),
        );
        registry.register(
            "acknowledged_readings",
            "Readings the broker acknowledged",
            self.acknowledged_readings.clone(),
        );
        registry.register(
            "broker_connects",
            "Connections to the MQTT broker (the first one and every reconnect)",
            self.broker_connects.clone(),
        );
        registry.register(
            "ha_announcements",
            "Home Assistant discovery announcements published",
            self.ha_announcements.clone(),
        );
        registry.register(
            "replay_requests",
            "Replay requests received from gateways",
            self.replay_requests.clone(),
        );
        registry.register(
            "replayed_readings",
            "Readings sent again on the replay topic",
            self.replayed_readings.clone(),
        );
        registry.register(
            "replays_coalesced",
            "Readings asked for again within 2 s of being replayed, not sent again",
            self.replays_coalesced.clone(),
        );
        // Both reasons exist from the start, at 0, so a dashboard can alert on any increase.
        for reason in ["retained_seq_refused", "foreign_offline"] {
            let _ = self.anomalies.get_or_create(&vec![("reason", reason)]);
        }
        registry.register(
            "anomalies",
            "Signs of another client impersonating this sensor, by reason",
            self.anomalies.clone(),
        );
    }

    /// Counts one anomaly of kind `reason`.
    pub fn anomaly(&self, reason: &'static str) {
        self.anomalies
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Records the newest reading for the value gauges.
    pub fn observe(&self, reading: &Reading) {
        let latest = Latest {
            temperature_c: reading.temperature_c,
            humidity_pct: reading.humidity_pct,
            read_at_seconds: reading.read_at.timestamp_millis() as f64 / 1000.0,
        };
        if let Ok(mut slot) = self.latest.lock() {
            *slot = Some(latest);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Reads [`ReadCounters`] and the newest reading at scrape time.
#[derive(Debug)]
struct ReadCollector {
    counters: watch::Receiver<ReadCounters>,
    latest: Arc<Mutex<Option<Latest>>>,
}

/// Each read outcome and its counter: every read attempt is in exactly one.
fn outcomes(c: &ReadCounters) -> [(&'static str, u64); 9] {
    [
        ("ok", c.ok),
        ("no_response", c.no_response),
        ("timeout", c.timeout),
        ("short_frame", c.short_frame),
        ("bad_pulse", c.bad_pulse),
        ("checksum", c.checksum),
        ("implausible", c.implausible),
        ("driver_error", c.driver_error),
        ("unavailable", c.unavailable),
    ]
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::<f64>::new(value);
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

fn labelled_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for &(value, count) in values {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ReadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = *self.counters.borrow();
        labelled_counters(
            &mut encoder,
            "reads",
            "Sensor reads by outcome (ok, or why the read failed)",
            "outcome",
            &outcomes(&c),
        )?;
        labelled_counters(
            &mut encoder,
            "confirmations",
            "Good reads checked against the previous good read: agreed (published) or disagreed",
            "result",
            &[("agreed", c.confirmed), ("disagreed", c.disagreed)],
        )?;
        counter(
            &mut encoder,
            "readings",
            "Readings produced for publishing (at most one per interval)",
            c.published,
        )?;
        counter(
            &mut encoder,
            "missed_intervals",
            "Intervals that ended without a good read, so nothing was published",
            c.missed_intervals,
        )?;
        let latest = self.latest.lock().ok().and_then(|l| *l);
        if let Some(latest) = latest {
            gauge(
                &mut encoder,
                "temperature_celsius",
                "Temperature of the newest reading",
                latest.temperature_c,
            )?;
            gauge(
                &mut encoder,
                "humidity_ratio",
                "Relative humidity of the newest reading, 0 to 1",
                latest.humidity_pct / 100.0,
            )?;
            gauge(
                &mut encoder,
                "last_reading_timestamp_seconds",
                "When the newest reading was read (Unix time)",
                latest.read_at_seconds,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use k3sense_protocol::Model;

    use super::*;

    #[test]
    fn exposes_outcomes_values_and_the_sensor_label() {
        let (tx, rx) = watch::channel(ReadCounters::default());
        let id = SensorId::new("pi-1").unwrap();
        let metrics = Metrics::new(&id, rx);
        let before = metrics.encode();
        assert!(
            before.contains("k3sense_publisher_reads_total{sensor_id=\"pi-1\",outcome=\"ok\"} 0")
                || before
                    .contains("k3sense_publisher_reads_total{outcome=\"ok\",sensor_id=\"pi-1\"} 0"),
            "{before}"
        );
        assert!(
            !before.contains("temperature_celsius"),
            "no value before a reading"
        );

        tx.send_replace(ReadCounters {
            ok: 5,
            checksum: 2,
            published: 4,
            ..ReadCounters::default()
        });
        let at = Utc.timestamp_millis_opt(1_700_000_000_500).unwrap();
        let reading = Reading::new(id.clone(), Model::Dht11, 21.5, 40.0, at, 3).unwrap();
        metrics.observe(&reading);
        metrics.broker_connected.set(1);
        let text = metrics.encode();
        for expected in [
            "outcome=\"ok\"} 5",
            "outcome=\"checksum\"} 2",
            "k3sense_publisher_readings_total{sensor_id=\"pi-1\"} 4",
            "k3sense_publisher_temperature_celsius{sensor_id=\"pi-1\"} 21.5",
            "k3sense_publisher_humidity_ratio{sensor_id=\"pi-1\"} 0.4",
            "k3sense_publisher_last_reading_timestamp_seconds{sensor_id=\"pi-1\"} 1700000000.5",
            "k3sense_publisher_broker_connected{sensor_id=\"pi-1\"} 1",
            "# TYPE k3sense_publisher_reads counter",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
