//! What every backend is: the [`Sensor`] trait, how fast one may be read ([`Pacing`]), and why
//! a read or an open fails ([`ReadError`], [`OpenError`]).
//!
//! A leaf: it imports nothing from the backends or from the read policy, which all import it.

use std::time::Duration;

use k3sense_protocol::Model;

use crate::dht::{DecodeError, Measurement};

/// One physical or simulated sensor.
pub trait Sensor: Send + 'static {
    /// The model, which decides value ranges and the fastest allowed read rate.
    fn model(&self) -> Model;

    /// One read attempt. Blocking: may take tens of milliseconds on real hardware.
    fn read(&mut self) -> Result<Measurement, ReadError>;

    /// How fast it may be read; real sensors keep their model's datasheet limits.
    fn pacing(&self) -> Pacing {
        Pacing::for_model(self.model())
    }

    /// Whether the sample is taken at the end of [`Sensor::read`] rather than at its start:
    /// the kernel driver measures during the read (and answers from its cache for 2 s after
    /// one), while a GPIO read's frame follows its start pulse at once. The reader stamps
    /// `read_at` and times the next read from this moment.
    fn sampled_at_end(&self) -> bool {
        false
    }
}

/// Why one read attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The frame could not be decoded (noise, timing, wiring); retrying usually helps.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The kernel driver failed this read (EIO: a bad frame, ETIMEDOUT: no answer, EAGAIN:
    /// busy); retrying usually helps.
    #[error("the kernel dht11 driver failed this read: {reason}")]
    Driver {
        /// Whether the sensor did not answer in time (ETIMEDOUT), as opposed to a bad frame.
        timed_out: bool,
        /// What the kernel said.
        reason: String,
    },
    /// The device is not there or not ours: retrying soon will not help, fixing the node will.
    #[error("{0}")]
    Unavailable(String),
}

impl ReadError {
    /// Whether the kernel driver failed this read with EIO: a frame it could not decode (or,
    /// on older kernels, any DHT11 frame with tenths).
    pub fn is_kernel_eio(&self) -> bool {
        let eio = format!("os error {}", nix::errno::Errno::EIO as i32);
        matches!(self, Self::Driver { reason, .. } if reason.contains(&eio))
    }

    /// Whether this was a two's-complement DHT22 clone read through the kernel driver.
    pub fn is_twos_complement_clone(&self) -> bool {
        matches!(self, Self::Driver { reason, .. } if reason == CLONE_FIX)
    }
}

/// Why a backend could not be opened: one message naming the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// How fast a sensor may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// The shortest time between two reads, which also makes two reads independent samples.
    /// Timed from the moment the sample was taken (see `Sensor::sampled_at_end`).
    pub min_spacing: Duration,
    /// How long after power-up (here: after opening) the sensor is left alone.
    pub settle: Duration,
    /// The oldest a previous read may be and still confirm a new one: two spacings for real
    /// sensors. Long enough that an interval too short for two reads (at most two spacings) is
    /// confirmed by the previous interval's read; short enough that the room cannot change much
    /// in between.
    pub confirm_within: Duration,
}

impl Pacing {
    /// The datasheets' limits: DHT11 once a second, DHT22 once every two seconds, and as long
    /// again after power-up before the first read.
    pub fn for_model(model: Model) -> Self {
        let min_spacing = match model {
            Model::Dht11 => Duration::from_secs(1),
            Model::Dht22 => Duration::from_secs(2),
        };
        Self {
            min_spacing,
            settle: min_spacing,
            confirm_within: min_spacing * 2,
        }
    }
}

/// What to do about a two's-complement DHT22 clone.
pub const CLONE_FIX: &str = "the kernel dht11 driver read about -3270 °C: this DHT22/AM2302 \
     clone sends temperatures below zero in two's complement, which the driver decodes only as \
     sign and magnitude. Read it with the GPIO backend instead (`--sensor dht22`, see \
     deploy/overlays/gpio-device-plugin), whose decoder tells the two apart, or use a genuine \
     AM2302";
