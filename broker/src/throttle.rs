//! Failed logins, slowed per source address and per account.
//!
//! Unthrottled, one loopback client tried 3,183 `admin` passwords a second (issue 14). Now:
//!
//! - **per source**: once an address has failed, its next login is *checked* no earlier than a
//!   delay after its previous one, the delay doubling with each failure (50 ms, 100 ms, … capped
//!   at [`MAX_DELAY`]). Parallel sockets from that address queue behind each other, so they
//!   guess no faster than one socket would; a login whose turn would come after its CONNECT
//!   deadline is answered CONNACK 3 (server unavailable) at once, unchecked.
//! - **per account**: a wrong password for an existing account is *answered* (CONNACK 4) only
//!   after the account's delay, doubling the same way, so a guesser spread over many addresses
//!   waits too. The right password is never held back by the account's failures: an attacker
//!   must not be able to lock the real `admin` out from elsewhere.
//!
//! A success from an address forgives it; an account is forgiven by a successful login. Entries
//! are forgotten [`FORGET`] after their last failure, and at most [`MAX_SOURCES`] addresses are
//! tracked (the stalest go first).
//!
//! What it cannot do: a guesser with many addresses and many parallel sockets is held back per
//! address only (and by `--max-pending`, which closes the oldest unanswered sockets); its guesses
//! cost it a wait each, not the defender a lock-out. Passwords from `deploy/gen-secrets.sh` are
//! 32 random hex digits, far beyond any such rate.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::pending::Source;

/// The first failure's delay; each further one doubles it.
pub(crate) const BASE_DELAY: Duration = Duration::from_millis(50);
/// The longest delay.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(2);
/// A source or account without a failure for this long starts afresh.
pub(crate) const FORGET: Duration = Duration::from_secs(600);
/// Most addresses tracked at once.
pub(crate) const MAX_SOURCES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last_failure: Instant,
    /// When the next login from this source may be checked.
    next_check: Instant,
}

impl Record {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            last_failure: now,
            next_check: now,
        }
    }

    fn stale(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_failure) >= FORGET
    }
}

/// The delay after `failures` failures: 0, then 50 ms doubling up to [`MAX_DELAY`].
pub(crate) fn delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    BASE_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

/// What a login must do before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Check it at this instant (now, for an address without failures).
    At(Instant),
    /// Its turn would come after its CONNECT deadline: refuse it unchecked.
    TooLate,
}

/// Failures by source and by account.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sources: HashMap<Source, Record>,
    accounts: HashMap<String, Record>,
}

impl Throttle {
    /// When a login from `source` may be checked, given its CONNECT `deadline`; reserves that
    /// turn so the next login from the same address queues behind it.
    pub(crate) fn turn(&self, source: Source, now: Instant, deadline: Instant) -> Turn {
        let Ok(mut inner) = self.inner.lock() else {
            return Turn::At(now);
        };
        let Some(record) = inner.sources.get_mut(&source) else {
            return Turn::At(now);
        };
        if record.stale(now) {
            inner.sources.remove(&source);
            return Turn::At(now);
        }
        let at = record.next_check.max(now);
        if at > deadline {
            return Turn::TooLate;
        }
        record.next_check = at + delay(record.failures);
        Turn::At(at)
    }

    /// Records a wrong password from `source` (for `account`, if it exists); returns how long to
    /// wait before answering it.
    pub(crate) fn failed(&self, source: Source, account: Option<&str>, now: Instant) -> Duration {
        let Ok(mut inner) = self.inner.lock() else {
            return MAX_DELAY;
        };
        if !inner.sources.contains_key(&source) && inner.sources.len() >= MAX_SOURCES {
            inner.sources.retain(|_, r| !r.stale(now));
            if inner.sources.len() >= MAX_SOURCES {
                // Make room by forgetting the address that failed longest ago.
                if let Some(stalest) = inner
                    .sources
                    .iter()
                    .min_by_key(|(_, r)| r.last_failure)
                    .map(|(s, _)| *s)
                {
                    inner.sources.remove(&stalest);
                }
            }
        }
        let bump = |record: &mut Record| {
            if record.stale(now) {
                *record = Record::new(now);
            }
            record.failures = record.failures.saturating_add(1);
            record.last_failure = now;
            record.failures
        };
        let source_failures = bump(inner.sources.entry(source).or_insert(Record::new(now)));
        let account_failures = match account {
            Some(name) => bump(
                inner
                    .accounts
                    .entry(name.to_owned())
                    .or_insert(Record::new(now)),
            ),
            None => 0,
        };
        delay(source_failures.max(account_failures))
    }

    /// A login from `source` to `account` went through: both are forgiven.
    pub(crate) fn succeeded(&self, source: Source, account: Option<&str>) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.sources.remove(&source);
            if let Some(name) = account {
                inner.accounts.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn src(last: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn delays_double_from_50_ms_to_2_s() {
        let ms = |n| delay(n).as_millis();
        assert_eq!(
            (0..9).map(ms).collect::<Vec<_>>(),
            [0, 50, 100, 200, 400, 800, 1600, 2000, 2000]
        );
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_source_queues_its_logins_and_others_are_untouched() {
        let t = Throttle::default();
        let now = Instant::now();
        let deadline = now + Duration::from_secs(5);
        assert_eq!(t.turn(src(1), now, deadline), Turn::At(now));
        for _ in 0..7 {
            t.failed(src(1), Some("admin"), now);
        }
        // Three parallel logins from the failing address: one now, then 2 s apart.
        assert_eq!(t.turn(src(1), now, deadline), Turn::At(now));
        assert_eq!(
            t.turn(src(1), now, deadline),
            Turn::At(now + Duration::from_secs(2))
        );
        assert_eq!(
            t.turn(src(1), now, deadline),
            Turn::At(now + Duration::from_secs(4))
        );
        assert_eq!(t.turn(src(1), now, deadline), Turn::TooLate);
        // Another address is checked at once, even for the same account.
        assert_eq!(t.turn(src(2), now, deadline), Turn::At(now));
        // Its wrong password is answered after the account's delay.
        assert_eq!(t.failed(src(2), Some("admin"), now), MAX_DELAY);
        assert_eq!(
            t.failed(src(3), Some("reader"), now),
            BASE_DELAY,
            "a first failure, on an account without failures"
        );
        // A success forgives the address and the account.
        t.succeeded(src(2), Some("admin"));
        assert_eq!(t.turn(src(2), now, deadline), Turn::At(now));
        assert_eq!(t.failed(src(4), Some("admin"), now), BASE_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_forgotten_and_the_table_stays_bounded() {
        let t = Throttle::default();
        let now = Instant::now();
        for _ in 0..5 {
            t.failed(src(1), None, now);
        }
        let later = now + FORGET;
        assert_eq!(
            t.turn(src(1), later, later + Duration::from_secs(5)),
            Turn::At(later)
        );
        assert_eq!(t.failed(src(1), None, later), BASE_DELAY);
        for i in 0..(MAX_SOURCES as u32 + 10) {
            t.failed(Source::of(IpAddr::from(i.to_be_bytes())), None, later);
        }
        assert!(t.inner.lock().unwrap().sources.len() <= MAX_SOURCES);
    }
}
