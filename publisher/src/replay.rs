//! The replay responder: answers a gateway's replay request
//! (`<prefix>/<id>/replay/request`) with the readings it asks for, from the [`Recent`] ones,
//! coalesced and paced by [`ReplayPace`] (see `crate::replaypace` for why).
//!
//! Pure: it is told the time; the link publishes what [`Replayer::due`] hands out on
//! `<prefix>/<id>/replay` and wakes up when it says the next one is due.

use std::{collections::VecDeque, time::Instant};

use k3sense_protocol::{Reading, ReplayRequest};

use crate::{recent::Recent, replaypace::ReplayPace};

/// What one request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked {
    /// Readings queued to go out.
    pub queued: usize,
    /// Readings left out because they went out within the cooldown.
    pub coalesced: u64,
}

/// Whether a replayed reading may go out now.
#[derive(Debug, PartialEq)]
pub enum Due<'a> {
    /// Nothing is waiting.
    Idle,
    /// Send this one now, then call [`Replayer::sent`].
    Now(&'a Reading),
    /// The pace lets the next one go at this instant.
    At(Instant),
}

/// The recent readings and the answers waiting to go out.
#[derive(Debug)]
pub struct Replayer {
    recent: Recent,
    pace: ReplayPace,
    waiting: VecDeque<Reading>,
}

impl Replayer {
    /// Keeps `capacity` recent readings (0: replays off).
    pub fn new(capacity: usize, now: Instant) -> Self {
        Self {
            recent: Recent::new(capacity),
            pace: ReplayPace::new(now),
            waiting: VecDeque::new(),
        }
    }

    /// Remembers a reading that went out live.
    pub fn remember(&mut self, reading: Reading) {
        self.recent.push(reading);
    }

    /// The newest reading, to restore the retained one after a broker restart.
    pub fn latest(&self) -> Option<&Reading> {
        self.recent.latest()
    }

    /// Queues what `request` asks for: never more than the readings kept, and none that went
    /// out within the cooldown.
    pub fn ask(&mut self, request: &ReplayRequest, now: Instant) -> Asked {
        let room = self.recent.kept().max(1);
        let mut asked = Asked::default();
        for reading in self.recent.wanted(request) {
            if self.waiting.len() >= room {
                break;
            }
            if self.pace.admit(reading.seq, now) {
                self.waiting.push_back(reading.clone());
                asked.queued += 1;
            } else {
                asked.coalesced += 1;
            }
        }
        asked
    }

    /// The next reading to send, taking a token from the pace for it.
    pub fn due(&mut self, now: Instant) -> Due<'_> {
        if self.waiting.is_empty() {
            return Due::Idle;
        }
        match self.pace.take(now) {
            Err(at) => Due::At(at),
            Ok(()) => self.waiting.front().map_or(Due::Idle, Due::Now),
        }
    }

    /// The reading [`Replayer::due`] handed out went out (or can never go out).
    pub fn sent(&mut self) {
        self.waiting.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::recent::test_reading as r;
    use crate::replaypace::{BURST, COOLDOWN};

    fn all() -> ReplayRequest {
        ReplayRequest {
            after_seq: 0,
            until_seq: None,
        }
    }

    fn drain(p: &mut Replayer, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Due::Now(reading) = p.due(now) {
            out.push(reading.seq);
            p.sent();
        }
        out
    }

    #[test]
    fn answers_from_the_recent_readings_and_coalesces_repeats() {
        let t0 = Instant::now();
        let mut p = Replayer::new(3, t0);
        assert_eq!(p.due(t0), Due::Idle);
        for seq in 1..=5 {
            p.remember(r(seq));
        }
        assert_eq!(p.latest().map(|r| r.seq), Some(5));
        assert_eq!(
            p.ask(&all(), t0),
            Asked {
                queued: 3,
                coalesced: 0
            }
        );
        // While as many wait as are kept, nothing more is queued.
        assert_eq!(p.ask(&all(), t0), Asked::default());
        assert_eq!(drain(&mut p, t0), [3, 4, 5]);
        // The same request again at once: every reading just went out.
        assert_eq!(
            p.ask(&all(), t0),
            Asked {
                queued: 0,
                coalesced: 3
            }
        );
        // After the cooldown they go out again.
        assert_eq!(p.ask(&all(), t0 + COOLDOWN).queued, 3);
    }

    #[test]
    fn paces_a_long_answer_and_says_when_the_next_is_due() {
        let t0 = Instant::now();
        let n = BURST as u64 + 10;
        let mut p = Replayer::new(n as usize, t0);
        for seq in 1..=n {
            p.remember(r(seq));
        }
        assert_eq!(p.ask(&all(), t0).queued, n as usize);
        assert_eq!(drain(&mut p, t0).len(), BURST as usize);
        let Due::At(next) = p.due(t0) else {
            panic!("the burst is spent")
        };
        assert!(
            next > t0 && next < t0 + Duration::from_millis(10),
            "{next:?}"
        );
        assert_eq!(drain(&mut p, t0 + Duration::from_secs(1)).len(), 10);
    }

    #[test]
    fn replays_off_answers_nothing() {
        let t0 = Instant::now();
        let mut p = Replayer::new(0, t0);
        p.remember(r(1));
        assert_eq!(p.ask(&all(), t0), Asked::default());
        assert_eq!(p.latest(), None);
    }
}
