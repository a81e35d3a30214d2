//! The sensor's own health, separate from the publisher's availability.
//!
//! `<prefix>/<sensor_id>/sensor`, QoS 1, retained:
//!
//! ```json
//! {"sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"no_response",
//!  "errors":{"no_response":31,"checksum":2}}
//! ```
//!
//! The publisher can be `online` (its process is up and connected) while the sensor wired to it
//! gives nothing usable: unplugged, dead, a broken pull-up. It says so here after a few intervals
//! without a reading (`--unhealthy-after`), and says `ok` again with the first good reading.
//! `status` is shaped for Home Assistant's availability list: `value_template:
//! '{{ value_json.status }}'`, `payload_available: 'ok'`. `errors` counts failed reads by kind
//! since the publisher started, so a user can tell wiring (`no_response` every time) from noise
//! (a few `checksum`).

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, MAX_PAYLOAD_BYTES, Result, SensorId, reading::format_read_at};

/// Whether the sensor gives readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Readings are coming.
    Ok,
    /// Several intervals in a row passed without a reading.
    NotAnswering,
}

impl HealthStatus {
    /// The JSON word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotAnswering => "not_answering",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a read failed, as counted in `errors` and named in `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The sensor did not answer the start pulse: power, ground, data wire, pull-up.
    NoResponse,
    /// The line stopped changing mid-frame, or the kernel driver timed out.
    Timeout,
    /// Fewer than 40 bits arrived.
    ShortFrame,
    /// A pulse no sensor sends: lost edges, or a line that rises too slowly.
    PulseWidth,
    /// The checksum did not match: noise on the line.
    Checksum,
    /// A frame of the wrong format, or values outside the model's range.
    Implausible,
    /// The kernel driver failed the read (EIO, EAGAIN).
    Driver,
    /// Reads decoded, but no two independent reads agreed.
    Unconfirmed,
    /// Anything a newer publisher names that this version does not know.
    #[serde(other)]
    Other,
}

impl FailureKind {
    /// Every kind, in the order they are listed.
    pub const ALL: [Self; 8] = [
        Self::NoResponse,
        Self::Timeout,
        Self::ShortFrame,
        Self::PulseWidth,
        Self::Checksum,
        Self::Implausible,
        Self::Driver,
        Self::Unconfirmed,
    ];

    /// The JSON word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoResponse => "no_response",
            Self::Timeout => "timeout",
            Self::ShortFrame => "short_frame",
            Self::PulseWidth => "pulse_width",
            Self::Checksum => "checksum",
            Self::Implausible => "implausible",
            Self::Driver => "driver",
            Self::Unconfirmed => "unconfirmed",
            Self::Other => "other",
        }
    }

    /// What to check, in a few words, for a user looking at a sensor that stopped answering.
    pub fn hint(self) -> &'static str {
        match self {
            Self::NoResponse | Self::Timeout => "check wiring/pull-up",
            Self::ShortFrame | Self::PulseWidth => "check the pull-up and cable length",
            Self::Checksum => "noise on the line: shorter cable, stronger pull-up",
            Self::Implausible => "the sensor sends impossible values: replace it",
            Self::Driver => "the kernel driver fails every read: see `k3sense check`",
            Self::Unconfirmed => "reads disagree: noisy line or a failing sensor",
            Self::Other => "see the publisher's log",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payload of `<prefix>/<sensor_id>/sensor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorHealth {
    /// The sensor.
    pub sensor_id: SensorId,
    /// Whether readings are coming.
    pub status: HealthStatus,
    /// When this status began: the first failed read of the spell for `not_answering`, the
    /// read of the first good reading for `ok`. UTC, RFC 3339, milliseconds.
    #[serde(serialize_with = "serialize_since")]
    pub since: DateTime<Utc>,
    /// The most frequent failure of the spell; absent when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailureKind>,
    /// Failed reads by kind since the publisher started (kinds never seen are left out).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

fn serialize_since<S: serde::Serializer>(
    at: &DateTime<Utc>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_read_at(at))
}

impl SensorHealth {
    /// Encodes to the contract's JSON.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and a string-keyed map always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes a `sensor` payload.
    pub fn from_json(payload: &[u8]) -> Result<Self> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        serde_json::from_slice(payload).map_err(|e| Error::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn the_documented_shape_round_trips() {
        let h = SensorHealth {
            sensor_id: SensorId::new("pi-1").unwrap(),
            status: HealthStatus::NotAnswering,
            since: Utc.with_ymd_and_hms(2026, 11, 27, 14, 2, 0).unwrap(),
            reason: Some(FailureKind::NoResponse),
            errors: [("no_response".to_owned(), 31), ("checksum".to_owned(), 2)].into(),
        };
        let json = h.to_json();
        assert_eq!(
            json,
            r#"{"sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"no_response","errors":{"checksum":2,"no_response":31}}"#
        );
        assert_eq!(SensorHealth::from_json(json.as_bytes()).unwrap(), h);
    }

    #[test]
    fn ok_has_no_reason_and_unknown_reasons_are_tolerated() {
        let ok = br#"{"sensor_id":"pi-1","status":"ok","since":"2026-11-27T14:02:00.000Z"}"#;
        let h = SensorHealth::from_json(ok).unwrap();
        assert_eq!((h.status, h.reason), (HealthStatus::Ok, None));
        assert!(!h.to_json().contains("reason"));
        let newer = br#"{"sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00Z","reason":"cosmic_rays"}"#;
        assert_eq!(
            SensorHealth::from_json(newer).unwrap().reason,
            Some(FailureKind::Other)
        );
        for bad in [
            &br#"{"sensor_id":"pi-1","status":"fine","since":"2026-11-27T14:02:00Z"}"#[..],
            br#"{"sensor_id":"PI","status":"ok","since":"2026-11-27T14:02:00Z"}"#,
            br#"{"sensor_id":"pi-1","status":"ok"}"#,
            b"ok",
        ] {
            assert!(SensorHealth::from_json(bad).is_err());
        }
    }
}
