//! Where the servers and the load tool run: spread over every core (each server free to use all
//! of them, beside the load tool), or on equal CPU (each server pinned to core 0 alone, the load
//! tool to the other cores).
//!
//! Equal CPU is the fair comparison: Mosquitto is single-threaded, while k3sense spreads over
//! threads and, as two processes, over both cores of the benchmark machine, which flatters its
//! ratios. Pinned to one core, both servers get the same CPU, and neither competes with the
//! clients for it. Pinning uses `taskset` (util-linux), which sets the affinity and then execs
//! the server, so the pid sampled is the server's own.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The core both servers get on equal CPU.
pub const SERVER_CORE: usize = 0;

/// How servers and load share the machine's cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Both servers on core 0 (`k3sense all`, one process), the load tool on the others.
    EqualCpu,
    /// Servers unpinned (`k3sense broker` + `k3sense gateway`), beside the load tool.
    Spread,
}

impl Placement {
    /// The program and arguments that start `bin args…` placed as this placement says.
    pub fn command(self, bin: &str, args: &[String]) -> (String, Vec<String>) {
        match self {
            Self::Spread => (bin.to_owned(), args.to_vec()),
            Self::EqualCpu => {
                let mut all = vec!["-c".to_owned(), SERVER_CORE.to_string(), bin.to_owned()];
                all.extend_from_slice(args);
                ("taskset".to_owned(), all)
            }
        }
    }

    /// Moves every thread of this process (the load tool) where this placement wants the load:
    /// off the server's core on equal CPU, onto every core otherwise. Threads started later
    /// inherit it, and so do servers started unpinned.
    pub fn place_load_tool(self) -> Result<()> {
        let cores = cores();
        let list = match self {
            Self::EqualCpu if cores < 2 => {
                bail!("equal CPU needs at least 2 cores (one for the servers, one for the load)")
            }
            Self::EqualCpu => format!("{}-{}", SERVER_CORE + 1, cores - 1),
            Self::Spread => format!("0-{}", cores.saturating_sub(1)),
        };
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &list, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .context("run taskset (util-linux) to place the load tool")?;
        if !status.success() {
            bail!("taskset -a -p -c {list} failed: {status}");
        }
        Ok(())
    }

    /// A short name for headings and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::EqualCpu => "equal CPU",
            Self::Spread => "spread",
        }
    }
}

/// Cores of the machine (not of this process's current affinity, which this module changes).
pub fn cores() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| online_count(s.trim()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Counts the CPUs of a kernel CPU list such as `0-3,6` (the format of
/// `/sys/devices/system/cpu/online`, Documentation/ABI/testing/sysfs-devices-system-cpu).
fn online_count(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                count += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                count += 1;
            }
        }
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_kernel_cpu_lists() {
        assert_eq!(online_count("0-1"), Some(2));
        assert_eq!(online_count("0"), Some(1));
        assert_eq!(online_count("0-3,6,8-9"), Some(7));
        assert_eq!(online_count("x"), None);
        assert_eq!(online_count("3-1"), None);
    }

    #[test]
    fn pins_only_on_equal_cpu() {
        let args = vec!["all".to_owned()];
        assert_eq!(
            Placement::Spread.command("k3sense", &args),
            ("k3sense".to_owned(), args.clone())
        );
        let (program, pinned) = Placement::EqualCpu.command("k3sense", &args);
        assert_eq!(program, "taskset");
        assert_eq!(pinned, ["-c", "0", "k3sense", "all"]);
    }
}
