//! What the gateway knows: per sensor, its availability, its newest reading and a bounded
//! history. Plain data, no I/O, no clock (the caller says what time it is): the MQTT side feeds
//! it, the HTTP side reads it.
//!
//! # Forgetting
//!
//! A sensor whose publisher is not `online` (it said `offline`, its will did, or it never said)
//! and from which nothing new was heard — no new reading, no change of availability — for
//! `--forget-after` is forgotten ([`Registry::forget`]): its history goes, and it leaves the API
//! and the snapshots. What it was forgotten with is remembered (a bounded list of ids and their
//! newest `(read_at, seq)`), so the broker re-sending the sensor's retained state or `offline`
//! (after every reconnect, on Mosquitto) does not bring it back; a newer reading or an `online`
//! does. A sensor whose publisher is `online` is never forgotten: its will says when it goes.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use chrono::{DateTime, Utc};
use k3sense_protocol::{
    Availability, Reading, ReplayRequest, SensorHealth, SensorId,
    ws::{SensorStatus, SensorSummary, ServerMessage},
};

/// The readings of one sensor, oldest first, at most `capacity` of them.
///
/// Ordered by `(read_at, seq)`, so a reading replayed late or twice lands in its place or is
/// dropped, and a publisher that restarts (its `seq` starting over) still sorts by time.
#[derive(Debug, Clone)]
pub struct History {
    capacity: usize,
    readings: VecDeque<Reading>,
}

/// What [`History::insert`] did with a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// It is the newest reading now.
    Newest,
    /// It belongs before the newest one (a late replay).
    Older,
    /// The same reading was already there.
    Duplicate,
    /// It is older than everything a full history keeps.
    TooOld,
}

impl History {
    /// An empty history holding at most `capacity` readings (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            readings: VecDeque::new(),
        }
    }

    /// Inserts in order, evicting the oldest when full.
    pub fn insert(&mut self, reading: Reading) -> Inserted {
        let key = |r: &Reading| (r.read_at, r.seq);
        let new_key = key(&reading);
        let position = self.readings.partition_point(|r| key(r) < new_key);
        if self
            .readings
            .get(position)
            .is_some_and(|r| key(r) == new_key)
        {
            return Inserted::Duplicate;
        }
        if position == 0 && self.readings.len() == self.capacity {
            return Inserted::TooOld;
        }
        let newest = position == self.readings.len();
        self.readings.insert(position, reading);
        if self.readings.len() > self.capacity {
            self.readings.pop_front();
        }
        if newest {
            Inserted::Newest
        } else {
            Inserted::Older
        }
    }

    /// The newest `limit` readings, oldest first.
    pub fn newest(&self, limit: usize) -> Vec<Reading> {
        self.newest_since(limit, None)
    }

    /// The newest `limit` readings read after `since` (all, without it), oldest first: what a
    /// page that reconnects asks for, so it fetches only what it missed.
    pub fn newest_since(&self, limit: usize, since: Option<DateTime<Utc>>) -> Vec<Reading> {
        let first_after = since.map_or(0, |since| {
            self.readings.partition_point(|r| r.read_at <= since)
        });
        let skip = self.readings.len().saturating_sub(limit).max(first_after);
        self.readings.iter().skip(skip).cloned().collect()
    }

    /// Gaps in `seq` between neighbouring readings of one publisher run (a later reading with a
    /// `seq` more than one higher), oldest first, as replay requests; at most `limit`.
    pub fn holes(&self, limit: usize) -> Vec<ReplayRequest> {
        self.readings
            .iter()
            .zip(self.readings.iter().skip(1))
            .filter(|(a, b)| b.seq > a.seq.saturating_add(1))
            .map(|(a, b)| ReplayRequest {
                after_seq: a.seq,
                until_seq: Some(b.seq),
            })
            .take(limit)
            .collect()
    }

    /// The reading held with this `(read_at, seq)`, if any.
    pub fn get(&self, read_at: DateTime<Utc>, seq: u64) -> Option<&Reading> {
        let key = |r: &Reading| (r.read_at, r.seq);
        let position = self.readings.partition_point(|r| key(r) < (read_at, seq));
        self.readings
            .get(position)
            .filter(|r| key(r) == (read_at, seq))
    }

    /// Puts `reading` in place of the one held with the same `(read_at, seq)`; `false` if
    /// there is none.
    pub fn replace(&mut self, reading: Reading) -> bool {
        let key = |r: &Reading| (r.read_at, r.seq);
        let position = self.readings.partition_point(|r| key(r) < key(&reading));
        match self.readings.get_mut(position) {
            Some(held) if key(held) == key(&reading) => {
                *held = reading;
                true
            }
            _ => false,
        }
    }

    /// The newest reading.
    pub fn latest(&self) -> Option<&Reading> {
        self.readings.back()
    }

    /// Number of readings held.
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    /// Whether no reading is held.
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Sensor {
    status: SensorStatus,
    history: History,
    /// The sensor's own health, as its publisher last said it.
    health: Option<SensorHealth>,
    /// When something new was last heard of it (a new reading, a change of availability; the
    /// gateway's clock): what [`Registry::forget`] measures.
    heard: DateTime<Utc>,
}

/// The `(read_at, seq)` of a forgotten sensor's newest reading (`None`: it had none).
type Forgotten = Option<(DateTime<Utc>, u64)>;

/// Forgotten sensors remembered, so their retained messages do not bring them back: ~100 bytes
/// each. Beyond it the oldest is let go (its stale retained state could bring it back, to be
/// forgotten again `--forget-after` later).
pub const MAX_FORGOTTEN: usize = 10_000;

/// Every sensor the gateway has heard of.
#[derive(Debug, Clone)]
pub struct Registry {
    history_capacity: usize,
    sensors: BTreeMap<SensorId, Sensor>,
    forgotten: HashMap<SensorId, Forgotten>,
    /// The ids in `forgotten`, oldest first (may hold ids brought back since: skipped).
    forgotten_order: VecDeque<SensorId>,
}

impl Registry {
    /// An empty registry keeping `history_capacity` readings per sensor.
    pub fn new(history_capacity: usize) -> Self {
        Self {
            history_capacity,
            sensors: BTreeMap::new(),
            forgotten: HashMap::new(),
            forgotten_order: VecDeque::new(),
        }
    }

    fn sensor(&mut self, id: &SensorId, now: DateTime<Utc>) -> &mut Sensor {
        let capacity = self.history_capacity;
        self.forgotten.remove(id);
        self.sensors.entry(id.clone()).or_insert_with(|| Sensor {
            status: SensorStatus::Unknown,
            history: History::new(capacity),
            health: None,
            heard: now,
        })
    }

    /// Whether `reading` is of a forgotten sensor and no newer than what it was forgotten
    /// with (a retained message sent again): it must not bring the sensor back.
    pub fn stale(&self, reading: &Reading) -> bool {
        match self.forgotten.get(&reading.sensor_id) {
            None => false,
            Some(None) => false,
            Some(Some(newest)) => (reading.read_at, reading.seq) <= *newest,
        }
    }

    /// Records a reading received at `now`; returns the message to send to clients, or `None`
    /// for a duplicate, a reading too old to keep, or a stale one of a forgotten sensor.
    pub fn apply_reading(&mut self, reading: Reading, now: DateTime<Utc>) -> Option<ServerMessage> {
        if self.stale(&reading) {
            return None;
        }
        let sensor = self.sensor(&reading.sensor_id, now);
        match sensor.history.insert(reading.clone()) {
            Inserted::Newest | Inserted::Older => {
                sensor.heard = now;
                Some(ServerMessage::Reading(reading))
            }
            Inserted::Duplicate | Inserted::TooOld => None,
        }
    }

    /// Forgets every sensor not `online` from which nothing new was heard for `after` by
    /// `now`; returns the messages that tell clients.
    pub fn forget(&mut self, now: DateTime<Utc>, after: Duration) -> Vec<ServerMessage> {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let gone: Vec<SensorId> = self
            .sensors
            .iter()
            .filter(|(_, s)| s.status != SensorStatus::Online && now - s.heard >= after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            let newest = self
                .sensors
                .remove(id)
                .and_then(|s| s.history.latest().map(|r| (r.read_at, r.seq)));
            self.remember_forgotten(id.clone(), newest);
        }
        gone.into_iter()
            .map(|sensor_id| ServerMessage::Forgotten { sensor_id })
            .collect()
    }

    fn remember_forgotten(&mut self, id: SensorId, newest: Forgotten) {
        self.forgotten.insert(id.clone(), newest);
        self.forgotten_order.push_back(id);
        while self.forgotten.len() > MAX_FORGOTTEN || self.forgotten_order.len() > 2 * MAX_FORGOTTEN
        {
            let Some(oldest) = self.forgotten_order.pop_front() else {
                break;
            };
            // An id brought back (and perhaps forgotten again, further back in the list) is
            // let go only at its newest place.
            if !self.forgotten_order.contains(&oldest) {
                self.forgotten.remove(&oldest);
            }
        }
    }

    /// The readings missing before a live `reading`, as a replay request to the publisher:
    /// everything it keeps up to this one when the sensor is new here, the range in between
    /// when `seq` jumps. `None` when nothing is missing (or the publisher restarted its count).
    pub fn gap_before(&self, reading: &Reading) -> Option<ReplayRequest> {
        let latest = self
            .sensors
            .get(&reading.sensor_id)
            .and_then(|s| s.history.latest());
        match latest {
            None => Some(ReplayRequest {
                after_seq: 0,
                until_seq: Some(reading.seq),
            })
            .filter(|_| reading.seq > 1),
            Some(latest)
                if reading.seq > latest.seq.saturating_add(1)
                    && reading.read_at > latest.read_at =>
            {
                Some(ReplayRequest {
                    after_seq: latest.seq,
                    until_seq: Some(reading.seq),
                })
            }
            Some(_) => None,
        }
    }

    /// The reading held with the `(read_at, seq)` of `reading` when its values differ: a
    /// conflicting duplicate (see `crate::guard`).
    pub fn conflicting(&self, reading: &Reading) -> Option<Reading> {
        self.sensors
            .get(&reading.sensor_id)
            .and_then(|s| s.history.get(reading.read_at, reading.seq))
            .filter(|held| *held != reading)
            .cloned()
    }

    /// Replaces a conflicting duplicate with `reading`; the message for clients if it did.
    pub fn replace_reading(&mut self, reading: Reading) -> Option<ServerMessage> {
        let sensor = self.sensors.get_mut(&reading.sensor_id)?;
        sensor
            .history
            .replace(reading.clone())
            .then_some(ServerMessage::Reading(reading))
    }

    /// The newest reading of a sensor, if any.
    pub fn latest(&self, id: &SensorId) -> Option<&Reading> {
        self.sensors.get(id).and_then(|s| s.history.latest())
    }

    /// Every sensor's gaps in `seq` (at most `limit` each), to ask for again.
    pub fn holes(&self, limit: usize) -> Vec<(SensorId, ReplayRequest)> {
        self.sensors
            .iter()
            .flat_map(|(id, s)| {
                s.history
                    .holes(limit)
                    .into_iter()
                    .map(move |r| (id.clone(), r))
            })
            .collect()
    }

    /// The newest `seq` held per sensor: where to resume after a lost broker connection.
    pub fn newest_seqs(&self) -> Vec<(SensorId, u64)> {
        self.sensors
            .iter()
            .filter_map(|(id, s)| s.history.latest().map(|r| (id.clone(), r.seq)))
            .collect()
    }

    /// Records an availability change received at `now`; `None` when nothing changed (or a
    /// forgotten sensor's `offline` came again).
    pub fn apply_availability(
        &mut self,
        id: &SensorId,
        availability: Availability,
        now: DateTime<Utc>,
    ) -> Option<ServerMessage> {
        let status = SensorStatus::from(availability);
        if status != SensorStatus::Online && self.forgotten.contains_key(id) {
            return None;
        }
        let sensor = self.sensor(id, now);
        if sensor.status == status {
            return None;
        }
        sensor.status = status;
        sensor.heard = now;
        Some(ServerMessage::Availability {
            sensor_id: id.clone(),
            status,
        })
    }

    /// Records the sensor's own health; `None` when nothing changed (the same message again,
    /// as after a publisher reconnects).
    /// A forgotten sensor's health (retained, sent again) is ignored.
    pub fn apply_health(
        &mut self,
        health: SensorHealth,
        now: DateTime<Utc>,
    ) -> Option<ServerMessage> {
        if self.forgotten.contains_key(&health.sensor_id) {
            return None;
        }
        let sensor = self.sensor(&health.sensor_id, now);
        if sensor.health.as_ref() == Some(&health) {
            return None;
        }
        sensor.health = Some(health.clone());
        Some(ServerMessage::Sensor(health))
    }

    /// Every sensor with its status and newest reading, sorted by id.
    pub fn summaries(&self) -> Vec<SensorSummary> {
        self.sensors
            .iter()
            .map(|(id, s)| SensorSummary {
                sensor_id: id.clone(),
                status: s.status,
                latest: s.history.latest().cloned(),
                sensor_health: s.health.clone(),
            })
            .collect()
    }

    /// The newest `limit` readings of a sensor read after `since`, oldest first; `None` for an
    /// unknown sensor.
    pub fn history(
        &self,
        id: &SensorId,
        limit: usize,
        since: Option<DateTime<Utc>>,
    ) -> Option<Vec<Reading>> {
        self.sensors
            .get(id)
            .map(|s| s.history.newest_since(limit, since))
    }

    /// Number of known sensors.
    pub fn len(&self) -> usize {
        self.sensors.len()
    }

    /// Whether no sensor is known.
    pub fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use k3sense_protocol::Model;

    use super::*;

    fn reading(id: &str, seq: u64, second: u32) -> Reading {
        Reading::new(
            SensorId::new(id).unwrap(),
            Model::Dht22,
            20.0,
            50.0,
            Utc.with_ymd_and_hms(2026, 11, 27, 4, 0, second).unwrap(),
            seq,
        )
        .unwrap()
    }

    /// The gateway's clock in these tests (readings are stamped 2026-11-27T04:00).
    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 4, 1, 0).unwrap()
    }

    fn seqs(h: &History) -> Vec<u64> {
        h.newest(usize::MAX).iter().map(|r| r.seq).collect()
    }

    #[test]
    fn keeps_order_through_late_and_duplicate_readings() {
        let mut h = History::new(10);
        assert_eq!(h.insert(reading("a", 1, 1)), Inserted::Newest);
        assert_eq!(h.insert(reading("a", 3, 3)), Inserted::Newest);
        assert_eq!(h.insert(reading("a", 2, 2)), Inserted::Older);
        assert_eq!(h.insert(reading("a", 2, 2)), Inserted::Duplicate);
        assert_eq!(h.insert(reading("a", 3, 3)), Inserted::Duplicate);
        assert_eq!(seqs(&h), [1, 2, 3]);
        assert_eq!(h.latest().unwrap().seq, 3);
    }

    #[test]
    fn a_restarted_publisher_sorts_by_time() {
        let mut h = History::new(10);
        h.insert(reading("a", 41, 1));
        h.insert(reading("a", 42, 2));
        assert_eq!(h.insert(reading("a", 1, 3)), Inserted::Newest);
        assert_eq!(seqs(&h), [41, 42, 1]);
    }

    #[test]
    fn is_bounded_and_evicts_the_oldest() {
        let mut h = History::new(3);
        for s in 1..=5 {
            h.insert(reading("a", s, s as u32));
        }
        assert_eq!(seqs(&h), [3, 4, 5]);
        assert_eq!(h.insert(reading("a", 1, 1)), Inserted::TooOld);
        assert_eq!(
            h.newest(2).iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn since_returns_only_what_came_after() {
        let mut h = History::new(10);
        for s in 1..=5 {
            h.insert(reading("a", s, s as u32));
        }
        let at = |second| Utc.with_ymd_and_hms(2026, 11, 27, 4, 0, second).unwrap();
        let got = |limit, since| {
            h.newest_since(limit, since)
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(got(10, Some(at(3))), [4, 5]);
        assert_eq!(got(1, Some(at(3))), [5]);
        assert_eq!(got(10, Some(at(0))), [1, 2, 3, 4, 5]);
        assert!(got(10, Some(at(9))).is_empty());
        assert_eq!(got(2, None), [4, 5]);
    }

    #[test]
    fn registry_reports_changes_only() {
        let mut reg = Registry::new(5);
        let id = SensorId::new("a").unwrap();
        assert!(reg.apply_reading(reading("a", 1, 1), now()).is_some());
        assert!(reg.apply_reading(reading("a", 1, 1), now()).is_none());
        assert_eq!(reg.summaries()[0].status, SensorStatus::Unknown);
        assert!(
            reg.apply_availability(&id, Availability::Online, now())
                .is_some()
        );
        assert!(
            reg.apply_availability(&id, Availability::Online, now())
                .is_none()
        );
        assert!(
            reg.apply_availability(&id, Availability::Offline, now())
                .is_some()
        );
        let summary = &reg.summaries()[0];
        assert_eq!(summary.status, SensorStatus::Offline);
        assert_eq!(summary.latest.as_ref().unwrap().seq, 1);
        assert_eq!(reg.history(&id, 10, None).unwrap().len(), 1);
        assert!(
            reg.history(&SensorId::new("b").unwrap(), 10, None)
                .is_none()
        );
    }

    #[test]
    fn health_is_kept_per_sensor_and_reported_when_it_changes() {
        let mut reg = Registry::new(5);
        let health = |status: &str| {
            SensorHealth::from_json(
                format!(
                    r#"{{"sensor_id":"a","status":"{status}","since":"2026-11-27T14:02:00.000Z"}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        assert!(matches!(
            reg.apply_health(health("not_answering"), now()),
            Some(ServerMessage::Sensor(_))
        ));
        assert!(reg.apply_health(health("not_answering"), now()).is_none());
        assert_eq!(
            reg.summaries()[0].sensor_health,
            Some(health("not_answering"))
        );
        assert!(reg.apply_health(health("ok"), now()).is_some());
        assert_eq!(reg.summaries()[0].status, SensorStatus::Unknown);
    }

    #[test]
    fn asks_for_what_is_missing() {
        let mut reg = Registry::new(10);
        // New sensor: everything before the first reading seen.
        assert_eq!(
            reg.gap_before(&reading("a", 42, 10)),
            Some(ReplayRequest {
                after_seq: 0,
                until_seq: Some(42)
            })
        );
        assert_eq!(reg.gap_before(&reading("a", 1, 10)), None);
        reg.apply_reading(reading("a", 42, 10), now());
        assert_eq!(reg.gap_before(&reading("a", 43, 11)), None);
        assert_eq!(
            reg.gap_before(&reading("a", 46, 12)),
            Some(ReplayRequest {
                after_seq: 42,
                until_seq: Some(46)
            })
        );
        // Duplicates and a restarted publisher (seq from 1, later time) ask for nothing.
        assert_eq!(reg.gap_before(&reading("a", 42, 10)), None);
        assert_eq!(reg.gap_before(&reading("a", 1, 20)), None);
        assert_eq!(reg.newest_seqs(), [(SensorId::new("a").unwrap(), 42)]);
    }

    #[test]
    fn a_conflicting_duplicate_is_found_and_can_be_replaced() {
        let mut reg = Registry::new(10);
        let real = reading("a", 5, 5);
        reg.apply_reading(real.clone(), now());
        assert_eq!(
            reg.conflicting(&real),
            None,
            "the same reading is no conflict"
        );
        let mut fake = real.clone();
        fake.temperature_c = -19.0;
        assert_eq!(reg.conflicting(&fake), Some(real.clone()));
        assert!(
            reg.apply_reading(fake.clone(), now()).is_none(),
            "first seen stays"
        );
        assert!(reg.replace_reading(fake.clone()).is_some());
        assert_eq!(reg.conflicting(&real), Some(fake));
        assert!(
            reg.replace_reading(reading("a", 6, 6)).is_none(),
            "nothing to replace"
        );
    }

    #[test]
    fn finds_holes_left_by_lost_replies() {
        let mut h = History::new(10);
        for (seq, second) in [(1, 1), (2, 2), (5, 5), (6, 6), (9, 9)] {
            h.insert(reading("a", seq, second));
        }
        let holes: Vec<(u64, Option<u64>)> = h
            .holes(10)
            .iter()
            .map(|r| (r.after_seq, r.until_seq))
            .collect();
        assert_eq!(holes, [(2, Some(5)), (6, Some(9))]);
        assert_eq!(h.holes(1).len(), 1);
        // A restarted publisher (seq from 1 again) is no hole.
        h.insert(reading("a", 1, 20));
        assert_eq!(h.holes(10).len(), 2);
    }

    #[test]
    fn a_sensor_gone_for_forget_after_is_forgotten_unless_online() {
        let mut reg = Registry::new(5);
        let (a, b, c) = (
            SensorId::new("a").unwrap(),
            SensorId::new("b").unwrap(),
            SensorId::new("c").unwrap(),
        );
        let after = Duration::from_secs(60);
        let later = |s: i64| now() + chrono::Duration::seconds(s);
        reg.apply_reading(reading("a", 1, 1), now());
        reg.apply_availability(&a, Availability::Offline, now());
        reg.apply_reading(reading("b", 1, 1), now());
        reg.apply_availability(&b, Availability::Online, now());
        reg.apply_reading(reading("c", 1, 1), now());
        // c (no availability) is heard of again 30 s later: its clock starts over.
        reg.apply_reading(reading("c", 2, 2), later(30));
        assert!(reg.forget(later(59), after).is_empty(), "not yet");
        assert_eq!(
            reg.forget(later(60), after),
            [ServerMessage::Forgotten {
                sensor_id: a.clone()
            }]
        );
        assert_eq!(
            reg.forget(later(90), after),
            [ServerMessage::Forgotten {
                sensor_id: c.clone()
            }]
        );
        assert!(reg.forget(later(10_000), after).is_empty(), "b is online");
        assert_eq!(reg.len(), 1);
        assert!(reg.history(&a, 10, None).is_none());
        assert_eq!(reg.summaries()[0].sensor_id, b);
    }

    #[test]
    fn retained_messages_sent_again_do_not_bring_a_forgotten_sensor_back_and_news_does() {
        let mut reg = Registry::new(5);
        let a = SensorId::new("a").unwrap();
        let later = now() + chrono::Duration::seconds(120);
        reg.apply_reading(reading("a", 7, 7), now());
        reg.apply_availability(&a, Availability::Offline, now());
        reg.apply_health(
            SensorHealth::from_json(
                br#"{"sensor_id":"a","status":"ok","since":"2026-11-27T04:00:00.000Z"}"#,
            )
            .unwrap(),
            now(),
        );
        assert_eq!(reg.forget(later, Duration::from_secs(60)).len(), 1);
        // What the broker re-sends after a reconnect: the retained reading, offline, health.
        assert!(reg.stale(&reading("a", 7, 7)));
        assert!(reg.apply_reading(reading("a", 7, 7), later).is_none());
        assert!(reg.apply_reading(reading("a", 6, 6), later).is_none());
        assert!(
            reg.apply_availability(&a, Availability::Offline, later)
                .is_none()
        );
        assert!(reg.summaries().is_empty());
        // A newer reading brings it back, with an empty history.
        assert!(reg.apply_reading(reading("a", 8, 8), later).is_some());
        assert_eq!(reg.history(&a, 10, None).unwrap().len(), 1);
        assert!(
            !reg.stale(&reading("a", 7, 7)),
            "known again: no longer forgotten"
        );
        // So does `online`, for a sensor forgotten with no reading at all.
        let b = SensorId::new("b").unwrap();
        reg.apply_availability(&b, Availability::Offline, now());
        reg.forget(later, Duration::from_secs(60));
        assert!(
            reg.apply_availability(&b, Availability::Offline, later)
                .is_none()
        );
        assert!(
            reg.apply_availability(&b, Availability::Online, later)
                .is_some()
        );
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn forgotten_sensors_are_remembered_up_to_a_bound() {
        let mut reg = Registry::new(1);
        for n in 0..MAX_FORGOTTEN + 10 {
            let id = SensorId::new(format!("s{n}")).unwrap();
            reg.apply_availability(&id, Availability::Offline, now());
        }
        let later = now() + chrono::Duration::seconds(120);
        assert_eq!(
            reg.forget(later, Duration::from_secs(60)).len(),
            MAX_FORGOTTEN + 10
        );
        assert!(reg.is_empty());
        assert_eq!(reg.forgotten.len(), MAX_FORGOTTEN);
        assert!(reg.forgotten_order.len() <= 2 * MAX_FORGOTTEN);
    }
}
