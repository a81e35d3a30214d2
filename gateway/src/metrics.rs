//! The gateway's Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Names follow Prometheus conventions: `k3sense_gateway_` prefix, `_total` on counters, base
//! units. Labels are fixed, small sets (`reason`, `kind`), never sensor-controlled strings, so a
//! hostile publisher cannot blow up the series count.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
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
        let ws_clients = Gauge::default();
        let ws_connections = Counter::default();
        let ws_rejected = Family::<Labels, Counter>::default();
        let ws_disconnects = Family::<Labels, Counter>::default();
        let ws_messages_sent = Counter::default();
        let mqtt_messages = Family::<Labels, Counter>::default();
        let invalid_messages = Family::<Labels, Counter>::default();
        let broker_connected = Gauge::default();
        let broker_disconnects = Counter::default();
        let sensors = Gauge::default();
        let sensors_forgotten = Counter::default();
        let replay_requests = Counter::default();
        let replay_requests_unsent = Counter::default();
        let connections = Gauge::default();
        let connections_accepted = Counter::default();
        let connections_refused = Family::<Labels, Counter>::default();
        let connection_timeouts = Family::<Labels, Counter>::default();
        let accept_errors = Family::<Labels, Counter>::default();
        registry.register(
            "ws_clients",
            "WebSocket clients connected now",
            ws_clients.clone(),
        );
        registry.register(
            "ws_connections",
            "WebSocket connections accepted",
            ws_connections.clone(),
        );
        registry.register(
            "ws_rejected",
            "WebSocket upgrades refused, by reason",
            ws_rejected.clone(),
        );
        registry.register(
            "ws_disconnects",
            "WebSocket clients disconnected by the gateway, by reason",
            ws_disconnects.clone(),
        );
        registry.register(
            "ws_messages_sent",
            "Messages written to WebSocket clients",
            ws_messages_sent.clone(),
        );
        registry.register(
            "mqtt_messages",
            "MQTT messages received, by kind",
            mqtt_messages.clone(),
        );
        registry.register(
            "invalid_messages",
            "MQTT messages dropped as invalid, by reason",
            invalid_messages.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected and subscribed to the MQTT broker",
            broker_connected.clone(),
        );
        registry.register(
            "broker_disconnects",
            "Subscribed connections to the MQTT broker lost (the gateway keeps serving what it holds)",
            broker_disconnects.clone(),
        );
        registry.register("sensors", "Sensors known to the gateway", sensors.clone());
        registry.register(
            "sensors_forgotten",
            "Sensors forgotten after --forget-after with no reading and not online",
            sensors_forgotten.clone(),
        );
        registry.register(
            "replay_requests",
            "Replay requests sent to publishers for missing readings",
            replay_requests.clone(),
        );
        registry.register(
            "replay_requests_unsent",
            "Replay requests dropped because the MQTT client's queue was full (asked again later)",
            replay_requests_unsent.clone(),
        );
        registry.register(
            "connections",
            "TCP connections open now (HTTP and WebSocket)",
            connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "TCP connections accepted",
            connections_accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "TCP connections closed at once after accept, by reason",
            connections_refused.clone(),
        );
        registry.register(
            "connection_timeouts",
            "Connections closed for sending no complete request head in time, by reason",
            connection_timeouts.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts on the listener, by reason",
            accept_errors.clone(),
        );
        Self {
            registry,
            ws_clients,
            ws_connections,
            ws_rejected,
            ws_disconnects,
            ws_messages_sent,
            mqtt_messages,
            invalid_messages,
            broker_connected,
            broker_disconnects,
            sensors,
            sensors_forgotten,
            replay_requests,
            replay_requests_unsent,
            connections,
            connections_accepted,
            connections_refused,
            connection_timeouts,
            accept_errors,
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
