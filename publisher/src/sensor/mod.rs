//! Sensor backends behind one trait, and [`open`], which picks one from the configuration.
//!
//! A [`Sensor`] does one blocking read attempt; the caller runs it off the async runtime and
//! decides pacing and retries (see [`crate::policy`]).
//!
//! | backend | module | reads through |
//! |---|---|---|
//! | `sim` | `sim` | simulated edge trains through the real decoder |
//! | `dht11` / `dht22` | `gpio` | rppal GPIO, bit-banged on a dedicated real-time thread |
//! | `iio` | `iio` | the Linux kernel's dht11 driver in sysfs |
//!
//! Opening a backend can fail for reasons no retry fixes (not a Pi, no /dev/gpiomem, no IIO
//! device): [`OpenError`] names the cause and the fix, and the reader keeps the process up,
//! reports the sensor `offline` and tries again periodically.

mod gpio;
mod gpio_devices;
mod iio;
mod sim;

pub use gpio::{DataLine, GpioSensor, capture};
pub use iio::{CACHE_WAIT, CLONE_FIX, DRIVER_CACHE, IioSensor};
pub use sim::{SimMode, SimSensor};

use k3sense_protocol::Model;

use crate::{
    config::{SensorConfig, SensorKind},
    dht::{self, DecodeError, Measurement},
    policy::Pacing,
};

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
        matches!(self, Self::Driver { reason, .. } if reason == iio::CLONE_FIX)
    }
}

/// Why a backend could not be opened: one message naming the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// Where `open` looks for IIO devices when no `--iio-device` is given.
pub const IIO_DEVICES: &str = "/sys/bus/iio/devices";

/// Opens the backend `config` asks for. Blocking (touches /dev and /sys): call it off the
/// async runtime.
pub fn open(config: &SensorConfig) -> Result<Box<dyn Sensor>, OpenError> {
    let model = config.effective_model();
    match config.backend.sensor {
        SensorKind::Sim => {
            let mut sim = SimSensor::new(model, dht::SimConfig::default(), rand::random());
            if let Some(path) = &config.sim_control {
                sim = sim.controlled_by(path.clone());
            }
            Ok(Box::new(sim))
        }
        SensorKind::Dht11 | SensorKind::Dht22 => {
            Ok(Box::new(GpioSensor::open(model, config.backend.gpio)?))
        }
        SensorKind::Iio => {
            let device = match &config.backend.iio_device {
                Some(path) => path.clone(),
                None => iio::find_device(std::path::Path::new(IIO_DEVICES), config.backend.gpio)?,
            };
            Ok(Box::new(IioSensor::open(model, device)?))
        }
    }
}
