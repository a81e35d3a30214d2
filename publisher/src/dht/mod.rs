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
//! - [`EdgeSimulator`] — ideal edges made imperfect (jitter per pulse or per edge timestamp, a
//!   slowly rising line, glitches, lost edges, flipped bits), seeded, so the `sim` backend and
//!   the tests exercise the real decoding path;
//! - [`rates`] — exact / refused / wrong counts over many simulated reads: the README's tables
//!   and the tests that hold the decoder to them.

mod decode;
mod encode;
pub mod rates;
mod signal;
mod sim;
mod tolerance;

pub use decode::{DecodeError, PulseFault, decode, decode_frame};
pub use encode::{edges_for_frame, encode_frame};
pub use k3sense_protocol::Model;
pub use signal::{Edge, Level, Measurement, timing};
pub use sim::{EdgeSimulator, SimConfig};
pub use tolerance::Tolerance;
