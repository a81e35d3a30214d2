//! The simulated sensor: slowly drifting room values, sent as the edge train a real DHT would
//! produce (with jitter, lost edges and flipped bits at the configured rates) and decoded by the
//! same decoder the GPIO backend uses. CI thereby exercises the real decoding path.

use k3sense_protocol::Model;
use rand::{Rng, SeedableRng, rngs::StdRng};

use std::time::Duration;

use super::{ReadError, Sensor};
use crate::dht::{self, EdgeSimulator, Measurement, SimConfig};
use crate::policy::Pacing;

/// A simulated DHT11/DHT22.
pub struct SimSensor {
    model: Model,
    rng: StdRng,
    line: EdgeSimulator,
    temperature_c: f64,
    humidity_pct: f64,
}

impl SimSensor {
    /// A sensor of `model` whose line has the imperfections of `line`, seeded for repeatability.
    pub fn new(model: Model, line: SimConfig, seed: u64) -> Self {
        Self {
            model,
            rng: StdRng::seed_from_u64(seed),
            line: EdgeSimulator::new(line, seed.wrapping_add(1)),
            temperature_c: 21.5,
            humidity_pct: 45.0,
        }
    }

    /// Moves the true values a little: a bounded random walk that stays in a room's range.
    fn drift(&mut self) {
        self.temperature_c =
            (self.temperature_c + self.rng.random_range(-0.15..=0.15)).clamp(17.0, 27.0);
        self.humidity_pct =
            (self.humidity_pct + self.rng.random_range(-0.4..=0.4)).clamp(30.0, 65.0);
    }

    /// The true values at the model's resolution (DHT11 whole units, DHT22 tenths).
    fn quantised(&self) -> Measurement {
        let step = match self.model {
            Model::Dht11 => 1.0,
            Model::Dht22 => 0.1,
        };
        let q = |v: f64| ((v / step).round() * step * 10.0).round() / 10.0;
        Measurement {
            temperature_c: q(self.temperature_c),
            humidity_pct: q(self.humidity_pct),
        }
    }
}

impl Sensor for SimSensor {
    fn model(&self) -> Model {
        self.model
    }

    fn read(&mut self) -> Result<Measurement, ReadError> {
        self.drift();
        let frame = dht::encode_frame(self.model, self.quantised());
        let edges = self.line.edges(frame);
        Ok(dht::decode(self.model, &edges)?)
    }

    /// A simulated sensor has no physical limit: demos and tests may read it every few
    /// milliseconds. Retries are still spaced, so a noisy simulated line does not spin.
    fn pacing(&self) -> Pacing {
        Pacing {
            min_spacing: Duration::from_millis(20),
            settle: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_line_reads_plausible_drifting_values() {
        let mut s = SimSensor::new(Model::Dht22, SimConfig::default(), 7);
        let mut previous: Option<Measurement> = None;
        for _ in 0..200 {
            let m = s.read().unwrap();
            assert!((17.0..=27.0).contains(&m.temperature_c), "{m:?}");
            assert!((30.0..=65.0).contains(&m.humidity_pct), "{m:?}");
            if let Some(p) = previous {
                assert!(
                    (m.temperature_c - p.temperature_c).abs() <= 0.31,
                    "{p:?} -> {m:?}"
                );
            }
            previous = Some(m);
        }
    }
}
