//! The command line. Every flag also reads an environment variable `K3SENSE_<FLAG>`.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
Every flag can also be set by the environment variable shown beside it. The MQTT password is
never a flag: give --password-file, or set K3SENSE_PASSWORD.

Examples:
  k3sense                                   # everything in one process, simulated sensor, page at http://127.0.0.1:8080
  k3sense broker --listen 0.0.0.0:1883
  k3sense publisher --broker broker:1883 --sensor iio --sensor-id pi-1
  k3sense gateway --broker broker:1883 --listen 0.0.0.0:8080";

/// Live DHT11/DHT22 readings from a Raspberry Pi k3s cluster to every browser and MQTT client.
#[derive(Debug, Parser)]
#[command(name = "k3sense", version, after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Log format: human-readable text or one JSON object per line. Verbosity: RUST_LOG (e.g. debug).
    #[arg(long, global = true, env = "K3SENSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub all: AllArgs,
}

/// The parts of k3sense.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Broker, simulated publisher and gateway in one process (the default).
    All(AllArgs),
    /// The MQTT broker (rumqttd), in the cluster the `broker` Service on port 1883.
    Broker(k3sense_broker::Config),
    /// Reads the sensor and publishes every reading (QoS 1, retained) with online/offline availability.
    Publisher(k3sense_publisher::Config),
    /// Subscribes to every sensor and serves the live page, WebSocket /ws, /api, /healthz, /readyz, /metrics.
    Gateway(k3sense_gateway::Config),
}

/// Settings of `k3sense all`.
#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    /// Address of the MQTT listener (other MQTT clients, e.g. mosquitto_sub, can connect here).
    #[arg(long, env = "K3SENSE_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,

    /// Address of the page, WebSocket and API.
    #[arg(long, env = "K3SENSE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,

    /// First level(s) of every topic.
    #[arg(long, env = "K3SENSE_TOPIC_PREFIX", default_value = k3sense_protocol::DEFAULT_PREFIX)]
    pub topic_prefix: String,

    #[command(flatten)]
    pub sensor: k3sense_publisher::SensorConfig,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl Cli {
    /// The password may come from `K3SENSE_PASSWORD`; the libraries never read the environment,
    /// so the binary hands it over.
    pub fn fill_passwords_from_env(&mut self) {
        let Ok(password) = std::env::var("K3SENSE_PASSWORD") else {
            return;
        };
        match &mut self.command {
            Some(Command::Publisher(c)) => c.mqtt.password = Some(password),
            Some(Command::Gateway(c)) => c.mqtt.password = Some(password),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_all() {
        let cli = Cli::try_parse_from(["k3sense", "--http-listen", "127.0.0.1:9999"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.all.http_listen.port(), 9999);
    }

    #[test]
    fn contract_flags_exist() {
        let cli = Cli::try_parse_from([
            "k3sense",
            "publisher",
            "--broker",
            "b:1883",
            "--sensor",
            "iio",
            "--gpio",
            "17",
            "--iio-device",
            "/x",
            "--sensor-id",
            "pi-1",
            "--interval",
            "10s",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Publisher(_))));
        for args in [
            &["k3sense", "broker", "--listen", "0.0.0.0:1883"][..],
            &[
                "k3sense",
                "gateway",
                "--broker",
                "b:1883",
                "--listen",
                "0.0.0.0:8080",
            ],
            &[
                "k3sense",
                "all",
                "--mqtt-listen",
                "127.0.0.1:1",
                "--http-listen",
                "127.0.0.1:2",
                "--sensor",
                "sim",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["k3sense", "publisher", "--password", "x"]).is_err());
    }
}
