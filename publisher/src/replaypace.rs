//! How fast, and how often, the publisher answers replay requests (issue 14, row 5).
//!
//! A replay request is 15 bytes; its answer can be thousands of readings. Unbounded, 20 requests
//! a second made the broker drop live readings for a QoS 1 subscriber that could not keep up. So:
//!
//! - **Coalesced:** a reading queued or sent as a replay within the last [`COOLDOWN`] is not
//!   queued again, whoever asks (every gateway subscribes to every replay topic, so one answer
//!   serves all replicas). Twenty identical requests a second cost one answer per cooldown.
//! - **Paced:** replayed readings go out at most [`RATE`] a second after a burst of [`BURST`]
//!   (a token bucket), so a full replay buffer (8640 readings) takes ~17 s instead of one burst,
//!   and live readings, which are not paced, always find room.
//!
//! The publisher cannot tell requesters apart (MQTT does not say who published a request), so
//! the limits are per sensor; the broker's ACL decides who may ask at all (`gateway`, `admin`).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How long a replayed reading is not replayed again.
pub const COOLDOWN: Duration = Duration::from_secs(2);
/// Replayed readings per second, sustained.
pub const RATE: f64 = 500.0;
/// Replayed readings that may go out at once.
pub const BURST: f64 = 500.0;

/// The coalescing memory and the token bucket.
#[derive(Debug)]
pub struct ReplayPace {
    /// When each recently replayed `seq` was queued.
    queued_at: HashMap<u64, Instant>,
    tokens: f64,
    refilled: Instant,
}

impl ReplayPace {
    /// A full bucket, nothing replayed yet.
    pub fn new(now: Instant) -> Self {
        Self {
            queued_at: HashMap::new(),
            tokens: BURST,
            refilled: now,
        }
    }

    /// Whether to queue `seq` for a replay now: not if it was queued within [`COOLDOWN`].
    pub fn admit(&mut self, seq: u64, now: Instant) -> bool {
        // Forget what is past its cooldown, so the map stays as small as one cooldown's worth.
        if self.queued_at.len() > 1024 {
            self.queued_at
                .retain(|_, at| now.duration_since(*at) < COOLDOWN);
        }
        match self.queued_at.get(&seq) {
            Some(at) if now.duration_since(*at) < COOLDOWN => false,
            _ => {
                self.queued_at.insert(seq, now);
                true
            }
        }
    }

    /// Takes one token to send a replayed reading, or says when the next one is due.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - self.tokens) / RATE))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_replayed_once_per_cooldown() {
        let t0 = Instant::now();
        let mut p = ReplayPace::new(t0);
        assert!(p.admit(7, t0));
        assert!(!p.admit(7, t0 + Duration::from_millis(1900)));
        assert!(p.admit(8, t0 + Duration::from_millis(1900)));
        assert!(p.admit(7, t0 + COOLDOWN));
    }

    #[test]
    fn paces_after_a_burst() {
        let t0 = Instant::now();
        let mut p = ReplayPace::new(t0);
        for _ in 0..BURST as usize {
            assert!(p.take(t0).is_ok());
        }
        let next = p.take(t0).unwrap_err();
        assert_eq!(next, t0 + Duration::from_secs_f64(1.0 / RATE));
        // One second later, RATE more.
        let t1 = t0 + Duration::from_secs(1);
        let sent = (0..10_000).take_while(|_| p.take(t1).is_ok()).count();
        assert_eq!(sent, RATE as usize);
    }

    #[test]
    fn the_memory_stays_bounded() {
        let t0 = Instant::now();
        let mut p = ReplayPace::new(t0);
        for seq in 0..5_000 {
            p.admit(seq, t0 + Duration::from_millis(seq));
        }
        assert!(p.queued_at.len() <= 1024 + 2_001, "{}", p.queued_at.len());
    }
}
