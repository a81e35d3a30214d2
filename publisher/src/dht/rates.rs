//! How often reads decode exactly, are refused, or come out **wrong**, measured with the
//! [`EdgeSimulator`]: the code behind the tables in publisher/README.md
//! (`cargo run --release -p k3sense-publisher --example decode_rates`) and behind the tests that
//! hold the decoder to them, so the two cannot drift apart.
//!
//! A read is *exact* when it decodes to the value that was sent, *refused* when the decoder
//! returns an error (a failed read, retried by the read policy), and *wrong* when it decodes to
//! anything else — the only outcome that matters, because it would be published.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{DecodeError, EdgeSimulator, Measurement, Model, SimConfig, decode, encode_frame};

/// The four shapes of frame a DHT sends, which exercise different bytes and sign rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// An older DHT11: whole °C (0–50) and whole % (20–90), both tenths bytes zero.
    Dht11Whole,
    /// A newer DHT11: tenths of °C in byte 3's low nibble and a minus sign in its bit 7 (half
    /// the readings below 0 °C, −20.0 to 60.0 °C), humidity 5.0–95.0 % with tenths in byte 1.
    Dht11Tenths,
    /// A DHT22/AM2302 above freezing: 0.0–80.0 °C, 0.1–100.0 %.
    Dht22Positive,
    /// A DHT22/AM2302 below freezing: −40.0 to −0.1 °C (sign bit set), 0.1–100.0 %.
    Dht22Negative,
}

impl FrameKind {
    /// All four, in table order.
    pub const ALL: [Self; 4] = [
        Self::Dht11Whole,
        Self::Dht11Tenths,
        Self::Dht22Positive,
        Self::Dht22Negative,
    ];

    /// The model the frame is decoded as.
    pub fn model(self) -> Model {
        match self {
            Self::Dht11Whole | Self::Dht11Tenths => Model::Dht11,
            Self::Dht22Positive | Self::Dht22Negative => Model::Dht22,
        }
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dht11Whole => "DHT11 whole",
            Self::Dht11Tenths => "DHT11 tenths/negative",
            Self::Dht22Positive => "DHT22 positive",
            Self::Dht22Negative => "DHT22 negative",
        }
    }

    /// A random reading of this kind, at the sensor's resolution.
    pub fn random_reading(self, rng: &mut StdRng) -> Measurement {
        let (t_tenths, h_tenths) = match self {
            Self::Dht11Whole => (
                rng.random_range(0..=50) * 10,
                rng.random_range(20..=90) * 10,
            ),
            Self::Dht11Tenths => {
                let t = if rng.random::<bool>() {
                    rng.random_range(-200..=-1)
                } else {
                    rng.random_range(0..=600)
                };
                (t, rng.random_range(50..=950))
            }
            Self::Dht22Positive => (rng.random_range(0..=800), rng.random_range(1..=1000)),
            Self::Dht22Negative => (rng.random_range(-400..=-1), rng.random_range(1..=1000)),
        };
        Measurement {
            temperature_c: f64::from(t_tenths) / 10.0,
            humidity_pct: f64::from(h_tenths) / 10.0,
        }
    }
}

/// What happened to a batch of simulated reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Reads in the batch.
    pub reads: u32,
    /// Decoded to exactly the value sent.
    pub exact: u32,
    /// Refused by the decoder (an error: the read is retried).
    pub refused: u32,
    /// Decoded to a value that was not sent: would be published.
    pub wrong: u32,
    /// Refused reads by reason ([`reason`]).
    pub reasons: BTreeMap<&'static str, u32>,
}

impl Outcome {
    /// Adds another batch's counts to this one.
    pub fn add(&mut self, other: &Self) {
        self.reads += other.reads;
        self.exact += other.exact;
        self.refused += other.refused;
        self.wrong += other.wrong;
        for (reason, n) in &other.reasons {
            *self.reasons.entry(reason).or_default() += n;
        }
    }

    /// A share of the reads, in percent.
    pub fn pct(&self, n: u32) -> f64 {
        if self.reads == 0 {
            return 0.0;
        }
        f64::from(n) * 100.0 / f64::from(self.reads)
    }

    /// The reasons for refusing, most frequent first, as "reason NN %" of the refused reads.
    pub fn reasons_summary(&self) -> String {
        if self.refused == 0 {
            return "—".to_owned();
        }
        let mut kinds: Vec<_> = self.reasons.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        kinds
            .iter()
            .map(
                |(kind, n)| match f64::from(**n) * 100.0 / f64::from(self.refused) {
                    share if share < 0.5 => format!("{kind} <1 %"),
                    share => format!("{kind} {share:.0} %"),
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A short name for why a read was refused; pulse-width faults are told apart.
pub fn reason(error: &DecodeError) -> &'static str {
    use super::PulseFault;
    match error {
        DecodeError::NoResponse => "no response",
        DecodeError::Timeout { .. } => "timeout",
        DecodeError::ShortFrame { .. } => "short",
        DecodeError::PulseWidth { fault, .. } => match fault {
            PulseFault::TooLong => "pulse too long",
            PulseFault::TooShort => "pulse too short",
            PulseFault::Ambiguous => "ambiguous bit",
            PulseFault::Noisy => "too noisy",
        },
        DecodeError::Checksum { .. } => "checksum",
        DecodeError::Format { .. } => "format",
        DecodeError::Implausible { .. } => "implausible",
    }
}

/// Simulates `reads` reads of random `kind` readings through `config`, decodes each with
/// [`decode`], and counts the outcomes. The same `seed` gives the same counts.
pub fn measure(kind: FrameKind, config: SimConfig, reads: u32, seed: u64) -> Outcome {
    let model = kind.model();
    let mut readings = StdRng::seed_from_u64(seed ^ 0x5eed_0f_7ea1);
    let mut sim = EdgeSimulator::new(config, seed);
    let mut outcome = Outcome {
        reads,
        ..Outcome::default()
    };
    for _ in 0..reads {
        let sent = kind.random_reading(&mut readings);
        match decode(model, &sim.edges(encode_frame(model, sent))) {
            Ok(got) if got == sent => outcome.exact += 1,
            Ok(_) => outcome.wrong += 1,
            Err(e) => {
                outcome.refused += 1;
                *outcome.reasons.entry(reason(&e)).or_default() += 1;
            }
        }
    }
    outcome
}

/// [`measure`] for each of the four [`FrameKind`]s (`reads_per_kind` each, seeds derived from
/// `seed`), and their sum.
pub fn measure_all_kinds(
    config: SimConfig,
    reads_per_kind: u32,
    seed: u64,
) -> (Outcome, [Outcome; 4]) {
    let per_kind = FrameKind::ALL.map(|kind| {
        let offset = FrameKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u64;
        measure(
            kind,
            config,
            reads_per_kind,
            seed.wrapping_mul(8).wrapping_add(offset),
        )
    });
    let mut total = Outcome::default();
    for o in &per_kind {
        total.add(o);
    }
    (total, per_kind)
}

/// Jitter on each edge timestamp in the slow-rise, glitch and double-flip rows: a good
/// busy-polling reader (a real line is never perfectly timed).
pub const ROW_EDGE_JITTER_US: u32 = 2;
/// The slow-rise rows: every µs from 0 to 30.
pub const SLOW_RISES_US: std::ops::RangeInclusive<u32> = 0..=30;
/// The edge-jitter rows: every µs from ±0 to ±20.
pub const EDGE_JITTERS_US: std::ops::RangeInclusive<u32> = 0..=20;
/// The glitch in the glitch rows: 2 µs low.
pub const GLITCH_US: u32 = 2;
/// The slow rises the glitch rows are measured at.
pub const GLITCH_RISES_US: [u32; 3] = [0, 10, 20];

/// A slow-rise row: every rising edge `d` µs late, ±[`ROW_EDGE_JITTER_US`] per edge.
pub fn slow_rise(d: u32) -> SimConfig {
    SimConfig {
        slow_rise_us: d,
        edge_jitter_us: ROW_EDGE_JITTER_US,
        ..SimConfig::default()
    }
}

/// An edge-jitter row: ±`j` µs on each edge timestamp, a fast line.
pub fn edge_jitter(j: u32) -> SimConfig {
    SimConfig {
        edge_jitter_us: j,
        ..SimConfig::default()
    }
}

/// A glitch row: one [`GLITCH_US`] low splitting a random bit's high per read, slow rise `d`,
/// ±[`ROW_EDGE_JITTER_US`] per edge.
pub fn glitch(d: u32) -> SimConfig {
    SimConfig {
        glitch_us: GLITCH_US,
        slow_rise_us: d,
        edge_jitter_us: ROW_EDGE_JITTER_US,
        ..SimConfig::default()
    }
}

/// The double-flip row: exactly two distinct bits inverted per read, ±[`ROW_EDGE_JITTER_US`]
/// per edge.
pub fn double_flip() -> SimConfig {
    SimConfig {
        flipped_bits: 2,
        edge_jitter_us: ROW_EDGE_JITTER_US,
        ..SimConfig::default()
    }
}
