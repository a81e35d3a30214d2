//! The publisher's memory of its recent readings, acknowledged or not: what it sends again when
//! a gateway asks for a range it missed (a gateway pod that just started, a gap after a fault).

use std::collections::VecDeque;

use k3sense_protocol::{Reading, ReplayRequest};

/// The newest readings, oldest first, at most `capacity` of them.
#[derive(Debug)]
pub struct Recent {
    capacity: usize,
    readings: VecDeque<Reading>,
}

impl Recent {
    /// Keeps at most `capacity` readings (none when 0: replays are then off).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            readings: VecDeque::new(),
        }
    }

    /// Remembers a reading, forgetting the oldest beyond the capacity.
    pub fn push(&mut self, reading: Reading) {
        if self.capacity == 0 {
            return;
        }
        if self.readings.len() == self.capacity {
            self.readings.pop_front();
        }
        self.readings.push_back(reading);
    }

    /// The readings a request asks for, oldest first.
    pub fn wanted(&self, request: &ReplayRequest) -> impl Iterator<Item = &Reading> {
        self.readings.iter().filter(|r| request.wants(r.seq))
    }

    /// The newest reading.
    pub fn latest(&self) -> Option<&Reading> {
        self.readings.back()
    }

    /// Number of readings kept.
    pub fn kept(&self) -> usize {
        self.readings.len()
    }
}

/// A reading of sensor `a` numbered `seq`, for the tests of the publisher's queues (outbox,
/// recent readings, replay).
#[cfg(test)]
pub(crate) fn test_reading(seq: u64) -> Reading {
    Reading::new(
        k3sense_protocol::SensorId::new("a").unwrap(),
        k3sense_protocol::Model::Dht11,
        20.0,
        40.0,
        chrono::Utc::now(),
        seq,
    )
    .unwrap()
}

#[cfg(test)]
mod tests {

    use super::test_reading as r;
    use super::*;

    #[test]
    fn answers_ranges_from_what_it_keeps() {
        let mut recent = Recent::new(3);
        for s in 1..=5 {
            recent.push(r(s));
        }
        let all = ReplayRequest {
            after_seq: 0,
            until_seq: None,
        };
        assert_eq!(
            recent.wanted(&all).map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let some = ReplayRequest {
            after_seq: 3,
            until_seq: Some(5),
        };
        assert_eq!(recent.wanted(&some).map(|r| r.seq).collect::<Vec<_>>(), [4]);
        assert_eq!(recent.latest().unwrap().seq, 5);
        let mut off = Recent::new(0);
        off.push(r(1));
        assert_eq!(off.kept(), 0);
    }
}
