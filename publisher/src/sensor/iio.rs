//! DHT11/DHT22 through the Linux kernel's dht11 IIO driver (`dtoverlay=dht11,gpiopin=N`).
//!
//! The driver times the edges in its interrupt handler, so preemption does not corrupt reads,
//! and the publisher needs no device access and no privilege: it reads two sysfs files,
//! `in_temp_input` and `in_humidityrelative_input`, in milli-units. A failed read shows up as
//! EIO (bad frame), ETIMEDOUT (no answer) or EAGAIN (busy): retried by the read policy.
//!
//! # Timing: the driver's 2 s cache
//!
//! `dht11_read_raw` (drivers/iio/humidity/dht11.c) reads the sensor only when
//! `dht11->timestamp + DHT11_DATA_VALID_TIME < ktime_get_boottime_ns()` (2 s); otherwise it
//! answers with the sample it already has. `timestamp` is set in `dht11_decode` once a frame
//! decoded, i.e. at the end of the read that took the sample; a failed read does not set it. So:
//! - one read measures for both files: `in_temp_input` makes the sensor send a frame (≥ 18 ms
//!   start pulse, ~5 ms frame), `in_humidityrelative_input` right after it gets the same sample;
//! - a second read within 2 s of the end of that read returns the same sample again — whatever
//!   its value, changed or not, and whatever a file's mtime says. Confirming a reading with it
//!   would confirm a corrupt frame with itself. Hence [`CACHE_WAIT`]: this backend is read no
//!   sooner than 2 s plus a margin after the end of its previous read, and the sample time is
//!   the end of the read ([`Sensor::sampled_at_end`]). Another process reading the device in
//!   between can only make the driver measure earlier, within the margin, never hand out the
//!   sample we already have.
//!
//! # Kernel facts this backend checks
//!
//! - The driver decodes DHT22 negatives only as sign and magnitude (`temp_int & 0x80` →
//!   negative). Clones that send two's complement read about −3276 °C at −0.1 °C (0xFFFF →
//!   −(0x7FFF) tenths). Such values are refused with [`CLONE_FIX`] rather than counted as noise.
//! - Before the Raspberry Pi kernel took "iio: humidity: dht11: Allow non-zero decimals"
//!   (raspberrypi/linux pull request 6454, merged 2024-11-06), the driver failed every frame of
//!   a DHT11 that sends tenths with EIO ("Don't know how to decode data"); `k3sense check`
//!   says so when every read fails with EIO.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use k3sense_protocol::Model;
use nix::errno::Errno;

use super::{OpenError, ReadError, Sensor};
use crate::{dht::Measurement, policy::Pacing};

/// The driver's `DHT11_DATA_VALID_TIME`: a read within this long after the end of the read that
/// took a sample returns that sample again.
pub const DRIVER_CACHE: Duration = Duration::from_secs(2);
/// The shortest time between the end of one read and the start of the next: past the cache,
/// with a margin for timer slack.
pub const CACHE_WAIT: Duration = DRIVER_CACHE.saturating_add(Duration::from_millis(100));
/// Below this (°C) a temperature can only be a two's-complement clone read as sign-magnitude.
const CLONE_BELOW_C: f64 = -1000.0;
/// What to do about a two's-complement DHT22 clone.
pub const CLONE_FIX: &str = "the kernel dht11 driver read about -3270 °C: this DHT22/AM2302 \
     clone sends temperatures below zero in two's complement, which the driver decodes only as \
     sign and magnitude. Read it with the GPIO backend instead (`--sensor dht22`, see \
     deploy/overlays/gpio-device-plugin), whose decoder tells the two apart, or use a genuine \
     AM2302";

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
        // The driver reads the sensor once for both files: the temperature read measures, the
        // humidity read right after it is answered from the 2 s cache (the same sample).
        let temperature_c = self.value(TEMPERATURE)?;
        let humidity_pct = self.value(HUMIDITY)?;
        if temperature_c < CLONE_BELOW_C {
            return Err(ReadError::Driver {
                timed_out: false,
                reason: CLONE_FIX.to_owned(),
            });
        }
        Ok(Measurement {
            temperature_c,
            humidity_pct,
        })
    }

    /// The model's spacing, but never inside the driver's cache: see the module docs.
    fn pacing(&self) -> Pacing {
        let model = Pacing::for_model(self.model);
        let min_spacing = model.min_spacing.max(CACHE_WAIT);
        Pacing {
            min_spacing,
            settle: model.settle,
            confirm_within: min_spacing * 2,
        }
    }

    fn sampled_at_end(&self) -> bool {
        true
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
        // What `k3sense check` counts to explain a kernel that refuses every DHT11 frame.
        let eio = read_error(p, &io::Error::from_raw_os_error(Errno::EIO as i32));
        let eagain = read_error(p, &io::Error::from_raw_os_error(Errno::EAGAIN as i32));
        assert!(eio.is_kernel_eio() && !eagain.is_kernel_eio());
        assert!(!eio.is_twos_complement_clone());
    }

    #[test]
    fn a_twos_complement_clone_is_refused_with_the_fix() {
        // -0.1 °C in two's complement is 0xFFFF; the driver computes
        // ((0xFF & 0x7f) << 8 + 0xFF) * -100 = -3276700 milli-°C.
        let root = tempfile::tempdir().unwrap();
        let dir = device(root.path(), 0, "dht11", "-3276700", "45000");
        let mut s = IioSensor::open(Model::Dht22, dir).unwrap();
        match s.read() {
            Err(e @ ReadError::Driver { .. }) => {
                assert!(e.is_twos_complement_clone(), "{e}");
                let text = e.to_string();
                assert!(text.contains("two's complement") && text.contains("--sensor dht22"));
            }
            other => panic!("{other:?}"),
        }
        assert!(s.sampled_at_end());
        assert_eq!(s.pacing().min_spacing, CACHE_WAIT);
    }

    #[test]
    fn garbage_in_the_file_is_a_failed_read() {
        let root = tempfile::tempdir().unwrap();
        let dir = device(root.path(), 0, "dht11", "abc", "1000");
        let mut s = IioSensor::open(Model::Dht11, dir).unwrap();
        assert!(matches!(s.read(), Err(ReadError::Driver { .. })));
    }
}
