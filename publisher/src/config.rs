//! The publisher's configuration: every flag also reads a `K3SENSE_*` environment variable.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use k3sense_protocol::{Model, MqttConfig, SensorId};

use crate::error::{Error, Result};

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

/// Where readings come from, and how the publisher shows itself to Home Assistant and
/// Prometheus; `k3sense all` takes the same flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SensorConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub backend: SensorBackend,

    /// Sensor id in topics and on the page: a DNS label (a-z, 0-9, '-'). Defaults to the host
    /// name (in Kubernetes, set it to the node name); other characters are mapped to '-'.
    #[arg(long, env = "K3SENSE_SENSOR_ID")]
    pub sensor_id: Option<String>,

    /// Time between published readings, e.g. 10s or 2s [default: 10s; 2s in `all`].
    #[arg(long, env = "K3SENSE_INTERVAL", value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,

    /// Intervals in a row without a reading after which the sensor is reported `not_answering`
    /// on `<prefix>/<id>/sensor` (the publisher itself stays `online`); the first reading
    /// makes it `ok` again.
    #[arg(long, env = "K3SENSE_UNHEALTHY_AFTER", default_value_t = UNHEALTHY_AFTER, value_parser = clap::value_parser!(u32).range(1..))]
    pub unhealthy_after: u32,

    /// For `--sensor sim`: a file the simulator reads before every read, to be told how to
    /// behave while it runs: `ok` (also a missing file), `silent` (does not answer, like an
    /// unplugged sensor) or `noisy` (every frame fails its checksum). E.g. `echo silent > PATH`.
    #[arg(long, env = "K3SENSE_SIM_CONTROL", value_name = "PATH")]
    pub sim_control: Option<PathBuf>,

    /// Readings kept while the broker is unreachable, published in order when it is back; the
    /// oldest are dropped (and counted) beyond this.
    #[arg(long, env = "K3SENSE_BUFFER", default_value_t = 8640)]
    pub buffer: usize,

    /// Recent readings kept to answer gateways' replay requests (a new gateway pod fills its
    /// chart from them; 8640 = 24 h at 10 s); 0 turns replays off.
    #[arg(long, env = "K3SENSE_REPLAY_BUFFER", default_value_t = 8640)]
    pub replay_buffer: usize,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub ha: HaConfig,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub metrics: MetricsConfig,
}

/// Which sensor to read and where it is: the flags `k3sense check` shares with the publisher.
#[derive(Debug, Clone, clap::Args)]
pub struct SensorBackend {
    /// Sensor backend: `sim` (simulated, no hardware), `dht11` / `dht22` (GPIO bit-banging with
    /// rppal, needs /dev/gpiomem), `iio` (the kernel dht11 driver, `dtoverlay=dht11,gpiopin=N`).
    #[arg(long, env = "K3SENSE_SENSOR", value_enum, default_value_t = SensorKind::Sim)]
    pub sensor: SensorKind,

    /// Sensor model for `sim` and `iio` (dht11 or dht22); `dht11`/`dht22` imply it.
    #[arg(long, env = "K3SENSE_MODEL", default_value = "dht11", value_parser = parse_model)]
    pub model: Model,

    /// GPIO pin (BCM numbering) of the sensor's data line, for `dht11` / `dht22` (and, for
    /// `iio` with several kernel dht11 devices, which one).
    #[arg(long, env = "K3SENSE_GPIO", default_value_t = 4)]
    pub gpio: u8,

    /// IIO device directory for `iio`, e.g. /sys/bus/iio/devices/iio:device0. When not given,
    /// the kernel dht11 driver's device: name dht11@<pin in hex> (the Pi overlay) or dht11, or
    /// of_node/compatible dht11.
    #[arg(long, env = "K3SENSE_IIO_DEVICE", value_name = "PATH")]
    pub iio_device: Option<PathBuf>,
}

impl SensorBackend {
    /// The model the readings will name.
    pub fn effective_model(&self) -> Model {
        match self.sensor {
            SensorKind::Dht11 => Model::Dht11,
            SensorKind::Dht22 => Model::Dht22,
            SensorKind::Sim | SensorKind::Iio => self.model,
        }
    }
}

/// Home Assistant MQTT discovery.
#[derive(Debug, Clone, clap::Args)]
pub struct HaConfig {
    /// Announce the sensor to Home Assistant (MQTT discovery): a device with a temperature and
    /// a humidity entity, retained, on every connect and whenever Home Assistant restarts.
    #[arg(long = "ha-discovery", env = "K3SENSE_HA_DISCOVERY", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub discovery: bool,

    /// Home Assistant's discovery prefix (its MQTT integration setting of the same name).
    #[arg(long = "ha-prefix", env = "K3SENSE_HA_PREFIX", default_value = crate::discovery::DEFAULT_PREFIX)]
    pub prefix: String,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            discovery: true,
            prefix: crate::discovery::DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// The publisher's `/metrics` and `/healthz` server.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsConfig {
    /// Address of the HTTP server with /metrics (Prometheus) and /healthz, or `off`
    /// [default: 0.0.0.0:9101; off in `all`].
    #[arg(
        long = "metrics-listen",
        env = "K3SENSE_METRICS_LISTEN",
        value_name = "ADDR|off"
    )]
    pub listen: Option<MetricsListen>,
}

/// The default `--metrics-listen` of `k3sense publisher`.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9101);

impl MetricsConfig {
    /// No metrics server.
    pub fn off() -> Self {
        Self {
            listen: Some(MetricsListen::Off),
        }
    }

    /// Where to serve metrics, if anywhere: [`DEFAULT_METRICS_LISTEN`] unless told otherwise.
    pub fn effective_listen(&self) -> Option<SocketAddr> {
        match self.listen {
            None => Some(DEFAULT_METRICS_LISTEN),
            Some(MetricsListen::Off) => None,
            Some(MetricsListen::At(address)) => Some(address),
        }
    }
}

/// A value of `--metrics-listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No metrics server.
    Off,
    /// Serve on this address.
    At(SocketAddr),
}

impl FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::At)
            .map_err(|_| format!("{s:?} is neither host:port (e.g. 0.0.0.0:9101) nor `off`"))
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::At(address) => write!(f, "{address}"),
        }
    }
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

/// How many intervals in a row without a reading make the sensor `not_answering`.
pub const UNHEALTHY_AFTER: u32 = 3;

/// The publish interval when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

impl SensorConfig {
    /// A simulated sensor called `id`, reading every `interval`; Home Assistant discovery on
    /// (the default), no metrics server (tests run many at once).
    pub fn sim(id: &str, interval: Duration) -> Self {
        Self {
            backend: SensorBackend {
                sensor: SensorKind::Sim,
                model: Model::Dht11,
                gpio: 4,
                iio_device: None,
            },
            sensor_id: Some(id.to_owned()),
            interval: Some(interval),
            unhealthy_after: UNHEALTHY_AFTER,
            sim_control: None,
            buffer: 8640,
            replay_buffer: 8640,
            ha: HaConfig::default(),
            metrics: MetricsConfig::off(),
        }
    }

    /// The model the readings will name.
    pub fn effective_model(&self) -> Model {
        self.backend.effective_model()
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
        c.backend.model = Model::Dht22;
        assert_eq!(c.effective_model(), Model::Dht22);
        c.backend.sensor = SensorKind::Dht11;
        assert_eq!(c.effective_model(), Model::Dht11);
    }

    #[test]
    fn metrics_listen_defaults_and_off() {
        assert_eq!(
            MetricsConfig { listen: None }.effective_listen(),
            Some(DEFAULT_METRICS_LISTEN)
        );
        assert_eq!(MetricsConfig::off().effective_listen(), None);
        assert_eq!("OFF".parse::<MetricsListen>(), Ok(MetricsListen::Off));
        assert_eq!(
            "127.0.0.1:9".parse::<MetricsListen>(),
            Ok(MetricsListen::At(SocketAddr::from(([127, 0, 0, 1], 9))))
        );
        assert!("9101".parse::<MetricsListen>().is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sensor: SensorConfig,
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.sensor.unhealthy_after, 3);
        assert_eq!(cli.sensor.sim_control, None);
        assert!(Cli::try_parse_from(["x", "--unhealthy-after", "0"]).is_err());
        let cli = Cli::try_parse_from(["x", "--unhealthy-after", "5", "--sim-control", "/tmp/c"])
            .unwrap();
        assert_eq!(cli.sensor.unhealthy_after, 5);
        assert_eq!(cli.sensor.sim_control, Some(PathBuf::from("/tmp/c")));
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.sensor.ha.discovery);
        assert_eq!(cli.sensor.ha.prefix, "homeassistant");
        assert_eq!(cli.sensor.metrics.listen, None);
        let cli = Cli::try_parse_from([
            "x",
            "--ha-discovery",
            "false",
            "--ha-prefix",
            "ha",
            "--metrics-listen",
            "off",
        ])
        .unwrap();
        assert!(!cli.sensor.ha.discovery);
        assert_eq!(cli.sensor.ha.prefix, "ha");
        assert_eq!(cli.sensor.metrics.listen, Some(MetricsListen::Off));
        assert!(Cli::try_parse_from(["x", "--ha-discovery"]).is_err());
    }
}
