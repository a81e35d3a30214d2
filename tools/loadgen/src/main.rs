//! `loadgen`: the load tool of k3sense, and the benchmark that puts k3sense beside Mosquitto.
//!
//! - `loadgen measure` opens N WebSocket clients to a running server (k3sense's `/ws`, or
//!   MQTT over WebSocket for Mosquitto), publishes M readings over MQTT at a set rate once all
//!   are subscribed, and prints per-client latency, the time until the last client had each
//!   reading, and the server's CPU and memory (from /proc, `--pid`) before and after.
//! - `loadgen bench` starts the servers itself (fresh processes for every measurement), on equal
//!   CPU (both pinned to core 0, the load elsewhere) and spread (unpinned), and writes the
//!   markdown report of BENCHMARKS.md; `bench/run.sh` builds and calls it.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `clients` | one simulated browser: connect, subscribe, record arrivals (both dialects) |
//! | `measure` | one measurement: publisher, N clients, samples, latencies |
//! | `stats` | percentiles and per-reading "last client" times (pure) |
//! | `process_stats` | CPU time and RSS from /proc |
//! | `placement` | equal CPU (servers pinned to core 0, load elsewhere) or spread |
//! | `servers` | starting k3sense and Mosquitto on free loopback ports |
//! | `bench` | the whole benchmark and its report |

mod bench;
mod clients;
mod measure;
mod placement;
mod process_stats;
mod servers;
mod stats;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::{
    bench::Size,
    clients::Protocol,
    measure::{Load, Target},
    placement::Placement,
    servers::Binaries,
};

/// Load tool and benchmark for k3sense.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one running server.
    Measure {
        /// Which WebSocket dialect the server speaks.
        #[arg(long, value_enum, default_value = "k3sense")]
        protocol: Protocol,
        /// The WebSocket address (host:port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        ws: SocketAddr,
        /// The WebSocket path (`/` for Mosquitto).
        #[arg(long, default_value = "/ws")]
        path: String,
        /// The MQTT broker the readings are published to.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: String,
        /// Server processes to sample (repeat for several: gateway and broker).
        #[arg(long)]
        pid: Vec<u32>,
        /// WebSocket clients.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Readings to publish.
        #[arg(long, default_value_t = 100)]
        readings: u64,
        /// Readings per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Clients connecting at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Also print, for each reading, when the last client had it.
        #[arg(long)]
        per_reading: bool,
    },
    /// Run the whole benchmark, k3sense beside Mosquitto, and print the markdown report.
    Bench {
        /// How big a run: full (~6 min), quick (~2 min), smoke (seconds, for CI).
        #[arg(long, value_enum, default_value = "full")]
        size: Size,
        /// The k3sense binary (build it with --release).
        #[arg(long, default_value = "target/release/k3sense")]
        k3sense: PathBuf,
        /// The Mosquitto binary.
        #[arg(long, default_value = "/usr/sbin/mosquitto")]
        mosquitto: PathBuf,
        /// Where logs and Mosquitto's config go.
        #[arg(long, default_value = "target/bench")]
        work_dir: PathBuf,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The command line to quote in the report.
        #[arg(long, default_value = "bench/run.sh")]
        command: String,
        /// The source revision measured, to quote in the report.
        #[arg(long, default_value = "unknown")]
        revision: String,
        /// Only equal CPU: both servers pinned to core 0 (`k3sense all` vs Mosquitto), the load
        /// on the other cores. Without either flag, equal CPU runs first, then spread.
        #[arg(long, conflicts_with = "spread")]
        equal_cpu: bool,
        /// Only spread: servers unpinned beside the load (`k3sense broker` + `gateway`).
        #[arg(long)]
        spread: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // 10,000 clients need 10,000 descriptors here, and as many in the servers this starts.
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raise RLIMIT_NOFILE")?;
    match cli.command {
        Command::Measure {
            protocol,
            ws,
            path,
            mqtt,
            pid,
            clients,
            readings,
            rate,
            concurrency,
            per_reading,
        } => {
            warn_if_short(limit, clients);
            let target = Target {
                protocol,
                ws,
                path,
                mqtt,
                pids: pid,
            };
            let load = Load {
                clients,
                readings,
                rate,
                concurrency,
            };
            let m = measure::measure(&target, load).await?;
            let (l, ms) = (&m.latencies, |d: std::time::Duration| {
                d.as_secs_f64() * 1000.0
            });
            println!(
                "clients {}/{}  connect {:.1} ms  lost {}",
                m.connected,
                clients,
                ms(m.connect_time),
                l.lost
            );
            for (name, s) in [("all clients", l.all_clients), ("one client", l.per_client)] {
                println!(
                    "{name:<12} p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({} samples)",
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max),
                    s.count
                );
            }
            if !target.pids.is_empty() {
                println!(
                    "server: RSS {} → {} → {} KiB ({:.2} KiB per client); CPU connect {:.0} ms, readings {:.0} ms",
                    m.idle.rss_kib,
                    m.loaded.rss_kib,
                    m.done.rss_kib,
                    m.kib_per_client(),
                    ms((m.loaded - m.idle).cpu),
                    ms((m.done - m.loaded).cpu)
                );
            }
            for e in &m.errors {
                println!("client error: {e}");
            }
            if per_reading {
                for (i, last) in l.per_reading.iter().enumerate() {
                    let shown =
                        last.map_or("not everyone".to_owned(), |d| format!("{:.3} ms", ms(d)));
                    println!("seq {:>4}: {shown}", i + 1);
                }
            }
        }
        Command::Bench {
            size,
            k3sense,
            mosquitto,
            work_dir,
            out,
            command,
            revision,
            equal_cpu,
            spread,
        } => {
            warn_if_short(limit, 10_000);
            let placements = match (equal_cpu, spread) {
                (true, _) => vec![Placement::EqualCpu],
                (false, true) => vec![Placement::Spread],
                (false, false) => vec![Placement::EqualCpu, Placement::Spread],
            };
            let bins = Binaries {
                k3sense,
                mosquitto,
                work_dir,
            };
            let report = bench::run(size, &placements, &bins, &command, &revision).await?;
            println!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)
                    .with_context(|| format!("write {}", path.display()))?;
                eprintln!("report written to {}", path.display());
            }
        }
    }
    Ok(())
}

fn warn_if_short(limit: u64, clients: usize) {
    if limit < clients as u64 + 100 {
        eprintln!(
            "warning: only {limit} file descriptors allowed (hard limit); raise it (ulimit -Hn) for {clients} clients"
        );
    }
}
