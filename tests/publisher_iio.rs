//! `k3sense publisher --sensor iio` with no `--iio-device`, on a sysfs shaped like a Raspberry
//! Pi's with `dtoverlay=dht11,gpiopin=4`, finds the sensor at the real path
//! /sys/bus/iio/devices and publishes the values of its `in_temp_input` and
//! `in_humidityrelative_input`, as a real MQTT subscriber of a real broker receives them.
//!
//! The binary reads the real paths: each publisher runs in a private mount namespace
//! (`unshare -m`) where a fake sysfs tree is bind-mounted read-only over /sys, the way a
//! container sees sysfs. Needs `unshare` and the right to make a mount namespace (root); without
//! them the tests print a notice and pass, unless `CI` is set, where they fail.
//!
//! Where the tree's shape comes from (the unit tests in publisher/src/sensor/iio.rs say it in
//! more detail):
//! - /sys/bus/iio/devices/iio:deviceN are relative symlinks to the device under its parent in
//!   /sys/devices (Documentation/ABI/testing/sysfs-bus-iio);
//! - the Raspberry Pi overlay (raspberrypi/linux arch/arm/boot/dts/overlays/dht11-overlay.dts)
//!   makes the root node `dht11@4` (`gpiopin` rewrites the unit address, in hex), so the
//!   platform device is /sys/devices/platform/dht11@4, and the driver names its IIO device after
//!   it (`iio->name = pdev->name`, drivers/iio/humidity/dht11.c): `name` holds `dht11@4`;
//! - `of_node` links to /sys/firmware/devicetree/base/dht11@4, whose `compatible` is "dht11\0"
//!   (the IIO core hands the device its parent's node, drivers/iio/industrialio-core.c);
//! - other IIO devices a Pi may have: an MCP3008 ADC on SPI0 (`dtoverlay=mcp3008`) and a BME280
//!   on I2C1 (`dtoverlay=i2c-sensor,bme280`), which also has `in_temp_input` and
//!   `in_humidityrelative_input` and must not be picked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use support::*;

/// A /sys tree in a scratch directory, removed when dropped.
struct FakeSys {
    root: PathBuf,
}

impl Drop for FakeSys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl FakeSys {
    fn new() -> Self {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "fake-sys-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let fake = Self { root };
        std::fs::create_dir_all(fake.path("bus/iio/devices")).unwrap();
        fake
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `../` enough times to climb from `dir` (inside the tree) to the tree's root.
    fn up(&self, dir: &Path) -> String {
        let depth = dir.strip_prefix(&self.root).unwrap().components().count();
        "../".repeat(depth)
    }

    /// IIO device `n` at `place` (relative to /sys), its device-tree node `node` (relative to
    /// /sys/firmware/devicetree/base) with `compatible`, and its channel files.
    fn add(
        &self,
        n: u32,
        place: &str,
        name: &str,
        node: &str,
        compatible: &str,
        files: &[(&str, &str)],
    ) {
        let dir = self.path(place).join(format!("iio:device{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(dir.join("uevent"), "DEVTYPE=iio_device\n").unwrap();
        for (file, value) in files {
            std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
        }
        let base = self.path("firmware/devicetree/base").join(node);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("compatible"), format!("{compatible}\0")).unwrap();
        let node_name = node.rsplit('/').next().unwrap().split('@').next().unwrap();
        std::fs::write(base.join("name"), format!("{node_name}\0")).unwrap();
        std::os::unix::fs::symlink(
            format!("{}firmware/devicetree/base/{node}", self.up(&dir)),
            dir.join("of_node"),
        )
        .unwrap();
        let devices = self.path("bus/iio/devices");
        std::os::unix::fs::symlink(
            format!("{}{place}/iio:device{n}", self.up(&devices)),
            devices.join(format!("iio:device{n}")),
        )
        .unwrap();
    }

    /// A Pi 4 with an MCP3008 (iio:device0), the DHT11 on GPIO 4 (iio:device1) and a BME280
    /// (iio:device2).
    fn pi(temperature_milli: &str, humidity_milli: &str) -> Self {
        let fake = Self::new();
        fake.add(
            0,
            "devices/platform/soc/fe204000.spi/spi_master/spi0/spi0.0",
            "mcp3008",
            "soc/spi@7e204000/mcp3008@0",
            "microchip,mcp3008",
            &[
                ("in_voltage0_raw", "512"),
                ("in_voltage_scale", "3.222656250"),
            ],
        );
        fake.add(
            1,
            "devices/platform/dht11@4",
            "dht11@4",
            "dht11@4",
            "dht11",
            &[
                ("in_temp_input", temperature_milli),
                ("in_humidityrelative_input", humidity_milli),
            ],
        );
        // gpios = <&gpio 4 0>, big-endian cells.
        let gpios: Vec<u8> = [0x38u32, 4, 0]
            .iter()
            .flat_map(|c| c.to_be_bytes())
            .collect();
        std::fs::write(fake.path("firmware/devicetree/base/dht11@4/gpios"), gpios).unwrap();
        fake.add(
            2,
            "devices/platform/soc/fe804000.i2c/i2c-1/1-0076",
            "bme280",
            "soc/i2c@7e804000/bme280@76",
            "bosch,bme280",
            &[
                ("in_temp_input", "35125"),
                ("in_humidityrelative_input", "12500"),
            ],
        );
        fake
    }
}

/// Whether this machine lets us make a mount namespace and bind-mount in it. In CI a refusal
/// fails the test; elsewhere the test is skipped with a notice.
fn mount_namespaces_available() -> bool {
    if !tool_available("unshare") {
        return false;
    }
    let ok = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs none /mnt",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("publisher_iio needs `unshare -m` and mount rights (run CI as root)");
        }
        eprintln!("SKIPPED publisher_iio: cannot make a mount namespace here (needs root)");
    }
    ok
}

/// `k3sense publisher --sensor iio` (no --iio-device) seeing `fake` as /sys, read-only; with
/// `mask_firmware`, /sys/firmware is an empty read-only tmpfs, as container runtimes mask it.
fn start_publisher_on(fake: &FakeSys, mask_firmware: bool, broker: &str, id: &str) -> Proc {
    let mask = if mask_firmware {
        " && mount -t tmpfs -o ro none /sys/firmware"
    } else {
        ""
    };
    let script = format!(
        "mount --bind \"$1\" /sys && mount -o remount,bind,ro /sys{mask} && shift && exec \"$@\""
    );
    Proc::start(
        "unshare",
        &[
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
            fake.root.to_str().unwrap(),
            env!("CARGO_BIN_EXE_k3sense"),
            "publisher",
            "--sensor",
            "iio",
            "--sensor-id",
            id,
            "--broker",
            broker,
            "--interval",
            "1s",
            "--metrics-listen",
            "off",
        ],
    )
}

async fn publishes_the_files_values(mask_firmware: bool, id: &str) {
    if !mount_namespaces_available() {
        return;
    }
    // 23.4 °C and 41.0 %RH in the driver's milli-units.
    let fake = FakeSys::pi("23400", "41000");
    let broker = start_broker().await;
    let topic = format!("k3sense/{id}/state");
    let mut state = mqtt_subscriber(broker, &topic).await;
    let publisher = start_publisher_on(&fake, mask_firmware, &broker.to_string(), id);

    let (payload, _) = next_on(&mut state, &topic, Duration::from_secs(15)).await;
    let reading = k3sense_protocol::Reading::from_json(&payload).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&payload),
            publisher.log()
        )
    });
    assert_eq!(reading.sensor_id.as_str(), id);
    assert_eq!(
        reading.temperature_c,
        23400.0 / 1000.0,
        "{}",
        publisher.log()
    );
    assert_eq!(
        reading.humidity_pct,
        41000.0 / 1000.0,
        "{}",
        publisher.log()
    );

    // It took the dht11 device at the real path, not the BME280 that has the same files.
    let log = publisher.log();
    assert!(
        log.contains("device=/sys/bus/iio/devices/iio:device1"),
        "the publisher did not say it uses iio:device1:\n{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");

    // The next reading too (the driver's files still hold the same values).
    let (payload, _) = next_on(&mut state, &topic, Duration::from_secs(15)).await;
    let next = k3sense_protocol::Reading::from_json(&payload).unwrap();
    assert_eq!((next.temperature_c, next.humidity_pct), (23.4, 41.0));
    assert!(next.seq > reading.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iio_without_iio_device_finds_the_pis_dht11_at_4_and_publishes_its_files() {
    publishes_the_files_values(false, "pi-iio").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iio_finds_it_by_name_when_sys_firmware_is_masked_as_in_a_container() {
    publishes_the_files_values(true, "pi-iio-masked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iio_without_a_dht11_lists_what_it_saw() {
    if !mount_namespaces_available() {
        return;
    }
    let fake = FakeSys::new();
    fake.add(
        0,
        "devices/platform/soc/fe804000.i2c/i2c-1/1-0076",
        "bme280",
        "soc/i2c@7e804000/bme280@76",
        "bosch,bme280",
        &[
            ("in_temp_input", "35125"),
            ("in_humidityrelative_input", "12500"),
        ],
    );
    let broker = start_broker().await;
    let id = "pi-no-dht11";
    let topic = format!("k3sense/{id}/availability");
    let mut availability = mqtt_subscriber(broker, &topic).await;
    let publisher = start_publisher_on(&fake, false, &broker.to_string(), id);
    let (payload, _) = next_on(&mut availability, &topic, Duration::from_secs(15)).await;
    assert_eq!(payload, b"offline");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !publisher.log().contains("ERROR") {
        assert!(
            std::time::Instant::now() < deadline,
            "no error:\n{}",
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = publisher.log();
    for needle in [
        "/sys/bus/iio/devices",
        "iio:device0 (name \"bme280\", compatible \"bosch,bme280\")",
        "dtoverlay=dht11,gpiopin=",
    ] {
        assert!(log.contains(needle), "{needle:?} missing:\n{log}");
    }
}
