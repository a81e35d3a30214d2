//! Sockets that have not logged in yet: bounded per source address and in total, oldest out.
//!
//! Anyone can open a TCP socket and say nothing. Before this pool such sockets counted against
//! the cap on open sockets, so 2,500 of them (issue 14) had every legitimate CONNECT closed at
//! accept for seconds at a time. Now a socket is *pending* from accept until its CONNECT has
//! been read and its login accepted (TLS handshake, CONNECT, a failed login's delay), and the
//! pending ones live in a pool of their own: `--max-pending` in all (4096), and at most
//! `--max-pending-per-source` from one address. A new socket never waits and is never refused
//! for the pool's sake: when the pool is full, the *oldest* pending socket of the address
//! holding the most is closed to make room (when an address has its full share, its own
//! oldest). A real client sends its CONNECT within a round trip of connecting, so it is in long
//! before it could become the oldest; a silent socket only ever makes room for the next one.
//! That holds even when the flood comes from the same address as the real client (one NAT, or
//! loopback in the tests), which a per-address limit alone would lock out.
//!
//! The per-address share defaults to the whole pool: a share smaller than a flood makes the
//! flooder's sockets churn (each one closed is reopened at once: measured, ~2,000 a second on
//! loopback), which costs CPU and fills the kernel's accept queue, while a pool that holds the
//! flood lets it sit until `--connect-timeout`. Fairness between addresses comes from closing
//! the biggest address's sockets first. A pending socket costs ~4–7 KiB (measured: 2,500 of them
//! added ~14 MiB to the broker process in a debug build).
//!
//! An IPv6 source is its /64 (one host's usual share), an IPv4 source its address.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

use crate::{Metrics, metrics::Reason};

/// Where a connection comes from, for per-source limits: the IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(u128);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(u128::from(u32::from(v4))),
                None => Self((u128::from(v6) >> 64 << 64) | (1 << 32)),
            },
        }
    }
}

/// The pool of pending sockets.
#[derive(Debug)]
pub(crate) struct PendingPool {
    inner: Mutex<Pool>,
    max_total: usize,
    max_per_source: usize,
    /// The `pending_connections` gauge and the `pending_evicted` count live here.
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Pool {
    next: u64,
    /// Oldest first: each pending socket's source and the token that closes it.
    by_age: BTreeMap<u64, (Source, CancellationToken)>,
    by_source: HashMap<Source, BTreeSet<u64>>,
}

impl Pool {
    fn remove(&mut self, id: u64) -> Option<CancellationToken> {
        let (source, token) = self.by_age.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(token)
    }
}

/// One pending socket's place in the pool; dropping it (the login went through, or the socket
/// closed) frees the place.
pub(crate) struct Pending {
    pool: Arc<PendingPool>,
    id: u64,
    /// Cancelled when the pool closes this socket to make room for a newer one.
    pub(crate) evicted: CancellationToken,
}

impl PendingPool {
    pub(crate) fn new(max_total: usize, max_per_source: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Pool::default()),
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            metrics,
        }
    }

    /// Admits a new socket from `source`, closing the oldest pending one of the same source (if
    /// it has its full share) or, if the pool is full, of the address holding the most. Returns the new socket's place and
    /// how many older sockets it pushed out.
    pub(crate) fn admit(self: &Arc<Self>, source: Source) -> (Pending, usize) {
        let evicted = CancellationToken::new();
        let mut pushed_out = 0;
        let Ok(mut pool) = self.inner.lock() else {
            // A poisoned lock only follows a panic elsewhere; serve without the pool.
            return (
                Pending {
                    pool: self.clone(),
                    id: u64::MAX,
                    evicted,
                },
                0,
            );
        };
        let oldest_of_source = pool
            .by_source
            .get(&source)
            .filter(|ids| ids.len() >= self.max_per_source)
            .and_then(|ids| ids.first().copied());
        if let Some(id) = oldest_of_source {
            if let Some(token) = pool.remove(id) {
                token.cancel();
                pushed_out += 1;
            }
        }
        while pool.by_age.len() >= self.max_total {
            // The oldest socket of the address holding the most: a flood from one address
            // pushes out its own sockets, not everyone's.
            let Some(id) = pool
                .by_source
                .values()
                .max_by_key(|ids| ids.len())
                .and_then(|ids| ids.first().copied())
            else {
                break;
            };
            if let Some(token) = pool.remove(id) {
                token.cancel();
                pushed_out += 1;
            }
        }
        pool.next += 1;
        let id = pool.next;
        pool.by_age.insert(id, (source, evicted.clone()));
        pool.by_source.entry(source).or_default().insert(id);
        for _ in 0..pushed_out {
            self.metrics.refused(Reason::PendingEvicted);
        }
        self.metrics.pending(pool.by_age.len());
        (
            Pending {
                pool: self.clone(),
                id,
                evicted,
            },
            pushed_out,
        )
    }

    /// Sockets pending right now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map_or(0, |p| p.by_age.len())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.pool.inner.lock() {
            pool.remove(self.id);
            self.pool.metrics.pending(pool.by_age.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_full_source_share_pushes_out_its_own_oldest() {
        let pool = Arc::new(PendingPool::new(100, 2, Arc::default()));
        let (a1, _) = pool.admit(src(1));
        let (b1, _) = pool.admit(src(2));
        let (a2, _) = pool.admit(src(1));
        let (a3, pushed) = pool.admit(src(1));
        assert_eq!(pushed, 1);
        assert!(a1.evicted.is_cancelled(), "the oldest of that source");
        assert!(!b1.evicted.is_cancelled() && !a2.evicted.is_cancelled());
        assert!(!a3.evicted.is_cancelled());
        assert_eq!(pool.len(), 3);
        drop(a1);
        assert_eq!(pool.len(), 3, "an evicted place was already freed");
        drop((a2, a3));
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn a_full_pool_pushes_out_the_oldest_of_the_biggest_source() {
        let pool = Arc::new(PendingPool::new(4, 4, Arc::default()));
        let held: Vec<_> = [1, 2, 2, 3].map(|s| pool.admit(src(s)).0).into();
        let (newest, pushed) = pool.admit(src(4));
        assert_eq!(pushed, 1);
        assert!(held[1].evicted.is_cancelled(), "source 2's oldest");
        assert!(!held[0].evicted.is_cancelled() && !newest.evicted.is_cancelled());
        let pool = Arc::new(PendingPool::new(3, 3, Arc::default()));
        let held: Vec<_> = [1, 2, 3].map(|s| pool.admit(src(s)).0).into();
        let (newest, pushed) = pool.admit(src(4));
        assert_eq!(pushed, 1);
        let evicted = held.iter().filter(|p| p.evicted.is_cancelled()).count();
        assert_eq!(evicted, 1, "all equal: the oldest of one of them");
        // Logged-in sockets leave the pool and are never pushed out; a new flood from one
        // address pushes out its own.
        drop(held);
        let more: Vec<_> = (0..3).map(|_| pool.admit(src(5)).0).collect();
        assert!(!newest.evicted.is_cancelled());
        assert!(more[0].evicted.is_cancelled());
        assert!(!more[1].evicted.is_cancelled() && !more[2].evicted.is_cancelled());
    }

    #[test]
    fn an_ipv6_source_is_its_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped), src(1));
    }
}
