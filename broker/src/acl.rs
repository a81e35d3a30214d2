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
//! | `publisher` (sensors S) | `<prefix>/<s>/state`, `<prefix>/<s>/availability`, `<prefix>/<s>/replay[/…]`, `homeassistant/…` | `<prefix>/<s>/replay/#`, `<prefix>/<s>/state` (its own retained reading, to continue `seq`), `<prefix>/<s>/availability` (to answer a foreign `offline`), `homeassistant/status` |
//!
//! Whatever the role, an *empty* payload to `<prefix>/<id>/state` or `…/availability` is dropped:
//! rumqttd erases a retained message on any empty publish (even with retain=0), and a reading must
//! never be erased. `$SYS/…` and other `$` filters are refused with SUBACK 0x80 (rumqttd would
//! disconnect the client); `$share/<group>/<filter>` is judged by its inner filter.

use rumqttc::mqttbytes::valid_filter;

use crate::users::{Role, Sensors};

/// Home Assistant's discovery prefix and its status topic.
const HOME_ASSISTANT: &str = "homeassistant";
const HOME_ASSISTANT_STATUS: &str = "homeassistant/status";

/// The verdict on one PUBLISH (or last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishVerdict {
    /// Forward it.
    Allow,
    /// The role may not publish to this topic.
    Forbidden,
    /// An empty payload to a reading or availability topic: it would erase state.
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

    /// May `role` publish `payload_empty`-or-not to `topic` (a valid topic name, no wildcards)?
    pub(crate) fn publish(&self, role: &Role, topic: &str, payload_empty: bool) -> PublishVerdict {
        if !self.may_publish(role, topic) {
            return PublishVerdict::Forbidden;
        }
        if payload_empty && self.is_state_topic(topic) {
            return PublishVerdict::WouldErase;
        }
        PublishVerdict::Allow
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
                if topic
                    .strip_prefix(HOME_ASSISTANT)
                    .is_some_and(|rest| rest.starts_with('/'))
                {
                    return true;
                }
                self.sensor_subtopic(topic).is_some_and(|(id, rest)| {
                    sensors.includes(id)
                        && (rest == "state"
                            || rest == "availability"
                            || rest == "replay"
                            || rest.starts_with("replay/"))
                })
            }
        }
    }

    /// May `role` subscribe to `filter`?
    pub(crate) fn subscribe(&self, role: &Role, filter: &str) -> SubscribeVerdict {
        let filter = match shared_inner(filter) {
            Some(inner) => inner,
            None if filter.starts_with("$share/") => return SubscribeVerdict::Invalid,
            None => filter,
        };
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
                        // after a restart) and its availability (to answer a foreign
                        // `offline`).
                        Sensors::Any => {
                            within(filter, &format!("{}/+/replay/#", self.prefix))
                                || within(filter, &format!("{}/+/state", self.prefix))
                                || within(filter, &format!("{}/+/availability", self.prefix))
                        }
                        Sensors::Only(ids) => ids.iter().any(|id| {
                            within(filter, &format!("{}/{}/replay/#", self.prefix, id.as_str()))
                                || within(filter, &format!("{}/{}/state", self.prefix, id.as_str()))
                                || within(
                                    filter,
                                    &format!("{}/{}/availability", self.prefix, id.as_str()),
                                )
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

    /// `<prefix>/<id>/state` or `<prefix>/<id>/availability`, whatever `<id>` is.
    fn is_state_topic(&self, topic: &str) -> bool {
        self.sensor_subtopic(topic)
            .is_some_and(|(_, rest)| rest == "state" || rest == "availability")
    }

    /// Splits `<prefix>/<id>/<rest>` into `(id, rest)`.
    fn sensor_subtopic<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let after = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let (id, rest) = after.split_once('/')?;
        (!id.is_empty()).then_some((id, rest))
    }
}

/// The filter inside `$share/<group>/<filter>`, if it is one with a group and a filter.
fn shared_inner(filter: &str) -> Option<&str> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    (!group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty()).then_some(inner)
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
            assert_eq!(acl.publish(&Role::Reader, topic, false), P::Forbidden);
            assert_eq!(acl.publish(&Role::Reader, topic, true), P::Forbidden);
        }
        assert_eq!(acl.subscribe(&Role::Reader, "k3sense/#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "k3sense/+/state"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "homeassistant/#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "#"), S::Forbidden);
        assert_eq!(acl.subscribe(&Role::Reader, "other/#"), S::Forbidden);
        assert_eq!(acl.subscribe(&Role::Reader, "$SYS/#"), S::System);
        assert_eq!(acl.subscribe(&Role::Reader, "k3sense/#/x"), S::Invalid);
        assert_eq!(acl.subscribe(&Role::Reader, "$share/g/k3sense/#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Reader, "$share/g/#"), S::Forbidden);
        assert_eq!(acl.subscribe(&Role::Reader, "$share/g/$SYS/x"), S::System);
        assert_eq!(acl.subscribe(&Role::Reader, "$share/x"), S::Invalid);
    }

    #[test]
    fn gateways_may_only_ask_for_replays() {
        let acl = Acl::new("k3sense");
        let g = Role::Gateway;
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay/request", false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay/request/gw-a", false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&g, "k3sense/pi-1/replay/answer", false),
            P::Forbidden
        );
        assert_eq!(acl.publish(&g, "k3sense/pi-1/state", false), P::Forbidden);
        assert_eq!(acl.publish(&g, "k3sense/pi-1/replay", false), P::Forbidden);
        assert_eq!(acl.subscribe(&g, "k3sense/#"), S::Allow);
        assert_eq!(acl.subscribe(&g, "k3sense/+/replay"), S::Allow);
    }

    #[test]
    fn publishers_publish_only_their_own_sensors() {
        let acl = Acl::new("home/k3sense");
        let p = publisher(&["pi-1"]);
        assert_eq!(acl.publish(&p, "home/k3sense/pi-1/state", false), P::Allow);
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/availability", false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/replay/answer", false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-2/state", false),
            P::Forbidden
        );
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-1/other", false),
            P::Forbidden
        );
        assert_eq!(acl.publish(&p, "k3sense/pi-1/state", false), P::Forbidden);
        assert_eq!(
            acl.publish(&p, "homeassistant/sensor/pi-1/temperature/config", false),
            P::Allow
        );
        assert_eq!(acl.publish(&p, "homeassistantx/y", false), P::Forbidden);
        assert_eq!(acl.publish(&p, "$SYS/x", false), P::Forbidden);
        assert_eq!(acl.subscribe(&p, "home/k3sense/pi-1/replay/#"), S::Allow);
        assert_eq!(
            acl.subscribe(&p, "home/k3sense/pi-1/replay/request"),
            S::Allow
        );
        assert_eq!(acl.publish(&p, "home/k3sense/pi-1/replay", false), P::Allow);
        assert_eq!(
            acl.publish(&p, "home/k3sense/pi-2/replay", false),
            P::Forbidden
        );
        assert_eq!(
            acl.subscribe(&p, "home/k3sense/pi-2/replay/#"),
            S::Forbidden
        );
        assert_eq!(acl.subscribe(&p, "home/k3sense/+/replay/#"), S::Forbidden);
        // Its own retained state, to continue `seq` after a restart; nobody else's.
        assert_eq!(acl.subscribe(&p, "home/k3sense/pi-1/state"), S::Allow);
        assert_eq!(acl.subscribe(&p, "home/k3sense/pi-2/state"), S::Forbidden);
        assert_eq!(acl.subscribe(&p, "home/k3sense/+/state"), S::Forbidden);
        assert_eq!(acl.subscribe(&p, "homeassistant/status"), S::Allow);
        assert_eq!(acl.subscribe(&p, "home/k3sense/#"), S::Forbidden);

        let any = Role::Publisher(Sensors::Any);
        assert_eq!(
            acl.publish(&any, "home/k3sense/node-7/state", false),
            P::Allow
        );
        assert_eq!(
            acl.publish(&any, "home/k3sense/Not_An_Id/state", false),
            P::Forbidden
        );
        assert_eq!(acl.subscribe(&any, "home/k3sense/+/replay/#"), S::Allow);
    }

    #[test]
    fn nobody_erases_a_reading_with_an_empty_publish() {
        let acl = Acl::new("k3sense");
        for role in [Role::Admin, Role::Unscoped, publisher(&["pi-1"])] {
            assert_eq!(
                acl.publish(&role, "k3sense/pi-1/state", true),
                P::WouldErase
            );
            assert_eq!(
                acl.publish(&role, "k3sense/pi-1/availability", true),
                P::WouldErase
            );
            assert_eq!(
                acl.publish(&role, "homeassistant/sensor/x/config", true),
                P::Allow,
                "an empty retained discovery config is how Home Assistant entities are removed"
            );
        }
        assert_eq!(acl.publish(&Role::Admin, "other/topic", true), P::Allow);
        assert_eq!(acl.publish(&Role::Admin, "$SYS/x", false), P::Forbidden);
        assert_eq!(acl.subscribe(&Role::Admin, "#"), S::Allow);
        assert_eq!(acl.subscribe(&Role::Admin, "$SYS/#"), S::System);
    }
}
