//! The k3sense publisher: reads the DHT sensor wired to this node and publishes every reading
//! over MQTT, QoS 1 and retained, with `online`/`offline` availability (offline is also its last
//! will).
//!
//! ```text
//! Sensor (sim | dht11/dht22 via rppal | iio) ──read on a blocking thread──▶ reader ──▶ link ──MQTT──▶ broker
//!                                                                               └─ Outbox: kept until PUBACK
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
//! | `sensor` | the [`Sensor`] trait and its backends |
//! | `outbox` | [`Outbox`]: readings kept until the broker acknowledged them (pure) |
//! | `link` | the MQTT connection task |
//! | `error` | [`Error`] |

mod config;
pub mod dht;
mod error;
mod link;
mod outbox;
pub mod sensor;

use chrono::Utc;
use k3sense_protocol::{Availability, Reading, SensorId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{Config, DEFAULT_INTERVAL, SensorConfig, SensorKind};
pub use error::{Error, Result};
pub use link::Update;
pub use outbox::Outbox;
pub use sensor::{ReadError, Sensor, SimSensor};

/// Reads and publishes until `shutdown`, then says `offline` and disconnects.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let id = config.sensor.effective_id()?;
    config.mqtt.topics()?;
    config.mqtt.mqtt_options("probe")?;
    let sensor = open_sensor(&config.sensor)?;
    let (tx, rx) = mpsc::channel(64);
    let link = tokio::spawn(link::run(
        config.mqtt.clone(),
        id.clone(),
        config.sensor.buffer,
        rx,
        shutdown.clone(),
    ));
    read_loop(sensor, id, config.sensor.effective_interval(), tx, shutdown).await;
    match link.await {
        Ok(result) => result,
        Err(e) => Err(Error::Invalid(format!("the MQTT task failed: {e}"))),
    }
}

fn open_sensor(config: &SensorConfig) -> Result<Box<dyn Sensor>> {
    match config.sensor {
        SensorKind::Sim => Ok(Box::new(SimSensor::new(
            config.effective_model(),
            dht::SimConfig::default(),
            rand::random(),
        ))),
        other => Err(Error::Invalid(format!(
            "sensor backend {other:?} is not available in this build yet; use --sensor sim"
        ))),
    }
}

/// Reads every `interval` and hands each reading to the link. The read itself runs on a
/// blocking thread, never on the async runtime.
async fn read_loop(
    mut sensor: Box<dyn Sensor>,
    id: SensorId,
    interval: std::time::Duration,
    updates: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let model = sensor.model();
    let mut seq: u64 = 0;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    tracing::info!(sensor_id = %id, %model, ?interval, "reading the sensor");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let (returned, result) = match tokio::task::spawn_blocking(move || {
            let result = sensor.read();
            (sensor, result)
        })
        .await
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(error = %e, "the sensor thread failed; stopping the reader");
                return;
            }
        };
        sensor = returned;
        let update = match result {
            Ok(m) => {
                seq += 1;
                match Reading::new(
                    id.clone(),
                    model,
                    m.temperature_c,
                    m.humidity_pct,
                    Utc::now(),
                    seq,
                ) {
                    Ok(reading) => {
                        tracing::debug!(seq, t = m.temperature_c, rh = m.humidity_pct, "read");
                        if !healthy {
                            healthy = true;
                            let _ = updates.send(Update::Sensor(Availability::Online)).await;
                        }
                        Update::Reading(reading)
                    }
                    Err(e) => {
                        seq -= 1;
                        tracing::warn!(error = %e, "discarding an implausible reading");
                        continue;
                    }
                }
            }
            Err(ReadError::Unavailable(why)) => {
                tracing::error!("{why}");
                if healthy {
                    healthy = false;
                    let _ = updates.send(Update::Sensor(Availability::Offline)).await;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "sensor read failed; will try again");
                continue;
            }
        };
        if updates.send(update).await.is_err() {
            return;
        }
    }
}
