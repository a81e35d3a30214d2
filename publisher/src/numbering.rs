//! The one owner of `seq`, and the one place a measurement becomes a [`Reading`].
//!
//! `seq` rises by one per reading of a sensor and continues across publisher restarts: the
//! publisher keeps no state of its own, so after connecting it reads its own retained reading
//! and numbers on from there ([`resume_point`], which believes it only if a real publisher could
//! have written it: `crate::seqguard`). Until that is settled, measurements are held (bounded,
//! the oldest dropped); when it is, they are numbered in order.
//!
//! [`Reading::new`] checks every value against the contract (the model's ranges, `seq` ≤
//! `MAX_SEQ`, the timestamp), so nothing invalid is numbered: a measurement that does not
//! validate is refused here and its number is not used up.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use k3sense_protocol::{Model, Reading, SensorId};

use crate::{dht::Measurement, seqguard};

/// A confirmed measurement, not yet numbered: what the reader hands to the link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// The values.
    pub measurement: Measurement,
    /// When the sample was taken.
    pub read_at: DateTime<Utc>,
}

/// What became of one measurement handed to [`Numbering::number`].
#[derive(Debug)]
pub enum Numbered {
    /// Numbered: publish it.
    Reading(Reading),
    /// Held until the numbering is settled; `dropped` when the oldest held one made room.
    Held {
        /// Whether a held measurement was dropped to make room.
        dropped: bool,
    },
    /// It breaks the contract (out of the model's range, `seq` exhausted): never published.
    Refused(k3sense_protocol::Error),
}

/// Numbers the measurements of one sensor.
#[derive(Debug)]
pub struct Numbering {
    id: SensorId,
    model: Model,
    /// The newest `seq` given out; `None` until the retained reading told where to continue.
    last: Option<u64>,
    /// Measurements that arrived before `last` was known, oldest first.
    held: VecDeque<Measured>,
    /// The most measurements held.
    hold: usize,
}

impl Numbering {
    /// Numbering for sensor `id` of `model`, holding at most `hold` measurements (at least one)
    /// until it is settled.
    pub fn new(id: SensorId, model: Model, hold: usize) -> Self {
        Self {
            id,
            model,
            last: None,
            held: VecDeque::new(),
            hold: hold.max(1),
        }
    }

    /// The sensor whose readings it numbers.
    pub fn id(&self) -> &SensorId {
        &self.id
    }

    /// Whether it is known where `seq` continues.
    pub fn is_settled(&self) -> bool {
        self.last.is_some()
    }

    /// Measurements held until it is settled.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Numbers `measured`, or holds it while unsettled.
    pub fn number(&mut self, measured: Measured) -> Numbered {
        let Some(last) = self.last else {
            let dropped = self.held.len() >= self.hold;
            if dropped {
                self.held.pop_front();
            }
            self.held.push_back(measured);
            return Numbered::Held { dropped };
        };
        let seq = last.saturating_add(1);
        match Reading::new(
            self.id.clone(),
            self.model,
            measured.measurement.temperature_c,
            measured.measurement.humidity_pct,
            measured.read_at,
            seq,
        ) {
            Ok(reading) => {
                self.last = Some(seq);
                Numbered::Reading(reading)
            }
            Err(e) => Numbered::Refused(e),
        }
    }

    /// Settles the numbering after `last_seq` (0: from 1) unless already settled; the held
    /// measurements, numbered in order.
    pub fn settle(&mut self, last_seq: u64) -> Vec<Numbered> {
        if self.last.is_some() {
            return Vec::new();
        }
        self.last = Some(last_seq);
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|m| self.number(m))
            .collect()
    }
}

/// Where `seq` continues after the retained `payload` found on our state topic at `now`: its
/// `seq` if it is our reading and a real publisher could have written it; 0 (number from 1) for
/// anything that is not a reading of ours; why not for a reading no publisher could have
/// written.
pub fn resume_point(
    payload: &[u8],
    id: &SensorId,
    now: DateTime<Utc>,
) -> Result<u64, (Reading, seqguard::Refused)> {
    let Some(retained) = Reading::from_json(payload)
        .ok()
        .filter(|r| r.sensor_id == *id)
    else {
        return Ok(0);
    };
    seqguard::continue_from(&retained, now).map_err(|why| (retained, why))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, second).unwrap()
    }

    fn m(t: f64, second: u32) -> Measured {
        Measured {
            measurement: Measurement {
                temperature_c: t,
                humidity_pct: 40.0,
            },
            read_at: at(second),
        }
    }

    fn numbering(hold: usize) -> Numbering {
        Numbering::new(SensorId::new("pi-1").unwrap(), Model::Dht11, hold)
    }

    fn seqs(numbered: &[Numbered]) -> Vec<u64> {
        numbered
            .iter()
            .filter_map(|n| match n {
                Numbered::Reading(r) => Some(r.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn holds_until_settled_then_numbers_on_from_the_retained_seq() {
        let mut n = numbering(2);
        assert!(matches!(
            n.number(m(20.0, 1)),
            Numbered::Held { dropped: false }
        ));
        assert!(matches!(
            n.number(m(21.0, 2)),
            Numbered::Held { dropped: false }
        ));
        // Full: the oldest goes.
        assert!(matches!(
            n.number(m(22.0, 3)),
            Numbered::Held { dropped: true }
        ));
        assert_eq!(n.held(), 2);
        assert!(!n.is_settled());
        let settled = n.settle(41);
        assert_eq!(seqs(&settled), [42, 43]);
        let Numbered::Reading(first) = &settled[0] else {
            panic!("{settled:?}")
        };
        assert_eq!((first.temperature_c, first.read_at), (21.0, at(2)));
        // Settling twice changes nothing.
        assert!(n.settle(1000).is_empty());
        assert!(matches!(n.number(m(20.0, 4)), Numbered::Reading(r) if r.seq == 44));
    }

    #[test]
    fn an_invalid_measurement_is_refused_and_uses_no_number() {
        let mut n = numbering(8);
        assert!(n.settle(0).is_empty());
        // A DHT11 reads 0–50 °C.
        assert!(matches!(n.number(m(80.0, 1)), Numbered::Refused(_)));
        assert!(matches!(n.number(m(f64::NAN, 1)), Numbered::Refused(_)));
        assert!(matches!(n.number(m(20.0, 2)), Numbered::Reading(r) if r.seq == 1));
        // `seq` never passes the contract's maximum, and never wraps.
        let mut n = numbering(8);
        n.settle(k3sense_protocol::MAX_SEQ);
        assert!(matches!(n.number(m(20.0, 1)), Numbered::Refused(_)));
        let mut n = numbering(8);
        n.settle(u64::MAX);
        assert!(matches!(n.number(m(20.0, 1)), Numbered::Refused(_)));
    }

    #[test]
    fn resumes_only_from_a_plausible_reading_of_its_own() {
        let id = SensorId::new("pi-1").unwrap();
        let reading = |sensor: &str, seq: u64, read_at: DateTime<Utc>| {
            Reading::new(
                SensorId::new(sensor).unwrap(),
                Model::Dht11,
                20.0,
                40.0,
                read_at,
                seq,
            )
            .unwrap()
            .to_json()
            .unwrap()
        };
        let now = at(0);
        assert_eq!(
            resume_point(reading("pi-1", 42, now).as_bytes(), &id, now),
            Ok(42)
        );
        assert_eq!(
            resume_point(reading("pi-2", 42, now).as_bytes(), &id, now),
            Ok(0)
        );
        assert_eq!(resume_point(b"not json", &id, now), Ok(0));
        let forged = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
        assert!(matches!(
            resume_point(reading("pi-1", 43, forged).as_bytes(), &id, now),
            Err((r, seqguard::Refused::Future)) if r.seq == 43
        ));
    }
}
