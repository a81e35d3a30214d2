//! Home Assistant MQTT discovery: the retained config messages that make a k3sense sensor show
//! up in Home Assistant as a device with a temperature and a humidity entity, with no YAML.
//!
//! Pure: [`Announcement::new`] builds the topics and JSON payloads; the link (`link.rs`)
//! publishes them (QoS 1, retained) on every connect, and again whenever Home Assistant's status
//! topic (`<prefix>/status`) says `online` — Home Assistant publishes that when it (re)starts
//! and may have lost what it knew.
//!
//! The payloads follow Home Assistant's MQTT sensor schema
//! (<https://www.home-assistant.io/integrations/sensor.mqtt/>): the entities read our own state
//! topic through a `value_template`, and expire after three intervals without a reading, so a
//! stuck sensor shows as unavailable instead of an old value. They list two availability
//! topics with `availability_mode: all`: the publisher's (`online`/`offline`) and the sensor's
//! own health (`<prefix>/<id>/sensor`, JSON whose `status` is `ok` or `not_answering`), so an
//! unplugged sensor shows as unavailable while its publisher runs.
//!
//! ```text
//! <prefix>/sensor/k3sense_<sensor_id>/temperature/config
//! <prefix>/sensor/k3sense_<sensor_id>/humidity/config
//! ```

use std::time::Duration;

use k3sense_protocol::{Availability, HealthStatus, Model, SensorId, Topics};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Home Assistant's default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";

/// What Home Assistant publishes on its status topic when it starts.
pub const ONLINE: &str = "online";

/// How many publish intervals without a reading before Home Assistant shows a value as
/// unavailable.
pub const EXPIRE_AFTER_INTERVALS: u32 = 3;

/// Where the project lives, for the `origin` block Home Assistant shows in its logs.
const ORIGIN_URL: &str = "https://github.com/k3sense/k3sense";

/// One retained discovery message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `<prefix>/sensor/k3sense_<id>/<entity>/config`.
    pub topic: String,
    /// The entity's JSON config.
    pub payload: String,
}

/// Everything the link needs to announce one sensor to Home Assistant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Home Assistant's status topic: `<prefix>/status`.
    pub status_topic: String,
    /// The discovery messages (temperature, then humidity).
    pub messages: Vec<Message>,
}

/// The two entities of a k3sense device.
#[derive(Debug, Clone, Copy)]
struct Entity {
    key: &'static str,
    name: &'static str,
    device_class: &'static str,
    unit: &'static str,
    field: &'static str,
}

const ENTITIES: [Entity; 2] = [
    Entity {
        key: "temperature",
        name: "Temperature",
        device_class: "temperature",
        unit: "°C",
        field: "temperature_c",
    },
    Entity {
        key: "humidity",
        name: "Humidity",
        device_class: "humidity",
        unit: "%",
        field: "humidity_pct",
    },
];

/// Checks a discovery prefix: one or more non-empty topic levels without wildcards.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let bad = prefix.is_empty()
        || prefix.split('/').any(str::is_empty)
        || prefix.contains(['+', '#', '\0']);
    if bad {
        return Err(Error::Invalid(format!(
            "--ha-prefix {prefix:?} is not a usable MQTT topic prefix: use Home Assistant's \
             discovery prefix (default `homeassistant`), without wildcards or empty levels"
        )));
    }
    Ok(())
}

/// The node id in discovery topics and the device identifier: `k3sense_<sensor_id>`.
pub fn device_id(id: &SensorId) -> String {
    format!("k3sense_{id}")
}

/// The `expire_after` of both entities: [`EXPIRE_AFTER_INTERVALS`] intervals (of at least a
/// second, the fastest a DHT may be read), in whole seconds.
pub fn expire_after_secs(interval: Duration) -> u64 {
    let interval = interval.max(Duration::from_secs(1));
    let secs = (interval * EXPIRE_AFTER_INTERVALS).as_secs_f64().ceil();
    // A float of whole seconds, far below u64::MAX for any sensible interval.
    (secs as u64).max(1)
}

impl Announcement {
    /// The discovery messages of the sensor `id` (a `model`, publishing on `topics` every
    /// `interval`) under the discovery prefix `prefix`.
    pub fn new(
        prefix: &str,
        topics: &Topics,
        id: &SensorId,
        model: Model,
        interval: Duration,
    ) -> Result<Self> {
        validate_prefix(prefix)?;
        let node = device_id(id);
        let messages = ENTITIES
            .iter()
            .map(|entity| Message {
                topic: format!("{prefix}/sensor/{node}/{}/config", entity.key),
                payload: entity_config(entity, topics, id, model, interval).to_string(),
            })
            .collect();
        Ok(Self {
            status_topic: format!("{prefix}/status"),
            messages,
        })
    }
}

/// Whether a message on Home Assistant's status topic asks for a new announcement.
pub fn is_online(payload: &[u8]) -> bool {
    payload.trim_ascii() == ONLINE.as_bytes()
}

impl Announcement {
    /// Whether a message on `topic` asks for the announcement again: Home Assistant saying
    /// `online` live on its status topic (it restarted and may have lost what it knew). A
    /// retained `online` arrives right after every subscription, our own announcement on
    /// connect already answered it.
    pub fn asked_again(&self, topic: &str, retain: bool, payload: &[u8]) -> bool {
        topic == self.status_topic && !retain && is_online(payload)
    }
}

fn entity_config(
    entity: &Entity,
    topics: &Topics,
    id: &SensorId,
    model: Model,
    interval: Duration,
) -> Value {
    let node = device_id(id);
    let version = env!("CARGO_PKG_VERSION");
    json!({
        "name": entity.name,
        "unique_id": format!("{node}_{}", entity.key),
        "state_topic": topics.state(id),
        "value_template": format!("{{{{ value_json.{} }}}}", entity.field),
        "device_class": entity.device_class,
        "unit_of_measurement": entity.unit,
        "state_class": "measurement",
        "suggested_display_precision": 1,
        "expire_after": expire_after_secs(interval),
        "availability_mode": "all",
        "availability": [
            {
                "topic": topics.availability(id),
                "payload_available": Availability::Online.as_str(),
                "payload_not_available": Availability::Offline.as_str(),
            },
            {
                "topic": topics.sensor(id),
                "value_template": "{{ value_json.status }}",
                "payload_available": HealthStatus::Ok.as_str(),
                "payload_not_available": HealthStatus::NotAnswering.as_str(),
            },
        ],
        "qos": 1,
        "device": {
            "identifiers": [node],
            "name": format!("k3sense {id}"),
            "model": model.as_str().to_ascii_uppercase(),
            "manufacturer": "Aosong (read by k3sense)",
            "sw_version": version,
        },
        "origin": {
            "name": "k3sense",
            "sw_version": version,
            "support_url": ORIGIN_URL,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(interval: Duration) -> Announcement {
        Announcement::new(
            DEFAULT_PREFIX,
            &Topics::new("k3sense").unwrap(),
            &SensorId::new("pi-1").unwrap(),
            Model::Dht22,
            interval,
        )
        .unwrap()
    }

    #[test]
    fn topics_follow_the_discovery_layout() {
        let a = announcement(Duration::from_secs(10));
        assert_eq!(a.status_topic, "homeassistant/status");
        let topics: Vec<_> = a.messages.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/sensor/k3sense_pi-1/temperature/config",
                "homeassistant/sensor/k3sense_pi-1/humidity/config"
            ]
        );
    }

    #[test]
    fn payloads_name_our_topics_and_the_device() {
        let a = announcement(Duration::from_secs(10));
        let t: Value = serde_json::from_str(&a.messages[0].payload).unwrap();
        assert_eq!(t["state_topic"], "k3sense/pi-1/state");
        assert_eq!(t["availability_mode"], "all");
        assert_eq!(t["availability"][0]["topic"], "k3sense/pi-1/availability");
        assert_eq!(t["availability"][0]["payload_available"], "online");
        assert_eq!(t["availability"][1]["topic"], "k3sense/pi-1/sensor");
        assert_eq!(
            t["availability"][1]["value_template"],
            "{{ value_json.status }}"
        );
        assert_eq!(t["availability"][1]["payload_available"], "ok");
        assert_eq!(
            t["availability"][1]["payload_not_available"],
            "not_answering"
        );
        assert_eq!(t["value_template"], "{{ value_json.temperature_c }}");
        assert_eq!(t["unit_of_measurement"], "°C");
        assert_eq!(t["expire_after"], 30);
        assert_eq!(t["unique_id"], "k3sense_pi-1_temperature");
        assert_eq!(t["device"]["model"], "DHT22");
        assert_eq!(t["device"]["identifiers"][0], "k3sense_pi-1");
        let h: Value = serde_json::from_str(&a.messages[1].payload).unwrap();
        assert_eq!(h["value_template"], "{{ value_json.humidity_pct }}");
        assert_eq!(h["device_class"], "humidity");
        assert_eq!(h["unit_of_measurement"], "%");
        assert_eq!(h["device"], t["device"]);
    }

    #[test]
    fn expiry_is_three_intervals_in_whole_seconds() {
        assert_eq!(expire_after_secs(Duration::from_secs(10)), 30);
        assert_eq!(expire_after_secs(Duration::from_millis(200)), 3);
        assert_eq!(expire_after_secs(Duration::from_millis(2500)), 8);
        assert_eq!(expire_after_secs(Duration::ZERO), 3);
    }

    #[test]
    fn prefixes_with_wildcards_or_empty_levels_are_refused() {
        for bad in ["", "/ha", "ha/", "a//b", "ha/#", "ha/+/x"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["homeassistant", "site-a/homeassistant"] {
            assert!(validate_prefix(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn only_online_triggers_an_announcement() {
        assert!(is_online(b"online"));
        assert!(is_online(b"online\n"));
        assert!(!is_online(b"offline"));
        assert!(!is_online(b""));
    }

    #[test]
    fn only_a_live_online_on_the_status_topic_asks_again() {
        let topics = Topics::new("k3sense").unwrap();
        let id = SensorId::new("pi-1").unwrap();
        let a =
            Announcement::new("ha", &topics, &id, Model::Dht11, Duration::from_secs(10)).unwrap();
        assert!(a.asked_again("ha/status", false, b"online\n"));
        assert!(!a.asked_again("ha/status", true, b"online"));
        assert!(!a.asked_again("ha/status", false, b"offline"));
        assert!(!a.asked_again("homeassistant/status", false, b"online"));
    }
}
