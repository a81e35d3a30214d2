//! The publisher's configuration: every flag also reads a `K3SENSE_*` environment variable.

use std::{path::PathBuf, time::Duration};

use k3sense_protocol::{Model, MqttConfig, SensorId};

use crate::{Error, Result};

/// Settings of `k3sense publisher`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub mqtt: MqttConfig,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub sensor: SensorConfig,
}

/// Where readings come from; `k3sense all` takes the same flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SensorConfig {
    /// Sensor backend: `sim` (simulated, no hardware), `dht11` / `dht22` (GPIO bit-banging with
    /// rppal, needs /dev/gpiomem), `iio` (the kernel dht11 driver, `dtoverlay=dht11,gpiopin=N`).
    #[arg(long, env = "K3SENSE_SENSOR", value_enum, default_value_t = SensorKind::Sim)]
    pub sensor: SensorKind,

    /// Sensor model for `sim` and `iio` (dht11 or dht22); `dht11`/`dht22` imply it.
    #[arg(long, env = "K3SENSE_MODEL", default_value = "dht11", value_parser = parse_model)]
    pub model: Model,

    /// GPIO pin (BCM numbering) of the sensor's data line, for `dht11` / `dht22`.
    #[arg(long, env = "K3SENSE_GPIO", default_value_t = 4)]
    pub gpio: u8,

    /// IIO device directory for `iio`, e.g. /sys/bus/iio/devices/iio:device0. Found by its
    /// name (dht11) when not given.
    #[arg(long, env = "K3SENSE_IIO_DEVICE", value_name = "PATH")]
    pub iio_device: Option<PathBuf>,

    /// Sensor id in topics and on the page: a DNS label (a-z, 0-9, '-'). Defaults to the host
    /// name (in Kubernetes, set it to the node name); other characters are mapped to '-'.
    #[arg(long, env = "K3SENSE_SENSOR_ID")]
    pub sensor_id: Option<String>,

    /// Time between published readings, e.g. 10s or 2s [default: 10s; 2s in `all`].
    #[arg(long, env = "K3SENSE_INTERVAL", value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,

    /// Readings kept while the broker is unreachable, published in order when it is back; the
    /// oldest are dropped (and counted) beyond this.
    #[arg(long, env = "K3SENSE_BUFFER", default_value_t = 8640)]
    pub buffer: usize,
}

fn parse_model(s: &str) -> Result<Model, String> {
    s.parse::<Model>().map_err(|e| e.to_string())
}

/// The sensor backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SensorKind {
    /// Simulated DHT frames through the real decoder.
    Sim,
    /// DHT11 on a GPIO pin.
    Dht11,
    /// DHT22 / AM2302 on a GPIO pin.
    Dht22,
    /// The Linux kernel's dht11 IIO driver.
    Iio,
}

/// The publish interval when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

impl SensorConfig {
    /// A simulated sensor called `id`, reading every `interval`.
    pub fn sim(id: &str, interval: Duration) -> Self {
        Self {
            sensor: SensorKind::Sim,
            model: Model::Dht11,
            gpio: 4,
            iio_device: None,
            sensor_id: Some(id.to_owned()),
            interval: Some(interval),
            buffer: 8640,
        }
    }

    /// The model the readings will name.
    pub fn effective_model(&self) -> Model {
        match self.sensor {
            SensorKind::Dht11 => Model::Dht11,
            SensorKind::Dht22 => Model::Dht22,
            SensorKind::Sim | SensorKind::Iio => self.model,
        }
    }

    /// The publish interval.
    pub fn effective_interval(&self) -> Duration {
        self.interval.unwrap_or(DEFAULT_INTERVAL)
    }

    /// The sensor id: as given if it is a valid DNS label, else mapped like a node name; the
    /// host name when none is given.
    pub fn effective_id(&self) -> Result<SensorId> {
        let given = match &self.sensor_id {
            Some(id) => id.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .map_err(|e| Error::Invalid(format!("no --sensor-id given and the host name is unreadable ({e}); set --sensor-id")))?,
        };
        match SensorId::new(given.clone()) {
            Ok(id) => Ok(id),
            Err(_) => {
                let id = SensorId::from_node_name(&given)?;
                tracing::warn!(given, id = %id, "sensor id is not a DNS label; using a cleaned-up form");
                Ok(id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_cleaned_up_not_refused() {
        let mut c = SensorConfig::sim("Pi-4.Lan", Duration::from_secs(1));
        assert_eq!(c.effective_id().unwrap().as_str(), "pi-4-lan");
        c.sensor_id = Some("---".into());
        assert!(c.effective_id().is_err());
    }

    #[test]
    fn gpio_backends_imply_their_model() {
        let mut c = SensorConfig::sim("a", Duration::from_secs(1));
        c.model = Model::Dht22;
        assert_eq!(c.effective_model(), Model::Dht22);
        c.sensor = SensorKind::Dht11;
        assert_eq!(c.effective_model(), Model::Dht11);
    }
}
