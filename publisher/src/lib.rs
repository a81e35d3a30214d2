//! The k3sense publisher: reads the DHT sensor wired to this node and publishes every reading
//! over MQTT, QoS 1 and retained, with `online`/`offline` availability (offline is also its last
//! will) and the sensor's own health (`ok` / `not_answering`, on `<prefix>/<id>/sensor`).
//!
//! ```text
//! Sensor (sim | dht11/dht22 via rppal | iio) ──blocking read──▶ reader (ReadPolicy) ──Measured──▶ link ──mqtt::Client──▶ broker
//!                                                      │                                           ├─ Numbering: seq, the one Reading builder
//!                                                      │ ReadCounters                              ├─ Outbox + Receipts: kept until PUBACK
//!                                                      ▼                                           ├─ Replayer, Presence, Announcement
//!                                  Metrics ◀── link ── http: /metrics, /healthz (--metrics-listen, default 0.0.0.0:9101)
//! ```
//!
//! The reader decides *what* was measured (pure policy, blocking reads off the runtime); the
//! link decides *what goes out*: it numbers each measurement, keeps it until the broker
//! acknowledged it, and routes the broker's events to small pure parts (see `link`).
//!
//! In a cluster it is the `publisher` Deployment pinned to the node labelled
//! `k3sense.io/sensor`; in `k3sense all` it runs a simulated sensor in the same process.
//!
//! # Layout
//!
//! No module imports from a module that imports it: `sensor::device` and `dht::signal` are the
//! leaves their siblings share.
//!
//! | module | concern |
//! |---|---|
//! | `config` | [`Config`], [`SensorConfig`]: flags and `K3SENSE_*` variables, their defaults |
//! | `dht` | DHT11/DHT22 frames: decoder, encoder, edge simulator (pure) |
//! | `sensor` | the [`Sensor`] trait, its [`Pacing`] and errors (`sensor::device`), and its backends: `sim`, `gpio` (rppal), `iio` (kernel) |
//! | `policy` | [`ReadPolicy`]: pacing, confirmation by a second independent read, retries, freshness, read counters (pure) |
//! | `reader` | the reader task: opens (and reopens) the sensor, applies the policy, hands confirmed [`Measured`] values to the link, keeps the sensor's health |
//! | `link` | the MQTT task: a router between the reader, the broker and the parts below; the connect sequence (`Link::greet`) and the goodbye |
//! | `numbering` | the one owner of `seq` and the one place a measurement becomes a checked `Reading`; held until the retained `seq` is known (pure) |
//! | `seqguard` | whether a retained `seq` may be continued from (pure) |
//! | `outbox` | [`Outbox`]: readings kept until the broker acknowledged them; `Receipts`: what each publish carried (pure) |
//! | `replay` | the replay responder: `recent` readings, answers coalesced and paced by `replaypace` (pure) |
//! | `presence` | the sensor's availability and health; a foreign `offline` (pure) |
//! | `discovery` | Home Assistant MQTT discovery configs, and when to announce again (pure) |
//! | `connection` | the one MQTT client (`k3sense_protocol::mqtt`), connected or not, events the link acts on |
//! | `metrics` | [`Metrics`]: the Prometheus metrics (docs/metrics.md) |
//! | `http` | `/metrics` and `/healthz` |
//! | `error` | [`Error`] |

mod config;
mod connection;
pub mod dht;
pub mod discovery;
mod error;
mod http;
mod link;
mod metrics;
mod numbering;
mod outbox;
pub mod policy;
mod presence;
pub mod reader;
mod recent;
mod replay;
mod replaypace;
pub mod sensor;
mod seqguard;

use k3sense_protocol::{Availability, SensorId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use config::{
    Config, DEFAULT_INTERVAL, DEFAULT_METRICS_LISTEN, HaConfig, MetricsConfig, MetricsListen,
    SensorBackend, SensorConfig, SensorKind,
};
pub use error::{Error, Result};
pub use link::Update;
pub use metrics::Metrics;
pub use numbering::Measured;
pub use outbox::Outbox;
pub use policy::{ReadCounters, ReadPolicy, Tolerance, Verdict};
pub use reader::{Clock, ReaderConfig};
pub use sensor::{OpenError, Pacing, ReadError, Sensor, SimSensor};

/// Reads and publishes until `shutdown`, then says `offline` and disconnects.
///
/// A sensor that cannot be opened does not make this fail: the sensor is reported `offline`
/// and opened again periodically (see [`reader`]).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let id = config.sensor.effective_id()?;
    let settings = link_settings(&config, &id)?;
    let (counters, _) = watch::channel(ReadCounters::default());
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
    reader_config.unhealthy_after = config.sensor.unhealthy_after;
    reader::run(opener, first, reader_config, tx, counters, shutdown).await;
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

/// The link's settings, checked before anything starts: topics, the broker address and the
/// password file, the Home Assistant prefix.
fn link_settings(config: &Config, id: &SensorId) -> Result<link::Settings> {
    let topics = config.mqtt.topics()?;
    config.mqtt.mqtt_options("probe")?;
    let sensor = &config.sensor;
    let discovery = if sensor.ha.discovery {
        Some(discovery::Announcement::new(
            &sensor.ha.prefix,
            &topics,
            id,
            sensor.effective_model(),
            sensor.effective_interval(),
        )?)
    } else {
        None
    };
    Ok(link::Settings {
        mqtt: config.mqtt.clone(),
        id: id.clone(),
        model: sensor.effective_model(),
        buffer: sensor.buffer,
        replay_buffer: sensor.replay_buffer,
        discovery,
    })
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
