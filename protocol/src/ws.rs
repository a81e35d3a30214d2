//! What the gateway says to browsers and HTTP clients.
//!
//! `GET /ws` sends JSON text messages, each with a `type`:
//!
//! ```json
//! {"type":"snapshot","sensors":[{"sensor_id":"pi-1","status":"online","latest":{…Reading…}}]}
//! {"type":"reading","sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"…","seq":43}
//! {"type":"availability","sensor_id":"pi-1","status":"offline"}
//! {"type":"sensor","sensor_id":"pi-1","status":"not_answering","since":"…","reason":"no_response","errors":{"no_response":31}}
//! ```
//!
//! `availability` is the publisher's (its process and connection); `sensor` is the sensor's own
//! health ([`SensorHealth`]), and each summary carries the latest one as `sensor_health`.
//!
//! A `snapshot` always comes first, so a client never has to ask for state; `GET /api/sensors`
//! returns the same `sensors` array.

use serde::{Deserialize, Serialize};

use crate::{Availability, Reading, SensorHealth, SensorId};

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

/// A message from the gateway on `/ws`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// Everything known, sent once right after the connection opens.
    Snapshot {
        /// Every known sensor, sorted by id.
        sensors: Vec<SensorSummary>,
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
    /// The sensor's own health changed; the [`SensorHealth`] fields sit beside `type`.
    Sensor(SensorHealth),
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
    }
}
