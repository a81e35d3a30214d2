//! The gateway's configuration: every flag also reads a `K3SENSE_*` environment variable.

use std::{net::SocketAddr, time::Duration};

use k3sense_protocol::MqttConfig;

/// Settings of `k3sense gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address and port of the HTTP and WebSocket server.
    #[arg(long, env = "K3SENSE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub mqtt: MqttConfig,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: Options,
}

/// Gateway settings other than the listen address and the broker, shared with `k3sense all`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Origins allowed to open /ws, comma-separated (e.g. https://sensors.example.org). The page's
    /// own origin is always allowed; requests without an Origin header (non-browser clients) too.
    #[arg(long, env = "K3SENSE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most WebSocket clients at once; beyond it /ws answers 503.
    #[arg(long, env = "K3SENSE_MAX_CLIENTS", default_value_t = 10_000)]
    pub max_clients: usize,

    /// Readings kept per sensor (8640 = 24 h at one reading per 10 s, about 1.5 MB per sensor).
    #[arg(long, env = "K3SENSE_HISTORY", default_value_t = 8640)]
    pub history: usize,

    /// Messages queued per WebSocket client; a client that falls further behind is disconnected
    /// (close code 1008) so it cannot slow the others.
    #[arg(long, env = "K3SENSE_CLIENT_QUEUE", default_value_t = 256)]
    pub client_queue: usize,

    /// How long one write to a WebSocket client may take; a client whose socket accepts nothing
    /// for this long has stopped reading and is disconnected (close code 1008). An HTTP answer
    /// the client reads nothing of for twice this long closes the connection.
    #[arg(long, env = "K3SENSE_SEND_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,

    /// Largest message a browser may send, in bytes; larger closes the socket (code 1009).
    #[arg(long, env = "K3SENSE_MAX_FRAME", default_value_t = 4096)]
    pub max_frame: usize,

    /// Interval of WebSocket pings; a client silent for three intervals is dropped.
    #[arg(long, env = "K3SENSE_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Most TCP connections open at once: HTTP requests, idle keep-alives and WebSockets. One
    /// more is accepted and closed at once. Keep it below the open-file limit (ulimit -n) and
    /// above --max-clients, so WebSocket clients over --max-clients get a 503 they can read.
    #[arg(long, env = "K3SENSE_MAX_CONNECTIONS", default_value_t = 12_000, value_parser = at_least_one)]
    pub max_connections: usize,

    /// How long a connection may take to send a complete request head, and how long a
    /// keep-alive connection may sit idle between requests; then it is closed. Cuts slowloris
    /// clients (headers trickled byte by byte) and connections that never send anything.
    #[arg(long, env = "K3SENSE_HEADER_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_timeout: Duration,

    /// How long shutdown waits for WebSocket clients to answer their close frame (1001); the
    /// listener stays open meanwhile, with /readyz answering 503 and /ws refusing (503).
    #[arg(long, env = "K3SENSE_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How far in the future a reading's `read_at` may lie (the publisher's clock ahead of the
    /// gateway's); later ones are refused and counted (`reason="future"`), so a forged reading
    /// stamped 2099 cannot stay `latest` for ever.
    #[arg(long, env = "K3SENSE_MAX_CLOCK_SKEW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,

    /// Forget a sensor that is not online (it said offline, or never said) and sent no new
    /// reading for this long: it leaves the API, the page and /metrics' count. A newer reading
    /// or an `online` brings it back. 0 never forgets.
    #[arg(long, env = "K3SENSE_FORGET_AFTER", default_value = "24h", value_parser = humantime::parse_duration)]
    pub forget_after: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_clients: 10_000,
            history: 8640,
            client_queue: 256,
            send_timeout: Duration::from_secs(10),
            max_frame: 4096,
            ping_interval: Duration::from_secs(20),
            max_connections: 12_000,
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            max_clock_skew: Duration::from_secs(120),
            forget_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// A count of at least one (a limit of zero would refuse everyone).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}; give a whole number such as 12000")),
    }
}

/// A duration above zero (a zero timeout would cut every connection at once).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero, e.g. 10s".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e}; give a duration such as 10s or 500ms")),
    }
}

impl Config {
    /// Settings for a gateway on `listen` reading from `broker`, everything else at its default.
    pub fn new(listen: SocketAddr, broker: impl Into<String>) -> Self {
        Self {
            listen,
            mqtt: MqttConfig::new(broker),
            options: Options::default(),
        }
    }
}
