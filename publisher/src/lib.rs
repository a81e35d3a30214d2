//! The k3sense publisher: reads the DHT sensor wired to this node and publishes every reading
//! over MQTT, QoS 1 and retained, with `online`/`offline` availability (offline is also its last
//! will) and the sensor's own health (`ok` / `not_answering`, on `<prefix>/<id>/sensor`).
//!
//! ```text
//! Sensor (sim | dht11/dht22 via rppal | iio) ──blocking read──▶ reader (ReadPolicy) ──▶ link ──MQTT──▶ broker
//!                                                      │                                 ├─ Outbox: kept until PUBACK
//!                                                      │ ReadCounters                    └─ Home Assistant discovery
//!                                                      ▼
//!                                  Metrics ◀── link ── http: /metrics, /healthz (--metrics-listen, default 0.0.0.0:9101)
//! ```
//!
//! In a cluster it is the `publisher` Deployment pinned to the node labelled
//! `k3sense.io/sensor`; in `k3sense all` it runs a simulated sensor in the same process.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `config` | [`Config`], [`SensorConfig`]: flags and `K3SENSE_*` variables |
//! | `dht` | DHT11/DHT22 frames: decoder, encoder, edge simulator (pure) |
//! | `sensor` | the [`Sensor`] trait and its backends: `sim`, `gpio` (rppal), `iio` (kernel) |
//! | `policy` | [`ReadPolicy`]: pacing, confirmation by a second independent read, retries, freshness, read counters (pure) |
//! | `reader` | the reader task: opens (and reopens) the sensor, applies the policy, numbers readings, keeps the sensor's health |
//! | `outbox` | [`Outbox`]: readings kept until the broker acknowledged them (pure) |
//! | `recent` | the recent readings kept to answer gateways' replay requests (pure) |
//! | `replaypace` | replay answers coalesced and paced (pure) |
//! | `seqguard` | whether a retained `seq` may be continued from (pure) |
//! | `link` | the MQTT connection task |
//! | `discovery` | Home Assistant MQTT discovery configs (pure) |
//! | `metrics` | [`Metrics`]: the Prometheus metrics (docs/metrics.md) |
//! | `http` | `/metrics` and `/healthz` |
//! | `error` | [`Error`] |

mod config;
pub mod dht;
pub mod discovery;
mod error;
mod http;
mod link;
mod metrics;
mod outbox;
pub mod policy;
pub mod reader;
mod recent;
mod replaypace;
pub mod sensor;
mod seqguard;

use std::time::Duration;

use k3sense_protocol::Availability;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use config::{
    Config, DEFAULT_INTERVAL, DEFAULT_METRICS_LISTEN, HaConfig, MetricsConfig, MetricsListen,
    SensorBackend, SensorConfig, SensorKind,
};
pub use error::{Error, Result};
pub use link::Update;
pub use metrics::Metrics;
pub use outbox::Outbox;
pub use policy::{Pacing, ReadCounters, ReadPolicy, Tolerance, Verdict};
pub use reader::{Clock, ReaderConfig};
pub use sensor::{OpenError, ReadError, Sensor, SimSensor};

/// Reads and publishes until `shutdown`, then says `offline` and disconnects.
///
/// A sensor that cannot be opened does not make this fail: the sensor is reported `offline`
/// and opened again periodically (see [`reader`]).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let (counters, _) = watch::channel(ReadCounters::default());
    run_with(config, ReaderOptions::default(), counters, shutdown).await
}

/// What tests and embedders may change about the reader beyond the [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// How long after a failed open the sensor is opened again.
    pub reopen_every: Duration,
    /// Where `read_at` comes from.
    pub clock: Clock,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            reopen_every: reader::REOPEN_EVERY,
            clock: Clock::System,
        }
    }
}

/// [`run`], with reader options and a channel that always holds the latest read counters.
pub async fn run_with(
    config: Config,
    options: ReaderOptions,
    counters: watch::Sender<ReadCounters>,
    shutdown: CancellationToken,
) -> Result<()> {
    let id = config.sensor.effective_id()?;
    let topics = config.mqtt.topics()?;
    config.mqtt.mqtt_options("probe")?;
    let discovery = if config.sensor.ha.discovery {
        Some(discovery::Announcement::new(
            &config.sensor.ha.prefix,
            &topics,
            &id,
            config.sensor.effective_model(),
            config.sensor.effective_interval(),
        )?)
    } else {
        None
    };
    let metrics = Metrics::new(&id, counters.subscribe());
    let server_stop = shutdown.child_token();
    let server = metrics_listener(&config.sensor.metrics)
        .await?
        .map(|listener| tokio::spawn(http::serve(listener, metrics.clone(), server_stop.clone())));
    let sensor_config = config.sensor.clone();
    let opener: reader::Opener = Box::new(move || sensor::open(&sensor_config));
    let (opener, first) = reader::open(opener).await;
    let availability = if first.is_ok() {
        Availability::Online
    } else {
        Availability::Offline
    };
    let (tx, rx) = mpsc::channel(64);
    let settings = link::Settings {
        mqtt: config.mqtt.clone(),
        id: id.clone(),
        buffer: config.sensor.buffer,
        replay_buffer: config.sensor.replay_buffer,
        discovery,
    };
    let link = tokio::spawn(link::run(
        settings,
        availability,
        metrics,
        rx,
        shutdown.clone(),
    ));
    let mut reader_config = ReaderConfig::new(
        id,
        config.sensor.effective_model(),
        config.sensor.effective_interval(),
    );
    reader_config.reopen_every = options.reopen_every;
    reader_config.clock = options.clock;
    reader_config.unhealthy_after = config.sensor.unhealthy_after;
    reader::run(opener, first, reader_config, tx, counters, shutdown.clone()).await;
    let linked = link.await;
    if let Some(server) = server {
        server_stop.cancel();
        let _ = server.await;
    }
    match linked {
        Ok(result) => result,
        Err(e) => Err(Error::Invalid(format!("the MQTT task failed: {e}"))),
    }
}

/// Binds the metrics server's socket. An address given with `--metrics-listen` that cannot be
/// bound stops the start (the operator asked for it); the default one only logs why, so a second
/// publisher on one host still publishes.
async fn metrics_listener(config: &MetricsConfig) -> Result<Option<tokio::net::TcpListener>> {
    let Some(address) = config.effective_listen() else {
        return Ok(None);
    };
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if config.listen.is_none() => {
            tracing::warn!(
                %address,
                error = %e,
                "cannot serve metrics on the default address; publishing without /metrics. Pick \
                 another address with --metrics-listen, or turn the server off with --metrics-listen off"
            );
            Ok(None)
        }
        Err(e) => Err(Error::Invalid(format!(
            "cannot serve metrics on {address} ({e}); pick another address with \
             --metrics-listen, or turn the server off with --metrics-listen off"
        ))),
    }
}
