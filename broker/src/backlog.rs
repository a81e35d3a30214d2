//! A QoS 1 subscriber that cannot keep up is disconnected, never silently skipped.
//!
//! rumqttd 0.20 keeps each subscription filter's messages in a commit log of at most
//! `max_segment_count` segments (embedded.rs: 4 × 256 KiB, sizes counted as 4 + topic + payload
//! bytes, `segments/utils/serde.rs`) and gives each subscriber a read cursor into it. A connection
//! may hold at most 100 QoS 1/2 messages unacknowledged (`router/iobufs.rs`, `MAX_INFLIGHT`, fixed
//! whatever the config says); while its window is full its cursor stands still. When the log drops
//! the segment under a standing cursor, rumqttd moves the cursor to the oldest message it still
//! has (`router/routing.rs`: "Read cursor start jumped", `segments/mod.rs`: "jumping to head") and
//! carries on: the subscriber silently misses everything in between (issue 14, row 5: 11 of 45
//! live readings lost by a subscriber to `k3sense/#` during a replay flood).
//!
//! The proxy cannot see the cursor, but it sees every message written into rumqttd
//! ([`LogBytes`]) and every message and acknowledgement of each subscriber ([`Backlog`]). While a
//! subscriber's window is (nearly) full, whatever is written to rumqttd may be piling up behind its
//! cursor; whatever it is then sent comes off the pile. That estimate is never below the real lag
//! (it counts messages on every topic, not only the subscriber's), so closing the connection once
//! it passes [`MAX_BACKLOG`] — a third of what the log is sure to hold — closes it before rumqttd
//! could skip anything. rumqttd then keeps the session (clean session off) with its cursor at the
//! first unacknowledged message, and the subscriber gets everything again from there when it
//! reconnects, provided it comes back before the other two thirds are written.
//!
//! A persistent session's estimate outlives its connection ([`Parked`]): what was not yet
//! acknowledged is sent again, and everything written while it is away piles up behind its
//! cursor (but never more than a log can hold, [`LOG_MAX`]), so a resumed connection starts that
//! far behind. Over [`MAX_BACKLOG`] it may catch up but not fall further behind (by more than
//! [`TOLERANCE`], none at all beyond twice the limit): a subscriber coming back slower than the
//! traffic is closed again before rumqttd could skip anything; one that reads faster catches up.
//! A subscriber that stays slower than the traffic for long falls further behind at each
//! resumption and, once what was written while it was away is more than the log holds, loses the
//! oldest of it there (rumqttd moves the cursor when the session resumes) — after a disconnect,
//! not silently within a connection.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// rumqttd's fixed window of unacknowledged QoS 1/2 messages per connection.
pub(crate) const WINDOW: u32 = 100;
/// From this many unacknowledged messages on, the window counts as full: rumqttd's own count
/// runs ahead of the proxy's by the messages and acknowledgements in flight between them.
const FULL_FROM: u32 = WINDOW - 8;
/// How far (in rumqttd's size units) a subscriber may fall behind before it is disconnected.
pub(crate) const MAX_BACKLOG: u64 = 256 * 1024;
/// How much further a subscriber over [`MAX_BACKLOG`] may fall behind the least it has been on
/// this connection (a live reading arriving while a resumed subscriber catches up is not a reason
/// to close it).
pub(crate) const TOLERANCE: u64 = 64 * 1024;
/// The most a subscriber can really be behind: what rumqttd's log for one filter holds (4
/// segments of 256 KiB, each overrun by at most one message of `--max-payload` and headers).
pub(crate) const LOG_MAX: u64 = 4 * (256 + 66) * 1024;
/// How often a slow subscriber's disconnection is logged: the first, then at most one line per
/// this long with the count since (a subscriber far slower than the traffic is closed again at
/// each resumption).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The log line for slow subscribers, rate-limited.
#[derive(Debug, Default)]
pub(crate) struct SlowLog(Mutex<(Option<tokio::time::Instant>, u64)>);

impl SlowLog {
    /// Counts one disconnection; the number to log (this one and the unlogged ones before it)
    /// if a line is due.
    pub(crate) fn closed(&self, now: tokio::time::Instant) -> Option<u64> {
        let mut state = self.0.lock().ok()?;
        let (last, unlogged) = &mut *state;
        *unlogged += 1;
        if last.is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(unlogged))
    }
}

/// How often a subscriber with a full window is checked while nothing else happens on it (a
/// subscriber that stops reading altogether sends nothing and is sent nothing).
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(50);

/// What rumqttd counts for one message in its log.
pub(crate) fn log_size(topic: &str, payload: usize) -> u64 {
    (4 + topic.len() + payload) as u64
}

/// Bytes (as rumqttd counts them) of every PUBLISH forwarded to rumqttd since start.
#[derive(Debug, Default)]
pub(crate) struct LogBytes(AtomicU64);

impl LogBytes {
    /// Counts a PUBLISH about to be written to rumqttd (before, so the count leads the log).
    pub(crate) fn add(&self, size: u64) {
        self.0.fetch_add(size, Ordering::Relaxed);
    }

    pub(crate) fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One connection's estimate of how far rumqttd's cursors for it may trail the logs.
#[derive(Debug)]
pub(crate) struct Backlog {
    /// Sizes of the QoS 1/2 messages sent to the client and not yet acknowledged by it, oldest
    /// first (rumqttd takes acknowledgements only in order).
    unacked: VecDeque<u64>,
    /// Bytes written to rumqttd while the window was full, less the bytes sent to the client.
    behind: u64,
    /// [`LogBytes`] when last looked at.
    seen: u64,
    /// The least `behind` has been on this connection.
    low: u64,
    /// [`MAX_BACKLOG`], or less in tests.
    max: u64,
}

/// A persistent session's estimate while it has no connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Saved {
    /// How far behind it was, counting what it had not acknowledged (sent again on resumption).
    behind: u64,
    /// [`LogBytes`] when it left.
    written: u64,
}

impl Backlog {
    /// A new connection's, with `LogBytes` at `written`.
    pub(crate) fn new(written: u64, max: u64) -> Self {
        Self {
            unacked: VecDeque::new(),
            behind: 0,
            seen: written,
            low: 0,
            max,
        }
    }

    /// A persistent session's, resumed: everything written while it was away is behind it.
    pub(crate) fn resumed(saved: Saved, written: u64, max: u64) -> Self {
        let behind = saved
            .behind
            .saturating_add(written.saturating_sub(saved.written))
            .min(LOG_MAX);
        Self {
            unacked: VecDeque::new(),
            behind,
            seen: written,
            low: behind,
            max,
        }
    }

    /// The estimate to keep for the session when its connection ends.
    pub(crate) fn end(mut self, written: u64) -> Saved {
        self.catch_up(written);
        Saved {
            behind: self.behind.saturating_add(self.unacked.iter().sum()),
            written,
        }
    }

    fn catch_up(&mut self, written: u64) {
        if self.window_full() {
            self.behind = self
                .behind
                .saturating_add(written.saturating_sub(self.seen));
        }
        self.seen = written;
    }

    /// rumqttd sent the client a message of `size`; `acknowledged` if its QoS is 1 or 2.
    pub(crate) fn sent(&mut self, size: u64, acknowledged: bool, written: u64) {
        self.catch_up(written);
        self.behind = self.behind.saturating_sub(size);
        self.low = self.low.min(self.behind);
        if acknowledged {
            self.unacked.push_back(size);
        }
    }

    /// The client acknowledged a message (PUBACK, or PUBREC for QoS 2).
    pub(crate) fn acknowledged(&mut self, written: u64) {
        self.catch_up(written);
        self.unacked.pop_front();
    }

    /// Whether the window is full, so rumqttd may not be reading for this client.
    pub(crate) fn window_full(&self) -> bool {
        self.unacked.len() >= FULL_FROM as usize
    }

    /// The estimate now, if it is over the limit: over [`MAX_BACKLOG`] and further behind than
    /// the least it has been on this connection.
    pub(crate) fn too_far_behind(&mut self, written: u64) -> Option<u64> {
        self.catch_up(written);
        let room = if self.low < 2 * self.max {
            TOLERANCE
        } else {
            0
        };
        let over = self.behind > self.max && self.behind > self.low.saturating_add(room);
        self.low = self.low.min(self.behind);
        over.then_some(self.behind)
    }
}

/// Most persistent sessions whose estimate is kept while they are away; beyond it a session
/// resumes from zero (rumqttd keeps every persistent session for good anyway).
const MAX_PARKED: usize = 10_000;

/// The estimates of persistent sessions that have no connection, by the client id rumqttd sees.
#[derive(Debug, Default)]
pub(crate) struct Parked(Mutex<HashMap<String, Saved>>);

impl Parked {
    /// Keeps `saved` for the session `id` until it comes back.
    pub(crate) fn park(&self, id: &str, saved: Saved) {
        if let Ok(mut parked) = self.0.lock() {
            if parked.len() < MAX_PARKED || parked.contains_key(id) {
                parked.insert(id.to_owned(), saved);
            }
        }
    }

    /// The estimate of session `id`, if it was parked.
    pub(crate) fn take(&self, id: &str) -> Option<Saved> {
        self.0.lock().ok()?.remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: u64 = 150;

    #[test]
    fn a_subscriber_that_keeps_up_is_never_behind() {
        let mut b = Backlog::new(0, MAX_BACKLOG);
        let mut written = 0;
        for _ in 0..100_000 {
            written += READING;
            b.sent(READING, true, written);
            b.acknowledged(written);
            assert_eq!(b.too_far_behind(written), None);
        }
    }

    #[test]
    fn a_full_window_while_others_are_written_is_too_far_behind() {
        let mut b = Backlog::new(0, MAX_BACKLOG);
        let mut written = 0;
        for _ in 0..WINDOW {
            written += READING;
            b.sent(READING, true, written);
        }
        assert!(b.window_full());
        // The client reads nothing more; the flood goes on.
        let mut n = 0;
        while b.too_far_behind(written).is_none() {
            written += READING;
            n += 1;
        }
        assert_eq!(n, MAX_BACKLOG / READING + 1);
    }

    #[test]
    fn a_slow_reader_falls_behind_by_what_it_does_not_read() {
        // 5 messages written for each one the subscriber reads and acknowledges.
        let mut b = Backlog::new(0, MAX_BACKLOG);
        let mut written = 0;
        for _ in 0..WINDOW {
            written += READING;
            b.sent(READING, true, written);
        }
        let mut read = 0u64;
        while b.too_far_behind(written).is_none() {
            written += 5 * READING;
            b.acknowledged(written);
            b.sent(READING, true, written);
            read += 1;
        }
        // 4 × 150 bytes net per message read.
        assert_eq!(read, MAX_BACKLOG / (4 * READING) + 1);
    }

    #[test]
    fn what_is_written_while_the_window_has_room_is_not_counted() {
        let mut b = Backlog::new(0, MAX_BACKLOG);
        b.sent(READING, true, 0);
        assert_eq!(b.too_far_behind(10 * MAX_BACKLOG), None);
        // QoS 0 deliveries use no window.
        for _ in 0..1000 {
            b.sent(READING, false, 10 * MAX_BACKLOG);
        }
        assert!(!b.window_full());
    }

    #[test]
    fn a_resumed_session_starts_as_far_behind_as_it_left_plus_what_came_meanwhile() {
        let mut b = Backlog::new(0, MAX_BACKLOG);
        let mut written = 0;
        for _ in 0..WINDOW {
            written += READING;
            b.sent(READING, true, written);
        }
        // Gone with 100 unacknowledged: those come again, and 2,000 more were written.
        let saved = b.end(written);
        assert_eq!(saved.behind, u64::from(WINDOW) * READING);
        let parked = Parked::default();
        parked.park("u.sub", saved);
        written += 2000 * READING;
        let saved = parked.take("u.sub").unwrap();
        assert!(parked.take("u.sub").is_none());
        let mut b = Backlog::resumed(saved, written, MAX_BACKLOG);
        assert_eq!(b.behind, 2100 * READING);
        // It catches up while a few more arrive...
        for _ in 0..WINDOW {
            b.sent(READING, true, written);
        }
        written += 50 * READING;
        assert_eq!(b.too_far_behind(written), None);
        // ...but may not fall further behind than the least it has been, plus the tolerance.
        written += TOLERANCE;
        assert!(b.too_far_behind(written).is_some());
    }

    #[test]
    fn a_session_away_too_long_counts_at_most_a_log_and_may_not_grow() {
        let saved = Saved {
            behind: 0,
            written: 0,
        };
        let mut b = Backlog::resumed(saved, 100 * LOG_MAX, MAX_BACKLOG);
        assert_eq!(b.behind, LOG_MAX);
        for _ in 0..WINDOW {
            b.sent(READING, true, 100 * LOG_MAX);
        }
        assert_eq!(b.too_far_behind(100 * LOG_MAX), None);
        assert!(b.too_far_behind(100 * LOG_MAX + 1).is_some());
    }

    #[test]
    fn slow_subscribers_are_logged_once_then_every_ten_seconds_with_a_count() {
        let log = SlowLog::default();
        let now = tokio::time::Instant::now();
        assert_eq!(log.closed(now), Some(1));
        assert_eq!(log.closed(now + Duration::from_secs(1)), None);
        assert_eq!(log.closed(now + Duration::from_secs(9)), None);
        assert_eq!(log.closed(now + Duration::from_secs(10)), Some(3));
    }
}
