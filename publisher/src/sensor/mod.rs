//! Sensor backends behind one trait.
//!
//! A [`Sensor`] does one blocking read attempt; the caller runs it off the async runtime and
//! decides pacing and retries.

mod sim;

pub use sim::SimSensor;

use k3sense_protocol::Model;

use crate::dht::{DecodeError, Measurement};

/// One physical or simulated sensor.
pub trait Sensor: Send + 'static {
    /// The model, which decides value ranges and the fastest allowed read rate.
    fn model(&self) -> Model;

    /// One read attempt. Blocking: may take tens of milliseconds on real hardware.
    fn read(&mut self) -> Result<Measurement, ReadError>;
}

/// Why one read attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The frame could not be decoded (noise, timing, wiring); retrying usually helps.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The device is not there or not ours: retrying soon will not help, fixing the node will.
    #[error("{0}")]
    Unavailable(String),
}
