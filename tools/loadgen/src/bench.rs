//! `loadgen bench`: the whole benchmark in one go. For each placement (equal CPU, then spread;
//! see `placement`) and each client count, k3sense and Mosquitto's WebSocket listener, each on
//! fresh processes, in alternating order; then the idle footprint of `k3sense all` and of the
//! three separate processes. Writes one markdown report.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use chrono::Utc;

use crate::{
    measure::{Load, Measurement, Target, measure},
    placement::Placement,
    process_stats::Sample,
    servers::{Binaries, Servers},
};

/// Clients connecting at once.
const CONCURRENCY: usize = 64;

/// How big a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// N = 10, 100, 1,000, 10,000 with enough readings for a p99; a minute of idle (~9 minutes
    /// per placement).
    ///
    /// 1,000 readings at 10 and 100 clients and 500 at 1,000: with 200 (before issue 17's
    /// cut 7) the p99 was the second-slowest reading, one pause of the VM decided it, and the
    /// same binaries swapped places at p99 from run to run.
    Full,
    /// The same client counts, fewer readings, 10 s idle (~2 minutes per placement).
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
                load(10, 1_000, 20.0),
                load(100, 1_000, 20.0),
                load(1_000, 500, 10.0),
                load(10_000, 60, 1.0),
            ],
            Self::Quick => vec![
                load(10, 50, 20.0),
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

/// One server under one load, and the machine's load average when it started.
struct Run {
    m: Measurement,
    load_average: String,
}

/// Both servers under one load.
struct Pair {
    ours: Run,
    mosquitto: Run,
}

/// Every load under one placement.
struct Section {
    placement: Placement,
    pairs: Vec<Pair>,
}

/// The idle footprint.
struct Idle {
    window: Duration,
    all_ready: Duration,
    gateway_ready: Duration,
    /// CPU over the window and RSS at its end: all, broker, publisher, gateway.
    samples: [(&'static str, Sample); 4],
}

/// Runs the benchmark under each of `placements`, in that order, and returns the report as
/// markdown.
pub async fn run(
    size: Size,
    placements: &[Placement],
    bins: &Binaries,
    command: &str,
    revision: &str,
) -> Result<String> {
    std::fs::create_dir_all(&bins.work_dir)
        .with_context(|| format!("create {}", bins.work_dir.display()))?;
    let load_before = load_average();
    let date = Utc::now();
    let began = Instant::now();
    let mut sections = Vec::new();
    let mut skipped = Vec::new();
    for &placement in placements {
        if placement == Placement::EqualCpu && crate::placement::cores() < 2 {
            // One core cannot hold a server and the load apart; the rest still runs.
            eprintln!("equal CPU skipped: this machine has one core");
            skipped.push("equal CPU: not run, this machine has one core");
            continue;
        }
        placement.place_load_tool()?;
        let pairs = run_placement(size, placement, bins).await;
        // Whatever happened, later work (the idle footprint) runs unpinned again.
        Placement::Spread.place_load_tool()?;
        sections.push(Section {
            placement,
            pairs: pairs?,
        });
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
        took: began.elapsed(),
        mosquitto: mosquitto_version(&bins.mosquitto).await,
        command: command.to_owned(),
        revision: revision.to_owned(),
        skipped,
    };
    Ok(render(&header, &sections, &idle, binary))
}

async fn run_placement(size: Size, placement: Placement, bins: &Binaries) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for (i, load) in size.loads().into_iter().enumerate() {
        // Alternate who goes first, so neither always runs on a warmer (or busier) machine.
        let (ours, mosquitto) = if i % 2 == 0 {
            let ours = run_ours(bins, load, placement).await?;
            (ours, run_mosquitto(bins, load, placement).await?)
        } else {
            let mosquitto = run_mosquitto(bins, load, placement).await?;
            (run_ours(bins, load, placement).await?, mosquitto)
        };
        pairs.push(Pair { ours, mosquitto });
    }
    Ok(pairs)
}

/// Where one server's logs go: `<server>-<placement>-<clients>`.
fn subdir(server: &str, placement: Placement, load: Load) -> String {
    let mode = match placement {
        Placement::EqualCpu => "equal",
        Placement::Spread => "spread",
    };
    format!("{server}-{mode}-{}", load.clients)
}

async fn run_ours(bins: &Binaries, load: Load, placement: Placement) -> Result<Run> {
    eprintln!("k3sense ({}), {} clients", placement.name(), load.clients);
    let bins = bins.in_subdir(&subdir("k3sense", placement, load))?;
    let load_average = load_average_1min();
    let (servers, target) = retry(|| Servers::k3sense(&bins, load.clients, placement)).await?;
    let m = finish(servers, &target, load).await?;
    Ok(Run { m, load_average })
}

async fn run_mosquitto(bins: &Binaries, load: Load, placement: Placement) -> Result<Run> {
    eprintln!("mosquitto ({}), {} clients", placement.name(), load.clients);
    let bins = bins.in_subdir(&subdir("mosquitto", placement, load))?;
    let load_average = load_average_1min();
    let (servers, target) = retry(|| Servers::mosquitto(&bins, placement)).await?;
    let m = finish(servers, &target, load).await?;
    Ok(Run { m, load_average })
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
    took: Duration,
    mosquitto: String,
    command: String,
    revision: String,
    /// Placements asked for but not run, and why.
    skipped: Vec<&'static str>,
}

fn render(h: &Header, sections: &[Section], idle: &Idle, binary: u64) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Run of {}\n", h.date);
    let _ = writeln!(md, "- command: `{}` at revision {}", h.command, h.revision);
    let _ = writeln!(md, "- machine: {}", h.machine);
    let _ = writeln!(
        md,
        "- load average (1, 5, 15 min) before: {}; after: {}; the run took {:.1} min",
        h.load_before,
        h.load_after,
        h.took.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        md,
        "- Mosquitto: {} with one MQTT and one WebSocket listener",
        h.mosquitto
    );
    for note in &h.skipped {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(
        md,
        "- every column is fresh processes; {CONCURRENCY} clients connect at a time; once all are subscribed, readings are published over MQTT (QoS 1, retained) at the rate shown; \"all clients have it\" is, per reading, the time from publish until the last client had it; \"load average\" is the machine's 1-minute load when that server started\n"
    );
    for section in sections {
        match section.placement {
            Placement::EqualCpu => {
                let _ = writeln!(
                    md,
                    "### Equal CPU: both servers on core 0, the load tool on the other core(s)\n\n\
                     k3sense is `k3sense all` (one process: broker, gateway and its own simulated sensor, reading once an hour), Mosquitto its WebSocket listener; each started with `taskset -c 0`.\n"
                );
            }
            Placement::Spread => {
                let _ = writeln!(
                    md,
                    "### Spread: servers unpinned, beside the load tool\n\n\
                     k3sense is `k3sense broker` + `k3sense gateway` (two processes, CPU and memory summed), as deployed; every process may use every core.\n"
                );
            }
        }
        fan_out_table(&mut md, &section.pairs);
        match section.placement {
            Placement::EqualCpu => equal_cpu_targets(&mut md, &section.pairs, idle),
            Placement::Spread => spread_targets(&mut md, &section.pairs, idle, binary),
        }
        md.push('\n');
    }
    footprint(&mut md, idle, binary);
    md
}

fn fan_out_table(md: &mut String, pairs: &[Pair]) {
    let _ = writeln!(
        md,
        "| clients | readings | figure | k3sense | Mosquitto | Mosquitto ÷ k3sense |"
    );
    let _ = writeln!(md, "|---:|---|---|---:|---:|---:|");
    for p in pairs {
        let (o, m) = (&p.ours.m, &p.mosquitto.m);
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
        row(
            "load average at start",
            p.ours.load_average.clone(),
            p.mosquitto.load_average.clone(),
            String::new(),
        );
    }
}

/// One row of a targets table; `met` is `None` when the figure was not measured.
fn target_row(
    md: &mut String,
    figure: &str,
    goal: &str,
    ours: &str,
    theirs: &str,
    met: Option<bool>,
) {
    let met = match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    };
    let _ = writeln!(md, "| {figure} | {goal} | {ours} | {theirs} | {met} |");
}

/// Issue 17's targets: ahead of Mosquitto on equal CPU at every client count.
fn equal_cpu_targets(md: &mut String, pairs: &[Pair], idle: &Idle) {
    let _ = writeln!(md, "\n#### Targets on equal CPU\n");
    let _ = writeln!(md, "| figure | target | k3sense | Mosquitto | met |");
    let _ = writeln!(md, "|---|---|---:|---:|---|");
    for p in pairs {
        let (o, m) = (
            &p.ours.m.latencies.all_clients,
            &p.mosquitto.m.latencies.all_clients,
        );
        let n = thousands(p.ours.m.load.clients);
        target_row(
            md,
            &format!("all {n} clients have it, p50 / p99"),
            "below Mosquitto's",
            &format!("{} / {}", ms(o.p50), ms(o.p99)),
            &format!("{} / {}", ms(m.p50), ms(m.p99)),
            Some(o.p50 < m.p50 && o.p99 < m.p99),
        );
        let (a, b) = (p.ours.m.cpu_per_reading(), p.mosquitto.m.cpu_per_reading());
        target_row(
            md,
            &format!("server CPU per reading at {n}"),
            "≤ Mosquitto's",
            &ms(a),
            &ms(b),
            Some(a <= b),
        );
    }
    if let Some(p) = pairs.iter().find(|p| p.ours.m.load.clients == 100) {
        let (a, b) = (
            p.ours.m.latencies.all_clients.p50,
            p.mosquitto.m.latencies.all_clients.p50,
        );
        target_row(
            md,
            "all 100 clients have it, p50",
            "≤ 0.8 × Mosquitto's",
            &ms(a),
            &ms(b),
            Some(a.as_secs_f64() <= 0.8 * b.as_secs_f64()),
        );
    }
    if let Some(p) = pairs.iter().find(|p| p.ours.m.load.clients == 10_000) {
        let (a, b) = (
            p.ours.m.latencies.all_clients.p99,
            p.mosquitto.m.latencies.all_clients.p99,
        );
        target_row(
            md,
            "all 10,000 clients have it, p99",
            "≤ 50 ms",
            &ms(a),
            &ms(b),
            Some(a <= Duration::from_millis(50)),
        );
    }
    memory_and_idle_targets(md, pairs, idle);
}

fn memory_and_idle_targets(md: &mut String, pairs: &[Pair], idle: &Idle) {
    if let Some(p) = pairs.last() {
        let (a, b) = (
            kb(p.ours.m.kib_per_client()),
            kb(p.mosquitto.m.kib_per_client()),
        );
        target_row(
            md,
            &format!(
                "memory per connected idle client (at {})",
                thousands(p.ours.m.load.clients)
            ),
            "≤ 4 KB",
            &format!("{a:.2} KB"),
            &format!("{b:.2} KB"),
            Some(a <= 4.0),
        );
    }
    let rss = kb(idle.samples[0].1.rss_kib as f64) / 1000.0;
    target_row(
        md,
        "idle RSS of `k3sense all`",
        "≤ 16 MB",
        &format!("{rss:.2} MB"),
        "—",
        Some(rss <= 16.0),
    );
}

/// Issue 7's targets, on the spread placement they were set for.
fn spread_targets(md: &mut String, pairs: &[Pair], idle: &Idle, binary: u64) {
    let _ = writeln!(md, "\n#### Targets (spread)\n");
    let _ = writeln!(md, "| figure | target | k3sense | Mosquitto | met |");
    let _ = writeln!(md, "|---|---|---:|---:|---|");
    let find = |clients: usize| pairs.iter().find(|p| p.ours.m.load.clients == clients);
    for (n, goal, limit) in [(1_000, "≤ 4 ms", 4), (10_000, "≤ 50 ms", 50)] {
        let ours = find(n).map(|p| p.ours.m.latencies.all_clients.p99);
        let theirs = find(n).map(|p| p.mosquitto.m.latencies.all_clients.p99);
        target_row(
            md,
            &format!("all {} clients have a reading, p99", thousands(n)),
            goal,
            &ours.map_or("—".to_owned(), ms),
            &theirs.map_or("—".to_owned(), ms),
            ours.map(|d| d <= Duration::from_millis(limit)),
        );
    }
    let ours = find(100).map(|p| p.ours.m.latencies.per_client.p50);
    let theirs = find(100).map(|p| p.mosquitto.m.latencies.per_client.p50);
    target_row(
        md,
        "publish → client latency at 100 clients, p50",
        "≤ 0.8 ms",
        &ours.map_or("—".to_owned(), ms),
        &theirs.map_or("—".to_owned(), ms),
        ours.map(|d| d <= Duration::from_micros(800)),
    );
    memory_and_idle_targets(md, pairs, idle);
    let size = binary as f64 / 1e6;
    target_row(
        md,
        "stripped release binary",
        "≤ 8 MB",
        &format!("{size:.2} MB"),
        "—",
        Some(size <= 8.0),
    );
}

fn footprint(md: &mut String, idle: &Idle, binary: u64) {
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

fn load_average_1min() -> String {
    let all = load_average();
    all.split_whitespace().next().unwrap_or("?").to_owned()
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
