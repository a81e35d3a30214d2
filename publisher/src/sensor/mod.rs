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

mod device;
mod gpio;
mod gpio_devices;
mod iio;
mod sim;

pub use device::{CLONE_FIX, OpenError, Pacing, ReadError, Sensor};
pub use gpio::{DataLine, GpioSensor, capture};
pub use iio::{CACHE_WAIT, DRIVER_CACHE, IioSensor};
pub use sim::{SimMode, SimSensor};

use crate::{
    config::{SensorConfig, SensorKind},
    dht,
};

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
