//! One log line per kind of trouble per interval, with how many were left out since.
//!
//! A misbehaving client, or a flood of them, must not be able to fill the log (on a Pi, the SD
//! card), yet the first occurrence of each kind must show at once and the count of the rest must
//! not be lost. Every component logs such trouble through this one type: the gateway's MQTT
//! complaints and its connection troubles, and whatever else needs it.
//!
//! It only decides; the caller writes the line, so the line keeps the caller's target, level and
//! structured fields (a `RUST_LOG` filter on `k3sense_gateway` still finds it).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Lets one line per kind through per interval and counts the ones left out. Shared by
/// reference between tasks (`&self`); kinds are `&'static str`, so the set of kinds is fixed by
/// the code and a hostile peer cannot grow it.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    kinds: Mutex<HashMap<&'static str, Window>>,
}

/// The current interval of one kind.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// When the last line of this kind was let through.
    since: Instant,
    /// Lines of this kind refused since then.
    left_out: u64,
}

impl LogThrottle {
    /// The interval every component uses: at most six lines a minute per kind.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// A throttle letting one line per kind through every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(lines of this kind left out since the last one)` when a line of `kind` may be
    /// logged now; `None` when it must not (it is counted for the next one).
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        self.allow_at(kind, Instant::now())
    }

    /// [`allow`](Self::allow) at a given time (for tests, and callers that have the time).
    pub fn allow_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        // A panic elsewhere while holding the lock leaves the map consistent: keep using it.
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        match kinds.get_mut(kind) {
            Some(window) if now.saturating_duration_since(window.since) < self.interval => {
                window.left_out += 1;
                None
            }
            Some(window) => {
                let left_out = window.left_out;
                *window = Window {
                    since: now,
                    left_out: 0,
                };
                Some(left_out)
            }
            None => {
                kinds.insert(
                    kind,
                    Window {
                        since: now,
                        left_out: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

impl Default for LogThrottle {
    /// A throttle with [`LogThrottle::INTERVAL`].
    fn default() -> Self {
        Self::new(Self::INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_and_the_count_of_the_rest() {
        let throttle = LogThrottle::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(throttle.allow_at("slow", at(0)), Some(0));
        assert_eq!(throttle.allow_at("slow", at(1)), None);
        assert_eq!(throttle.allow_at("slow", at(9)), None);
        // Another kind has its own interval.
        assert_eq!(throttle.allow_at("flood", at(9)), Some(0));
        // The next interval begins 10 s after the line let through, and says what was left out.
        assert_eq!(throttle.allow_at("slow", at(10)), Some(2));
        assert_eq!(throttle.allow_at("slow", at(11)), None);
        assert_eq!(throttle.allow_at("slow", at(25)), Some(1));
        assert_eq!(throttle.allow_at("slow", at(40)), Some(0));
        assert_eq!(throttle.allow_at("flood", at(10)), None);
    }

    #[test]
    fn a_clock_going_backwards_lets_nothing_extra_through() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(throttle.allow_at("k", t0), Some(0));
        assert_eq!(
            throttle.allow_at("k", t0.checked_sub(Duration::from_secs(50)).unwrap()),
            None
        );
    }

    #[test]
    fn shared_between_threads_the_count_is_exact() {
        let throttle = LogThrottle::default();
        let allowed: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..250)
                            .filter(|_| throttle.allow("busy").is_some())
                            .count() as u64
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        // 1,000 calls well within 10 s: exactly one let through, 999 counted for the next.
        assert_eq!(allowed, 1);
        let later = Instant::now() + LogThrottle::INTERVAL;
        assert_eq!(throttle.allow_at("busy", later), Some(999));
    }
}
