//! `$SYS/broker/…`: the few statistics Mosquitto publishes that dashboards and MQTT Explorer
//! read (version, uptime, clients connected, messages received and sent), served by the front.
//!
//! rumqttd has no `$SYS` tree and closes a connection that subscribes to a `$` filter, so no
//! `$SYS` filter ever reaches it: the front grants it, sends the current values as retained
//! messages (as Mosquitto's are), and every `--sys-interval` sends the values that changed, at
//! QoS 0, to each connection holding a matching filter. Mosquitto does the same (`sys_interval`,
//! 10 s by default; its `$SYS` messages are QoS 0 and retained).
//!
//! A `#` or `+/…` filter does not match `$SYS` topics [MQTT-4.7.2-1]: those go to rumqttd, which
//! never has a `$SYS` message to send.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use rumqttc::mqttbytes::{QoS, matches, v4::Publish};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// What a `$SYS` tree reports: the broker's start and its counters.
pub(crate) struct SysTree {
    started: Instant,
    /// `--sys-interval`; `None` (0 s) serves no `$SYS` tree.
    interval: Option<Duration>,
}

impl SysTree {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            started: Instant::now(),
            interval: (!interval.is_zero()).then_some(interval),
        }
    }

    /// How often changed values are sent, if the tree is served.
    pub(crate) fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Whether `filter` is served here rather than forwarded: a `$SYS` filter while the tree is
    /// served.
    pub(crate) fn serves(&self, filter: &str) -> bool {
        self.interval.is_some() && is_sys_filter(filter)
    }

    /// Every topic of the tree with its value now, in Mosquitto's names and formats.
    fn values(&self, metrics: &Metrics) -> [(&'static str, String); 7] {
        let now = metrics.snapshot();
        let publishes_received = now.publishes_forwarded
            + now.publishes_forbidden
            + now.publishes_would_erase
            + now.publishes_too_large
            + now.publishes_rate_limited;
        [
            (
                "$SYS/broker/version",
                format!("k3sense version {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "$SYS/broker/uptime",
                format!("{} seconds", self.started.elapsed().as_secs()),
            ),
            ("$SYS/broker/clients/connected", now.active.to_string()),
            (
                "$SYS/broker/messages/received",
                now.packets_received.to_string(),
            ),
            ("$SYS/broker/messages/sent", now.packets_sent.to_string()),
            (
                "$SYS/broker/publish/messages/received",
                publishes_received.to_string(),
            ),
            (
                "$SYS/broker/publish/messages/sent",
                now.publishes_delivered.to_string(),
            ),
        ]
    }
}

/// A `$SYS` filter: `$SYS` itself or anything below it (`$SYS/#`, `$SYS/broker/+`…).
pub(crate) fn is_sys_filter(filter: &str) -> bool {
    filter == "$SYS" || filter.starts_with("$SYS/")
}

/// One connection's `$SYS` filters and the values it was last sent.
#[derive(Default)]
pub(crate) struct SysSubscriptions {
    filters: Vec<String>,
    sent: HashMap<&'static str, String>,
}

impl SysSubscriptions {
    pub(crate) fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Adds (or renews) `filter` and returns what it matches now, retained, as a subscription
    /// to a topic holding a retained message gets it [MQTT-3.3.1-6], again on a repeated
    /// SUBSCRIBE [MQTT-3.8.4-3].
    pub(crate) fn subscribe(
        &mut self,
        filter: String,
        tree: &SysTree,
        metrics: &Metrics,
    ) -> Vec<Publish> {
        let mut out = Vec::new();
        for (topic, value) in tree.values(metrics) {
            if sys_matches(topic, &filter) {
                out.push(message(topic, &value, true));
                self.sent.insert(topic, value);
            }
        }
        if !self.filters.contains(&filter) {
            self.filters.push(filter);
        }
        out
    }

    /// Removes `filter`; whether it was held.
    pub(crate) fn unsubscribe(&mut self, filter: &str) -> bool {
        let before = self.filters.len();
        self.filters.retain(|f| f != filter);
        self.filters.len() != before
    }

    /// The values that changed since they were last sent, on topics a held filter matches.
    pub(crate) fn changed(&mut self, tree: &SysTree, metrics: &Metrics) -> Vec<Publish> {
        let mut out = Vec::new();
        for (topic, value) in tree.values(metrics) {
            if !self.filters.iter().any(|f| sys_matches(topic, f)) {
                continue;
            }
            if self.sent.get(topic) != Some(&value) {
                out.push(message(topic, &value, false));
                self.sent.insert(topic, value);
            }
        }
        out
    }
}

/// Whether the `$SYS` `filter` matches the `$SYS` `topic`. rumqttc's `matches` never matches a
/// `$` topic (right for a wildcard at the first level [MQTT-4.7.2-1], which these filters do not
/// have), so the shared `$SYS` level is compared here and the rest by `matches`.
fn sys_matches(topic: &str, filter: &str) -> bool {
    match (topic.strip_prefix("$SYS"), filter.strip_prefix("$SYS")) {
        (Some(topic), Some(filter)) => matches(&format!("SYS{topic}"), &format!("SYS{filter}")),
        _ => false,
    }
}

fn message(topic: &str, value: &str, retain: bool) -> Publish {
    let mut publish = Publish::new(
        topic,
        QoS::AtMostOnce,
        Bytes::copy_from_slice(value.as_bytes()),
    );
    publish.retain = retain;
    publish
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(messages: &[Publish]) -> Vec<(&str, bool)> {
        messages
            .iter()
            .map(|m| (m.topic.as_str(), m.retain))
            .collect()
    }

    #[test]
    fn sys_filters_match_as_filters_do() {
        assert!(sys_matches("$SYS/broker/uptime", "$SYS/#"));
        assert!(sys_matches("$SYS/broker/uptime", "$SYS/broker/+"));
        assert!(sys_matches("$SYS/broker/uptime", "$SYS/broker/uptime"));
        assert!(sys_matches(
            "$SYS/broker/clients/connected",
            "$SYS/+/clients/#"
        ));
        assert!(!sys_matches(
            "$SYS/broker/clients/connected",
            "$SYS/broker/+"
        ));
        assert!(!sys_matches("$SYS/broker/uptime", "$SYS"));
        assert!(!sys_matches("$SYS/broker/uptime", "#"));
    }

    #[test]
    fn only_sys_filters_are_served_and_only_when_enabled() {
        let on = SysTree::new(Duration::from_secs(10));
        assert!(on.serves("$SYS/#"));
        assert!(on.serves("$SYS/broker/+"));
        assert!(on.serves("$SYS"));
        assert!(!on.serves("$SYSTEM/x"));
        assert!(!on.serves("$share/g/$SYS/#"));
        assert!(!on.serves("#"));
        assert!(!SysTree::new(Duration::ZERO).serves("$SYS/#"));
    }

    #[test]
    fn a_subscription_gets_the_matching_values_retained_then_only_changes() {
        let tree = SysTree::new(Duration::from_secs(10));
        let metrics = Metrics::default();
        let mut subs = SysSubscriptions::default();
        let first = subs.subscribe("$SYS/broker/clients/+".into(), &tree, &metrics);
        assert_eq!(topics(&first), [("$SYS/broker/clients/connected", true)]);
        assert_eq!(&first[0].payload[..], b"0");
        assert_eq!(first[0].qos, QoS::AtMostOnce);
        // Nothing changed: nothing to send.
        assert!(subs.changed(&tree, &metrics).is_empty());
        metrics.connected();
        let later = subs.changed(&tree, &metrics);
        assert_eq!(topics(&later), [("$SYS/broker/clients/connected", false)]);
        assert_eq!(&later[0].payload[..], b"1");
        // Subscribing again sends the value again, retained.
        let again = subs.subscribe("$SYS/broker/clients/+".into(), &tree, &metrics);
        assert_eq!(topics(&again), [("$SYS/broker/clients/connected", true)]);
        assert!(subs.unsubscribe("$SYS/broker/clients/+"));
        assert!(subs.is_empty());
        metrics.connected();
        assert!(subs.changed(&tree, &metrics).is_empty());
    }

    #[test]
    fn the_whole_tree_in_mosquittos_formats() {
        let tree = SysTree::new(Duration::from_secs(10));
        let metrics = Metrics::default();
        let all = SysSubscriptions::default().subscribe("$SYS/#".into(), &tree, &metrics);
        let values: HashMap<&str, String> = all
            .iter()
            .map(|m| {
                (
                    m.topic.as_str(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                )
            })
            .collect();
        assert_eq!(values.len(), 7);
        assert!(values["$SYS/broker/version"].starts_with("k3sense version "));
        assert_eq!(values["$SYS/broker/uptime"], "0 seconds");
        assert_eq!(values["$SYS/broker/messages/received"], "0");
    }
}
