//! The [`Reading`] and its strict JSON encoding.
//!
//! ```json
//! {"sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"2026-11-27T04:00:00.123Z","seq":42}
//! ```
//!
//! Decoding is strict where it matters and lenient where it helps evolution: unknown fields are
//! ignored (a newer publisher may add some), but every known field must be present, finite, and
//! within what the named sensor model can physically report. A payload that fails is refused
//! with an [`Error`] naming the rule, never half-accepted.

use std::fmt;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::{Error, Result, SensorId};

/// The largest state payload accepted. A reading encodes to about 130 bytes; the margin allows
/// extra fields from newer publishers while refusing floods.
pub const MAX_PAYLOAD_BYTES: usize = 1024;

/// The largest `seq` accepted: 2^53 − 1, the largest integer a JavaScript number (the page,
/// any JSON consumer) holds exactly. A publisher never gets near it (one reading a second for
/// 285 million years); a larger one is a forgery, and refusing it means `seq` can never wrap.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The sensor models k3sense reads. The model decides the range a value may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// DHT11: 1 read/s at most; older chips whole degrees, newer ones tenths and sub-zero.
    Dht11,
    /// DHT22 / AM2302: 0.5 read/s at most, tenths, -40..80 °C.
    Dht22,
}

impl Model {
    /// The name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dht11 => "dht11",
            Self::Dht22 => "dht22",
        }
    }

    /// Temperatures (°C) the model can report. DHT11's datasheet says 0..50 °C, but newer
    /// DHT11 chips report down to -20 °C and up to 60 °C, so those are accepted too.
    pub fn temperature_range(self) -> (f64, f64) {
        match self {
            Self::Dht11 => (-20.0, 60.0),
            Self::Dht22 => (-40.0, 80.0),
        }
    }

    /// Relative humidity (%) the model can report.
    pub fn humidity_range(self) -> (f64, f64) {
        (0.0, 100.0)
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Model {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dht11" => Ok(Self::Dht11),
            "dht22" | "am2302" => Ok(Self::Dht22),
            other => Err(Error::UnknownModel(other.chars().take(40).collect())),
        }
    }
}

/// One measurement of one sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireReading")]
pub struct Reading {
    /// Which sensor (by default the name of the node it is wired to).
    pub sensor_id: SensorId,
    /// Which kind of sensor; decides the valid ranges.
    pub model: Model,
    /// Temperature in degrees Celsius.
    pub temperature_c: f64,
    /// Relative humidity in percent.
    pub humidity_pct: f64,
    /// When the sensor was read (not when the message was sent): UTC, millisecond precision.
    #[serde(serialize_with = "serialize_read_at")]
    pub read_at: DateTime<Utc>,
    /// Rises by one per reading of this sensor, so receivers can spot gaps and duplicates.
    pub seq: u64,
}

/// Formats a timestamp the way the contract writes `read_at`: RFC 3339, UTC, milliseconds, `Z`.
pub fn format_read_at(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses `read_at` exactly as the contract writes it: `YYYY-MM-DDTHH:MM:SS.mmmZ` — UTC (`Z`,
/// no offset), exactly three fraction digits, no leap second. Anything else (an offset such as
/// `+02:00`, no or more fraction digits, `:60`) is refused: every consumer, the page's
/// `Date.parse` included, must read the same instant from it.
pub fn parse_read_at(text: &str) -> Result<DateTime<Utc>> {
    let bad = || Error::BadTimestamp(text.chars().take(40).collect());
    let b = text.as_bytes();
    let shape_ok = b.len() == 24
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            23 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok || &b[17..19] >= b"60".as_slice() {
        return Err(bad());
    }
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|_| bad())?
        .with_timezone(&Utc);
    if at.timestamp_subsec_nanos() >= 1_000_000_000 {
        return Err(bad());
    }
    Ok(at)
}

fn serialize_read_at<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_read_at(at))
}

/// What arrives on the wire, before validation. Every field optional so a missing one is
/// reported by name rather than as a generic syntax error.
#[derive(Deserialize)]
struct WireReading {
    sensor_id: Option<String>,
    model: Option<String>,
    temperature_c: Option<f64>,
    humidity_pct: Option<f64>,
    read_at: Option<String>,
    seq: Option<u64>,
}

impl Reading {
    /// Builds a reading and checks it against the contract. `read_at` is rounded to the
    /// millisecond, the precision the wire carries, so encoding and decoding round-trip exactly.
    pub fn new(
        sensor_id: SensorId,
        model: Model,
        temperature_c: f64,
        humidity_pct: f64,
        read_at: DateTime<Utc>,
        seq: u64,
    ) -> Result<Self> {
        let reading = Self {
            sensor_id,
            model,
            temperature_c,
            humidity_pct,
            read_at: read_at.trunc_subsecs(3),
            seq,
        };
        reading.validate()?;
        Ok(reading)
    }

    /// Checks the values against the model's ranges, `seq` against [`MAX_SEQ`] and `read_at`
    /// against the contract (no leap second: `…:60` is not a time a browser can parse).
    pub fn validate(&self) -> Result<()> {
        if self.seq > MAX_SEQ {
            return Err(Error::SeqTooLarge(self.seq));
        }
        if self.read_at.timestamp_subsec_nanos() >= 1_000_000_000 {
            return Err(Error::BadTimestamp(format_read_at(&self.read_at)));
        }
        let model = self.model;
        check_value(
            "temperature_c",
            self.temperature_c,
            model,
            model.temperature_range(),
        )?;
        check_value(
            "humidity_pct",
            self.humidity_pct,
            model,
            model.humidity_range(),
        )
    }

    /// Encodes to the contract's JSON. Fails only for a reading that does not validate (e.g.
    /// built by hand with NaN), so nothing invalid is ever sent.
    pub fn to_json(&self) -> Result<String> {
        self.validate()?;
        serde_json::to_string(self).map_err(|e| Error::Malformed(e.to_string()))
    }

    /// Decodes and validates a state payload.
    pub fn from_json(payload: &[u8]) -> Result<Self> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let wire: WireReading =
            serde_json::from_slice(payload).map_err(|e| Error::Malformed(e.to_string()))?;
        Self::try_from(wire)
    }
}

impl TryFrom<WireReading> for Reading {
    type Error = Error;

    fn try_from(wire: WireReading) -> Result<Self> {
        let sensor_id = SensorId::new(wire.sensor_id.ok_or(Error::MissingField("sensor_id"))?)?;
        let model = wire
            .model
            .ok_or(Error::MissingField("model"))?
            .parse::<Model>()?;
        let temperature_c = wire
            .temperature_c
            .ok_or(Error::MissingField("temperature_c"))?;
        let humidity_pct = wire
            .humidity_pct
            .ok_or(Error::MissingField("humidity_pct"))?;
        let read_at = wire.read_at.ok_or(Error::MissingField("read_at"))?;
        let read_at = parse_read_at(&read_at)?;
        let seq = wire.seq.ok_or(Error::MissingField("seq"))?;
        Self::new(sensor_id, model, temperature_c, humidity_pct, read_at, seq)
    }
}

fn check_value(
    field: &'static str,
    value: f64,
    model: Model,
    (min, max): (f64, f64),
) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::NotFinite { field });
    }
    if value < min || value > max {
        return Err(Error::OutOfRange {
            field,
            value,
            model: model.as_str(),
            min,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    const EXAMPLE: &str = r#"{"sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"2026-11-27T04:00:00.123Z","seq":42}"#;

    fn example() -> Reading {
        Reading::new(
            SensorId::new("pi-1").unwrap(),
            Model::Dht11,
            23.0,
            41.0,
            Utc.with_ymd_and_hms(2026, 11, 27, 4, 0, 0).unwrap()
                + chrono::Duration::milliseconds(123),
            42,
        )
        .unwrap()
    }

    fn with(field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v[field] = value;
        serde_json::to_vec(&v).unwrap()
    }

    fn without(field: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn read_at_must_be_utc_with_milliseconds() {
        for bad in [
            "2026-11-27T04:00:00Z",
            "2026-11-27T04:00:00.1Z",
            "2026-11-27T04:00:00.123456Z",
            "2026-11-27T06:00:00.123+02:00",
            "2026-11-27T04:00:00.123+00:00",
            "2026-11-27T23:59:60.000Z",
            "2026-11-27 04:00:00.123Z",
            "2026-11-27T04:00:00.123z",
            "2026-02-30T04:00:00.123Z",
        ] {
            assert!(
                matches!(
                    Reading::from_json(&with("read_at", bad.into())),
                    Err(Error::BadTimestamp(_))
                ),
                "{bad}"
            );
        }
        assert!(Reading::from_json(&with("read_at", "2026-11-27T23:59:59.999Z".into())).is_ok());
    }

    #[test]
    fn seq_is_capped_so_it_never_wraps_and_stays_exact_in_javascript() {
        assert_eq!(MAX_SEQ, 9_007_199_254_740_991);
        assert!(Reading::from_json(&with("seq", MAX_SEQ.into())).is_ok());
        assert_eq!(
            Reading::from_json(&with("seq", (MAX_SEQ + 1).into())),
            Err(Error::SeqTooLarge(MAX_SEQ + 1))
        );
        assert!(matches!(
            Reading::from_json(&with("seq", u64::MAX.into())),
            Err(Error::SeqTooLarge(_))
        ));
        let mut r = example();
        r.seq = u64::MAX;
        assert!(r.to_json().is_err(), "nothing invalid is ever sent");
    }

    #[test]
    fn encodes_exactly_the_documented_example() {
        assert_eq!(example().to_json().unwrap(), EXAMPLE);
    }

    #[test]
    fn decodes_the_documented_example() {
        assert_eq!(Reading::from_json(EXAMPLE.as_bytes()).unwrap(), example());
    }

    #[test]
    fn read_at_is_utc_with_milliseconds() {
        let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
            + chrono::Duration::nanoseconds(6_789_999);
        let r = Reading::new(example().sensor_id, Model::Dht22, 1.0, 2.0, at, 0).unwrap();
        let json = r.to_json().unwrap();
        assert!(
            json.contains(r#""read_at":"2026-01-02T03:04:05.006Z""#),
            "{json}"
        );
        assert_eq!(Reading::from_json(json.as_bytes()).unwrap(), r);
        // The contract says UTC with `Z`: another offset is refused (issue 14, row 11), not
        // normalised, so every consumer reads the very string the publisher wrote.
        let shifted = with("read_at", "2026-11-27T05:00:00.123+01:00".into());
        assert!(matches!(
            Reading::from_json(&shifted),
            Err(Error::BadTimestamp(_))
        ));
    }

    #[test]
    fn ignores_unknown_fields() {
        let payload = with("firmware", "1.2".into());
        assert_eq!(Reading::from_json(&payload).unwrap(), example());
    }

    #[test]
    fn rejects_each_missing_field() {
        for field in [
            "sensor_id",
            "model",
            "temperature_c",
            "humidity_pct",
            "read_at",
            "seq",
        ] {
            assert_eq!(
                Reading::from_json(&without(field)),
                Err(Error::MissingField(match field {
                    "sensor_id" => "sensor_id",
                    "model" => "model",
                    "temperature_c" => "temperature_c",
                    "humidity_pct" => "humidity_pct",
                    "read_at" => "read_at",
                    _ => "seq",
                })),
                "{field}"
            );
            // null counts as missing
            assert!(Reading::from_json(&with(field, serde_json::Value::Null)).is_err());
        }
    }

    #[test]
    fn rejects_nan_and_infinity() {
        // JSON has no NaN literal: a publisher writing one produces malformed JSON.
        let nan = EXAMPLE.replace("23.0", "NaN");
        assert!(matches!(
            Reading::from_json(nan.as_bytes()),
            Err(Error::Malformed(_))
        ));
        let inf = EXAMPLE.replace("23.0", "1e999");
        assert!(Reading::from_json(inf.as_bytes()).is_err());
        // And a reading built by hand with NaN is never encoded.
        let mut r = example();
        r.humidity_pct = f64::NAN;
        assert_eq!(
            r.to_json(),
            Err(Error::NotFinite {
                field: "humidity_pct"
            })
        );
        r.humidity_pct = 41.0;
        r.temperature_c = f64::INFINITY;
        assert!(matches!(r.to_json(), Err(Error::NotFinite { .. })));
    }

    #[test]
    fn rejects_values_the_model_cannot_report() {
        let cases = [
            ("dht11", "temperature_c", -20.1, false),
            ("dht11", "temperature_c", -20.0, true),
            ("dht11", "temperature_c", 60.0, true),
            ("dht11", "temperature_c", 60.1, false),
            ("dht22", "temperature_c", -40.0, true),
            ("dht22", "temperature_c", -40.1, false),
            ("dht22", "temperature_c", 80.0, true),
            ("dht22", "temperature_c", 80.1, false),
            ("dht11", "humidity_pct", -0.1, false),
            ("dht11", "humidity_pct", 0.0, true),
            ("dht22", "humidity_pct", 100.0, true),
            ("dht22", "humidity_pct", 100.1, false),
        ];
        for (model, field, value, ok) in cases {
            let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
            v["model"] = model.into();
            v[field] = value.into();
            let result = Reading::from_json(&serde_json::to_vec(&v).unwrap());
            assert_eq!(result.is_ok(), ok, "{model} {field}={value}: {result:?}");
            if !ok {
                assert!(matches!(result, Err(Error::OutOfRange { .. })));
            }
        }
    }

    #[test]
    fn rejects_bad_ids_models_timestamps_and_types() {
        assert!(matches!(
            Reading::from_json(&with("sensor_id", "Pi_1".into())),
            Err(Error::BadSensorId(_))
        ));
        assert!(matches!(
            Reading::from_json(&with("model", "bme280".into())),
            Err(Error::UnknownModel(_))
        ));
        assert!(matches!(
            Reading::from_json(&with("read_at", "yesterday".into())),
            Err(Error::BadTimestamp(_))
        ));
        for (field, value) in [
            ("seq", serde_json::json!(-1)),
            ("seq", serde_json::json!(1.5)),
            ("temperature_c", serde_json::json!("23")),
            ("sensor_id", serde_json::json!(7)),
        ] {
            assert!(
                matches!(
                    Reading::from_json(&with(field, value.clone())),
                    Err(Error::Malformed(_))
                ),
                "{field}={value}"
            );
        }
        for garbage in [&b""[..], b"[]", b"null", b"{", b"\xff\xfe", b"42"] {
            assert!(Reading::from_json(garbage).is_err());
        }
    }

    #[test]
    fn rejects_oversized_payloads_before_parsing() {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v["padding"] = "x".repeat(MAX_PAYLOAD_BYTES).into();
        let payload = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            Reading::from_json(&payload),
            Err(Error::TooLarge {
                max: MAX_PAYLOAD_BYTES,
                ..
            })
        ));
    }

    #[test]
    fn errors_say_what_to_fix() {
        let err = Reading::from_json(&with("temperature_c", 99.0.into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `temperature_c` is 99, outside the dht11 range -20..=60"
        );
    }

    #[test]
    fn models_parse_from_the_command_line() {
        assert_eq!("dht11".parse::<Model>(), Ok(Model::Dht11));
        assert_eq!("am2302".parse::<Model>(), Ok(Model::Dht22));
        assert!("DHT11".parse::<Model>().is_err());
    }
}
