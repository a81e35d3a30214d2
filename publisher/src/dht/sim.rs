//! Edge trains as a real reader records them: the ideal train made imperfect in the three ways
//! reading a DHT on Linux goes wrong. Seeded, so a test or a measurement repeats exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Edge, edges_for_frame};

/// The host's start pulse as the simulator records it (what a DHT11 needs; the decoder only
/// cares that it is long).
const HOST_START_US: u32 = 18_000;
/// The line released by the host, before the sensor pulls it low.
const HOST_RELEASE_US: u32 = 30;
/// The idle line after the frame, until the reader stops recording.
const IDLE_US: u32 = 1_000;

/// How imperfect the simulated reads are.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimConfig {
    /// Every pulse is lengthened or shortened by a uniform random amount in ±`jitter_us`
    /// (never below 1 µs): a reader's timestamps are late by a varying amount.
    pub jitter_us: u32,
    /// The probability that the reader misses an edge: the pulses on both sides of it are
    /// recorded as one, at the level before the edge (a preempted busy-poll, a lost interrupt).
    pub lost_edge_rate: f64,
    /// The probability that each of the 40 bits is sent inverted (electrical noise, a failing
    /// sensor). Applied before timing, so the train is well formed but the frame is wrong.
    pub flipped_bit_rate: f64,
}

/// Generates the edges a reader would record for a frame, with the imperfections of a
/// [`SimConfig`], from a seeded random number generator.
#[derive(Debug, Clone)]
pub struct EdgeSimulator {
    config: SimConfig,
    rng: StdRng,
}

impl EdgeSimulator {
    /// A simulator whose output depends only on `config`, `seed` and the frames asked for.
    pub fn new(config: SimConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> SimConfig {
        self.config
    }

    /// The edges recorded for one read of a sensor sending `frame`: the host's start pulse and
    /// release, the sensor's train ([`edges_for_frame`]), and the idle line after it, with bits
    /// flipped, pulses jittered and edges lost at the configured rates.
    pub fn edges(&mut self, frame: [u8; 5]) -> Vec<Edge> {
        let mut frame = frame;
        for bit in 0..40 {
            if self.chance(self.config.flipped_bit_rate) {
                frame[bit / 8] ^= 0x80 >> (bit % 8);
            }
        }
        let mut ideal = Vec::with_capacity(86);
        ideal.push(Edge::low(HOST_START_US));
        ideal.push(Edge::high(HOST_RELEASE_US));
        ideal.extend(edges_for_frame(frame));
        ideal.push(Edge::high(IDLE_US));

        let jitter = i64::from(self.config.jitter_us);
        let mut recorded: Vec<Edge> = Vec::with_capacity(ideal.len());
        for edge in ideal {
            let delta = if jitter == 0 {
                0
            } else {
                self.rng.random_range(-jitter..=jitter)
            };
            let duration = (i64::from(edge.duration_us) + delta).max(1);
            let duration_us = u32::try_from(duration).unwrap_or(u32::MAX);
            let lost = !recorded.is_empty() && self.chance(self.config.lost_edge_rate);
            match recorded.last_mut() {
                // The edge into this pulse was missed: the reader still sees the previous level.
                Some(last) if lost => {
                    last.duration_us = last.duration_us.saturating_add(duration_us);
                }
                _ => recorded.push(Edge {
                    level: edge.level,
                    duration_us,
                }),
            }
        }
        recorded
    }

    /// True with probability `p` (never for p ≤ 0 or NaN, always for p ≥ 1).
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dht::{DecodeError, Level, Measurement, Model, decode, encode_frame};

    const FRAME: [u8; 5] = [0x35, 0x00, 0x18, 0x00, 0x4d];

    #[test]
    fn perfect_config_gives_the_ideal_train_around_the_host_part() {
        let mut sim = EdgeSimulator::new(SimConfig::default(), 1);
        let edges = sim.edges(FRAME);
        assert_eq!(edges.len(), 86);
        assert_eq!(edges[0], Edge::low(HOST_START_US));
        assert_eq!(edges[2..85], edges_for_frame(FRAME)[..]);
        assert_eq!(
            decode(Model::Dht11, &edges),
            Ok(Measurement {
                temperature_c: 24.0,
                humidity_pct: 53.0
            })
        );
    }

    #[test]
    fn same_seed_same_edges_different_seed_different_edges() {
        let config = SimConfig {
            jitter_us: 10,
            lost_edge_rate: 0.01,
            flipped_bit_rate: 0.01,
        };
        let a: Vec<_> = (0..20)
            .map(|_| EdgeSimulator::new(config, 7).edges(FRAME))
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut sim = EdgeSimulator::new(config, 7);
        let b = sim.edges(FRAME);
        let c = sim.edges(FRAME);
        assert_eq!(a[0], b);
        assert_ne!(b, c);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut sim = EdgeSimulator::new(
            SimConfig {
                jitter_us: 15,
                ..SimConfig::default()
            },
            3,
        );
        let ideal = edges_for_frame(FRAME);
        let mut seen_change = false;
        for _ in 0..100 {
            let edges = sim.edges(FRAME);
            assert_eq!(edges.len(), 86);
            for (got, want) in edges[2..85].iter().zip(&ideal) {
                assert_eq!(got.level, want.level);
                let d = i64::from(got.duration_us) - i64::from(want.duration_us);
                assert!((-15..=15).contains(&d), "{got:?} vs {want:?}");
                seen_change |= d != 0;
            }
            assert_eq!(
                decode(Model::Dht11, &edges).map(|m| m.humidity_pct),
                Ok(53.0)
            );
        }
        assert!(seen_change);
    }

    #[test]
    fn lost_edges_merge_pulses_at_the_earlier_level() {
        let mut sim = EdgeSimulator::new(
            SimConfig {
                lost_edge_rate: 1.0,
                ..SimConfig::default()
            },
            3,
        );
        // Every edge lost: one pulse at the first level, as long as the whole train.
        let edges = sim.edges(FRAME);
        assert_eq!(edges.len(), 1);
        assert_eq!(edges[0].level, Level::Low);
        let total: u32 = EdgeSimulator::new(SimConfig::default(), 3)
            .edges(FRAME)
            .iter()
            .map(|e| e.duration_us)
            .sum();
        assert_eq!(edges[0].duration_us, total);
        assert_eq!(decode(Model::Dht11, &edges), Err(DecodeError::NoResponse));
    }

    #[test]
    fn flipped_bits_are_caught_unless_two_cancel_out() {
        let mut sim = EdgeSimulator::new(
            SimConfig {
                flipped_bit_rate: 1.0 / 40.0,
                ..SimConfig::default()
            },
            11,
        );
        let want = Measurement {
            temperature_c: 21.5,
            humidity_pct: 47.0,
        };
        let frame = encode_frame(Model::Dht11, want);
        let (mut failed, mut wrong) = (0, 0);
        for _ in 0..1_000 {
            match decode(Model::Dht11, &sim.edges(frame)) {
                Ok(got) if got == want => {}
                Ok(_) => wrong += 1,
                Err(_) => failed += 1,
            }
        }
        // P(no flip in 40 bits at 1/40) ≈ 36 %: about 640 of 1000 fail. A single flip is
        // always caught; two flips of the same bit position in opposite directions in two
        // bytes keep the sum, and pass when the values stay in range (e.g. 47.0 % → 46.1 %).
        assert!((500..800).contains(&failed), "{failed}");
        assert!(wrong <= 10, "{wrong} wrong values out of 1000");
    }
}
