//! A server process's CPU time and memory, read from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::{ops::Sub, time::Duration};

use anyhow::{Context, Result};

/// Linux reports CPU times in `/proc` in USER_HZ ticks, which is 100 per second on every
/// architecture k3sense runs on (x86_64, arm64, armv7).
const TICK: Duration = Duration::from_millis(10);

/// One sample of one or more processes (summed).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Resident set size, in KiB.
    pub rss_kib: u64,
}

impl Sample {
    /// Sums the samples of `pids`.
    pub fn of(pids: &[u32]) -> Result<Self> {
        let mut total = Self::default();
        for &pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| {
                format!("cannot read /proc/{pid}/stat: is process {pid} alive?")
            })?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("cannot read /proc/{pid}/status"))?;
            total.cpu += cpu_time(&stat).with_context(|| format!("/proc/{pid}/stat"))?;
            total.rss_kib += rss_kib(&status).with_context(|| format!("/proc/{pid}/status"))?;
        }
        Ok(total)
    }
}

impl Sub for Sample {
    type Output = Self;

    /// The change from `other` to `self` (RSS saturates at 0 when memory shrank).
    fn sub(self, other: Self) -> Self {
        Self {
            cpu: self.cpu.saturating_sub(other.cpu),
            rss_kib: self.rss_kib.saturating_sub(other.rss_kib),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from the last `)`.
fn cpu_time(stat: &str) -> Result<Duration> {
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no command name")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field n is `fields[n - 3]`.
    let ticks = |n: usize| -> Result<u32> {
        fields
            .get(n - 3)
            .context("too few fields")?
            .parse::<u32>()
            .context("not a number")
    };
    Ok(TICK * (ticks(14)? + ticks(15)?))
}

/// `VmRSS:` of a `/proc/<pid>/status`, in KiB.
fn rss_kib(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line (a zombie?)")?;
    let number = line.trim().trim_end_matches("kB").trim();
    number.parse().context("VmRSS is not a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_tricky_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 3 0 99 1000 200";
        assert_eq!(cpu_time(stat).unwrap(), Duration::from_millis(2870));
        assert!(cpu_time("42 (x) S 1").is_err());
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tk3sense\nVmPeak:\t  9000 kB\nVmRSS:\t    5312 kB\nThreads:\t3\n";
        assert_eq!(rss_kib(status).unwrap(), 5312);
        assert!(rss_kib("Name:\tx\n").is_err());
    }

    #[test]
    fn reads_this_process() {
        let s = Sample::of(&[std::process::id()]).unwrap();
        assert!(s.rss_kib > 0);
    }
}
