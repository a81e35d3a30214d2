//! The broker's metrics: connections, refusals by reason, messages, forbidden publishes and
//! subscriptions — what an operator needs to see an intruder, a flood or a broken client.
//!
//! prometheus-client, like the gateway's and the publisher's metrics, so all three components
//! speak the same OpenMetrics text and a reader learns one library. [`serve`] answers
//! `GET /metrics` on `--metrics-listen` with axum, as the publisher does on its own
//! `--metrics-listen`; whoever embeds the broker calls [`Metrics::encode`] instead.
//!
//! Every labelled series (each refusal reason, each outcome) is created at start, so a scrape
//! shows a 0 rather than no series, and `rate()` and alerts work from the first scrape. The
//! handles of those series are kept, so counting one never looks a label set up.

use std::sync::Arc;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a connection was refused before or at CONNECT, or closed afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No CONNECT (or no TLS handshake) within `--connect-timeout`.
    ConnectTimeout,
    /// The TLS handshake failed.
    TlsHandshake,
    /// Wrong username or password (CONNACK 4).
    BadCredentials,
    /// No credentials where they are required, or a forbidden last will (CONNACK 5).
    NotAuthorised,
    /// Not MQTT 3.1.1 (CONNACK 1).
    ProtocolVersion,
    /// More than `--max-connections` clients (CONNACK 3, or closed at accept when far over).
    TooManyConnections,
    /// rumqttd did not answer (CONNACK 3).
    BrokerUnavailable,
    /// Bytes that are not MQTT, a truncated packet, a bad remaining length, a second CONNECT.
    Malformed,
    /// A packet over `--max-payload`.
    Oversized,
    /// Nothing received within 1.5 × the client's keepalive.
    KeepaliveTimeout,
    /// Not logged in yet, and closed to make room for a newer socket (`--max-pending`,
    /// `--max-pending-per-source`).
    PendingEvicted,
    /// Its address had failed so many logins that its turn to be checked would have come after
    /// its CONNECT deadline (CONNACK 3, unchecked).
    LoginThrottled,
    /// A QoS 1/2 subscriber so far behind that rumqttd's log would have dropped messages it has
    /// not received: closed instead, so its persistent session resumes where it stopped.
    SlowSubscriber,
}

impl Reason {
    const ALL: [Reason; 13] = [
        Reason::ConnectTimeout,
        Reason::TlsHandshake,
        Reason::BadCredentials,
        Reason::NotAuthorised,
        Reason::ProtocolVersion,
        Reason::TooManyConnections,
        Reason::BrokerUnavailable,
        Reason::Malformed,
        Reason::Oversized,
        Reason::KeepaliveTimeout,
        Reason::PendingEvicted,
        Reason::LoginThrottled,
        Reason::SlowSubscriber,
    ];

    /// The label value in the metrics and the log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectTimeout => "connect_timeout",
            Self::TlsHandshake => "tls_handshake",
            Self::BadCredentials => "bad_credentials",
            Self::NotAuthorised => "not_authorised",
            Self::ProtocolVersion => "protocol_version",
            Self::TooManyConnections => "too_many_connections",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::PendingEvicted => "pending_evicted",
            Self::LoginThrottled => "login_throttled",
            Self::SlowSubscriber => "slow_subscriber",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// TCP connections accepted on any listener.
    pub accepted: u64,
    /// Clients connected (past CONNACK) right now.
    pub active: u64,
    /// Connections refused or closed, by reason.
    pub refused: Vec<(Reason, u64)>,
    /// Client PUBLISHes passed to rumqttd.
    pub publishes_forwarded: u64,
    /// PUBLISHes rumqttd sent to clients.
    pub publishes_delivered: u64,
    /// PUBLISHes (and wills) dropped because the role may not publish there.
    pub publishes_forbidden: u64,
    /// Empty PUBLISHes dropped because they would have erased a retained message.
    pub publishes_would_erase: u64,
    /// PUBLISHes dropped for a payload over their topic family's cap (a reading over 1 KiB).
    pub publishes_too_large: u64,
    /// Replay requests dropped over the per-connection or per-account rate.
    pub publishes_rate_limited: u64,
    /// SUBSCRIBE filters passed to rumqttd.
    pub subscriptions_forwarded: u64,
    /// SUBSCRIBE filters refused (0x80) because the role may not read there.
    pub subscriptions_forbidden: u64,
    /// `$` filters refused (0x80): any but `$SYS/…` while the `$SYS` tree is served.
    pub subscriptions_system: u64,
    /// `$SYS/…` filters granted and served by the front (see `sys`).
    pub subscriptions_sys: u64,
    /// Invalid filters refused (0x80).
    pub subscriptions_invalid: u64,
    /// `$share/…` filters refused (0x80).
    pub subscriptions_shared: u64,
    /// Filters refused (0x80) by `--max-subscriptions`, `--max-filters-per-account` or
    /// `--max-filters`.
    pub subscriptions_limit: u64,
    /// Slot ids the pool has handed rumqttd for clean sessions: what rumqttd's per-client
    /// records are bounded by, however many fresh client ids connect.
    pub client_id_slots: u64,
    /// Sockets that have not logged in yet, right now.
    pub pending: u64,
    /// Distinct filters forwarded to rumqttd, which keeps a log for each for good.
    pub filters: u64,
    /// Wrong passwords answered late, and logins queued behind their address's failures.
    pub logins_delayed: u64,
    /// MQTT packets of any kind read from logged-in clients.
    pub packets_received: u64,
    /// MQTT packets of any kind written to logged-in clients.
    pub packets_sent: u64,
}

impl Snapshot {
    /// The count for one reason.
    pub fn refused(&self, reason: Reason) -> u64 {
        self.refused
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// Every metric of one broker (all listeners). Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    accepted: Counter,
    active: Gauge,
    /// One series per [`Reason`], in the order of [`Reason::ALL`].
    refused: [Counter; Reason::ALL.len()],
    publishes_forwarded: Counter,
    publishes_delivered: Counter,
    publishes_forbidden: Counter,
    publishes_would_erase: Counter,
    publishes_too_large: Counter,
    publishes_rate_limited: Counter,
    subscriptions_forwarded: Counter,
    subscriptions_forbidden: Counter,
    subscriptions_system: Counter,
    subscriptions_invalid: Counter,
    subscriptions_shared: Counter,
    subscriptions_limit: Counter,
    subscriptions_sys: Counter,
    client_id_slots: Gauge,
    pending: Gauge,
    filters: Gauge,
    logins_delayed: Counter,
    packets_received: Counter,
    packets_sent: Counter,
}

type Labels = Vec<(&'static str, &'static str)>;

/// The `outcome` label values of `k3sense_broker_publishes_total`, in the order of the fields.
const PUBLISH_OUTCOMES: [&str; 5] = [
    "forwarded",
    "forbidden",
    "would_erase",
    "too_large",
    "rate_limited",
];
/// The `outcome` label values of `k3sense_broker_subscriptions_total`.
const SUBSCRIBE_OUTCOMES: [&str; 7] = [
    "forwarded",
    "forbidden",
    "system",
    "invalid",
    "shared",
    "limit",
    "sys",
];

impl Default for Metrics {
    /// Registers every metric, each labelled series included, at 0. Help texts get their final
    /// full stop from prometheus-client.
    fn default() -> Self {
        let mut registry = Registry::with_prefix("k3sense_broker");
        let r = &mut registry;
        let accepted = counter(
            r,
            "connections_accepted",
            "TCP connections accepted on any MQTT listener",
        );
        let active = gauge(
            r,
            "clients_connected",
            "MQTT clients connected (CONNACK sent) right now",
        );
        let refused = labelled(
            r,
            "connections_refused",
            "Connections refused or closed by the broker, by reason",
            "reason",
            Reason::ALL.map(Reason::as_str),
        );
        let [forwarded, forbidden, would_erase, too_large, rate_limited] = labelled(
            r,
            "publishes",
            "Client PUBLISH packets, by what the broker did with them",
            "outcome",
            PUBLISH_OUTCOMES,
        );
        let [
            sub_forwarded,
            sub_forbidden,
            system,
            invalid,
            shared,
            limit,
            sys,
        ] = labelled(
            r,
            "subscriptions",
            "SUBSCRIBE filters, by what the broker did with them",
            "outcome",
            SUBSCRIBE_OUTCOMES,
        );
        let (client_id_slots, pending, filters, logins_delayed) = bounded_state(r);
        let (packets_received, packets_sent) = packet_counters(r);
        Self {
            accepted,
            active,
            refused,
            publishes_forwarded: forwarded,
            publishes_forbidden: forbidden,
            publishes_would_erase: would_erase,
            publishes_too_large: too_large,
            publishes_rate_limited: rate_limited,
            subscriptions_forwarded: sub_forwarded,
            subscriptions_forbidden: sub_forbidden,
            subscriptions_system: system,
            subscriptions_invalid: invalid,
            subscriptions_shared: shared,
            subscriptions_limit: limit,
            subscriptions_sys: sys,
            publishes_delivered: counter(r, "deliveries", "PUBLISH packets sent to clients"),
            client_id_slots,
            pending,
            filters,
            logins_delayed,
            packets_received,
            packets_sent,
            // Last: every field above has registered through `r` by now.
            registry,
        }
    }
}

/// The gauges of the broker's bounded state, and the delayed-login counter.
fn bounded_state(r: &mut Registry) -> (Gauge, Gauge, Gauge, Counter) {
    (
        gauge(
            r,
            "client_id_slots",
            "Pooled client ids handed to the embedded rumqttd for clean sessions; its per-client records are bounded by this, not by the client ids that ever connected",
        ),
        gauge(
            r,
            "pending_connections",
            "Sockets that have not logged in yet (TLS handshake, CONNECT, a failed login's delay)",
        ),
        gauge(
            r,
            "filters",
            "Distinct subscription filters forwarded to the embedded rumqttd, which keeps a log for each until the broker restarts",
        ),
        counter(
            r,
            "logins_delayed",
            "Wrong passwords answered after a delay, and logins queued behind their address's failures",
        ),
    )
}

/// The packet counters behind `$SYS/broker/messages/received` and `…/sent`.
fn packet_counters(r: &mut Registry) -> (Counter, Counter) {
    (
        counter(
            r,
            "packets_received",
            "MQTT packets of any kind read from logged-in clients ($SYS/broker/messages/received)",
        ),
        counter(
            r,
            "packets_sent",
            "MQTT packets of any kind written to logged-in clients ($SYS/broker/messages/sent)",
        ),
    )
}

/// Registers a counter; prometheus-client adds `_total` to the sample's name.
fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    registry.register(name, help, counter.clone());
    counter
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let gauge = Gauge::default();
    registry.register(name, help, gauge.clone());
    gauge
}

/// Registers a counter family with one label and creates its series for every value up front.
fn labelled<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    values.map(|value| family.get_or_create(&vec![(label, value)]).clone())
}

/// A gauge's value as the count it holds (gauges here never go below 0).
fn level(gauge: &Gauge) -> u64 {
    u64::try_from(gauge.get()).unwrap_or(0)
}

/// A count or size as a gauge value.
fn as_gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub(crate) fn accepted(&self) {
        self.accepted.inc();
    }
    pub(crate) fn refused(&self, reason: Reason) {
        if let Some(counter) = self.refused.get(reason.index()) {
            counter.inc();
        }
    }
    pub(crate) fn connected(&self) {
        self.active.inc();
    }
    pub(crate) fn disconnected(&self) {
        self.active.dec();
    }
    pub(crate) fn publish_forwarded(&self) {
        self.publishes_forwarded.inc();
    }
    pub(crate) fn publish_delivered(&self) {
        self.publishes_delivered.inc();
    }
    pub(crate) fn publish_forbidden(&self) {
        self.publishes_forbidden.inc();
    }
    pub(crate) fn publish_would_erase(&self) {
        self.publishes_would_erase.inc();
    }
    pub(crate) fn publish_too_large(&self) {
        self.publishes_too_large.inc();
    }
    pub(crate) fn publish_rate_limited(&self) {
        self.publishes_rate_limited.inc();
    }
    pub(crate) fn subscription_shared(&self) {
        self.subscriptions_shared.inc();
    }
    pub(crate) fn subscription_limit(&self) {
        self.subscriptions_limit.inc();
    }
    pub(crate) fn pending(&self, pending: usize) {
        self.pending.set(as_gauge(pending));
    }
    pub(crate) fn filters(&self, filters: usize) {
        self.filters.set(as_gauge(filters));
    }
    pub(crate) fn login_delayed(&self) {
        self.logins_delayed.inc();
    }
    pub(crate) fn subscription_forwarded(&self) {
        self.subscriptions_forwarded.inc();
    }
    pub(crate) fn subscription_forbidden(&self) {
        self.subscriptions_forbidden.inc();
    }
    pub(crate) fn subscription_system(&self) {
        self.subscriptions_system.inc();
    }
    pub(crate) fn subscription_sys(&self) {
        self.subscriptions_sys.inc();
    }
    pub(crate) fn packet_received(&self) {
        self.packets_received.inc();
    }
    pub(crate) fn packet_sent(&self) {
        self.packets_sent.inc();
    }
    pub(crate) fn subscription_invalid(&self) {
        self.subscriptions_invalid.inc();
    }
    pub(crate) fn client_id_slots(&self, slots: u32) {
        self.client_id_slots.set(i64::from(slots));
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            accepted: self.accepted.get(),
            active: level(&self.active),
            refused: Reason::ALL
                .iter()
                .zip(&self.refused)
                .map(|(r, c)| (*r, c.get()))
                .collect(),
            publishes_forwarded: self.publishes_forwarded.get(),
            publishes_delivered: self.publishes_delivered.get(),
            publishes_forbidden: self.publishes_forbidden.get(),
            publishes_would_erase: self.publishes_would_erase.get(),
            publishes_too_large: self.publishes_too_large.get(),
            publishes_rate_limited: self.publishes_rate_limited.get(),
            subscriptions_forwarded: self.subscriptions_forwarded.get(),
            subscriptions_forbidden: self.subscriptions_forbidden.get(),
            subscriptions_system: self.subscriptions_system.get(),
            subscriptions_invalid: self.subscriptions_invalid.get(),
            subscriptions_shared: self.subscriptions_shared.get(),
            subscriptions_limit: self.subscriptions_limit.get(),
            subscriptions_sys: self.subscriptions_sys.get(),
            client_id_slots: level(&self.client_id_slots),
            pending: level(&self.pending),
            filters: level(&self.filters),
            logins_delayed: self.logins_delayed.get(),
            packets_received: self.packets_received.get(),
            packets_sent: self.packets_sent.get(),
        }
    }

    /// The OpenMetrics text exposition, as served at `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Metrics").field(&self.snapshot()).finish()
    }
}

/// The content type of the OpenMetrics text format (the gateway and the publisher send the same).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`; any other path is a 404, any other method a 405 (axum's answers).
fn app(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.encode())
}

/// Serves `GET /metrics` on `listener` (`--metrics-listen`) until `stop` is cancelled. A failing
/// server is logged, never fatal: the broker's job is MQTT.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let served = axum::serve(listener, app(metrics))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the --metrics-listen server stopped");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn counts_and_encodes_every_reason() {
        let m = Metrics::default();
        m.accepted();
        m.refused(Reason::BadCredentials);
        m.refused(Reason::BadCredentials);
        m.refused(Reason::KeepaliveTimeout);
        m.connected();
        m.connected();
        m.disconnected();
        m.publish_forbidden();
        m.client_id_slots(7);
        m.pending(3);
        let s = m.snapshot();
        assert_eq!(s.accepted, 1);
        assert_eq!(s.active, 1);
        assert_eq!(s.pending, 3);
        assert_eq!(s.refused(Reason::BadCredentials), 2);
        assert_eq!(s.refused(Reason::KeepaliveTimeout), 1);
        assert_eq!(s.refused(Reason::Oversized), 0);
        let text = m.encode();
        assert!(
            text.contains(
                "k3sense_broker_connections_refused_total{reason=\"bad_credentials\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("k3sense_broker_publishes_total{outcome=\"forbidden\"} 1\n"));
        assert!(text.contains("k3sense_broker_connections_accepted_total 1\n"));
        assert!(text.contains("# TYPE k3sense_broker_connections_accepted counter\n"));
        assert!(text.contains("# TYPE k3sense_broker_clients_connected gauge\n"));
        assert!(text.contains("k3sense_broker_clients_connected 1\n"));
        assert!(text.contains("k3sense_broker_client_id_slots 7\n"));
        assert!(text.contains("k3sense_broker_pending_connections 3\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_labelled_series_is_there_from_the_start() {
        let text = Metrics::default().encode();
        for reason in Reason::ALL {
            let sample = format!(
                "k3sense_broker_connections_refused_total{{reason=\"{}\"}} 0\n",
                reason.as_str()
            );
            assert!(text.contains(&sample), "{sample} missing from\n{text}");
        }
        // The contract's values (docs/metrics.md), not the constants: a renamed one must fail.
        for outcome in [
            "forwarded",
            "forbidden",
            "would_erase",
            "too_large",
            "rate_limited",
        ] {
            let sample = format!("k3sense_broker_publishes_total{{outcome=\"{outcome}\"}} 0\n");
            assert!(text.contains(&sample), "{sample} missing");
        }
        for outcome in [
            "forwarded",
            "forbidden",
            "system",
            "invalid",
            "shared",
            "limit",
            "sys",
        ] {
            let sample = format!("k3sense_broker_subscriptions_total{{outcome=\"{outcome}\"}} 0\n");
            assert!(text.contains(&sample), "{sample} missing");
        }
        for counter in ["packets_received", "packets_sent"] {
            let sample = format!("k3sense_broker_{counter}_total 0\n");
            assert!(text.contains(&sample), "{sample} missing");
        }
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// A real socket: the status, the content type and the counters as they are now; other
    /// paths are 404; cancelling `stop` ends the server.
    #[tokio::test]
    async fn serves_the_metrics_until_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, metrics.clone(), stop.clone()));
        metrics.accepted();
        metrics.accepted();

        let close = "Host: x\r\nConnection: close\r\n\r\n";
        let answer = get(addr, &format!("GET /metrics?x=1 HTTP/1.1\r\n{close}")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains(&format!("content-type: {OPENMETRICS}\r\n")),
            "{answer}"
        );
        assert!(answer.contains("\nk3sense_broker_connections_accepted_total 2\n"));
        let answer = get(addr, &format!("GET / HTTP/1.1\r\n{close}")).await;
        assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");

        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
