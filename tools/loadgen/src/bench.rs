//! `loadgen bench`: the whole benchmark in one go. For each client count, k3sense (`broker` +
//! `gateway`) and Mosquitto's WebSocket listener, each on fresh processes, in alternating order;
//! then the idle footprint of `k3sense all` and of the three separate processes. Writes one
//! markdown report.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use chrono::Utc;

use crate::{
    measure::{Load, Measurement, Target, measure},
    process_stats::Sample,
    servers::{Binaries, Servers},
};

/// Clients connecting at once.
const CONCURRENCY: usize = 64;

/// How big a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// N = 100, 1,000, 10,000 with enough readings for a p99; a minute of idle (~6 minutes).
    Full,
    /// The same client counts, fewer readings, 10 s idle (~2 minutes).
    Quick,
    /// N = 10, five readings, 1 s idle: checks that the benchmark still works (seconds).
    Smoke,
}

impl Size {
    fn loads(self) -> Vec<Load> {
        let load = |clients, readings, rate| Load {
            clients,
            readings,
            rate,
            concurrency: CONCURRENCY,
        };
        match self {
            Self::Full => vec![
                load(100, 200, 20.0),
                load(1_000, 100, 10.0),
                load(10_000, 60, 1.0),
            ],
            Self::Quick => vec![
                load(100, 50, 20.0),
                load(1_000, 30, 10.0),
                load(10_000, 10, 1.0),
            ],
            Self::Smoke => vec![load(10, 5, 20.0)],
        }
    }

    fn idle_window(self) -> Duration {
        match self {
            Self::Full => Duration::from_secs(60),
            Self::Quick => Duration::from_secs(10),
            Self::Smoke => Duration::from_secs(1),
        }
    }
}

/// Both servers under one load.
struct Pair {
    ours: Measurement,
    mosquitto: Measurement,
}

/// The idle footprint.
struct Idle {
    window: Duration,
    all_ready: Duration,
    gateway_ready: Duration,
    /// CPU over the window and RSS at its end: all, broker, publisher, gateway.
    samples: [(&'static str, Sample); 4],
}

/// Runs the benchmark and returns the report as markdown.
pub async fn run(size: Size, bins: &Binaries, command: &str, revision: &str) -> Result<String> {
    std::fs::create_dir_all(&bins.work_dir)
        .with_context(|| format!("create {}", bins.work_dir.display()))?;
    let load_before = load_average();
    let date = Utc::now();
    let mut pairs = Vec::new();
    for (i, load) in size.loads().into_iter().enumerate() {
        // Alternate who goes first, so neither always runs on a warmer (or busier) machine.
        let (ours, mosquitto) = if i % 2 == 0 {
            let ours = run_ours(bins, load).await?;
            (ours, run_mosquitto(bins, load).await?)
        } else {
            let mosquitto = run_mosquitto(bins, load).await?;
            (run_ours(bins, load).await?, mosquitto)
        };
        pairs.push(Pair { ours, mosquitto });
    }
    let idle = idle(bins, size.idle_window()).await?;
    let binary = std::fs::metadata(&bins.k3sense)
        .with_context(|| format!("size of {}", bins.k3sense.display()))?
        .len();
    let header = Header {
        date: date.format("%Y-%m-%d %H:%M UTC").to_string(),
        machine: machine(),
        load_before,
        load_after: load_average(),
        mosquitto: mosquitto_version(&bins.mosquitto).await,
        command: command.to_owned(),
        revision: revision.to_owned(),
    };
    Ok(render(&header, &pairs, &idle, binary))
}

async fn run_ours(bins: &Binaries, load: Load) -> Result<Measurement> {
    eprintln!("k3sense, {} clients", load.clients);
    let bins = bins.in_subdir(&format!("k3sense-{}", load.clients))?;
    let (servers, target) = retry(|| Servers::k3sense(&bins, load.clients)).await?;
    finish(servers, &target, load).await
}

async fn run_mosquitto(bins: &Binaries, load: Load) -> Result<Measurement> {
    eprintln!("mosquitto, {} clients", load.clients);
    let bins = bins.in_subdir(&format!("mosquitto-{}", load.clients))?;
    let (servers, target) = retry(|| Servers::mosquitto(&bins)).await?;
    finish(servers, &target, load).await
}

/// Starts servers, trying up to three times (on new ports): one failed start is not a result.
async fn retry<F: Future<Output = Result<(Servers, Target)>>>(
    start: impl Fn() -> F,
) -> Result<(Servers, Target)> {
    let mut attempt = 1;
    loop {
        match start().await {
            Ok(started) => return Ok(started),
            Err(e) if attempt < 3 => eprintln!("  could not start ({e:#}); trying again"),
            Err(e) => return Err(e),
        }
        attempt += 1;
    }
}

async fn finish(servers: Servers, target: &Target, load: Load) -> Result<Measurement> {
    let result = measure(target, load).await;
    servers.stop().await;
    let m = result?;
    eprintln!(
        "  all clients: p50 {:.2?} p99 {:.2?} max {:.2?}; lost {}",
        m.latencies.all_clients.p50,
        m.latencies.all_clients.p99,
        m.latencies.all_clients.max,
        m.latencies.lost
    );
    for e in &m.errors {
        eprintln!("  client error: {e}");
    }
    Ok(m)
}

async fn idle(bins: &Binaries, window: Duration) -> Result<Idle> {
    eprintln!("idle: k3sense all, and broker + publisher + gateway, for {window:?}");
    let bins = &bins.in_subdir("idle")?;
    let mut all = Servers::none();
    let all_ready = all.k3sense_all(bins).await?;
    let mut trio = Servers::none();
    let gateway_ready = trio.k3sense_trio(bins).await?;
    // Let start-up work (first readings, retained messages) settle before the window opens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names = ["all", "broker", "publisher", "gateway"];
    let pid = |name: &str| {
        if name == "all" {
            all.pid(name)
        } else {
            trio.pid(name)
        }
        .with_context(|| format!("{name} is not running"))
    };
    let mut before = Vec::new();
    for name in names {
        before.push(Sample::of(&[pid(name)?])?);
    }
    tokio::time::sleep(window).await;
    let mut samples = [("", Sample::default()); 4];
    for (i, name) in names.into_iter().enumerate() {
        let after = Sample::of(&[pid(name)?])?;
        samples[i] = (
            name,
            Sample {
                cpu: after.cpu.saturating_sub(before[i].cpu),
                rss_kib: after.rss_kib,
            },
        );
    }
    all.stop().await;
    trio.stop().await;
    Ok(Idle {
        window,
        all_ready,
        gateway_ready,
        samples,
    })
}

struct Header {
    date: String,
    machine: String,
    load_before: String,
    load_after: String,
    mosquitto: String,
    command: String,
    revision: String,
}

fn render(h: &Header, pairs: &[Pair], idle: &Idle, binary: u64) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Run of {}\n", h.date);
    let _ = writeln!(md, "- command: `{}` at revision {}", h.command, h.revision);
    let _ = writeln!(md, "- machine: {}", h.machine);
    let _ = writeln!(
        md,
        "- load average (1, 5, 15 min) before: {}; after: {}",
        h.load_before, h.load_after
    );
    let _ = writeln!(
        md,
        "- k3sense: `k3sense broker` + `k3sense gateway` (release); Mosquitto: {} with one MQTT and one WebSocket listener",
        h.mosquitto
    );
    let _ = writeln!(
        md,
        "- every column is fresh processes; {CONCURRENCY} clients connect at a time; once all are subscribed, readings are published over MQTT (QoS 1, retained) at the rate shown; \"all clients have it\" is, per reading, the time from publish until the last client had it\n"
    );
    let _ = writeln!(md, "### Fan-out\n");
    let _ = writeln!(
        md,
        "| clients | readings | figure | k3sense | Mosquitto | Mosquitto ÷ k3sense |"
    );
    let _ = writeln!(md, "|---:|---|---|---:|---:|---:|");
    for p in pairs {
        let (o, m) = (&p.ours, &p.mosquitto);
        let load = o.load;
        let mut first = true;
        let mut row = |figure: &str, ours: String, theirs: String, ratio: String| {
            let (n, r) = if first {
                (
                    thousands(load.clients),
                    format!("{} at {}/s", load.readings, load.rate),
                )
            } else {
                (String::new(), String::new())
            };
            first = false;
            let _ = writeln!(md, "| {n} | {r} | {figure} | {ours} | {theirs} | {ratio} |");
        };
        let (ol, ml) = (&o.latencies, &m.latencies);
        for (figure, a, b) in [
            (
                "all clients have it, p50",
                ol.all_clients.p50,
                ml.all_clients.p50,
            ),
            (
                "all clients have it, p99",
                ol.all_clients.p99,
                ml.all_clients.p99,
            ),
            (
                "all clients have it, max",
                ol.all_clients.max,
                ml.all_clients.max,
            ),
            (
                "one client has it, p50",
                ol.per_client.p50,
                ml.per_client.p50,
            ),
            (
                "one client has it, p99",
                ol.per_client.p99,
                ml.per_client.p99,
            ),
        ] {
            row(
                figure,
                ms(a),
                ms(b),
                ratio(b.as_secs_f64(), a.as_secs_f64()),
            );
        }
        let (a, b) = (kb(o.kib_per_client()), kb(m.kib_per_client()));
        row(
            "server memory per client",
            format!("{a:.1} KB"),
            format!("{b:.1} KB"),
            ratio(b, a),
        );
        let (a, b) = (o.cpu_per_reading(), m.cpu_per_reading());
        row(
            "server CPU per reading",
            ms(a),
            ms(b),
            ratio(b.as_secs_f64(), a.as_secs_f64()),
        );
        let (a, b) = (o.connect_time, m.connect_time);
        row(
            "time to connect all",
            ms(a),
            ms(b),
            ratio(b.as_secs_f64(), a.as_secs_f64()),
        );
        row(
            "clients connected; readings lost",
            format!("{}; {}", o.connected, ol.lost),
            format!("{}; {}", m.connected, ml.lost),
            String::new(),
        );
    }

    let find = |clients: usize| pairs.iter().find(|p| p.ours.load.clients == clients);
    let all_idle = idle.samples[0].1;
    let _ = writeln!(md, "\n### Targets\n");
    let _ = writeln!(md, "| figure | target | k3sense | Mosquitto | met |");
    let _ = writeln!(md, "|---|---|---:|---:|---|");
    let mut target = |figure: &str,
                      goal: &str,
                      ours: Option<f64>,
                      theirs: Option<f64>,
                      limit: f64,
                      unit: &str| {
        let show = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.2} {unit}"));
        let met = match ours {
            Some(v) if v <= limit => "yes",
            Some(_) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(
            md,
            "| {figure} | {goal} | {} | {} | {met} |",
            show(ours),
            show(theirs)
        );
    };
    let secs = |d: Duration| d.as_secs_f64() * 1000.0;
    for (n, goal, limit) in [(1_000, "≤ 4 ms", 4.0), (10_000, "≤ 50 ms", 50.0)] {
        target(
            &format!("all {} clients have a reading, p99", thousands(n)),
            goal,
            find(n).map(|p| secs(p.ours.latencies.all_clients.p99)),
            find(n).map(|p| secs(p.mosquitto.latencies.all_clients.p99)),
            limit,
            "ms",
        );
    }
    let largest = pairs.last();
    target(
        &format!(
            "memory per connected idle client (at {})",
            largest.map_or("—".to_owned(), |p| thousands(p.ours.load.clients))
        ),
        "≤ 4 KB",
        largest.map(|p| kb(p.ours.kib_per_client())),
        largest.map(|p| kb(p.mosquitto.kib_per_client())),
        4.0,
        "KB",
    );
    target(
        "publish → client latency at 100 clients, p50",
        "≤ 0.8 ms",
        find(100).map(|p| secs(p.ours.latencies.per_client.p50)),
        find(100).map(|p| secs(p.mosquitto.latencies.per_client.p50)),
        0.8,
        "ms",
    );
    target(
        "idle RSS of `k3sense all`",
        "≤ 16 MB",
        Some(kb(all_idle.rss_kib as f64) / 1000.0),
        None,
        16.0,
        "MB",
    );
    target(
        "stripped release binary",
        "≤ 8 MB",
        Some(binary as f64 / 1e6),
        None,
        8.0,
        "MB",
    );

    let _ = writeln!(md, "\n### Footprint (idle, simulated sensor every 2 s)\n");
    let _ = writeln!(
        md,
        "| process | RSS | CPU over {:?} | CPU share |",
        idle.window
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (name, s) in &idle.samples {
        let _ = writeln!(
            md,
            "| `k3sense {name}` | {:.1} MB | {} | {:.3} % |",
            kb(s.rss_kib as f64) / 1000.0,
            ms(s.cpu),
            s.cpu.as_secs_f64() / idle.window.as_secs_f64() * 100.0
        );
    }
    let _ = writeln!(md, "\n| figure | value |\n|---|---:|");
    let _ = writeln!(
        md,
        "| start → /readyz 200, `k3sense all` | {} |",
        ms(idle.all_ready)
    );
    let _ = writeln!(
        md,
        "| start → /readyz 200, `k3sense gateway` (broker already up) | {} |",
        ms(idle.gateway_ready)
    );
    let _ = writeln!(
        md,
        "| stripped release binary | {:.2} MB ({binary} bytes) |",
        binary as f64 / 1e6
    );
    md
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// KiB to KB (1000 bytes), the unit of the targets.
fn kb(kib: f64) -> f64 {
    kib * 1.024
}

fn ratio(theirs: f64, ours: f64) -> String {
    if ours > 0.0 && theirs > 0.0 {
        format!("{:.1}×", theirs / ours)
    } else {
        "—".to_owned()
    }
}

fn thousands(n: usize) -> String {
    if n >= 1000 {
        format!("{},{:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("?".to_owned(), |kib| {
            format!("{:.0}", kib as f64 / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {memory} GiB RAM, Linux {kernel}")
}

async fn mosquitto_version(bin: &PathBuf) -> String {
    let out = tokio::process::Command::new(bin).arg("-h").output().await;
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "mosquitto".to_owned())
}
