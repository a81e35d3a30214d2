//! What the gateway says to browsers and HTTP clients.
//!
//! `GET /ws` sends JSON text messages, each with a `type`:
//!
//! ```json
//! {"type":"snapshot","sensors":[{"sensor_id":"pi-1","status":"online","latest":{…Reading…}}]}
//! {"type":"reading","sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"…","seq":43}
//! {"type":"availability","sensor_id":"pi-1","status":"offline"}
//! {"type":"sensor","sensor_id":"pi-1","status":"not_answering","since":"…","reason":"no_response","errors":{"no_response":31}}
//! {"type":"broker","status":"unreachable","since":"2026-11-27T04:00:05.000Z"}
//! {"type":"forgotten","sensor_id":"pi-1"}
//! ```
//!
//! `availability` is the publisher's (its process and connection); `sensor` is the sensor's own
//! health ([`SensorHealth`]), and each summary carries the latest one as `sensor_health`.
//!
//! A `snapshot` always comes first, so a client never has to ask for state; `GET /api/sensors`
//! returns the same `sensors` array. The snapshot also carries the gateway's `broker` link (the
//! same object `GET /api/status` returns), and a `broker` message follows each change of it, so a
//! page can say "broker unreachable — showing the last readings" while the gateway keeps serving.
//!
//! `forgotten` says the gateway dropped a sensor gone (offline or never online, no reading) for
//! its `--forget-after`: a page removes it; a newer reading or an `online` brings it back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::{Availability, Reading, SensorHealth, SensorId, format_read_at};

/// What the gateway knows of a sensor's publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorStatus {
    /// The publisher said `online`.
    Online,
    /// The publisher said `offline`, or its last will did.
    Offline,
    /// Readings were seen, but no availability message yet.
    Unknown,
}

impl From<Availability> for SensorStatus {
    fn from(a: Availability) -> Self {
        match a {
            Availability::Online => Self::Online,
            Availability::Offline => Self::Offline,
        }
    }
}

/// One sensor in a snapshot or in `GET /api/sensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorSummary {
    /// The sensor.
    pub sensor_id: SensorId,
    /// Its publisher's availability.
    pub status: SensorStatus,
    /// The newest reading, if any arrived yet.
    pub latest: Option<Reading>,
    /// The sensor's own health, once its publisher said it (`null` before).
    #[serde(default)]
    pub sensor_health: Option<SensorHealth>,
}

/// Whether a gateway is connected (and subscribed) to its MQTT broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerStatus {
    /// Subscribed: readings flow live.
    Connected,
    /// Not subscribed (the broker is down, restarting or not reachable, or not yet reached since
    /// the gateway started): the gateway serves the readings it holds and retries.
    Unreachable,
}

/// A gateway's link to its broker: in the snapshot, in `broker` messages and in `GET /api/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerLink {
    /// Connected or not.
    pub status: BrokerStatus,
    /// Since when (RFC 3339, UTC, milliseconds, like `read_at`): for an unreachable broker, when
    /// the connection was lost (or the gateway started, if it never got through).
    #[serde(serialize_with = "serialize_since")]
    pub since: DateTime<Utc>,
}

fn serialize_since<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_read_at(at))
}

/// A message from the gateway on `/ws`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// Everything known, sent once right after the connection opens.
    Snapshot {
        /// Every known sensor, sorted by id.
        sensors: Vec<SensorSummary>,
        /// The gateway's broker link (absent from gateways older than this field).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        broker: Option<BrokerLink>,
    },
    /// A new reading; the Reading's fields sit beside `type`.
    Reading(Reading),
    /// A publisher went online or offline.
    Availability {
        /// The sensor.
        sensor_id: SensorId,
        /// Its new status.
        status: SensorStatus,
    },
    /// The gateway's broker link changed; its fields sit beside `type`.
    Broker(BrokerLink),
    /// The sensor's own health changed; the [`SensorHealth`] fields sit beside `type`.
    Sensor(SensorHealth),
    /// The gateway forgot a sensor that has been gone for its `--forget-after`: it is no longer
    /// in the API or in snapshots.
    Forgotten {
        /// The sensor.
        sensor_id: SensorId,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_fields_are_flattened_beside_type() {
        let r = Reading::from_json(
            br#"{"sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"2026-11-27T04:00:00.123Z","seq":42}"#,
        )
        .unwrap();
        let json = serde_json::to_string(&ServerMessage::Reading(r.clone())).unwrap();
        assert_eq!(
            json,
            r#"{"type":"reading","sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"2026-11-27T04:00:00.123Z","seq":42}"#
        );
        let back: ServerMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ServerMessage::Reading(r));
    }

    #[test]
    fn availability_and_snapshot_shapes() {
        let id = SensorId::new("pi-1").unwrap();
        let json = serde_json::to_string(&ServerMessage::Availability {
            sensor_id: id.clone(),
            status: SensorStatus::Offline,
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"type":"availability","sensor_id":"pi-1","status":"offline"}"#
        );
        let json = serde_json::to_string(&ServerMessage::Snapshot {
            sensors: vec![SensorSummary {
                sensor_id: id,
                status: SensorStatus::Unknown,
                latest: None,
                sensor_health: None,
            }],
            broker: None,
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"type":"snapshot","sensors":[{"sensor_id":"pi-1","status":"unknown","latest":null,"sensor_health":null}]}"#
        );
        let health = SensorHealth::from_json(
            br#"{"sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"no_response","errors":{"no_response":3}}"#,
        )
        .unwrap();
        let json = serde_json::to_string(&ServerMessage::Sensor(health)).unwrap();
        assert_eq!(
            json,
            r#"{"type":"sensor","sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"no_response","errors":{"no_response":3}}"#
        );
        let json = serde_json::to_string(&ServerMessage::Forgotten {
            sensor_id: SensorId::new("pi-1").unwrap(),
        })
        .unwrap();
        assert_eq!(json, r#"{"type":"forgotten","sensor_id":"pi-1"}"#);
    }

    #[test]
    fn broker_link_in_the_snapshot_and_as_a_message() {
        let since = DateTime::parse_from_rfc3339("2026-11-27T04:00:05.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let link = BrokerLink {
            status: BrokerStatus::Unreachable,
            since,
        };
        let json = serde_json::to_string(&ServerMessage::Broker(link)).unwrap();
        assert_eq!(
            json,
            r#"{"type":"broker","status":"unreachable","since":"2026-11-27T04:00:05.500Z"}"#
        );
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&json).unwrap(),
            ServerMessage::Broker(link)
        );
        let json = serde_json::to_string(&ServerMessage::Snapshot {
            sensors: vec![],
            broker: Some(BrokerLink {
                status: BrokerStatus::Connected,
                since,
            }),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"type":"snapshot","sensors":[],"broker":{"status":"connected","since":"2026-11-27T04:00:05.500Z"}}"#
        );
        // A snapshot from an older gateway, without the field, still reads.
        let old: ServerMessage =
            serde_json::from_str(r#"{"type":"snapshot","sensors":[]}"#).unwrap();
        assert_eq!(
            old,
            ServerMessage::Snapshot {
                sensors: vec![],
                broker: None
            }
        );
    }
}
