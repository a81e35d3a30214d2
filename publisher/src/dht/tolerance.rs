//! How far two reads of one sample may differ and still confirm each other. It lives with the
//! decoder because it is a property of the sensor models; the read policy applies it
//! (`crate::policy`) and the decoder's rate tables (`super::rates`) count against it.

use super::signal::Measurement;
use k3sense_protocol::Model;

/// How far two reads of one sample may differ and still confirm each other: the sensor's
/// resolution plus a small margin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Degrees Celsius.
    pub temperature_c: f64,
    /// Percent relative humidity.
    pub humidity_pct: f64,
}

impl Tolerance {
    /// DHT11: ±1.0 °C / ±2 %RH. Its integer readings flicker by one step between two reads of a
    /// value near a half (older chips send whole units; newer ones tenths, within the same ±1),
    /// and its datasheet gives ±1 %RH repeatability, so one step of each plus one %RH.
    /// DHT22: ±0.5 °C / ±2 %RH. Resolution 0.1 °C with ±0.2 °C repeatability (datasheet), so two
    /// honest reads differ by at most ~0.4 °C; humidity repeatability ±1 %RH, doubled.
    /// Wrong frames that pass the checksum mostly change a value by a power of two of its unit
    /// (1, 2, 4, … or 0.1, 0.2, … 25.6), so most differ from the truth by more than this.
    pub fn for_model(model: Model) -> Self {
        match model {
            Model::Dht11 => Self {
                temperature_c: 1.0,
                humidity_pct: 2.0,
            },
            Model::Dht22 => Self {
                temperature_c: 0.5,
                humidity_pct: 2.0,
            },
        }
    }

    /// Whether `a` and `b` agree.
    pub fn agree(&self, a: Measurement, b: Measurement) -> bool {
        // The margin absorbs binary rounding of tenths (20.1 - 19.6 is 0.5000000000000036).
        const EPSILON: f64 = 1e-6;
        (a.temperature_c - b.temperature_c).abs() <= self.temperature_c + EPSILON
            && (a.humidity_pct - b.humidity_pct).abs() <= self.humidity_pct + EPSILON
    }
}
