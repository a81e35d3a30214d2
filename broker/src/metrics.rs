//! The broker's counters: connections, refusals by reason, messages, forbidden publishes and
//! subscriptions — what an operator needs to see an intruder, a flood or a broken client.
//!
//! Plain atomics, shared by every connection task; [`Metrics::render`] writes them in the
//! Prometheus text format (served by `--metrics-listen`, or by whoever embeds the broker).

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

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

/// Counters of one broker (all listeners). Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: [AtomicU64; Reason::ALL.len()],
    publishes_forwarded: AtomicU64,
    publishes_delivered: AtomicU64,
    publishes_forbidden: AtomicU64,
    publishes_would_erase: AtomicU64,
    publishes_too_large: AtomicU64,
    publishes_rate_limited: AtomicU64,
    subscriptions_forwarded: AtomicU64,
    subscriptions_forbidden: AtomicU64,
    subscriptions_system: AtomicU64,
    subscriptions_invalid: AtomicU64,
    subscriptions_shared: AtomicU64,
    subscriptions_limit: AtomicU64,
    client_id_slots: AtomicU64,
    pending: AtomicU64,
    filters: AtomicU64,
    logins_delayed: AtomicU64,
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
    /// `$SYS/…` and other `$` filters refused (0x80).
    pub subscriptions_system: u64,
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

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub(crate) fn accepted(&self) {
        add(&self.accepted);
    }
    pub(crate) fn refused(&self, reason: Reason) {
        if let Some(counter) = self.refused.get(reason.index()) {
            add(counter);
        }
    }
    pub(crate) fn connected(&self) {
        add(&self.active);
    }
    pub(crate) fn disconnected(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
    pub(crate) fn publish_forwarded(&self) {
        add(&self.publishes_forwarded);
    }
    pub(crate) fn publish_delivered(&self) {
        add(&self.publishes_delivered);
    }
    pub(crate) fn publish_forbidden(&self) {
        add(&self.publishes_forbidden);
    }
    pub(crate) fn publish_would_erase(&self) {
        add(&self.publishes_would_erase);
    }
    pub(crate) fn publish_too_large(&self) {
        add(&self.publishes_too_large);
    }
    pub(crate) fn publish_rate_limited(&self) {
        add(&self.publishes_rate_limited);
    }
    pub(crate) fn subscription_shared(&self) {
        add(&self.subscriptions_shared);
    }
    pub(crate) fn subscription_limit(&self) {
        add(&self.subscriptions_limit);
    }
    pub(crate) fn pending(&self, pending: usize) {
        self.pending.store(pending as u64, Ordering::Relaxed);
    }
    pub(crate) fn filters(&self, filters: usize) {
        self.filters.store(filters as u64, Ordering::Relaxed);
    }
    pub(crate) fn login_delayed(&self) {
        add(&self.logins_delayed);
    }
    pub(crate) fn subscription_forwarded(&self) {
        add(&self.subscriptions_forwarded);
    }
    pub(crate) fn subscription_forbidden(&self) {
        add(&self.subscriptions_forbidden);
    }
    pub(crate) fn subscription_system(&self) {
        add(&self.subscriptions_system);
    }
    pub(crate) fn subscription_invalid(&self) {
        add(&self.subscriptions_invalid);
    }
    pub(crate) fn client_id_slots(&self, slots: u32) {
        self.client_id_slots
            .store(u64::from(slots), Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            accepted: get(&self.accepted),
            active: get(&self.active),
            refused: Reason::ALL
                .iter()
                .zip(&self.refused)
                .map(|(r, c)| (*r, get(c)))
                .collect(),
            publishes_forwarded: get(&self.publishes_forwarded),
            publishes_delivered: get(&self.publishes_delivered),
            publishes_forbidden: get(&self.publishes_forbidden),
            publishes_would_erase: get(&self.publishes_would_erase),
            publishes_too_large: get(&self.publishes_too_large),
            publishes_rate_limited: get(&self.publishes_rate_limited),
            subscriptions_forwarded: get(&self.subscriptions_forwarded),
            subscriptions_forbidden: get(&self.subscriptions_forbidden),
            subscriptions_system: get(&self.subscriptions_system),
            subscriptions_invalid: get(&self.subscriptions_invalid),
            subscriptions_shared: get(&self.subscriptions_shared),
            subscriptions_limit: get(&self.subscriptions_limit),
            client_id_slots: get(&self.client_id_slots),
            pending: get(&self.pending),
            filters: get(&self.filters),
            logins_delayed: get(&self.logins_delayed),
        }
    }

    /// The counters in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "k3sense_broker_connections_accepted_total",
            "counter",
            "TCP connections accepted on any MQTT listener.",
            &[("", s.accepted)],
        );
        family(
            "k3sense_broker_clients_connected",
            "gauge",
            "MQTT clients connected (CONNACK sent) right now.",
            &[("", s.active)],
        );
        let refused: Vec<(String, u64)> = s
            .refused
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", r.as_str()), *n))
            .collect();
        let refused: Vec<(&str, u64)> = refused.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        family(
            "k3sense_broker_connections_refused_total",
            "counter",
            "Connections refused or closed by the broker, by reason.",
            &refused,
        );
        family(
            "k3sense_broker_publishes_total",
            "counter",
            "Client PUBLISH packets, by what the broker did with them.",
            &[
                ("{outcome=\"forwarded\"}", s.publishes_forwarded),
                ("{outcome=\"forbidden\"}", s.publishes_forbidden),
                ("{outcome=\"would_erase\"}", s.publishes_would_erase),
                ("{outcome=\"too_large\"}", s.publishes_too_large),
                ("{outcome=\"rate_limited\"}", s.publishes_rate_limited),
            ],
        );
        family(
            "k3sense_broker_deliveries_total",
            "counter",
            "PUBLISH packets sent to clients.",
            &[("", s.publishes_delivered)],
        );
        family(
            "k3sense_broker_subscriptions_total",
            "counter",
            "SUBSCRIBE filters, by what the broker did with them.",
            &[
                ("{outcome=\"forwarded\"}", s.subscriptions_forwarded),
                ("{outcome=\"forbidden\"}", s.subscriptions_forbidden),
                ("{outcome=\"system\"}", s.subscriptions_system),
                ("{outcome=\"invalid\"}", s.subscriptions_invalid),
                ("{outcome=\"shared\"}", s.subscriptions_shared),
                ("{outcome=\"limit\"}", s.subscriptions_limit),
            ],
        );
        family(
            "k3sense_broker_client_id_slots",
            "gauge",
            "Pooled client ids handed to the embedded rumqttd for clean sessions; its per-client records are bounded by this, not by the client ids that ever connected.",
            &[("", s.client_id_slots)],
        );
        family(
            "k3sense_broker_pending_connections",
            "gauge",
            "Sockets that have not logged in yet (TLS handshake, CONNECT, a failed login's delay).",
            &[("", s.pending)],
        );
        family(
            "k3sense_broker_filters",
            "gauge",
            "Distinct subscription filters forwarded to the embedded rumqttd, which keeps a log for each until the broker restarts.",
            &[("", s.filters)],
        );
        family(
            "k3sense_broker_logins_delayed_total",
            "counter",
            "Wrong passwords answered after a delay, and logins queued behind their address's failures.",
            &[("", s.logins_delayed)],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders_every_reason() {
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
        let s = m.snapshot();
        assert_eq!(s.accepted, 1);
        assert_eq!(s.active, 1);
        assert_eq!(s.refused(Reason::BadCredentials), 2);
        assert_eq!(s.refused(Reason::KeepaliveTimeout), 1);
        assert_eq!(s.refused(Reason::Oversized), 0);
        let text = m.render();
        assert!(
            text.contains(
                "k3sense_broker_connections_refused_total{reason=\"bad_credentials\"} 2\n"
            )
        );
        assert!(text.contains("k3sense_broker_publishes_total{outcome=\"forbidden\"} 1\n"));
        assert!(text.contains("# TYPE k3sense_broker_clients_connected gauge\n"));
        assert!(text.contains("k3sense_broker_client_id_slots 7\n"));
        for reason in Reason::ALL {
            assert!(text.contains(reason.as_str()), "{reason:?} missing");
        }
    }
}
