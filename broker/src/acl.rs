//! Who may publish and subscribe to what: the rules behind each role, as pure functions.
//!
//! rumqttd authenticates but has no authorisation; the proxy asks [`Acl`] about every PUBLISH,
//! every SUBSCRIBE filter and every last will before anything reaches rumqttd.
//!
//! | role | may publish | may subscribe (filters within) |
//! |---|---|---|
//! | `admin`, no role | anything but `$…` | anything but `$…` |
//! | `reader` | nothing | `<prefix>/#`, `homeassistant/#` |
//! | `gateway` | `<prefix>/<id>/replay/request[/…]` | `<prefix>/#`, `homeassistant/#` |
//! | `publisher` (sensors S) | `<prefix>/<s>/state`, `<prefix>/<s>/availability`, `<prefix>/<s>/sensor`, `<prefix>/<s>/replay[/…]`, `homeassistant/<component>/k3sense_<s>/…` (its own discovery configs) | `<prefix>/<s>/replay/#`, `<prefix>/<s>/state` (its own retained reading, to continue `seq`), `<prefix>/<s>/availability` (to answer a foreign `offline`), `homeassistant/status` |
//!
//! An *empty* payload to `<prefix>/<id>/state` or `…/availability` is dropped unless it is
//! retained: rumqttd erases a retained message on any empty publish (even with retain=0), while
//! MQTT says only a retained empty publish clears one — which is how an account allowed to write
//! the topic (`admin`, the sensor's own publisher) removes a sensor. `$SYS/…` and other `$`
//! filters are refused with SUBACK 0x80 (rumqttd would disconnect the client), and so is
//! `$share/…`: one client holding N shared subscriptions to the same topic would get each
//! message N times (an amplification), and MQTT 3.1.1 has no shared subscriptions anyway.
//!
//! [`Acl::payload_cap`] caps each topic family's payload below `--max-payload`: a reading or a
//! replayed reading is at most 1 KiB ([`k3sense_protocol::MAX_PAYLOAD_BYTES`]), an availability
//! 16 bytes, so no client the project ships ever receives more than it accepts.

use rumqttc::mqttbytes::valid_filter;

use crate::users::{Role, Sensors};

/// Home Assistant's discovery prefix and its status topic.
const HOME_ASSISTANT: &str = "homeassistant";
const HOME_ASSISTANT_STATUS: &str = "homeassistant/status";
/// The node id of a sensor's discovery topics: `homeassistant/<component>/k3sense_<id>/…`
/// (publisher/src/discovery.rs, `device_id`).
const DISCOVERY_NODE_PREFIX: &str = "k3sense_";
/// Largest payload on `<prefix>/<id>/availability` (`online`, `offline`).
pub(crate) const MAX_AVAILABILITY_BYTES: usize = 16;
/// Largest payload on `<prefix>/<id>/state` and `<prefix>/<id>/replay[/…]`: one Reading JSON
/// (or a replay request), as the gateway and the publisher accept it.
pub(crate) const MAX_READING_BYTES: usize = k3sense_protocol::MAX_PAYLOAD_BYTES;

/// The verdict on one PUBLISH (or last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishVerdict {
    /// Forward it.
    Allow,
    /// The role may not publish to this topic.
    Forbidden,
    /// An empty non-retained payload to a reading or availability topic: rumqttd would erase
    /// the retained message, which MQTT reserves for a retained empty publish.
    WouldErase,
}

/// The verdict on one SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubscribeVerdict {
    /// Forward it.
    Allow,
    /// The role may not read these topics.
    Forbidden,
    /// A `$SYS/…` or other `$` filter.
    System,
    /// Not a valid MQTT filter (`a/#/b`, `a+`, empty).
    Invalid,
    /// A `$share/…` filter: refused, see the module's doc.
    Shared,
}

/// The rules of one installation (one topic prefix).
#[derive(Debug, Clone)]
pub(crate) struct Acl {
    prefix: String,
}

impl Acl {
    /// Rules for topics under `prefix` (already validated by `k3sense_protocol::Topics`).
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// May `role` publish `payload_empty`-or-not, `retain`ed or not, to `topic` (a valid topic
    /// name, no wildcards)? A last will is judged with `retain` false: no will may erase a
    /// reading.
    pub(crate) fn publish(
        &self,
        role: &Role,
        topic: &str,
        payload_empty: bool,
        retain: bool,
    ) -> PublishVerdict {
        if !self.may_publish(role, topic) {
            return PublishVerdict::Forbidden;
        }
        if payload_empty && !retain && self.is_state_topic(topic) {
            return PublishVerdict::WouldErase;
        }
        PublishVerdict::Allow
    }

    /// The largest payload accepted on `topic`, where its family has a cap of its own below
    /// `--max-payload`: readings, sensor health and replays 1 KiB, availability 16 bytes.
    pub(crate) fn payload_cap(&self, topic: &str) -> Option<usize> {
        let (_, rest) = self.sensor_subtopic(topic)?;
        match rest {
            "state" => Some(MAX_READING_BYTES),
            "availability" => Some(MAX_AVAILABILITY_BYTES),
            "sensor" => Some(MAX_READING_BYTES),
            "replay" => Some(MAX_READING_BYTES),
            rest if rest.starts_with("replay/") => Some(MAX_READING_BYTES),
            _ => None,
        }
    }

    fn may_publish(&self, role: &Role, topic: &str) -> bool {
        if topic.starts_with('$') {
            return false;
        }
        match role {
            Role::Admin | Role::Unscoped => true,
            Role::Reader => false,
            Role::Gateway => self.sensor_subtopic(topic).is_some_and(|(_, rest)| {
                rest == "replay/request" || rest.starts_with("replay/request/")
            }),
            Role::Publisher(sensors) => {
                if let Some(rest) = topic
                    .strip_prefix(HOME_ASSISTANT)
                    .and_then(|rest| rest.strip_prefix('/'))
                {
                    return own_discovery_topic(sensors, rest);
                }
                self.sensor_subtopic(topic).is_some_and(|(id, rest)| {
                    sensors.includes(id)
                        && (rest == "state"
                            || rest == "availability"
                            || rest == "sensor"
                            || rest == "replay"
                            || rest.starts_with("replay/"))
                })
            }
        }
    }

    /// May `role` subscribe to `filter`?
    pub(crate) fn subscribe(&self, role: &Role, filter: &str) -> SubscribeVerdict {
        if filter.starts_with("$share/") {
            return SubscribeVerdict::Shared;
        }
        if !valid_filter(filter) {
            return SubscribeVerdict::Invalid;
        }
        if filter.starts_with('$') {
            return SubscribeVerdict::System;
        }
        let allowed = match role {
            Role::Admin | Role::Unscoped => true,
            Role::Reader | Role::Gateway => {
                within(filter, &format!("{}/#", self.prefix))
                    || within(filter, &format!("{HOME_ASSISTANT}/#"))
            }
            Role::Publisher(sensors) => {
                within(filter, HOME_ASSISTANT_STATUS)
                    || match sensors {
                        // Its replay requests, its own retained state (to continue `seq`
                        // after a restart) and its own availability (to say `online` again
                        // when someone else says it is `offline`).
                        Sensors::Any => ["+/replay/#", "+/state", "+/availability"]
                            .iter()
                            .any(|own| within(filter, &format!("{}/{own}", self.prefix))),
                        Sensors::Only(ids) => ids.iter().any(|id| {
                            ["replay/#", "state", "availability"].iter().any(|own| {
                                within(filter, &format!("{}/{}/{own}", self.prefix, id.as_str()))
                            })
                        }),
                    }
            }
        };
        if allowed {
            SubscribeVerdict::Allow
        } else {
            SubscribeVerdict::Forbidden
        }
    }

    /// `<prefix>/<id>/state`, `…/availability` or `…/sensor` (the retained ones), whatever
    /// `<id>` is.
    fn is_state_topic(&self, topic: &str) -> bool {
        self.sensor_subtopic(topic)
            .is_some_and(|(_, rest)| rest == "state" || rest == "availability" || rest == "sensor")
    }

    /// Splits `<prefix>/<id>/<rest>` into `(id, rest)`.
    /// Whether `topic` asks a publisher to replay readings (`<prefix>/<id>/replay/request[/…]`),
    /// which the broker rate-limits per requester (see `replays`).
    pub(crate) fn is_replay_request(&self, topic: &str) -> bool {
        self.sensor_subtopic(topic).is_some_and(|(_, rest)| {
            rest == "replay/request" || rest.starts_with("replay/request/")
        })
    }

    fn sensor_subtopic<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let after = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let (id, rest) = after.split_once('/')?;
        (!id.is_empty()).then_some((id, rest))
    }
}

/// Whether `rest` (a topic after `homeassistant/`) is `<component>/k3sense_<id>/<more>` for one
/// of `sensors`: the discovery configs of the publisher's own sensors and nothing else, so one
/// publisher cannot rewrite another sensor's (or any other) Home Assistant entity.
fn own_discovery_topic(sensors: &Sensors, rest: &str) -> bool {
    let mut levels = rest.splitn(3, '/');
    let (Some(component), Some(node), Some(more)) = (levels.next(), levels.next(), levels.next())
    else {
        return false;
    };
    !component.is_empty()
        && !more.is_empty()
        && node
            .strip_prefix(DISCOVERY_NODE_PREFIX)
            .is_some_and(|id| sensors.includes(id))
}

/// Whether every topic `filter` matches is also matched by `pattern` (both valid filters).
fn within(filter: &str, pattern: &str) -> bool {
    let mut filter_levels = filter.split('/');
    for p in pattern.split('/') {
        if p == "#" {
            return true;
        }
        match filter_levels.next() {
            None => return false,
            Some("#") => return false,
            Some("+") if p != "+" => return false,
            Some(f) if p != "+" && p != f => return false,
            Some(_) => {}
        }
    }
    filter_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use k3sense_protocol::SensorId;

    use super::*;
    use PublishVerdict as P;
    use SubscribeVerdict as S;

    fn publisher(ids: &[&str]) -> Role {
        Role::Publisher(Sensors::Only(
            ids.iter().map(|id| SensorId::new(*id).unwrap()).collect(),
        ))
    }

    #[test]
    fn within_compares_levels_and_wildcards() {
        assert!(within("k3sense/#", "k3sense/#"));
        assert!(within("k3sense", "k3sense/#"));
        assert!(within("k3sense/+/state", "k3sense/#"));
        assert!(within("k3sense/pi-1/replay/x", "k3sense/+/replay/#"));
        assert!(within("k3sense/+/replay/#", "k3sense/+/replay/#"));
        assert!(!within("#", "k3sense/#"));
        assert!(!within("+/pi-1/state", "k3sense/#"));
        assert!(!within("k3sense/+/replay/#", "k3sense/pi-1/replay/#"));
        assert!(!within("k3sense/pi-1", "k3sense/pi-1/replay/#"));
        assert!(within("homeassistant/status", "homeassistant/status"));
        assert!(!within("homeassistant/#", "homeassistant/status"));
        assert!(!within("homeassistant/status/x", "homeassistant/status"));
    }

    #[test]
    fn readers_never_publish_and_read_only_our_topics() {
        let acl = Acl::new("k3sense");
        for topic in ["k3sense/pi-1/state", "k3sense/pi-1/replay/request", "x"] {
            assert_eq!(
                acl.publish(&Role::Reader, topic, false, false),
                P::Forbidden
            );
            assert_eq!(acl.publish(&Role::Reader, topic, true, false), P::Forbidden);
        }
        assert_eq!(acl.subscribe(&Role::Reader, "k3sense/#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "k3sense/+/state"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "homeassistant/#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "#"), S::Forbidden);
        assert_eq!(acl.subscribe(&Role::Reader, "other/#"), S::Forbidden);
        assert_eq!(acl.subscribe(&Role::Reader, "$SYS/#"), S::System);
        assert_eq!(acl.subscribe(&Role::Reader, "k3sense/#/x"), S::Invalid);
        // No shared subscriptions at all: N of them to one topic would deliver each message N
        // times to the same client.
        for filter in [
            "$share/g/k3sense/#",
            "$share/g/#",
            "$share/g/$SYS/x",
            "$share/x",
        ] {
            assert_eq!(acl.subscribe(&Role::Reader, filter), S::Shared, "{filter}");
            assert_eq!(acl.subscribe(&Role::Admin, filter), S::Shared, "{filter}");
        }
    }

    #[test]
    fn gateways_may_only_ask_for_replays() {
        let acl = Acl::new("k3sense");
        let g = Role::Gateway;
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay/request", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay/request/gw-a", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay/answer", false, false),
            P::Forbidden
        );
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/state", false, false),
            P::Forbidden
        );
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay", false, false),
            P::Forbidden
        );
        assert_eq!(acl.subscribe(&g, "k3sense/#"), S::Allow);
        assert_eq!(acl.subscribe(&g, "k3sense/+/replay"), S::Allow);
    }

    #[test]
    fn publishers_publish_only_their_own_sensors() {
        let acl = Acl::new("home/k3sense");
        let p = publisher(&["pi-1"]);
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/state", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/availability", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/sensor", false, true),
            P::Allow
        );
        // Empty and not retained would erase it in rumqttd; empty and retained is a clear.
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/sensor", true, false),
            P::WouldErase
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/sensor", true, true),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-2/sensor", false, true),
            P::Forbidden
        );
        assert_eq!(
            acl.payload_cap("home/k3sense/pi-1/sensor"),
            Some(MAX_READING_BYTES)
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/replay/answer", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-2/state", false, false),
            P::Forbidden
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/other", false, false),
            P::Forbidden
        );
        assert_eq!(
            acl.publish(&p, "k3sense/pi-1/state", false, false),
            P::Forbidden
        );
        // Its own discovery configs (publisher/src/discovery.rs), nobody else's.
        assert_eq!(
            acl.publish(
                &p,
                "homeassistant/sensor/k3sense_pi-1/temperature/config",
                false,
                true
            ),
            P::Allow
        );
        for topic in [
            "homeassistant/sensor/k3sense_pi-2/temperature/config",
            "homeassistant/sensor/pi-1/temperature/config",
            "homeassistant/light/kitchen/config",
            "homeassistant/sensor/k3sense_pi-1",
            "homeassistant/sensor/k3sense_pi-1/",
            "homeassistant/status",
        ] {
            assert_eq!(acl.publish(&p, topic, false, true), P::Forbidden, "{topic}");
        }
        assert_eq!(
            acl.publish(&p, "homeassistantx/y", false, false),
            P::Forbidden
        );
        assert_eq!(acl.publish(&p, "$SYS/x", false, false), P::Forbidden);
        assert_eq!(acl.subscribe(&p, "home/k3sense/pi-1/replay/#"), S::Allow);
        assert_eq!(
            acl.subscribe(&p, "home/k3sense/pi-1/replay/request"),
            S::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/replay", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-2/replay", false, false),
            P::Forbidden
        );
        assert_eq!(
            acl.subscribe(&p, "home/k3sense/pi-2/replay/#"),
            S::Forbidden
        );
        assert_eq!(acl.subscribe(&p, "home/k3sense/+/replay/#"), S::Forbidden);
        // Its own retained state, to continue `seq` after a restart; nobody else's.
        assert_eq!(acl.subscribe(&p, "home/k3sense/pi-1/state"), S::Allow);
        assert_eq!(
            acl.subscribe(&p, "home/k3sense/pi-1/availability"),
            S::Allow
        );
        assert_eq!(
            acl.subscribe(&p, "home/k3sense/pi-2/availability"),
            S::Forbidden
        );
        assert_eq!(acl.subscribe(&p, "home/k3sense/pi-2/state"), S::Forbidden);
        assert_eq!(acl.subscribe(&p, "home/k3sense/+/state"), S::Forbidden);
        assert_eq!(acl.subscribe(&p, "homeassistant/status"), S::Allow);
        assert_eq!(acl.subscribe(&p, "home/k3sense/#"), S::Forbidden);

        let any = Role::Publisher(Sensors::Any);
        assert_eq!(
            acl.publish(
                &any,
                "homeassistant/sensor/k3sense_node-7/humidity/config",
                false,
                true
            ),
            P::Allow
        );
        assert_eq!(
            acl.publish(&any, "homeassistant/light/kitchen/config", false, true),
            P::Forbidden
        );
        assert_eq!(
            acl.publish(&any, "home/k3sense/node-7/state", false, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&any, "home/k3sense/Not_An_Id/state", false, false),
            P::Forbidden
        );
        assert_eq!(acl.subscribe(&any, "home/k3sense/+/replay/#"), S::Allow);
    }

    #[test]
    fn only_a_retained_empty_publish_from_a_writer_clears_a_reading() {
        let acl = Acl::new("k3sense");
        for role in [Role::Admin, Role::Unscoped, publisher(&["pi-1"])] {
            for topic in ["k3sense/pi-1/state", "k3sense/pi-1/availability"] {
                // rumqttd would erase the retained message even with retain=0.
                assert_eq!(acl.publish(&role, topic, true, false), P::WouldErase);
                // MQTT's way to clear a retained message: how a sensor is removed.
                assert_eq!(acl.publish(&role, topic, true, true), P::Allow);
            }
            assert_eq!(
                acl.publish(
                    &role,
                    "homeassistant/sensor/k3sense_pi-1/t/config",
                    true,
                    true
                ),
                P::Allow,
                "an empty retained discovery config is how Home Assistant entities are removed"
            );
        }
        for role in [Role::Reader, Role::Gateway, publisher(&["pi-2"])] {
            assert_eq!(
                acl.publish(&role, "k3sense/pi-1/state", true, true),
                P::Forbidden
            );
        }
        assert_eq!(
            acl.publish(&Role::Admin, "other/topic", true, false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&Role::Admin, "$SYS/x", false, false),
            P::Forbidden
        );
        assert_eq!(acl.subscribe(&Role::Admin, "#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Admin, "$SYS/#"), S::System);
    }

    #[test]
    fn each_topic_family_has_its_payload_cap() {
        let acl = Acl::new("k3sense");
        assert_eq!(acl.payload_cap("k3sense/pi-1/state"), Some(1024));
        assert_eq!(acl.payload_cap("k3sense/pi-1/replay"), Some(1024));
        assert_eq!(acl.payload_cap("k3sense/pi-1/replay/request"), Some(1024));
        assert_eq!(acl.payload_cap("k3sense/pi-1/availability"), Some(16));
        assert_eq!(acl.payload_cap("k3sense/pi-1/other"), None);
        assert_eq!(
            acl.payload_cap("homeassistant/sensor/k3sense_pi-1/t/config"),
            None
        );
        assert_eq!(acl.payload_cap("other/pi-1/state"), None);
    }
}
