//! What a reading's fields may do to the gateway's view of a sensor (issue 14, rows 3 and 3b).
//!
//! Every field of a reading comes from whoever could publish on the sensor's topics, so no field
//! alone may move `latest` somewhere the real publisher cannot come back from:
//!
//! - **Future:** a reading stamped more than `--max-clock-skew` (default 2 min) after the
//!   gateway's clock is refused and counted (`reason="future"`): sorted by time it would stay
//!   `latest` until that date (a forged 2099 reading, for ever).
//! - **Seq jump:** a reading that would become the newest (a later `read_at` than the newest
//!   held) with a `seq` more than [`MAX_SEQ_JUMP`] above the newest's is *unconfirmed*: held aside (one per sensor, the newest replacing the older), not shown, and
//!   counted (`reason="unconfirmed_jump"`). The next reading that continues from it (`seq` one
//!   higher, later `read_at`) confirms it: both go in. A real publisher confirms within one
//!   interval (it reads on from the new number); a forger must keep forging, and a single forged
//!   retained reading (seq 10^15) never becomes `latest`. 10,000 readings are 28 h at 10 s: a
//!   gateway that was away longer than that shows the first reading after it one interval late.
//! - **Conflicting duplicate:** a reading with the `(seq, read_at)` of one held but other values
//!   is an anomaly (`reason="conflict"`), logged. Live, the copy held stays and the publisher is
//!   asked to replay that `seq`; a replayed copy (the publisher's answer on its replay topic)
//!   replaces the held one. Who can publish the sensor's state topic can also publish its replay
//!   topic, so this is only as strong as the broker's accounts: give each publisher node its own
//!   account bound to its sensor id (deploy/), not `publisher:*`.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use k3sense_protocol::{Reading, SensorId};

/// How far above the newest held `seq` a reading may jump and still be taken at its word.
pub const MAX_SEQ_JUMP: u64 = 10_000;

/// What the guard makes of one reading.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Take these readings, in order (a confirmed jump brings the held reading along).
    Accept(Vec<Reading>),
    /// Stamped too far in the future: drop.
    Future,
    /// Held aside until a reading continues from it.
    Unconfirmed,
}

/// The reading rules, with the one held reading per sensor they need.
#[derive(Debug)]
pub struct Guard {
    max_skew: chrono::Duration,
    held: HashMap<SensorId, Reading>,
}

impl Guard {
    /// A guard refusing readings more than `max_skew` in the future.
    pub fn new(max_skew: Duration) -> Self {
        Self {
            max_skew: chrono::Duration::from_std(max_skew).unwrap_or(chrono::Duration::MAX),
            held: HashMap::new(),
        }
    }

    /// Judges `reading`, given the `(seq, read_at)` of its sensor's newest reading held and the
    /// time now. A reading older than the newest cannot become `latest`: it goes in at its place
    /// (a late replay, the readings of an earlier publisher run).
    pub fn check(
        &mut self,
        reading: Reading,
        newest: Option<(u64, DateTime<Utc>)>,
        now: DateTime<Utc>,
    ) -> Verdict {
        if reading.read_at > now + self.max_skew {
            return Verdict::Future;
        }
        let Some((newest, newest_at)) = newest else {
            return Verdict::Accept(vec![reading]);
        };
        if reading.read_at <= newest_at || reading.seq <= newest.saturating_add(MAX_SEQ_JUMP) {
            return Verdict::Accept(vec![reading]);
        }
        let confirms = self.held.get(&reading.sensor_id).is_some_and(|held| {
            reading.seq == held.seq.saturating_add(1) && reading.read_at > held.read_at
        });
        if confirms {
            let held = self.held.remove(&reading.sensor_id);
            return Verdict::Accept(held.into_iter().chain([reading]).collect());
        }
        self.held.insert(reading.sensor_id.clone(), reading);
        Verdict::Unconfirmed
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use k3sense_protocol::Model;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()
    }

    fn reading(seq: u64, seconds: i64) -> Reading {
        Reading::new(
            SensorId::new("pi-1").unwrap(),
            Model::Dht22,
            20.0,
            50.0,
            now() + chrono::Duration::seconds(seconds),
            seq,
        )
        .unwrap()
    }

    fn seqs(v: Verdict) -> Vec<u64> {
        match v {
            Verdict::Accept(r) => r.iter().map(|r| r.seq).collect(),
            other => panic!("not accepted: {other:?}"),
        }
    }

    #[test]
    fn refuses_the_future_beyond_the_skew() {
        let mut g = Guard::new(Duration::from_secs(120));
        assert_eq!(seqs(g.check(reading(1, 119), None, now())), [1]);
        assert_eq!(g.check(reading(1, 121), None, now()), Verdict::Future);
        let forged = Reading::new(
            SensorId::new("pi-1").unwrap(),
            Model::Dht22,
            -19.0,
            50.0,
            Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap(),
            1_000_000_000_000_000,
        )
        .unwrap();
        assert_eq!(g.check(forged, Some((42, now())), now()), Verdict::Future);
    }

    #[test]
    fn a_jump_waits_for_a_reading_that_continues_it() {
        let mut g = Guard::new(Duration::from_secs(120));
        assert_eq!(
            seqs(g.check(reading(10_042, 1), Some((42, now())), now())),
            [10_042]
        );
        let far = 1_000_000_000_000_000;
        assert_eq!(
            g.check(reading(far, 1), Some((42, now())), now()),
            Verdict::Unconfirmed
        );
        // The real publisher reads on from its own number: accepted, the forgery stays held.
        assert_eq!(
            seqs(g.check(reading(43, 2), Some((42, now())), now())),
            [43]
        );
        // A reading continuing from the held one confirms it: both go in.
        assert_eq!(
            seqs(g.check(reading(far + 1, 3), Some((43, now())), now())),
            [far, far + 1]
        );
        // Older than the newest held: it cannot become latest, it goes in at its place.
        assert_eq!(
            seqs(g.check(reading(far + 7, -5), Some((43, now())), now())),
            [far + 7]
        );
        // Not continuing (same time, or a different number) confirms nothing.
        assert_eq!(
            g.check(reading(far, 5), Some((43, now())), now()),
            Verdict::Unconfirmed
        );
        assert_eq!(
            g.check(reading(far + 1, 5), Some((43, now())), now()),
            Verdict::Unconfirmed
        );
        assert_eq!(
            g.check(reading(far + 3, 6), Some((43, now())), now()),
            Verdict::Unconfirmed
        );
    }
}
