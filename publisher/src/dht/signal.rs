//! What travels on the data line, and what a frame means: the [`Edge`]s a backend records, the
//! protocol's [`timing`], and the [`Measurement`] a frame decodes to. A leaf: every other part
//! of `dht` builds on it.

/// The level of the data line. The line idles high (pull-up); host and sensor pull it low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// Pulled low by the host or the sensor.
    Low,
    /// Released, held high by the pull-up resistor.
    High,
}

impl Level {
    /// The other level.
    pub fn toggled(self) -> Self {
        match self {
            Self::Low => Self::High,
            Self::High => Self::Low,
        }
    }
}

/// One pulse as a reader saw it: the line stayed at `level` for `duration_us` microseconds,
/// from one edge to the next. Backends produce these in the order they happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Edge {
    /// The level the line was at.
    pub level: Level,
    /// How long it stayed there, in microseconds.
    pub duration_us: u32,
}

impl Edge {
    /// A low pulse of `duration_us`.
    pub const fn low(duration_us: u32) -> Self {
        Self {
            level: Level::Low,
            duration_us,
        }
    }

    /// A high pulse of `duration_us`.
    pub const fn high(duration_us: u32) -> Self {
        Self {
            level: Level::High,
            duration_us,
        }
    }
}

/// A decoded, checked reading: degrees Celsius and percent relative humidity, at the model's
/// resolution (DHT11: 1 or 0.1, DHT22: 0.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Temperature in °C.
    pub temperature_c: f64,
    /// Relative humidity in %.
    pub humidity_pct: f64,
}

/// Protocol timing shared by the encoder, the simulator and the decoder, in microseconds.
pub mod timing {
    /// The sensor's response: low, then high, before the first bit.
    pub const RESPONSE_LOW_US: u32 = 80;
    /// See [`RESPONSE_LOW_US`].
    pub const RESPONSE_HIGH_US: u32 = 80;
    /// Every bit starts with this low.
    pub const BIT_LOW_US: u32 = 50;
    /// High time of a 0 bit (datasheet: 26–28 µs).
    pub const ZERO_HIGH_US: u32 = 27;
    /// High time of a 1 bit.
    pub const ONE_HIGH_US: u32 = 70;
    /// The low that ends the last bit, before the line returns to idle.
    pub const FINAL_LOW_US: u32 = 50;
    /// A high pulse at least this long is a 1, shorter a 0, on a line that rises fast: the
    /// Linux kernel's dht11 driver's rule. The decoder compares the high *corrected for the
    /// line's rise delay* with [`ONE_THRESHOLD_HALF_US`] instead, which is the same rule for
    /// whole microseconds on a fast line.
    pub const ONE_THRESHOLD_US: u32 = 49;
    /// Half-way between a 0's and a 1's high (27 and 70 µs), in half microseconds (48.5 µs):
    /// a corrected high above it is a 1, below it a 0, and exactly on it is refused.
    pub const ONE_THRESHOLD_HALF_US: u32 = ZERO_HIGH_US + ONE_HIGH_US;
    /// The longest bit low a sensor itself sends: the AM2302/DHT22 datasheet gives 48–55 µs
    /// (typically 50); DHT11 datasheets say 50 µs and some DHT11 clones send 54. A frame whose
    /// median bit low is longer than this is on a line that rises late (a weak or missing
    /// pull-up, a long cable), and the decoder corrects for it; up to this, the difference is
    /// the sensor's own tolerance and nothing is corrected.
    pub const SENSOR_MAX_BIT_LOW_US: u32 = 55;
    /// The shortest bit low accepted, after correcting for the rise delay: half the nominal
    /// 50 µs. Jitter of ±10 µs on each edge timestamp makes a low at worst 30 µs; a glitch (the
    /// line pulled low for a few µs inside a high) or a spike that splits a low in two is
    /// shorter — one of the two halves of a split 50 µs low is at most 25 µs.
    pub const MIN_BIT_LOW_US: u32 = 25;
    /// The shortest bit high accepted, after correcting for the rise delay. A 0's high is
    /// 26–28 µs (DHT22 datasheets: 22–30), so with ±10 µs jitter on each edge timestamp it is
    /// never below 7 µs; a high of a few µs is a spike, not a bit.
    pub const MIN_BIT_HIGH_US: u32 = 5;
    /// The longest bit low accepted, after correcting for the rise delay: 50 µs nominal
    /// (48–55 µs in datasheets) plus a reader's latency. Two lows merged by a missed edge
    /// (≥ 127 µs) and the response's 80 µs low (a frame found one pair off) are longer.
    pub const MAX_BIT_LOW_US: u32 = 75;
    /// The longest bit high accepted, after correcting for the rise delay: 70 µs nominal plus a
    /// reader's latency. Two highs merged by a missed edge (≥ 104 µs) are longer.
    pub const MAX_BIT_HIGH_US: u32 = 90;
    /// A corrected high this close to the 0/1 threshold (or closer) is a close call, decided
    /// only if its neighbouring lows agree (see the decoder). With ±10 µs jitter on each edge
    /// timestamp a high is at worst 1.5 µs from the threshold, on the right side, and its
    /// neighbours always agree; with ±15 µs on each pulse it is at least 6.5 µs away.
    pub const CLOSE_CALL_US: u32 = 3;
    /// A frame whose pulses stray up to N µs from their nominal widths widens the close-call
    /// band to N minus this. Both nominal highs are 21.5 µs from the threshold, and a high that
    /// crossed it looks no further off than 21.5 µs from the *other* width, so only the rest of
    /// the frame shows how noisy it is: with ±10 µs per edge timestamp (pulses up to 20 µs off)
    /// the band is 8 µs and the neighbours still always agree; in noisier frames more highs
    /// are checked twice.
    pub const CLOSE_CALL_NOISE_US: u32 = 12;
    /// A frame with any pulse further than this from its nominal width (after correcting for
    /// the rise delay) is refused whole: both nominal highs are 21.5 µs from the threshold, so
    /// past that a high may have crossed it, and one that did looks no further off than
    /// 21.5 µs from the *other* width — only its neighbours show how noisy the frame is.
    pub const MAX_NOISE_US: u32 = 22;
    /// A pulse at least this long is no sensor pulse at all: the host's start pulse, the idle
    /// line, or a stall (sensor stopped, reader preempted).
    pub const LONG_PULSE_US: u32 = 200;
    /// Bits in a frame.
    pub const FRAME_BITS: usize = 40;
}
