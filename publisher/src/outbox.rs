//! Readings waiting for the broker's acknowledgement.
//!
//! The publisher, not the MQTT library, is the keeper of readings until the broker has taken
//! them: the MQTT client does not send a publish again that a lost connection took (a restarted
//! broker has lost the session anyway). So every reading stays here from the moment it is
//! read until its PUBACK arrives, and after every reconnect the unacknowledged ones are sent
//! again, oldest first, with their original `read_at` and `seq`. The buffer is bounded: when the
//! broker stays away too long, the oldest readings are dropped and counted.
//!
//! [`Receipts`] match the broker's acknowledgements to what was sent: the MQTT client names each
//! publish, and says when the broker acknowledged it, by an id of its own.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

use k3sense_protocol::Reading;

/// Bounded, ordered buffer of readings not yet acknowledged.
#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    entries: VecDeque<Entry>,
    dropped: u64,
}

#[derive(Debug)]
struct Entry {
    reading: Reading,
    sent: bool,
}

impl Outbox {
    /// A buffer of at most `capacity` readings (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Adds a reading; returns the oldest one if it had to be dropped to make room.
    pub fn push(&mut self, reading: Reading) -> Option<Reading> {
        let evicted = if self.entries.len() == self.capacity {
            self.dropped += 1;
            self.entries.pop_front().map(|e| e.reading)
        } else {
            None
        };
        self.entries.push_back(Entry {
            reading,
            sent: false,
        });
        evicted
    }

    /// The oldest reading not yet handed to the connection, marked as handed over.
    pub fn next_unsent(&mut self) -> Option<&Reading> {
        let entry = self.entries.iter_mut().find(|e| !e.sent)?;
        entry.sent = true;
        Some(&entry.reading)
    }

    /// Undoes the last [`Outbox::next_unsent`] for `seq` (the connection could not take it).
    pub fn unsend(&mut self, seq: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.reading.seq == seq) {
            e.sent = false;
        }
    }

    /// The broker acknowledged `seq`: forget it.
    pub fn acked(&mut self, seq: u64) {
        self.entries.retain(|e| e.reading.seq != seq);
    }

    /// The connection broke: everything not acknowledged must be sent again.
    pub fn resend_all(&mut self) {
        for e in &mut self.entries {
            e.sent = false;
        }
    }

    /// Readings handed over but not acknowledged.
    pub fn in_flight(&self) -> usize {
        self.entries.iter().filter(|e| e.sent).count()
    }

    /// The most readings held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Readings held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Readings dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// What a queued PUBLISH carried, so its PUBACK can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The reading with this `seq`, from the [`Outbox`].
    Reading(u64),
    /// The `offline` of a deliberate stop.
    Goodbye,
    /// Anything else (availability, health, discovery, replays): nothing waits for its PUBACK.
    Other,
}

/// What each publish carried, by the client's id for it, until acknowledged or lost.
#[derive(Debug)]
pub struct Receipts<Id> {
    sent: HashMap<Id, Sent>,
}

impl<Id> Default for Receipts<Id> {
    fn default() -> Self {
        Self {
            sent: HashMap::new(),
        }
    }
}

impl<Id: Eq + Hash> Receipts<Id> {
    /// The client took publish `id`, carrying `sent`.
    pub fn sent(&mut self, id: Id, sent: Sent) {
        self.sent.insert(id, sent);
    }

    /// The broker acknowledged `id`, or a lost connection took it: what it carried, if we
    /// sent it.
    pub fn settled(&mut self, id: &Id) -> Option<Sent> {
        self.sent.remove(id)
    }

    /// The connection is gone: nothing sent on it will be acknowledged.
    pub fn clear(&mut self) {
        self.sent.clear();
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::recent::test_reading as r;

    fn next(o: &mut Outbox) -> Option<u64> {
        o.next_unsent().map(|r| r.seq)
    }

    #[test]
    fn sends_in_order_and_forgets_on_ack() {
        let mut o = Outbox::new(10);
        for s in 1..=3 {
            o.push(r(s));
        }
        assert_eq!(next(&mut o), Some(1));
        assert_eq!(next(&mut o), Some(2));
        assert_eq!(o.in_flight(), 2);
        o.acked(1);
        assert_eq!(o.len(), 2);
        assert_eq!(next(&mut o), Some(3));
        assert_eq!(next(&mut o), None);
    }

    #[test]
    fn resends_everything_unacked_after_a_reconnect() {
        let mut o = Outbox::new(10);
        for s in 1..=3 {
            o.push(r(s));
        }
        while next(&mut o).is_some() {}
        o.acked(2);
        o.resend_all();
        assert_eq!(next(&mut o), Some(1));
        assert_eq!(next(&mut o), Some(3));
        o.unsend(3);
        assert_eq!(next(&mut o), Some(3));
    }

    #[test]
    fn drops_the_oldest_when_full_and_counts() {
        let mut o = Outbox::new(2);
        assert!(o.push(r(1)).is_none());
        assert!(o.push(r(2)).is_none());
        assert_eq!(o.push(r(3)).map(|r| r.seq), Some(1));
        assert_eq!(o.dropped(), 1);
        assert_eq!(next(&mut o), Some(2));
    }

    #[test]
    fn receipts_say_what_an_acknowledged_publish_carried() {
        let mut r = Receipts::default();
        r.sent(1_u64, Sent::Other);
        r.sent(2, Sent::Reading(7));
        assert_eq!(r.settled(&2), Some(Sent::Reading(7)));
        assert_eq!(r.settled(&2), None);
        // Someone else's publish.
        assert_eq!(r.settled(&3), None);
        r.sent(4, Sent::Goodbye);
        r.clear();
        assert_eq!(r.settled(&1), None);
        assert_eq!(r.settled(&4), None);
    }
}
