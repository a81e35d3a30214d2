//! DHT11/DHT22 through the Linux kernel's dht11 IIO driver (`dtoverlay=dht11,gpiopin=N`).
//!
//! The driver times the edges in its interrupt handler, so preemption does not corrupt reads,
//! and the publisher needs no device access and no privilege: it reads two sysfs files,
//! `in_temp_input` and `in_humidityrelative_input`, in milli-units. A failed read shows up as
//! EIO (bad frame), ETIMEDOUT (no answer) or EAGAIN (busy): retried by the read policy.
//!
//! Without `--iio-device`, [`find_device`] looks through /sys/bus/iio/devices for the driver's
//! device. Its `name` file is *not* `dht11` on a Raspberry Pi: the driver names its IIO device
//! after the platform device (`iio->name = pdev->name`, drivers/iio/humidity/dht11.c), which the
//! device tree names after the overlay's node, `dht11@<pin in hex>` (`dht11@4`; arch/arm/boot/
//! dts/overlays/dht11-overlay.dts in raspberrypi/linux rewrites the unit address with
//! `gpiopin`). So a device matches by the name `dht11@…` or `dht11`, or by its device-tree
//! node's `compatible` (`of_node/compatible`, which the IIO core links to the parent's node).
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

use super::device::{CLONE_FIX, OpenError, Pacing, ReadError, Sensor};
use crate::dht::Measurement;

/// The driver's `DHT11_DATA_VALID_TIME`: a read within this long after the end of the read that
/// took a sample returns that sample again.
pub const DRIVER_CACHE: Duration = Duration::from_secs(2);
/// The shortest time between the end of one read and the start of the next: past the cache,
/// with a margin for timer slack.
pub const CACHE_WAIT: Duration = DRIVER_CACHE.saturating_add(Duration::from_millis(100));
/// Below this (°C) a temperature can only be a two's-complement clone read as sign-magnitude.
const CLONE_BELOW_C: f64 = -1000.0;
/// The kernel driver's device-tree `compatible` string (drivers/iio/humidity/dht11.c).
const COMPATIBLE: &str = "dht11";
/// What the IIO device's `name` file holds: the driver sets the IIO name to the platform
/// device's name, and a device-tree platform device is named after its node. The Raspberry Pi
/// overlay's node is `dht11@<pin in hex>` (`dht11@4`, `dht11@11` for GPIO 17); a node without
/// a unit address is plain `dht11`.
const NODE_NAME: &str = "dht11";
const TEMPERATURE: &str = "in_temp_input";
const HUMIDITY: &str = "in_humidityrelative_input";

fn overlay_fix() -> &'static str {
    "enable the kernel driver on the Pi the sensor is wired to: add `dtoverlay=dht11,gpiopin=4` \
     (your BCM pin) to /boot/firmware/config.txt and reboot, label that node \
     `k3sense.io/sensor=dht11`, and deploy with the iio overlay (deploy/overlays/iio); or give \
     --iio-device PATH"
}

/// One IIO device as the lookup saw it: its directory, its `name`, and the `compatible`
/// strings of its device-tree node (`of_node/compatible`), or why either could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenDevice {
    /// The device directory, e.g. /sys/bus/iio/devices/iio:device0.
    pub dir: PathBuf,
    /// The `name` file, trimmed, or why it could not be read.
    pub name: Result<String, String>,
    /// `of_node/compatible` split at its NULs, or why it could not be read (a device without
    /// a device-tree node has no `of_node`; containers usually mask /sys/firmware, where
    /// `of_node` points).
    pub compatible: Result<Vec<String>, String>,
}

impl SeenDevice {
    fn read(dir: PathBuf) -> Self {
        let name = std::fs::read_to_string(dir.join("name"))
            .map(|n| n.trim().to_owned())
            .map_err(|e| e.to_string());
        let compatible = std::fs::read(dir.join("of_node").join("compatible"))
            .map(|bytes| split_compatible(&bytes))
            .map_err(|e| e.to_string());
        Self {
            dir,
            name,
            compatible,
        }
    }

    /// Whether this is a device of the kernel dht11 driver.
    pub fn is_dht11(&self) -> bool {
        self.name.as_deref().is_ok_and(is_dht11_name)
            || self
                .compatible
                .as_ref()
                .is_ok_and(|c| c.iter().any(|c| c == COMPATIBLE))
    }

    /// The GPIO the Raspberry Pi overlay put the sensor on: the unit address of `dht11@<hex>`.
    pub fn gpio(&self) -> Option<u32> {
        let name = self.name.as_deref().ok()?;
        let address = name.strip_prefix(NODE_NAME)?.strip_prefix('@')?;
        u32::from_str_radix(address, 16).ok()
    }

    /// `iio:device0 (name "dht11@4", compatible "dht11")`, for messages.
    fn describe(&self) -> String {
        let dir = self.dir.file_name().map_or_else(
            || self.dir.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        let name = match &self.name {
            Ok(n) => format!("name {n:?}"),
            Err(e) => format!("name unreadable: {e}"),
        };
        let compatible = match &self.compatible {
            Ok(c) => format!("compatible {:?}", c.join(", ")),
            Err(e) => format!("no of_node/compatible: {e}"),
        };
        format!("{dir} ({name}, {compatible})")
    }

    /// The N of iio:deviceN, so iio:device10 sorts after iio:device9.
    fn number(&self) -> Option<u32> {
        self.dir
            .file_name()?
            .to_str()?
            .strip_prefix("iio:device")?
            .parse()
            .ok()
    }
}

/// `dht11@<unit address>` (the Raspberry Pi overlay) or plain `dht11`; never another device
/// whose name merely starts with the letters.
fn is_dht11_name(name: &str) -> bool {
    name == NODE_NAME
        || name
            .strip_prefix(NODE_NAME)
            .is_some_and(|rest| rest.starts_with('@'))
}

/// A device-tree string list (`compatible`): strings separated and ended by NUL.
fn split_compatible(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Every IIO device under `root`, read as the lookup sees them, in device-number order.
pub fn scan(root: &Path) -> io::Result<Vec<SeenDevice>> {
    let mut seen: Vec<SeenDevice> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| SeenDevice::read(e.path())))
        .collect();
    seen.sort_by(|a, b| (a.number(), &a.dir).cmp(&(b.number(), &b.dir)));
    Ok(seen)
}

/// Finds the kernel dht11 driver's IIO device under `root` (normally /sys/bus/iio/devices).
///
/// A device matches when its `name` is `dht11@<hex>` or `dht11`, or its `of_node/compatible`
/// lists `dht11`; the name alone suffices because containers usually cannot read
/// /sys/firmware, where `of_node` points. When several match, the one on `gpio` (its
/// `dht11@<hex>` unit address) wins, else the first; a warning lists them all.
pub fn find_device(root: &Path, gpio: u8) -> Result<PathBuf, OpenError> {
    let seen = scan(root).map_err(|e| {
        OpenError(format!(
            "cannot read the sensor through the kernel IIO driver: {} is not readable ({e}), so \
             this kernel has no IIO devices (not a Raspberry Pi, or the dht11 overlay is not \
             enabled). Fix: {}",
            root.display(),
            overlay_fix()
        ))
    })?;
    pick(root, &seen, gpio)
}

/// The choice [`find_device`] makes among the devices it saw.
fn pick(root: &Path, seen: &[SeenDevice], gpio: u8) -> Result<PathBuf, OpenError> {
    let listing = |devices: &[&SeenDevice]| {
        devices
            .iter()
            .map(|d| d.describe())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let all: Vec<&SeenDevice> = seen.iter().collect();
    let found: Vec<&SeenDevice> = seen.iter().filter(|d| d.is_dht11()).collect();
    match found.as_slice() {
        [] => {
            let saw = if all.is_empty() {
                "it is empty: no IIO driver is loaded".to_owned()
            } else {
                format!("it holds {}: {}", all.len(), listing(&all))
            };
            Err(OpenError(format!(
                "cannot read the sensor through the kernel IIO driver: no device of the dht11 \
                 driver under {} (looked for a name `dht11@<pin in hex>` or `dht11`, or \
                 of_node/compatible listing `dht11`); {saw}. Fix: {}",
                root.display(),
                overlay_fix()
            )))
        }
        [one] => Ok(one.dir.clone()),
        several => {
            let on_pin = several.iter().find(|d| d.gpio() == Some(u32::from(gpio)));
            let (chosen, why) = match on_pin {
                Some(d) => (*d, format!("it is on GPIO {gpio} (--gpio)")),
                None => (
                    several[0],
                    format!("none is on GPIO {gpio} (--gpio), so the first"),
                ),
            };
            tracing::warn!(
                devices = %listing(several),
                using = %chosen.dir.display(),
                "several dht11 IIO devices; using {} because {why}. Pick another with \
                 --gpio <its BCM pin> or --iio-device PATH (K3SENSE_IIO_DEVICE)",
                chosen.dir.display()
            );
            Ok(chosen.dir.clone())
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
        // The driver checks only the checksum, so the all-zero frame (a line that answers the
        // start pulse, then sends only short highs) reaches us as 0 °C / 0.0 %RH. No DHT11 or
        // DHT22 reads 0.0 %RH in air (DHT11: 20–90 %, newer 5–95 %); the GPIO decoder refuses
        // the same frame (crate::dht, `Implausible`).
        if humidity_pct == 0.0 {
            return Err(ReadError::Driver {
                timed_out: false,
                reason: format!(
                    "{} holds 0.0 %RH: the all-zero frame, which passes the checksum but is no \
                     reading (a loose data wire or a missing pull-up); refused",
                    self.device.join(HUMIDITY).display()
                ),
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

    /// A sysfs laid out like a Raspberry Pi's, in a temp dir that stands for /sys.
    ///
    /// Where the shape comes from:
    /// - /sys/bus/iio/devices/iio:deviceN are relative symlinks into /sys/devices/…, the device's
    ///   place under its parent (Documentation/ABI/testing/sysfs-bus-iio; the IIO device is a
    ///   child of the device that registered it).
    /// - The dht11 overlay (raspberrypi/linux arch/arm/boot/dts/overlays/dht11-overlay.dts) adds
    ///   a root node `dht11@4 { compatible = "dht11"; gpios = <&gpio 4 0>; … }` and its
    ///   `gpiopin` parameter rewrites `reg`, hence the unit address: a user's
    ///   `dtc -I fs /proc/device-tree` on a Pi with gpiopin=17 and gpiopin=27 shows `/dht11@11`
    ///   and `/dht11@1b`, and scripts on Pis read /sys/devices/platform/dht11@4/iio:device0/.
    /// - The IIO name is the platform device's (`iio->name = pdev->name`,
    ///   drivers/iio/humidity/dht11.c); the IIO core points `of_node` at the parent's node
    ///   (drivers/iio/industrialio-core.c), so of_node → /sys/firmware/devicetree/base/dht11@4,
    ///   whose `compatible` and `name` are NUL-terminated strings and `gpios` big-endian cells.
    /// - No `dev` file: the IIO core makes a character device only for a device with buffers
    ///   or events (industrialio-core.c), and dht11 has neither.
    /// - The other devices are what the Raspberry Pi overlays `mcp3008` (SPI ADC, IIO name
    ///   `mcp3008`, compatible `microchip,mcp3008`) and `i2c-sensor,bme280` (IIO name `bme280`,
    ///   compatible `bosch,bme280`) add on a Pi 4, at their SPI/I2C bus paths.
    pub(super) struct PiSysfs {
        pub dir: tempfile::TempDir,
    }

    impl PiSysfs {
        pub fn new() -> Self {
            let sys = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::create_dir_all(sys.devices()).unwrap();
            sys
        }

        /// /sys/bus/iio/devices
        pub fn devices(&self) -> PathBuf {
            self.dir.path().join("bus/iio/devices")
        }

        /// Adds IIO device `n` at `place` (relative to /sys) with node `node` (relative to
        /// /sys/firmware/devicetree/base, `None`: no device-tree node).
        pub fn add(
            &self,
            n: u32,
            place: &str,
            name: &str,
            node: Option<(&str, &[u8])>,
            files: &[(&str, &str)],
        ) -> PathBuf {
            let dir = self.dir.path().join(place).join(format!("iio:device{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(dir.join("uevent"), "DEVTYPE=iio_device\n").unwrap();
            for (file, value) in files {
                std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
            }
            // Relative links, as the kernel makes them.
            let up = |from: &Path| {
                "../".repeat(
                    from.strip_prefix(self.dir.path())
                        .unwrap()
                        .components()
                        .count(),
                )
            };
            if let Some((node, compatible)) = node {
                let base = self.dir.path().join("firmware/devicetree/base").join(node);
                std::fs::create_dir_all(&base).unwrap();
                std::fs::write(base.join("compatible"), compatible).unwrap();
                let short = node.rsplit('/').next().unwrap();
                let short = short.split('@').next().unwrap();
                std::fs::write(base.join("name"), format!("{short}\0")).unwrap();
                std::os::unix::fs::symlink(
                    format!("{}firmware/devicetree/base/{node}", up(&dir)),
                    dir.join("of_node"),
                )
                .unwrap();
            }
            let link = self.devices().join(format!("iio:device{n}"));
            std::os::unix::fs::symlink(
                format!("{}{place}/iio:device{n}", up(&self.devices())),
                &link,
            )
            .unwrap();
            link
        }

        /// The Raspberry Pi dht11 overlay's device for BCM pin `gpio`.
        pub fn dht11(&self, n: u32, gpio: u8, t: &str, h: &str) -> PathBuf {
            let node = format!("dht11@{gpio:x}");
            let link = self.add(
                n,
                &format!("devices/platform/{node}"),
                &node,
                Some((&node, b"dht11\0")),
                &[(TEMPERATURE, t), (HUMIDITY, h)],
            );
            // gpios = <&gpio pin 0>: phandle, pin, flags, big-endian.
            let gpios: Vec<u8> = [0x38u32, u32::from(gpio), 0]
                .iter()
                .flat_map(|c| c.to_be_bytes())
                .collect();
            let base = self.dir.path().join("firmware/devicetree/base").join(&node);
            std::fs::write(base.join("gpios"), gpios).unwrap();
            std::fs::write(base.join("status"), b"okay\0").unwrap();
            link
        }

        /// An MCP3008 ADC on SPI0 CE0 of a Pi 4 (`dtoverlay=mcp3008,spi0-0-present`).
        pub fn mcp3008(&self, n: u32) -> PathBuf {
            self.add(
                n,
                "devices/platform/soc/fe204000.spi/spi_master/spi0/spi0.0",
                "mcp3008",
                Some(("soc/spi@7e204000/mcp3008@0", b"microchip,mcp3008\0")),
                &[
                    ("in_voltage0_raw", "512"),
                    ("in_voltage_scale", "3.222656250"),
                ],
            )
        }

        /// A BME280 on I2C1 of a Pi 4 (`dtoverlay=i2c-sensor,bme280`), which also measures
        /// temperature and humidity: it has the same two files and must not be mistaken.
        pub fn bme280(&self, n: u32) -> PathBuf {
            self.add(
                n,
                "devices/platform/soc/fe804000.i2c/i2c-1/1-0076",
                "bme280",
                Some(("soc/i2c@7e804000/bme280@76", b"bosch,bme280\0")),
                &[(TEMPERATURE, "21370"), (HUMIDITY, "48251")],
            )
        }
    }

    #[test]
    fn finds_the_pi_overlays_dht11_among_other_iio_devices_and_reads_milli_units() {
        let sys = PiSysfs::new();
        sys.mcp3008(0);
        let dht = sys.dht11(1, 4, "-7300", "88800");
        sys.bme280(2);
        let found = find_device(&sys.devices(), 4).unwrap();
        assert_eq!(found, dht);
        let mut s = IioSensor::open(Model::Dht22, found).unwrap();
        let m = s.read().unwrap();
        assert!((m.temperature_c + 7.3).abs() < 1e-9 && (m.humidity_pct - 88.8).abs() < 1e-9);
    }

    #[test]
    fn the_name_alone_finds_it_when_of_node_is_masked_as_in_a_container() {
        let sys = PiSysfs::new();
        sys.bme280(0);
        let dht = sys.dht11(1, 17, "21000", "40000");
        // Container runtimes mask /sys/firmware: of_node dangles.
        std::fs::remove_dir_all(sys.dir.path().join("firmware")).unwrap();
        assert_eq!(find_device(&sys.devices(), 4).unwrap(), dht);
        let seen = scan(&sys.devices()).unwrap();
        assert_eq!(seen[1].name.as_deref(), Ok("dht11@11"));
        assert_eq!(seen[1].gpio(), Some(17));
        assert!(seen[1].compatible.is_err());
    }

    #[test]
    fn the_compatible_alone_finds_it_whatever_the_node_is_called() {
        let sys = PiSysfs::new();
        sys.mcp3008(0);
        let dht = sys.add(
            1,
            "devices/platform/humidity-sensor",
            "humidity-sensor",
            Some(("humidity-sensor", b"dht11\0")),
            &[(TEMPERATURE, "1"), (HUMIDITY, "2")],
        );
        assert_eq!(find_device(&sys.devices(), 4).unwrap(), dht);
    }

    #[test]
    fn names_that_only_start_with_the_letters_do_not_match() {
        for (name, dht11) in [
            ("dht11", true),
            ("dht11@4", true),
            ("dht11@1b", true),
            ("dht11x", false),
            ("dht110", false),
            ("mcp3008", false),
            ("xdht11@4", false),
            ("", false),
        ] {
            assert_eq!(is_dht11_name(name), dht11, "{name:?}");
        }
        assert_eq!(split_compatible(b"dht11\0"), ["dht11"]);
        assert_eq!(
            split_compatible(b"brcm,bcm2711\0raspberrypi,4-model-b\0"),
            ["brcm,bcm2711", "raspberrypi,4-model-b"]
        );
    }

    #[test]
    fn none_found_lists_every_device_seen_and_the_fix() {
        let sys = PiSysfs::new();
        sys.mcp3008(0);
        sys.bme280(1);
        let e = find_device(&sys.devices(), 4).unwrap_err().0;
        for needle in [
            "iio:device0 (name \"mcp3008\", compatible \"microchip,mcp3008\")",
            "iio:device1 (name \"bme280\", compatible \"bosch,bme280\")",
            "it holds 2",
            "dht11@<pin in hex>",
            "dtoverlay=dht11,gpiopin=",
            "--iio-device",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from: {e}");
        }
        let empty = PiSysfs::new();
        let e = find_device(&empty.devices(), 4).unwrap_err().0;
        assert!(e.contains("it is empty"), "{e}");
        assert!(e.contains("dtoverlay=dht11,gpiopin="), "{e}");
        let e = find_device(&empty.dir.path().join("missing"), 4)
            .unwrap_err()
            .0;
        assert!(e.contains("dtoverlay=dht11,gpiopin="), "{e}");
        assert!(IioSensor::open(Model::Dht11, empty.devices()).is_err());
    }

    #[test]
    fn several_prefer_the_one_on_gpio_else_the_lowest_numbered() {
        let sys = PiSysfs::new();
        sys.mcp3008(0);
        let on_17 = sys.dht11(2, 17, "1", "1");
        let on_27 = sys.dht11(10, 27, "1", "1");
        assert_eq!(find_device(&sys.devices(), 27).unwrap(), on_27);
        assert_eq!(find_device(&sys.devices(), 17).unwrap(), on_17);
        // None on GPIO 4: iio:device2 before iio:device10 (numbers, not letters).
        assert_eq!(find_device(&sys.devices(), 4).unwrap(), on_17);
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
        let sys = PiSysfs::new();
        let dir = sys.dht11(0, 4, "-3276700", "45000");
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
    fn the_all_zero_frame_is_a_failed_read() {
        let sys = PiSysfs::new();
        let dir = sys.dht11(0, 4, "0", "0");
        let mut s = IioSensor::open(Model::Dht11, dir).unwrap();
        match s.read() {
            Err(e @ ReadError::Driver { .. }) => assert!(e.to_string().contains("all-zero"), "{e}"),
            other => panic!("{other:?}"),
        }
        // 0 °C with a real humidity is a reading.
        let dir = sys.dht11(1, 17, "0", "55000");
        let mut s = IioSensor::open(Model::Dht11, dir).unwrap();
        assert!(s.read().is_ok());
    }

    #[test]
    fn garbage_in_the_file_is_a_failed_read() {
        let sys = PiSysfs::new();
        let dir = sys.dht11(0, 4, "abc", "1000");
        let mut s = IioSensor::open(Model::Dht11, dir).unwrap();
        assert!(matches!(s.read(), Err(ReadError::Driver { .. })));
    }
}
