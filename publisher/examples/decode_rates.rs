//! Measures how often a read decodes, against timing jitter and lost edges, with the simulator.
//!
//! ```sh
//! cargo run --release -p k3sense-publisher --example decode_rates
//! ```
//!
//! Prints markdown tables (the ones in publisher/README.md). Every cell is 10,000 simulated
//! reads of random valid DHT11 readings from a fixed seed, so the numbers repeat exactly.

use std::collections::BTreeMap;

use k3sense_publisher::dht::{
    DecodeError, EdgeSimulator, Measurement, Model, SimConfig, decode, encode_frame,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FRAMES: u32 = 10_000;
const JITTERS_US: [u32; 7] = [0, 5, 10, 15, 20, 25, 30];
const LOST_EDGE_RATES: [f64; 4] = [0.0, 0.001, 0.01, 0.05];
const FLIPPED_BIT_RATES: [f64; 3] = [0.001, 0.01, 0.05];

/// What happened to the reads of one cell.
#[derive(Default)]
struct Outcome {
    ok: u32,
    /// Decoded, but not to what was sent: a wrong value would be published.
    wrong: u32,
    errors: BTreeMap<&'static str, u32>,
}

impl Outcome {
    fn success_pct(&self) -> f64 {
        f64::from(self.ok) * 100.0 / f64::from(FRAMES)
    }

    /// The failure kinds, most frequent first, as "kind NN %" of the failures.
    fn failures(&self) -> String {
        let failed: u32 = self.errors.values().sum();
        if failed == 0 {
            return "—".to_owned();
        }
        let mut kinds: Vec<_> = self.errors.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        kinds
            .iter()
            .map(
                |(kind, n)| match f64::from(**n) * 100.0 / f64::from(failed) {
                    share if share < 0.5 => format!("{kind} <1 %"),
                    share => format!("{kind} {share:.0} %"),
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn kind(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::NoResponse => "no response",
        DecodeError::Timeout { .. } => "timeout",
        DecodeError::ShortFrame { .. } => "short",
        DecodeError::PulseWidth { .. } => "pulse width",
        DecodeError::Checksum { .. } => "checksum",
        DecodeError::Format { .. } => "format",
        DecodeError::Implausible { .. } => "implausible",
    }
}

/// A random reading the model can report, at its resolution.
fn random_reading(rng: &mut StdRng, model: Model) -> Measurement {
    let (t_min, t_max) = model.temperature_range();
    let (h_min, h_max) = model.humidity_range();
    let t = rng.random_range((t_min * 10.0) as i32..=(t_max * 10.0) as i32);
    let h = rng.random_range((h_min * 10.0) as i32..=(h_max * 10.0) as i32);
    Measurement {
        temperature_c: f64::from(t) / 10.0,
        humidity_pct: f64::from(h) / 10.0,
    }
}

fn measure(model: Model, config: SimConfig, seed: u64) -> Outcome {
    let mut readings = StdRng::seed_from_u64(seed);
    let mut sim = EdgeSimulator::new(config, seed);
    let mut outcome = Outcome::default();
    for _ in 0..FRAMES {
        let sent = random_reading(&mut readings, model);
        match decode(model, &sim.edges(encode_frame(model, sent))) {
            Ok(got) if got == sent => outcome.ok += 1,
            Ok(_) => outcome.wrong += 1,
            Err(e) => *outcome.errors.entry(kind(&e)).or_default() += 1,
        }
    }
    outcome
}

fn pct(rate: f64) -> String {
    format!("{} %", rate * 100.0)
}

fn main() {
    let model = Model::Dht11;
    let mut cells = Vec::new();
    for (row, &jitter_us) in JITTERS_US.iter().enumerate() {
        let mut line = Vec::new();
        for (col, &lost_edge_rate) in LOST_EDGE_RATES.iter().enumerate() {
            let config = SimConfig {
                jitter_us,
                lost_edge_rate,
                flipped_bit_rate: 0.0,
            };
            line.push(measure(model, config, (row * 100 + col) as u64));
        }
        cells.push(line);
    }

    let header = |first: &str| {
        let cols: Vec<String> = LOST_EDGE_RATES.iter().map(|r| pct(*r)).collect();
        println!("| {first} | lost edges {} |", cols.join(" | "));
        println!("|---:|{}", "---:|".repeat(LOST_EDGE_RATES.len()));
    };

    println!(
        "Reads decoded to the value sent, {FRAMES} {model} reads per cell \
         (jitter: every pulse ± up to the given µs, uniform):\n"
    );
    header("jitter");
    for (jitter_us, line) in JITTERS_US.iter().zip(&cells) {
        let row: Vec<String> = line
            .iter()
            .map(|o| match o.wrong {
                0 => format!("{:.2} %", o.success_pct()),
                n => format!("{:.2} % ({n} wrong)", o.success_pct()),
            })
            .collect();
        println!("| ±{jitter_us} µs | {} |", row.join(" | "));
    }

    println!("\nWhy the others failed (share of the failed reads):\n");
    header("jitter");
    for (jitter_us, line) in JITTERS_US.iter().zip(&cells) {
        let row: Vec<String> = line.iter().map(Outcome::failures).collect();
        println!("| ±{jitter_us} µs | {} |", row.join(" | "));
    }

    let wrong: u32 = cells.iter().flatten().map(|o| o.wrong).sum();
    let reads = FRAMES as usize * cells.iter().flatten().count();
    println!(
        "\nWrong values (decoded, but not what was sent) in all {reads} reads above: {wrong}."
    );

    println!("\nFlipped bits (noise), ±5 µs jitter, no lost edges, {FRAMES} reads per cell:\n");
    println!("| model | flipped bits | decoded right | rejected | wrong value |");
    println!("|---|---:|---:|---:|---:|");
    for (i, model) in [Model::Dht11, Model::Dht22].into_iter().enumerate() {
        for (j, &flipped_bit_rate) in FLIPPED_BIT_RATES.iter().enumerate() {
            let config = SimConfig {
                jitter_us: 5,
                lost_edge_rate: 0.0,
                flipped_bit_rate,
            };
            let o = measure(model, config, (10_000 + i * 100 + j) as u64);
            let rejected: u32 = o.errors.values().sum();
            println!(
                "| {model} | {} per bit | {:.2} % | {:.2} % | {} ({:.3} %) |",
                pct(flipped_bit_rate),
                o.success_pct(),
                f64::from(rejected) * 100.0 / f64::from(FRAMES),
                o.wrong,
                f64::from(o.wrong) * 100.0 / f64::from(FRAMES),
            );
        }
    }
}
