//! Latency arithmetic, free of I/O: arrival times in, percentiles out.

use std::time::Duration;

/// p50, p99 and max of a set of durations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Median.
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
    /// How many samples.
    pub count: usize,
}

impl Summary {
    /// Summarises `samples` (sorted in place); all zero when empty.
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        Self {
            p50: nearest_rank(samples, 50),
            p99: nearest_rank(samples, 99),
            max: samples[samples.len() - 1],
            count: samples.len(),
        }
    }
}

/// The nearest-rank percentile of sorted, non-empty `sorted`.
fn nearest_rank(sorted: &[Duration], percent: usize) -> Duration {
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Latencies of one run: each client's latency for each reading, and for each reading the time
/// until the last client had it.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Over every (client, reading) pair that arrived.
    pub per_client: Summary,
    /// Over every reading that reached every client.
    pub all_clients: Summary,
    /// (client, reading) pairs that never arrived.
    pub lost: usize,
    /// For each reading (seq 1, 2, …), when the last client had it; `None` if some never did.
    pub per_reading: Vec<Option<Duration>>,
}

/// Computes [`Latencies`] from when each reading was sent (`sent[i]` for seq `i + 1`, `None` if
/// it was never sent) and when each client received it (`(seq, at)` pairs, any order). Times
/// are offsets from one common start. Arrivals of unknown seqs are ignored.
pub fn latencies(sent: &[Option<Duration>], arrivals: &[Vec<(u64, Duration)>]) -> Latencies {
    let mut per_client = Vec::with_capacity(arrivals.len() * sent.len());
    let mut last = vec![None::<Duration>; sent.len()];
    let mut reached = vec![0usize; sent.len()];
    for client in arrivals {
        for &(seq, at) in client {
            let Some(index) = usize::try_from(seq).ok().and_then(|s| s.checked_sub(1)) else {
                continue;
            };
            let Some(Some(sent_at)) = sent.get(index) else {
                continue;
            };
            let latency = at.saturating_sub(*sent_at);
            per_client.push(latency);
            reached[index] += 1;
            last[index] = Some(last[index].map_or(latency, |l| l.max(latency)));
        }
    }
    let expected = arrivals.len() * sent.iter().filter(|s| s.is_some()).count();
    let per_reading: Vec<Option<Duration>> = last
        .iter()
        .zip(&reached)
        .map(|(l, n)| l.filter(|_| *n == arrivals.len()))
        .collect();
    let mut all_clients: Vec<Duration> = per_reading.iter().flatten().copied().collect();
    Latencies {
        per_reading,
        lost: expected.saturating_sub(per_client.len()),
        per_client: Summary::of(&mut per_client),
        all_clients: Summary::of(&mut all_clients),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let s = Summary::of(&mut v);
        assert_eq!(
            (s.p50, s.p99, s.max, s.count),
            (ms(50), ms(99), ms(100), 100)
        );
        let s = Summary::of(&mut [ms(7)]);
        assert_eq!((s.p50, s.p99, s.max), (ms(7), ms(7), ms(7)));
        assert_eq!(Summary::of(&mut []), Summary::default());
    }

    #[test]
    fn last_client_per_reading_and_losses() {
        // Two readings sent at 0 and 100 ms; client A gets both, client B only the first.
        let sent = [Some(ms(0)), Some(ms(100))];
        let arrivals = vec![
            vec![(1, ms(2)), (2, ms(103))],
            vec![(1, ms(5)), (9, ms(1))], // seq 9 was never sent: ignored
        ];
        let l = latencies(&sent, &arrivals);
        assert_eq!(l.lost, 1);
        assert_eq!(l.per_client.count, 3);
        assert_eq!(l.per_client.max, ms(5));
        // Only reading 1 reached everyone; its last client had it after 5 ms.
        assert_eq!(l.all_clients.count, 1);
        assert_eq!(l.all_clients.p50, ms(5));
        assert_eq!(l.per_reading, vec![Some(ms(5)), None]);
    }
}
