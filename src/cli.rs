//! The command line. Every flag also reads an environment variable `K3SENSE_<FLAG>`.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
Every flag can also be set by the environment variable shown beside it. The MQTT password is
never a flag: give --password-file, or set K3SENSE_PASSWORD. `k3sense <subcommand> --help`
explains each subcommand with examples; docs/cli.md has all of them on one page.

Exit codes: 0 success; 1 failure (a check failed, a component could not start or stopped with an
error); 2 the command line is wrong.

Examples:
  k3sense                                   # everything in one process, simulated sensor, page at http://127.0.0.1:8080
  k3sense broker --listen 0.0.0.0:1883
  k3sense publisher --broker broker:1883 --sensor iio --sensor-id pi-1
  k3sense gateway --broker broker:1883 --listen 0.0.0.0:8080
  k3sense check --broker broker:1883 --sensor iio --gateway http://gateway:8080
  k3sense watch --broker broker:1883";

const ALL_HELP: &str = "\
Examples:
  k3sense all                               # the same as plain `k3sense`
  k3sense all --sensor iio --sensor-id pi-1 # a real sensor through the kernel driver
  k3sense all --mqtt-listen 0.0.0.0:1883 --http-listen 0.0.0.0:8080   # reachable from the LAN";

const BROKER_HELP: &str = "\
Without --users-file anonymous clients are accepted (a warning is logged). Other MQTT clients
(mosquitto_sub, Home Assistant, paho) may use this broker too; clients must use a keepalive
above 0 (rumqttd closes the socket of keepalive-0 clients without a CONNACK).

Examples:
  k3sense broker --listen 0.0.0.0:1883
  k3sense broker --listen 0.0.0.0:1883 --users-file /etc/k3sense/users   # lines of user:password";

const PUBLISHER_HELP: &str = "\
Any MQTT 3.1.1 broker works (Mosquitto too); see docs/own-broker.md.

Examples:
  k3sense publisher --sensor sim --sensor-id sim-1 --interval 2s
  k3sense publisher --broker broker:1883 --sensor iio --sensor-id pi-1
  k3sense publisher --broker broker:1883 --sensor dht22 --gpio 17 --sensor-id pi-2
  K3SENSE_PASSWORD=... k3sense publisher --broker broker:1883 --username publisher --sensor iio";

const GATEWAY_HELP: &str = "\
Any MQTT 3.1.1 broker works (Mosquitto too); see docs/own-broker.md.

Examples:
  k3sense gateway --broker broker:1883 --listen 0.0.0.0:8080
  k3sense gateway --broker mosquitto.lan:1883 --username gateway --password-file /run/secrets/mqtt
  curl -s http://127.0.0.1:8080/api/sensors";

const CHECK_HELP: &str = "\
Each check prints one line: `ok`, `info`, or `FAIL` followed by a `fix:` line.
  broker   MQTT CONNECT with these credentials; the CONNACK return code is explained
  sensors  (info) what the broker holds under the prefix: each sensor's status and last reading
  sensor   opens the --sensor backend and reads it once (skip with --skip sensor)
  gateway  GET /healthz and /readyz of --gateway (only when given)
A running publisher holds its sensor: on its node, run check inside the publisher pod
(kubectl exec) or stop the publisher first.

Exit codes: 0 every check passed; 1 at least one check failed; 2 the command line is wrong.

Examples:
  k3sense check                                         # local broker, simulated sensor
  k3sense check --broker broker:1883 --sensor iio --gateway http://gateway:8080
  k3sense check --broker mosquitto.lan:1883 --username gateway --password-file pw --skip sensor
  kubectl -n k3sense exec deploy/publisher -- k3sense check --gateway http://gateway:8080";

const WATCH_HELP: &str = "\
Subscribes to <prefix>/# and prints one line per message: readings decoded and aligned (sensor,
temperature, humidity, read_at, seq, age since read_at), `retained` for the ones the broker
kept, gaps and repeats in seq, availability changes, and invalid payloads as such. Ctrl-C stops.

Exit codes: 0 after --count readings or Ctrl-C; 1 the broker cannot be used (the reason and a
fix are printed); 2 the command line is wrong.

Examples:
  k3sense watch                                         # the local broker
  k3sense watch --broker broker:1883 --sensor-id pi-1
  k3sense watch --count 1 --no-header                   # the latest reading, for scripts
  kubectl -n k3sense port-forward svc/broker 1883 & k3sense watch";
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
    #[command(after_help = ALL_HELP)]
    All(AllArgs),
    /// The MQTT broker (rumqttd), in the cluster the `broker` Service on port 1883.
    #[command(after_help = BROKER_HELP)]
    Broker(k3sense_broker::Config),
    /// Reads the sensor and publishes every reading (QoS 1, retained) with online/offline availability.
    #[command(after_help = PUBLISHER_HELP)]
    Publisher(k3sense_publisher::Config),
    /// Subscribes to every sensor and serves the live page, WebSocket /ws, /api, /healthz, /readyz, /metrics.
    #[command(after_help = GATEWAY_HELP)]
    Gateway(k3sense_gateway::Config),
    /// Diagnoses a node: broker reachable with these credentials, sensor readable, gateway healthy.
    #[command(after_help = CHECK_HELP)]
    Check(crate::check::CheckArgs),
    /// Prints live readings from the broker, decoded and aligned (like mosquitto_sub, for people).
    #[command(after_help = WATCH_HELP)]
    Watch(crate::watch::WatchArgs),
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
            Some(Command::Check(c)) => c.mqtt.password = Some(password),
            Some(Command::Watch(c)) => c.mqtt.password = Some(password),
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

    #[test]
    fn check_takes_the_publishers_sensor_flags() {
        let cli = Cli::try_parse_from([
            "k3sense",
            "check",
            "--sensor",
            "iio",
            "--model",
            "dht22",
            "--gpio",
            "17",
            "--iio-device",
            "/x",
        ])
        .unwrap();
        let Some(Command::Check(args)) = cli.command else {
            panic!("not check")
        };
        assert_eq!(args.backend.sensor, k3sense_publisher::SensorKind::Iio);
        assert_eq!(
            args.backend.effective_model(),
            k3sense_protocol::Model::Dht22
        );
        assert_eq!(args.backend.gpio, 17);
        assert_eq!(args.backend.iio_device, Some("/x".into()));
        // Only the sensor's flags: the publisher's others are not check's.
        assert!(Cli::try_parse_from(["k3sense", "check", "--sensor-id", "pi-1"]).is_err());
    }
}
