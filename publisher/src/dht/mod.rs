//! DHT11/DHT22 (AM2302) frames: the pure core of reading the sensor, with no I/O and no clock.
//!
//! A DHT sensor answers the host's start pulse on its one data line with a train of pulses:
//!
//! ```text
//!  host start   release  response       bit 0 (of 40)          ...   final
//! ▔▔╲_________╱▔▔▔▔▔▔╲________╱▔▔▔▔▔▔▔▔╲______╱▔▔▔╲______╱▔▔▔▔▔▔▔ ... ╲_____╱▔▔▔ idle
//!    ≥ 1–18 ms  20–40µs  80 µs    80 µs   50 µs  27µs  50 µs  70 µs        50 µs
//!                                                (= 0)         (= 1)
//! ```
//!
//! Forty bits, most significant first, make five bytes: four data bytes and a checksum (the low
//! eight bits of their sum). A backend (rppal GPIO, or the simulator) records what it saw as a
//! list of [`Edge`]s — each one a level and how long the line stayed there — and hands them to
//! [`decode`], which finds the frame, checks it and interprets it for the [`Model`].
//!
//! Layout:
//! - [`decode`](decode()) — edges → [`Measurement`] or a [`DecodeError`] that says what to check;
//! - [`encode_frame`] and [`edges_for_frame`] — the inverse, what a sensor would send;
//! - [`EdgeSimulator`] — ideal edges made imperfect (jitter, lost edges, flipped bits), seeded, so
//!   the `sim` backend and the tests exercise the real decoding path.

mod decode;
mod encode;
mod sim;

pub use decode::{DecodeError, decode, decode_frame};
pub use encode::{edges_for_frame, encode_frame};
pub use k3sense_protocol::Model;
pub use sim::{EdgeSimulator, SimConfig};

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
    /// A high pulse at least this long is a 1, shorter a 0: half-way between 27 and 70 µs, as
    /// the Linux kernel's dht11 driver does.
    pub const ONE_THRESHOLD_US: u32 = 49;
    /// The longest bit low accepted: 50 µs nominal (48–55 µs in datasheets) plus a reader's
    /// latency. Two lows merged by a missed edge (≥ 127 µs) and the response's 80 µs low (a
    /// frame found one pair off) are longer.
    pub const MAX_BIT_LOW_US: u32 = 75;
    /// The longest bit high accepted: 70 µs nominal plus a reader's latency. Two highs merged
    /// by a missed edge (≥ 104 µs) are longer.
    pub const MAX_BIT_HIGH_US: u32 = 90;
    /// A pulse at least this long is no sensor pulse at all: the host's start pulse, the idle
    /// line, or a stall (sensor stopped, reader preempted).
    pub const LONG_PULSE_US: u32 = 200;
    /// Bits in a frame.
    pub const FRAME_BITS: usize = 40;
}
