//! Edge trains as a real reader records them: the ideal train made imperfect in the three ways
//! reading a DHT on Linux goes wrong. Seeded, so a test or a measurement repeats exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::encode::edges_for_frame;
use super::signal::{Edge, Level, timing::FRAME_BITS};

/// The host's start pulse as the simulator records it (what a DHT11 needs; the decoder only
/// cares that it is long).
const HOST_START_US: u32 = 18_000;
/// The line released by the host, before the sensor pulls it low.
const HOST_RELEASE_US: u32 = 30;
/// The idle line after the frame, until the reader stops recording.
const IDLE_US: u32 = 1_000;

/// How imperfect the simulated reads are. `Default` is a perfect reader on a perfect line.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimConfig {
    /// Per **pulse**: every pulse is lengthened or shortened by its own uniform random amount in
    /// ±`jitter_us` (never below 1 µs), independently of its neighbours. Harsher on the bits
    /// than a real reader (whose error is in the timestamps, so a pulse made longer makes the
    /// next one shorter), and kept because the README's first table uses it.
    pub jitter_us: u32,
    /// Per **edge timestamp**: every edge is recorded early or late by its own uniform random
    /// amount in ±`edge_jitter_us`, so each pulse is off by the difference of two of them (up
    /// to twice this) and neighbouring pulses are off in opposite directions — what a
    /// busy-polling reader or an interrupt's latency does. An edge recorded before the one
    /// before it makes the pulse between them vanish.
    pub edge_jitter_us: u32,
    /// A slowly rising line (weak or missing pull-up, long cable): every rising edge is seen
    /// this many µs late, so every low is that much longer and every high that much shorter.
    /// A high that would be 0 µs or less is not seen at all: the lows on both sides merge.
    pub slow_rise_us: u32,
    /// A glitch: when non-zero, one random bit's high per read is split by a low this many µs
    /// long at a random place inside it (noise pulling the line down for a moment).
    pub glitch_us: u32,
    /// The probability that the reader misses an edge: the pulses on both sides of it are
    /// recorded as one, at the level before the edge (a preempted busy-poll, a lost interrupt).
    pub lost_edge_rate: f64,
    /// The probability that each of the 40 bits is sent inverted (electrical noise, a failing
    /// sensor). Applied before timing, so the train is well formed but the frame is wrong.
    pub flipped_bit_rate: f64,
    /// Exactly this many distinct bits (of 40) are sent inverted in every read, on top of
    /// `flipped_bit_rate`: 2 gives the double-bit errors an 8-bit checksum cannot always catch.
    pub flipped_bits: u32,
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
    /// flipped, a glitch, the slow rise, edge and pulse jitter and lost edges as configured,
    /// in that order.
    pub fn edges(&mut self, frame: [u8; 5]) -> Vec<Edge> {
        let frame = self.flip_bits(frame);
        let mut ideal = Vec::with_capacity(88);
        ideal.push(Edge::low(HOST_START_US));
        ideal.push(Edge::high(HOST_RELEASE_US));
        ideal.extend(edges_for_frame(frame));
        ideal.push(Edge::high(IDLE_US));
        if self.config.glitch_us > 0 {
            self.glitch(&mut ideal);
        }
        let timed = self.retime(&ideal);

        let jitter = i64::from(self.config.jitter_us);
        let mut recorded: Vec<Edge> = Vec::with_capacity(timed.len());
        for edge in timed {
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

    fn flip_bits(&mut self, mut frame: [u8; 5]) -> [u8; 5] {
        let flip = |frame: &mut [u8; 5], bit: usize| frame[bit / 8] ^= 0x80 >> (bit % 8);
        for bit in 0..FRAME_BITS {
            if self.chance(self.config.flipped_bit_rate) {
                flip(&mut frame, bit);
            }
        }
        // Distinct bits: a partial Fisher–Yates shuffle of 0..40.
        let mut bits: [usize; FRAME_BITS] = std::array::from_fn(|i| i);
        let count = usize::try_from(self.config.flipped_bits)
            .unwrap_or(FRAME_BITS)
            .min(FRAME_BITS);
        for i in 0..count {
            let j = self.rng.random_range(i..FRAME_BITS);
            bits.swap(i, j);
            flip(&mut frame, bits[i]);
        }
        frame
    }

    /// Splits one random bit's high with a `glitch_us` low, both parts at least 1 µs.
    fn glitch(&mut self, ideal: &mut Vec<Edge>) {
        // Host start and release, the response's low and high, then (low, high) per bit.
        let bit = self.rng.random_range(0..FRAME_BITS);
        let at = 4 + 2 * bit + 1;
        let high = ideal[at].duration_us;
        let glitch = self.config.glitch_us;
        if high < glitch + 2 {
            return;
        }
        let before = self.rng.random_range(1..=high - glitch - 1);
        ideal.splice(
            at..=at,
            [
                Edge::high(before),
                Edge::low(glitch),
                Edge::high(high - glitch - before),
            ],
        );
    }

    /// The train with its edges moved: rising edges late by the slow rise, every edge by its
    /// own timestamp jitter. Pulses that end up 0 µs long or less vanish, and the pulses around
    /// them merge. The recording's start and end are not edges and do not move.
    fn retime(&mut self, ideal: &[Edge]) -> Vec<Edge> {
        let rise = i64::from(self.config.slow_rise_us);
        let jitter = i64::from(self.config.edge_jitter_us);
        if rise == 0 && jitter == 0 {
            return ideal.to_vec();
        }
        // times[k] is when pulse k starts; times[len] when the recording ends.
        let mut times = Vec::with_capacity(ideal.len() + 1);
        let mut t = 0i64;
        for edge in ideal {
            times.push(t);
            t += i64::from(edge.duration_us);
        }
        times.push(t);
        for k in 1..ideal.len() {
            if ideal[k].level == Level::High {
                times[k] += rise;
            }
            if jitter > 0 {
                times[k] += self.rng.random_range(-jitter..=jitter);
            }
        }
        let mut out: Vec<Edge> = Vec::with_capacity(ideal.len());
        let mut start = times[0];
        for (k, edge) in ideal.iter().enumerate() {
            // An edge recorded before the previous one: the pulse between them is not seen.
            let end = times[k + 1].max(start);
            let duration = u32::try_from(end - start).unwrap_or(u32::MAX);
            start = end;
            if duration == 0 {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.level == edge.level => {
                    last.duration_us = last.duration_us.saturating_add(duration);
                }
                _ => out.push(Edge {
                    level: edge.level,
                    duration_us: duration,
                }),
            }
        }
        out
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
            ..SimConfig::default()
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

    /// The frame an ideally timed train carries (highs of 49 µs or more are 1s).
    fn bits_of(train: &[Edge]) -> [u8; 5] {
        let mut bytes = [0u8; 5];
        for (i, high) in train[3..82].iter().step_by(2).enumerate() {
            if high.duration_us >= 49 {
                bytes[i / 8] |= 0x80 >> (i % 8);
            }
        }
        bytes
    }

    fn total(edges: &[Edge]) -> u32 {
        edges.iter().map(|e| e.duration_us).sum()
    }

    #[test]
    fn slow_rise_makes_every_low_longer_and_every_high_shorter() {
        let config = SimConfig {
            slow_rise_us: 10,
            ..SimConfig::default()
        };
        let edges = EdgeSimulator::new(config, 1).edges(FRAME);
        let ideal = EdgeSimulator::new(SimConfig::default(), 1).edges(FRAME);
        assert_eq!(edges.len(), ideal.len());
        // The host's start pulse and release are edges too; the idle line's end is not.
        for (got, want) in edges.iter().zip(&ideal).take(ideal.len() - 1) {
            let want = match want.level {
                Level::Low => want.duration_us + 10,
                Level::High => want.duration_us - 10,
            };
            assert_eq!(got.duration_us, want, "{got:?}");
        }
        assert_eq!(total(&edges), total(&ideal));
        // Past 27 µs the 0s' highs vanish: their lows merge.
        let config = SimConfig {
            slow_rise_us: 28,
            ..SimConfig::default()
        };
        let edges = EdgeSimulator::new(config, 1).edges(FRAME);
        let zeros = (0..40)
            .filter(|i| FRAME[i / 8] & (0x80 >> (i % 8)) == 0)
            .count();
        assert_eq!(edges.len(), ideal.len() - 2 * zeros);
        assert_eq!(total(&edges), total(&ideal));
    }

    #[test]
    fn edge_jitter_moves_edges_not_the_whole_train() {
        let config = SimConfig {
            edge_jitter_us: 10,
            ..SimConfig::default()
        };
        let mut sim = EdgeSimulator::new(config, 5);
        let ideal = EdgeSimulator::new(SimConfig::default(), 1).edges(FRAME);
        let mut worst = 0i64;
        let mut neighbours_opposite = 0;
        for _ in 0..200 {
            let edges = sim.edges(FRAME);
            assert_eq!(edges.len(), ideal.len());
            // Timestamps move, so the recording's length does not.
            assert_eq!(total(&edges), total(&ideal));
            let off: Vec<i64> = edges
                .iter()
                .zip(&ideal)
                .map(|(g, w)| i64::from(g.duration_us) - i64::from(w.duration_us))
                .collect();
            for pair in off.windows(2) {
                if pair[0] * pair[1] < 0 {
                    neighbours_opposite += 1;
                }
            }
            worst = worst.max(off.iter().map(|o| o.abs()).max().unwrap_or(0));
        }
        // A pulse is off by the difference of two edges' errors: up to 20 µs, and more than
        // 10 µs for some.
        assert!((11..=20).contains(&worst), "{worst}");
        // A late edge lengthens one pulse and shortens the next: neighbours are off in
        // opposite directions far more often than by chance (about a third of pairs would be).
        assert!(neighbours_opposite > 200 * 85 / 2, "{neighbours_opposite}");
    }

    #[test]
    fn a_glitch_splits_one_high() {
        let config = SimConfig {
            glitch_us: 2,
            ..SimConfig::default()
        };
        let mut sim = EdgeSimulator::new(config, 9);
        let ideal = EdgeSimulator::new(SimConfig::default(), 1).edges(FRAME);
        for _ in 0..100 {
            let edges = sim.edges(FRAME);
            assert_eq!(edges.len(), ideal.len() + 2);
            assert_eq!(total(&edges), total(&ideal));
            let at = edges
                .iter()
                .position(|e| *e == Edge::low(2))
                .expect("a 2 µs low");
            assert_eq!(edges[at - 1].level, Level::High);
            assert_eq!(edges[at + 1].level, Level::High);
            let split = edges[at - 1].duration_us + 2 + edges[at + 1].duration_us;
            assert!(split == 27 || split == 70, "{split}");
        }
    }

    #[test]
    fn flipped_bits_inverts_exactly_that_many_distinct_bits() {
        for n in [1, 2, 5] {
            let config = SimConfig {
                flipped_bits: n,
                ..SimConfig::default()
            };
            let mut sim = EdgeSimulator::new(config, u64::from(n));
            for _ in 0..100 {
                let edges = sim.edges(FRAME);
                let got = bits_of(&edges[2..85]);
                let differ: u32 = got
                    .iter()
                    .zip(&FRAME)
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum();
                assert_eq!(differ, n);
            }
        }
    }
}
