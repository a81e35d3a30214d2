//! Measures how often a read decodes exactly, is refused, or comes out wrong, with the edge
//! simulator, and prints the tables in publisher/README.md:
//!
//! ```sh
//! cargo run --release -p k3sense-publisher --example decode_rates
//! ```
//!
//! Every number comes from `k3sense_publisher::dht::rates` — the same code the decoder's tests
//! run — with fixed seeds, so the tables repeat exactly.

use k3sense_publisher::dht::SimConfig;
use k3sense_publisher::dht::rates::{self, FrameKind, Outcome};

/// Reads per frame kind in a row of the robustness tables (four kinds: 80,000 per row).
const READS_PER_KIND: u32 = 20_000;
/// Reads per cell of the per-pulse jitter × lost edges table.
const CELL_READS: u32 = 10_000;
/// Frames per kind whose every double flip is enumerated.
const RESIDUAL_READINGS: u32 = 2_000;
const PULSE_JITTERS_US: [u32; 7] = [0, 5, 10, 15, 20, 25, 30];
const LOST_EDGE_RATES: [f64; 4] = [0.0, 0.001, 0.01, 0.05];
const FLIPPED_BIT_RATES: [f64; 3] = [0.001, 0.01, 0.05];

fn main() {
    let mut args = std::env::args().skip(1);
    let only = args.next();
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if want("rise") {
        slow_rise();
    }
    if want("edge") {
        edge_jitter();
    }
    if want("both") {
        combined();
    }
    if want("glitch") {
        glitch();
    }
    if want("double") {
        double_flips();
    }
    if want("pulse") {
        pulse_jitter_and_lost_edges();
    }
    if want("noise") {
        flipped_bit_rates();
    }
}

fn row_header(first: &str) {
    println!("| {first} | exact | refused | **wrong** | why refused |");
    println!("|---:|---:|---:|---:|---|");
}

fn row(label: &str, o: &Outcome) {
    println!(
        "| {label} | {:.2} % | {:.2} % | **{}** | {} |",
        o.pct(o.exact),
        o.pct(o.refused),
        o.wrong,
        o.reasons_summary()
    );
}

fn slow_rise() {
    println!(
        "Slow rise (every low +d µs, every high −d µs), with ±{} µs jitter on each edge \
         timestamp; {} reads per row ({READS_PER_KIND} of each frame kind):\n",
        rates::ROW_EDGE_JITTER_US,
        4 * READS_PER_KIND
    );
    row_header("d");
    for d in rates::SLOW_RISES_US {
        let (o, _) = rates::measure_all_kinds(rates::slow_rise(d), READS_PER_KIND, u64::from(d));
        row(&format!("{d} µs"), &o);
    }
    println!();
}

fn edge_jitter() {
    println!(
        "Jitter on each edge timestamp (uniform ±j µs per edge, independent; a pulse is off by \
         up to 2j), fast line; {} reads per row:\n",
        4 * READS_PER_KIND
    );
    row_header("±j per edge");
    for j in rates::EDGE_JITTERS_US {
        let (o, _) =
            rates::measure_all_kinds(rates::edge_jitter(j), READS_PER_KIND, 100 + u64::from(j));
        row(&format!("±{j} µs"), &o);
    }
    println!();
}

fn combined() {
    println!(
        "Slow rise and edge jitter together; {} reads per cell, exact % (wrong):\n",
        4 * READS_PER_KIND
    );
    let jitters = [0u32, 5, 10, 15];
    let cols: Vec<String> = jitters
        .iter()
        .map(|j| format!("±{j} µs per edge"))
        .collect();
    println!("| d | {} |", cols.join(" | "));
    println!("|---:|{}", "---:|".repeat(jitters.len()));
    for d in [0u32, 6, 12, 18, 24] {
        let cells: Vec<String> = jitters
            .iter()
            .map(|&j| {
                let config = SimConfig {
                    slow_rise_us: d,
                    edge_jitter_us: j,
                    ..SimConfig::default()
                };
                let seed = 200 + u64::from(d) * 100 + u64::from(j);
                let (o, _) = rates::measure_all_kinds(config, READS_PER_KIND, seed);
                format!("{:.2} % ({})", o.pct(o.exact), o.wrong)
            })
            .collect();
        println!("| {d} µs | {} |", cells.join(" | "));
    }
    println!();
}

fn glitch() {
    println!(
        "One {} µs glitch per read (a low splitting one random bit's high), ±{} µs per edge; \
         {} reads per row:\n",
        rates::GLITCH_US,
        rates::ROW_EDGE_JITTER_US,
        4 * READS_PER_KIND
    );
    row_header("slow rise");
    for d in rates::GLITCH_RISES_US {
        let (o, _) = rates::measure_all_kinds(rates::glitch(d), READS_PER_KIND, 300 + u64::from(d));
        row(&format!("d = {d} µs"), &o);
    }
    println!();
}

fn double_flips() {
    println!(
        "Exactly two distinct bits of 40 inverted in every read, ±{} µs per edge; \
         {READS_PER_KIND} reads per row:\n",
        rates::ROW_EDGE_JITTER_US
    );
    row_header("frame kind");
    let (total, per_kind) = rates::measure_all_kinds(rates::double_flip(), READS_PER_KIND, 400);
    for (kind, o) in FrameKind::ALL.iter().zip(&per_kind) {
        row(kind.name(), o);
    }
    row("all four", &total);
    println!();
    println!(
        "Every double flip of {RESIDUAL_READINGS} random frames per kind, enumerated (780 per \
         frame), and what confirmation by a second independent read leaves (tolerance: DHT11 \
         ±1.0 °C / ±2 %, DHT22 ±0.5 °C / ±2 %):\n"
    );
    println!(
        "| frame kind | accepted, wrong | wrong beyond the tolerance | both of two reads wrong \
         and agreeing |"
    );
    println!("|---|---:|---:|---:|");
    for (i, kind) in FrameKind::ALL.into_iter().enumerate() {
        let r = rates::double_flip_residual(kind, RESIDUAL_READINGS, 500 + i as u64);
        println!(
            "| {} | {:.2} % | {:.2} % | {:.4} % (1 in {:.0}) |",
            kind.name(),
            r.wrong * 100.0,
            r.wrong_beyond_tolerance * 100.0,
            r.confirmed_pairs * 100.0,
            1.0 / r.confirmed_pairs,
        );
    }
    println!();
}

fn pulse_jitter_and_lost_edges() {
    println!(
        "Per-**pulse** jitter (every pulse ± up to the given µs, independently) and lost edges; \
         {CELL_READS} DHT11 tenths/negative reads per cell, exact % (wrong):\n"
    );
    let cols: Vec<String> = LOST_EDGE_RATES
        .iter()
        .map(|r| format!("lost edges {} %", r * 100.0))
        .collect();
    println!("| jitter per pulse | {} |", cols.join(" | "));
    println!("|---:|{}", "---:|".repeat(LOST_EDGE_RATES.len()));
    let mut why = Vec::new();
    for (row, &jitter_us) in PULSE_JITTERS_US.iter().enumerate() {
        let mut cells = Vec::new();
        let mut reasons = Vec::new();
        for (col, &lost_edge_rate) in LOST_EDGE_RATES.iter().enumerate() {
            let config = SimConfig {
                jitter_us,
                lost_edge_rate,
                ..SimConfig::default()
            };
            let o = rates::measure(
                FrameKind::Dht11Tenths,
                config,
                CELL_READS,
                (row * 100 + col) as u64,
            );
            cells.push(match o.wrong {
                0 => format!("{:.2} %", o.pct(o.exact)),
                n => format!("{:.2} % (**{n} wrong**)", o.pct(o.exact)),
            });
            reasons.push(o.reasons_summary());
        }
        println!("| ±{jitter_us} µs | {} |", cells.join(" | "));
        why.push((jitter_us, reasons));
    }
    println!("\nWhy the others were refused (share of the refused reads in the cell):\n");
    println!("| jitter per pulse | {} |", cols.join(" | "));
    println!("|---:|{}", "---:|".repeat(LOST_EDGE_RATES.len()));
    for (jitter_us, reasons) in why {
        println!("| ±{jitter_us} µs | {} |", reasons.join(" | "));
    }
    println!();
}

fn flipped_bit_rates() {
    println!(
        "Noise that inverts bits at random (each bit with the given chance), ±5 µs per pulse; \
         {CELL_READS} reads per cell:\n"
    );
    println!("| frame kind | flipped bits | exact | refused | **wrong** |");
    println!("|---|---:|---:|---:|---:|");
    for (i, kind) in [FrameKind::Dht11Tenths, FrameKind::Dht22Positive]
        .into_iter()
        .enumerate()
    {
        for (j, &flipped_bit_rate) in FLIPPED_BIT_RATES.iter().enumerate() {
            let config = SimConfig {
                jitter_us: 5,
                flipped_bit_rate,
                ..SimConfig::default()
            };
            let o = rates::measure(kind, config, CELL_READS, (10_000 + i * 100 + j) as u64);
            println!(
                "| {} | {} % per bit | {:.2} % | {:.2} % | {} ({:.3} %) |",
                kind.name(),
                flipped_bit_rate * 100.0,
                o.pct(o.exact),
                o.pct(o.refused),
                o.wrong,
                o.pct(o.wrong),
            );
        }
    }
    println!();
}
