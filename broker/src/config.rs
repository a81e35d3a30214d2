//! The broker's configuration: every flag also reads a `K3SENSE_*` environment variable.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

/// Settings of `k3sense broker`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address and port the MQTT (3.1.1) listener binds.
    #[arg(long, env = "K3SENSE_LISTEN", default_value = "0.0.0.0:1883")]
    pub listen: SocketAddr,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub tls: TlsOptions,

    /// Serve the broker's counters in the Prometheus text format at http://ADDR/metrics.
    #[arg(long, env = "K3SENSE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: Options,

    /// Also listen on a Unix socket in the abstract namespace (Linux), for clients in this same
    /// process: `k3sense all` connects its gateway and publisher there, so a reading does not
    /// cross the TCP/IP stack between broker and gateway. Not a flag: the socket's name is
    /// random, and only [`crate::Started::local_address`] tells it.
    #[arg(skip)]
    pub local_socket: bool,
}

/// The optional second listener, MQTT over TLS, for clients outside the cluster.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsOptions {
    /// Address and port of an MQTT-over-TLS listener (e.g. 0.0.0.0:8883); needs --tls-cert and --tls-key.
    #[arg(
        long,
        env = "K3SENSE_TLS_LISTEN",
        value_name = "ADDR",
        requires_all = ["tls_cert", "tls_key"]
    )]
    pub tls_listen: Option<SocketAddr>,

    /// PEM file with the TLS certificate chain, leaf first.
    #[arg(
        long,
        env = "K3SENSE_TLS_CERT",
        value_name = "PEM",
        requires = "tls_listen"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "K3SENSE_TLS_KEY",
        value_name = "PEM",
        requires = "tls_listen"
    )]
    pub tls_key: Option<PathBuf>,
}

/// Broker settings that `k3sense all` shares with `k3sense broker` (everything but the address).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// File of `username:password[:role]` lines (see broker/README.md). Without it the broker
    /// accepts anonymous clients with full access.
    #[arg(long, env = "K3SENSE_USERS_FILE", value_name = "PATH")]
    pub users_file: Option<PathBuf>,

    /// First level(s) of the sensors' topics, which the roles' rules are written against.
    #[arg(long, env = "K3SENSE_TOPIC_PREFIX", default_value = k3sense_protocol::DEFAULT_PREFIX)]
    pub topic_prefix: String,

    /// Most clients connected at once; more are refused.
    #[arg(long, env = "K3SENSE_MAX_CONNECTIONS", default_value_t = 1000)]
    pub max_connections: usize,

    /// Largest PUBLISH payload accepted, in bytes (a reading is ~130 bytes).
    #[arg(long, env = "K3SENSE_MAX_PAYLOAD", default_value_t = 64 * 1024)]
    pub max_payload: usize,

    /// How long a new connection may take for its TLS handshake and CONNECT before it is closed.
    #[arg(long, env = "K3SENSE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime_duration)]
    pub connect_timeout: Duration,

    /// Most sockets not logged in yet, from all addresses; when full, the oldest is closed to
    /// make room for a new one (so silent sockets never lock out a real client).
    #[arg(long, env = "K3SENSE_MAX_PENDING", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending: u32,

    /// Most sockets not logged in yet from one address (an IPv6 /64); when full, that address's
    /// oldest is closed to make room. Whatever this is, a full pool closes the oldest socket of
    /// the address holding the most.
    #[arg(long, env = "K3SENSE_MAX_PENDING_PER_SOURCE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_per_source: u32,

    /// Most filters one connection may be subscribed to at once; more are refused (SUBACK 0x80).
    #[arg(long, env = "K3SENSE_MAX_SUBSCRIPTIONS", default_value_t = 64)]
    pub max_subscriptions: usize,

    /// Most distinct filters the broker keeps (the embedded rumqttd keeps a log per filter ever
    /// subscribed, until restart); a filter not yet known is refused beyond this (SUBACK 0x80).
    #[arg(long, env = "K3SENSE_MAX_FILTERS", default_value_t = 2048)]
    pub max_filters: usize,

    /// Most new filters one account may add to those the broker keeps (see --max-filters);
    /// filters already known stay open to every account.
    #[arg(long, env = "K3SENSE_MAX_FILTERS_PER_ACCOUNT", default_value_t = 256)]
    pub max_filters_per_account: usize,

    /// Seconds between `$SYS/broker/…` updates (version, uptime, clients connected, messages
    /// received and sent), as Mosquitto's `sys_interval`; a `$SYS` subscription gets the
    /// current values at once. 0 serves no `$SYS` tree (a `$SYS` filter is refused, 0x80).
    #[arg(
        long,
        env = "K3SENSE_SYS_INTERVAL",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub sys_interval: u64,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (write e.g. 5s or 500ms)"))?;
    if d.is_zero() || d > Duration::from_millis(u64::from(u16::MAX)) {
        return Err("must be between 1ms and 65s".to_owned());
    }
    Ok(d)
}

impl Config {
    /// Settings for `listen` with every option at its default: what tests and `all` start from.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            tls: TlsOptions::default(),
            metrics_listen: None,
            options: Options::default(),
            local_socket: false,
        }
    }

    /// Where a local client reaches this listener: the wildcard addresses become loopback.
    pub fn connect_address(&self) -> SocketAddr {
        let ip = match self.listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.listen.port())
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            users_file: None,
            topic_prefix: k3sense_protocol::DEFAULT_PREFIX.to_owned(),
            max_connections: 1000,
            max_payload: 64 * 1024,
            connect_timeout: Duration::from_secs(5),
            max_pending: 4096,
            max_pending_per_source: 4096,
            max_subscriptions: 64,
            max_filters: 2048,
            max_filters_per_account: 256,
            sys_interval: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(humantime_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(humantime_duration("5s"), Ok(Duration::from_secs(5)));
        assert!(humantime_duration("5").is_err());
        assert!(humantime_duration("0s").is_err());
        assert!(humantime_duration("2m").is_err());
    }

    #[test]
    fn wildcard_listen_is_reached_on_loopback() {
        let c = Config::new("0.0.0.0:1883".parse().unwrap());
        assert_eq!(c.connect_address(), "127.0.0.1:1883".parse().unwrap());
        let c = Config::new("10.0.0.5:1884".parse().unwrap());
        assert_eq!(c.connect_address(), "10.0.0.5:1884".parse().unwrap());
    }
}
