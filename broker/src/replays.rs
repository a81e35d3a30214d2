//! Replay requests (`<prefix>/<id>/replay/request`), rate-limited per requester.
//!
//! One small request makes a publisher send back every reading it keeps for the asked range
//! (issue 14, row 5: ~260 readings per 15-byte request, 20 requests a second from one gateway).
//! The publisher coalesces and paces its answers per sensor (publisher/src/replaypace.rs), but MQTT
//! does not tell it who asked; the broker knows the connection and the account, so it limits
//! those here: a request over either rate is dropped and acknowledged like any refused publish,
//! and counted (`publishes_total{outcome="rate_limited"}`).
//!
//! A gateway asks once per hole in a sensor's history, again at most every 3 s and three times
//! (gateway/src/mqtt.rs, `HOLE_CHECK`), and once per sensor after a reconnect: the bursts below
//! let a gateway with 10 sensors ask for all of them at once; two gateway replicas share an
//! account.

use std::{collections::HashMap, sync::Mutex};

use tokio::time::Instant;

/// A token bucket's rate: `burst` requests at once, then `per_second`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    pub(crate) per_second: f64,
    pub(crate) burst: f64,
}

/// Per connection: 10 at once, then 2 a second.
pub(crate) const PER_CONNECTION: Rate = Rate {
    per_second: 2.0,
    burst: 10.0,
};
/// Per account (all its connections together): 20 at once, then 4 a second.
pub(crate) const PER_ACCOUNT: Rate = Rate {
    per_second: 4.0,
    burst: 20.0,
};

/// One requester's allowance.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub(crate) fn new(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    /// Takes one request's token if there is one.
    pub(crate) fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The accounts' buckets. Keyed by authenticated usernames (or "" without a users file), so it
/// holds at most one entry per account in the users file.
#[derive(Debug, Default)]
pub(crate) struct AccountBuckets(Mutex<HashMap<String, Bucket>>);

impl AccountBuckets {
    /// Takes a token from `account`'s bucket.
    pub(crate) fn take(&self, account: &str, now: Instant) -> bool {
        let Ok(mut buckets) = self.0.lock() else {
            return true;
        };
        if let Some(bucket) = buckets.get_mut(account) {
            return bucket.take(PER_ACCOUNT, now);
        }
        let mut bucket = Bucket::new(PER_ACCOUNT, now);
        let taken = bucket.take(PER_ACCOUNT, now);
        buckets.insert(account.to_owned(), bucket);
        taken
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(PER_CONNECTION, start);
        // 20 a second for 20 s, the flood of issue 14.
        let mut allowed = 0;
        for i in 0..400u64 {
            if bucket.take(PER_CONNECTION, start + Duration::from_millis(i * 50)) {
                allowed += 1;
            }
        }
        // 10 at once, then 2 a second over the 19.95 s.
        assert_eq!(allowed, 10 + 39);
        // After a quiet spell the burst is back, and no more than it.
        let later = start + Duration::from_secs(60);
        let burst = (0..20)
            .filter(|_| bucket.take(PER_CONNECTION, later))
            .count();
        assert_eq!(burst, 10);
    }

    #[test]
    fn accounts_have_their_own_buckets() {
        let accounts = AccountBuckets::default();
        let now = Instant::now();
        let gateway = (0..30).filter(|_| accounts.take("gateway", now)).count();
        assert_eq!(gateway, 20);
        assert!(accounts.take("admin", now));
        assert!(!accounts.take("gateway", now));
        assert!(accounts.take("gateway", now + Duration::from_millis(250)));
    }
}
