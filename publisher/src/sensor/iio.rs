//! DHT11/DHT22 through the Linux kernel's dht11 IIO driver (`dtoverlay=dht11,gpiopin=N`).
//!
//! The driver times the edges in its interrupt handler, so preemption does not corrupt reads,
//! and the publisher needs no device access and no privilege: it reads two sysfs files,
//! `in_temp_input` and `in_humidityrelative_input`, in milli-units. A failed read shows up as
//! EIO (bad frame), ETIMEDOUT (no answer) or EAGAIN (busy): retried by the read policy.

use std::{
    io,
    path::{Path, PathBuf},
};

use k3sense_protocol::Model;
use nix::errno::Errno;

use super::{OpenError, ReadError, Sensor};
use crate::dht::Measurement;

/// The name the kernel driver gives its IIO device.
const DRIVER_NAME: &str = "dht11";
const TEMPERATURE: &str = "in_temp_input";
const HUMIDITY: &str = "in_humidityrelative_input";

fn overlay_fix() -> &'static str {
    "enable the kernel driver on the Pi the sensor is wired to: add `dtoverlay=dht11,gpiopin=4` \
     (your BCM pin) to /boot/firmware/config.txt and reboot, label that node \
     `k3sense.io/sensor=dht11`, and deploy with the iio overlay (deploy/overlays/iio); or give \
     --iio-device PATH"
}

/// Finds the IIO device directory under `root` (normally /sys/bus/iio/devices) whose `name`
/// is `dht11`.
pub fn find_device(root: &Path) -> Result<PathBuf, OpenError> {
    let entries = std::fs::read_dir(root).map_err(|e| {
        OpenError(format!(
            "cannot read the sensor through the kernel IIO driver: {} is not readable ({e}), so \
             this kernel has no IIO devices (not a Raspberry Pi, or the dht11 overlay is not \
             enabled). Fix: {}",
            root.display(),
            overlay_fix()
        ))
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| std::fs::read_to_string(p.join("name")).is_ok_and(|n| n.trim() == DRIVER_NAME))
        .collect();
    found.sort();
    match found.len() {
        0 => Err(OpenError(format!(
            "cannot read the sensor through the kernel IIO driver: no IIO device named \
             {DRIVER_NAME} under {}. Fix: {}",
            root.display(),
            overlay_fix()
        ))),
        1 => Ok(found.remove(0)),
        _ => {
            tracing::warn!(devices = ?found, "several dht11 IIO devices; using the first, pick one with --iio-device");
            Ok(found.remove(0))
        }
    }
}

/// A sensor read through the kernel driver's sysfs files.
pub struct IioSensor {
    model: Model,
    device: PathBuf,
}

impl IioSensor {
    /// Uses the IIO device directory `device` (e.g. /sys/bus/iio/devices/iio:device0).
    pub fn open(model: Model, device: PathBuf) -> Result<Self, OpenError> {
        if !device.join(TEMPERATURE).exists() || !device.join(HUMIDITY).exists() {
            return Err(OpenError(format!(
                "cannot read the sensor through the kernel IIO driver: {} has no {TEMPERATURE} \
                 and {HUMIDITY}; is it the dht11 device? Fix: {}",
                device.display(),
                overlay_fix()
            )));
        }
        tracing::info!(%model, device = %device.display(), "reading the sensor through the kernel dht11 IIO driver");
        Ok(Self { model, device })
    }

    fn value(&self, file: &str) -> Result<f64, ReadError> {
        let path = self.device.join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| read_error(&path, &e))?;
        let milli: i64 = text.trim().parse().map_err(|_| ReadError::Driver {
            timed_out: false,
            reason: format!("{} holds {:?}, not a number", path.display(), text.trim()),
        })?;
        // Milli-units of a sensor with 0.1 resolution: exact in f64 after rounding to 0.001.
        #[allow(clippy::cast_precision_loss)]
        Ok((milli as f64) / 1000.0)
    }
}

impl Sensor for IioSensor {
    fn model(&self) -> Model {
        self.model
    }

    fn read(&mut self) -> Result<Measurement, ReadError> {
        // The driver reads the sensor once for both files (it keeps a read for ~2 s).
        let temperature_c = self.value(TEMPERATURE)?;
        let humidity_pct = self.value(HUMIDITY)?;
        Ok(Measurement {
            temperature_c,
            humidity_pct,
        })
    }
}

/// EIO, ETIMEDOUT, EAGAIN: this read failed, the next may not. Anything else (the device
/// vanished, permissions): the sensor is unavailable.
fn read_error(path: &Path, e: &io::Error) -> ReadError {
    let errno = e.raw_os_error().map(Errno::from_raw);
    match errno {
        Some(Errno::EIO | Errno::EAGAIN | Errno::ETIMEDOUT) => ReadError::Driver {
            timed_out: errno == Some(Errno::ETIMEDOUT),
            reason: format!("{}: {e}", path.display()),
        },
        _ => ReadError::Unavailable(format!(
            "the kernel IIO device is gone or unreadable: {}: {e}. Fix: {}",
            path.display(),
            overlay_fix()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(root: &Path, n: u32, name: &str, t: &str, h: &str) -> PathBuf {
        let dir = root.join(format!("iio:device{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(dir.join(TEMPERATURE), format!("{t}\n")).unwrap();
        std::fs::write(dir.join(HUMIDITY), format!("{h}\n")).unwrap();
        dir
    }

    #[test]
    fn finds_the_dht11_device_by_name_and_reads_milli_units() {
        let root = tempfile::tempdir().unwrap();
        device(root.path(), 0, "mcp3008", "1", "1");
        let dht = device(root.path(), 1, "dht11", "-7300", "88800");
        let found = find_device(root.path()).unwrap();
        assert_eq!(found, dht);
        let mut s = IioSensor::open(Model::Dht22, found).unwrap();
        let m = s.read().unwrap();
        assert!((m.temperature_c + 7.3).abs() < 1e-9 && (m.humidity_pct - 88.8).abs() < 1e-9);
    }

    #[test]
    fn no_device_names_the_overlay_as_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let e = find_device(root.path()).unwrap_err();
        assert!(e.0.contains("dtoverlay=dht11,gpiopin="), "{e}");
        let e = find_device(&root.path().join("missing")).unwrap_err();
        assert!(e.0.contains("dtoverlay=dht11,gpiopin="), "{e}");
        assert!(IioSensor::open(Model::Dht11, root.path().to_owned()).is_err());
    }

    #[test]
    fn eio_etimedout_eagain_are_retryable_the_rest_is_unavailable() {
        let p = Path::new("/x");
        for (errno, timed_out) in [
            (Errno::EIO, false),
            (Errno::EAGAIN, false),
            (Errno::ETIMEDOUT, true),
        ] {
            let e = io::Error::from_raw_os_error(errno as i32);
            assert!(
                matches!(read_error(p, &e), ReadError::Driver { timed_out: t, .. } if t == timed_out),
                "{errno}"
            );
        }
        let e = io::Error::from_raw_os_error(Errno::ENODEV as i32);
        assert!(matches!(read_error(p, &e), ReadError::Unavailable(_)));
    }

    #[test]
    fn garbage_in_the_file_is_a_failed_read() {
        let root = tempfile::tempdir().unwrap();
        let dir = device(root.path(), 0, "dht11", "abc", "1000");
        let mut s = IioSensor::open(Model::Dht11, dir).unwrap();
        assert!(matches!(s.read(), Err(ReadError::Driver { .. })));
    }
}
