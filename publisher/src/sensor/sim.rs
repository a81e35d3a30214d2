//! The simulated sensor: slowly drifting room values, sent as the edge train a real DHT would
//! produce (with jitter, lost edges and flipped bits at the configured rates) and decoded by the
//! same decoder the GPIO backend uses. CI thereby exercises the real decoding path.
//!
//! `--sim-control PATH` makes it controllable while it runs: before every read it reads the
//! file, whose first word is `ok` (answer normally; also a missing or empty file), `silent`
//! (the sensor does not answer the start pulse, like an unplugged one: every read fails with
//! "no response") or `noisy` (every frame arrives with a flipped bit and fails its checksum).
//! `echo silent > PATH` and `echo ok > PATH` are what a user or a test does.

use k3sense_protocol::Model;
use rand::{Rng, SeedableRng, rngs::StdRng};

use std::{path::PathBuf, time::Duration};

use super::device::{Pacing, ReadError, Sensor};
use crate::dht::{self, DecodeError, EdgeSimulator, Measurement, SimConfig};

/// A simulated DHT11/DHT22.
pub struct SimSensor {
    model: Model,
    rng: StdRng,
    line: EdgeSimulator,
    temperature_c: f64,
    humidity_pct: f64,
    control: Option<PathBuf>,
}

/// What `--sim-control` tells the simulated sensor to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimMode {
    /// Answer normally.
    Ok,
    /// Do not answer the start pulse (an unplugged sensor).
    Silent,
    /// Answer with a frame whose checksum fails (a noisy line).
    Noisy,
}

impl SimMode {
    /// The mode a control file holds: its first word; anything unknown, a missing or an empty
    /// file is `ok` (the simulator must never stop because of its remote control).
    pub fn from_control(text: &str) -> Self {
        match text.split_whitespace().next() {
            Some("silent") => Self::Silent,
            Some("noisy") => Self::Noisy,
            _ => Self::Ok,
        }
    }
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
            control: None,
        }
    }

    /// Reads its [`SimMode`] from `path` before every read (`--sim-control`).
    #[must_use]
    pub fn controlled_by(mut self, path: PathBuf) -> Self {
        self.control = Some(path);
        self
    }

    fn mode(&self) -> SimMode {
        self.control
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map_or(SimMode::Ok, |text| SimMode::from_control(&text))
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
        let mode = self.mode();
        if mode == SimMode::Silent {
            return Err(DecodeError::NoResponse.into());
        }
        let mut frame = dht::encode_frame(self.model, self.quantised());
        if mode == SimMode::Noisy {
            // One flipped bit in the humidity byte: the decoder's checksum refuses it.
            frame[0] ^= 0x04;
        }
        let edges = self.line.edges(frame);
        Ok(dht::decode(self.model, &edges)?)
    }

    /// A simulated sensor has no physical limit: demos and tests may read it every few
    /// milliseconds. Retries are still spaced, so a noisy simulated line does not spin. Its
    /// values drift slowly, so a read up to a second old still confirms the next one: a busy CI
    /// machine that wakes the reader late does not leave readings unconfirmed.
    fn pacing(&self) -> Pacing {
        Pacing {
            min_spacing: Duration::from_millis(20),
            settle: Duration::ZERO,
            confirm_within: Duration::from_secs(1),
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

    #[test]
    fn the_control_file_silences_and_revives_it() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control");
        let mut s =
            SimSensor::new(Model::Dht11, SimConfig::default(), 7).controlled_by(control.clone());
        assert!(s.read().is_ok(), "no file yet: ok");
        std::fs::write(&control, "silent\n").unwrap();
        assert!(matches!(
            s.read(),
            Err(ReadError::Decode(DecodeError::NoResponse))
        ));
        std::fs::write(&control, "noisy").unwrap();
        assert!(matches!(
            s.read(),
            Err(ReadError::Decode(DecodeError::Checksum { .. }))
        ));
        std::fs::write(&control, "ok").unwrap();
        assert!(s.read().is_ok());
        assert_eq!(SimMode::from_control("  silent please"), SimMode::Silent);
        assert_eq!(SimMode::from_control("banana"), SimMode::Ok);
    }
}
