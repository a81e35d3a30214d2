//! The gateway's Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Names follow Prometheus conventions: `k3sense_gateway_` prefix, `_total` on counters, base
//! units. Labels are fixed, small sets (`reason`, `kind`), never sensor-controlled strings, so a
//! hostile publisher cannot blow up the series count.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry},
};

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// WebSocket clients connected now.
    pub ws_clients: Gauge,
    /// WebSocket connections accepted since start.
    pub ws_connections: Counter,
    /// WebSocket upgrades refused, by reason (`limit`, `origin`, `shutdown`, `handshake`).
    pub ws_rejected: Family<Labels, Counter>,
    /// Clients disconnected by the server, by reason (`slow`, `silent`, `oversized`, `binary`,
    /// `flood`, `shutdown`).
    pub ws_disconnects: Family<Labels, Counter>,
    /// Messages sent to WebSocket clients (one per client per update, counted as the update is
    /// queued for the fan-out; a client that lags drops the rest of its queue).
    pub ws_messages_sent: Counter,
    /// MQTT messages received, by kind (`state`, `availability`).
    pub mqtt_messages: Family<Labels, Counter>,
    /// MQTT messages dropped, by reason (`malformed`, `out_of_range`, `id_mismatch`, `unknown_topic`, …).
    pub invalid_messages: Family<Labels, Counter>,
    /// 1 while connected and subscribed to the broker.
    pub broker_connected: Gauge,
    /// Subscribed broker connections lost (failed reconnect attempts are not counted).
    pub broker_disconnects: Counter,
    /// Sensors known.
    pub sensors: Gauge,
    /// Sensors forgotten after `--forget-after` without news (a newer reading brings one back).
    pub sensors_forgotten: Counter,
    /// Replay requests sent to publishers (missing readings asked for again).
    pub replay_requests: Counter,
    /// Replay requests dropped because the MQTT client's queue was full (asked again later).
    pub replay_requests_unsent: Counter,
    /// TCP connections open now: HTTP requests, idle keep-alives and WebSockets.
    pub connections: Gauge,
    /// TCP connections accepted since start.
    pub connections_accepted: Counter,
    /// Connections closed at once after accept, by reason (`limit`: over `--max-connections`).
    pub connections_refused: Family<Labels, Counter>,
    /// Connections closed for sending no complete request head within `--header-timeout`, by
    /// reason (`header`: a new connection, e.g. slowloris; `idle`: a keep-alive between requests).
    pub connection_timeouts: Family<Labels, Counter>,
    /// Failed `accept` calls, by reason (`fd_limit`: out of file descriptors; `other`).
    pub accept_errors: Family<Labels, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("k3sense_gateway");
        let mut r = Register(&mut registry);
        Self {
            ws_clients: r.add("ws_clients", "WebSocket clients connected now"),
            ws_connections: r.add("ws_connections", "WebSocket connections accepted"),
            ws_rejected: r.add("ws_rejected", "WebSocket upgrades refused, by reason"),
            ws_disconnects: r.add("ws_disconnects", "WebSocket clients disconnected by the gateway, by reason"),
            ws_messages_sent: r.add("ws_messages_sent", "Messages written to WebSocket clients"),
            mqtt_messages: r.add("mqtt_messages", "MQTT messages received, by kind"),
            invalid_messages: r.add("invalid_messages", "MQTT messages dropped as invalid, by reason"),
            broker_connected: r.add("broker_connected", "1 while connected and subscribed to the MQTT broker"),
            broker_disconnects: r.add("broker_disconnects", "Subscribed connections to the MQTT broker lost (the gateway keeps serving what it holds)"),
            sensors: r.add("sensors", "Sensors known to the gateway"),
            sensors_forgotten: r.add("sensors_forgotten", "Sensors forgotten after --forget-after with no reading and not online"),
            replay_requests: r.add("replay_requests", "Replay requests sent to publishers for missing readings"),
            replay_requests_unsent: r.add("replay_requests_unsent", "Replay requests dropped because the MQTT client's queue was full (asked again later)"),
            connections: r.add("connections", "TCP connections open now (HTTP and WebSocket)"),
            connections_accepted: r.add("connections_accepted", "TCP connections accepted"),
            connections_refused: r.add("connections_refused", "TCP connections closed at once after accept, by reason"),
            connection_timeouts: r.add("connection_timeouts", "Connections closed for sending no complete request head in time, by reason"),
            accept_errors: r.add("accept_errors", "Failed accepts on the listener, by reason"),
            registry,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts one refused upgrade.
    pub fn rejected(&self, reason: &'static str) {
        self.ws_rejected
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts one server-side disconnect.
    pub fn disconnected(&self, reason: &'static str) {
        self.ws_disconnects
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts one connection closed at once after accept.
    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts one connection closed for not sending a request head in time.
    pub fn timed_out(&self, reason: &'static str) {
        self.connection_timeouts
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts one failed accept.
    pub fn accept_failed(&self, reason: &'static str) {
        self.accept_errors
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts one received MQTT message.
    pub fn received(&self, kind: &'static str) {
        self.mqtt_messages
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    /// Counts one invalid MQTT message.
    pub fn invalid(&self, reason: &'static str) {
        self.invalid_messages
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }
}

/// Registers metrics under their names and help texts, each created with its default.
struct Register<'a>(&'a mut Registry);

impl Register<'_> {
    fn add<M: Default + Clone + Metric>(&mut self, name: &str, help: &str) -> M {
        let metric = M::default();
        self.0.register(name, help, metric.clone());
        metric
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
