#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The IIO backend and the read policy against a fake sysfs device that caches like the kernel.
//!
//! The shape comes from drivers/iio/humidity/dht11.c (torvalds/linux; the Raspberry Pi tree is
//! the same here):
//! - `dht11_read_raw` measures only when
//!   `dht11->timestamp + DHT11_DATA_VALID_TIME < ktime_get_boottime_ns()`, with
//!   `DHT11_DATA_VALID_TIME` 2000000000 ns; otherwise it returns the values it holds;
//! - a measurement holds the line low for `usleep_range(DHT11_START_TRANSMISSION_MIN,
//!   DHT11_START_TRANSMISSION_MAX)` (18–20 ms), then waits for the frame's edges (~4 ms);
//! - `dht11->timestamp = ktime_get_boottime_ns()` is set in `dht11_decode` once the frame
//!   decoded — at the end of the read that took the sample;
//! - `in_temp_input` and `in_humidityrelative_input` are two channels of that one measurement.
//!
//! The files here are named pipes served by one thread each: the thread sees each open (a
//! read of the file), applies exactly that rule to a shared "driver" (fresh: sleep 20 ms, take
//! the sensor's next sample, stamp it; else the cached sample) and writes the milli-units. The
//! sensor's samples are scripted, one of them corrupt (45 °C, a frame that passed the checksum).
//!
//! What it proves: the corrupt sample is never published (its cached copy never confirms it:
//! every temperature read the publisher makes is a fresh measurement), every published reading
//! is confirmed by a different sample, and `read_at` is the time that sample was taken.

use std::{
    collections::VecDeque,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use k3sense_protocol::{Model, SensorId};
use k3sense_publisher::{
    ReadCounters, Update,
    reader::{self, Opener, ReaderConfig},
    sensor::{DRIVER_CACHE, IioSensor, OpenError, Sensor},
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// `DHT11_START_TRANSMISSION_MIN` plus a frame.
const MEASURE: Duration = Duration::from_millis(22);

/// One measurement the fake driver made.
#[derive(Debug, Clone, Copy)]
struct Sample {
    milli_c: i64,
    milli_rh: i64,
    /// The end of the read that took it (the driver's `timestamp`), on the wall clock.
    taken: DateTime<Utc>,
}

#[derive(Default)]
struct Driver {
    /// The end of the last successful measurement (the driver's `timestamp`).
    timestamp: Option<Instant>,
    current: Option<Sample>,
    /// What the sensor will send, in order; then the last one again.
    script: VecDeque<(i64, i64)>,
    /// Every measurement made.
    measured: Vec<Sample>,
    /// Reads of `in_temp_input` answered from the cache.
    cached_temperature_reads: usize,
}

impl Driver {
    /// `dht11_read_raw` for one channel.
    fn read_raw(&mut self, temperature: bool) -> i64 {
        let fresh = self
            .timestamp
            .is_none_or(|t| Instant::now() > t + DRIVER_CACHE);
        if fresh {
            thread::sleep(MEASURE);
            let (c, rh) = if self.script.len() > 1 {
                self.script.pop_front().unwrap()
            } else {
                self.script[0]
            };
            let sample = Sample {
                milli_c: c,
                milli_rh: rh,
                taken: Utc::now(),
            };
            self.timestamp = Some(Instant::now());
            self.current = Some(sample);
            self.measured.push(sample);
        } else if temperature {
            self.cached_temperature_reads += 1;
        }
        let sample = self.current.unwrap();
        if temperature {
            sample.milli_c
        } else {
            sample.milli_rh
        }
    }
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success(), "mkfifo {}", path.display());
}

/// Linux's `O_NONBLOCK`: opening a FIFO for writing then fails with ENXIO while nobody has it
/// open for reading.
const O_NONBLOCK: i32 = 0o4000;
const ENXIO: i32 = 6;

/// Serves one channel file: every open for reading is one `read_raw`.
fn serve(path: PathBuf, driver: Arc<Mutex<Driver>>, temperature: bool, stop: Arc<Mutex<bool>>) {
    use std::os::unix::fs::OpenOptionsExt;
    thread::spawn(move || {
        loop {
            // Blocks until the publisher opens the file.
            let Ok(mut writer) = std::fs::OpenOptions::new().write(true).open(&path) else {
                return;
            };
            if *stop.lock().unwrap() {
                return;
            }
            let value = driver.lock().unwrap().read_raw(temperature);
            let _ = writeln!(writer, "{value}");
            drop(writer);
            // Wait until that reader has closed the file, so its late close is not taken for
            // the next read.
            loop {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(O_NONBLOCK)
                    .open(&path)
                {
                    Err(e) if e.raw_os_error() == Some(ENXIO) => break,
                    Err(_) => return,
                    Ok(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_sample_is_never_confirmed_by_its_cached_copy_and_read_at_is_the_sample_time() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("iio:device0");
    std::fs::create_dir(&device).unwrap();
    std::fs::write(device.join("name"), "dht11@4\n").unwrap();
    let temperature = device.join("in_temp_input");
    let humidity = device.join("in_humidityrelative_input");
    mkfifo(&temperature);
    mkfifo(&humidity);
    let driver = Arc::new(Mutex::new(Driver {
        script: [
            (20_000, 40_000),
            (45_000, 41_000), // corrupt: a frame that passed the checksum
            (20_000, 40_000),
            (21_000, 41_000),
            (20_000, 40_000),
            (21_000, 41_000),
            (20_000, 40_000),
        ]
        .into(),
        ..Driver::default()
    }));
    let stop = Arc::new(Mutex::new(false));
    serve(
        temperature.clone(),
        Arc::clone(&driver),
        true,
        Arc::clone(&stop),
    );
    serve(
        humidity.clone(),
        Arc::clone(&driver),
        false,
        Arc::clone(&stop),
    );

    let sensor = IioSensor::open(Model::Dht11, device.clone()).unwrap();
    assert!(sensor.sampled_at_end());
    let first: Result<Box<dyn Sensor>, OpenError> = Ok(Box::new(sensor));
    let opener: Opener = Box::new(|| Err(OpenError("opened twice".into())));
    // 2 s asked for: the kernel's cache stretches it to 2.1 s, one read per interval, each
    // confirmed by the one before.
    let config = ReaderConfig::new(
        SensorId::new("pi-1").unwrap(),
        Model::Dht11,
        Duration::from_secs(2),
    );
    let (tx, mut rx) = mpsc::channel(100);
    let (counters, counters_rx) = watch::channel(ReadCounters::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(reader::run(
        opener,
        first,
        config,
        tx,
        counters,
        shutdown.clone(),
    ));
    let mut readings = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while readings.len() < 3 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Update::Measured(m))) => readings.push(m),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!(
                "only {} readings: {readings:?}; reads {:?}; measured {:?}",
                readings.len(),
                *counters_rx.borrow(),
                driver.lock().unwrap().measured
            ),
        }
    }
    shutdown.cancel();
    task.await.unwrap();
    *stop.lock().unwrap() = true;
    // Unblock the serving threads' pending opens.
    for path in [&temperature, &humidity] {
        let _ = std::fs::File::open(path);
    }

    let driver = driver.lock().unwrap();
    assert_eq!(
        driver.cached_temperature_reads, 0,
        "every read must be a fresh measurement, never the cached copy of the previous one"
    );
    assert!(
        readings.iter().all(|r| r.measurement.temperature_c != 45.0),
        "the corrupt sample was published: {readings:?}"
    );
    let c = *counters_rx.borrow();
    assert!(c.disagreed >= 2, "45 vs 20, 20 vs 45: {c:?}");
    for r in &readings {
        // The sample this reading is: the measurement whose end is nearest its read_at.
        let sample = driver
            .measured
            .iter()
            .min_by_key(|s| (s.taken - r.read_at).num_milliseconds().abs())
            .unwrap();
        let off = (sample.taken - r.read_at).num_milliseconds().abs();
        assert!(
            off < 500,
            "read_at {} is {off} ms from the sample it reports ({})",
            r.read_at,
            sample.taken
        );
        assert_eq!(
            (
                (r.measurement.temperature_c * 1000.0).round() as i64,
                (r.measurement.humidity_pct * 1000.0).round() as i64
            ),
            (sample.milli_c, sample.milli_rh),
            "reading {r:?} is not the sample taken at its read_at"
        );
    }
    // Measurements are at least the cache apart, so each reading and its confirmation are two.
    for pair in driver.measured.windows(2) {
        assert!(
            (pair[1].taken - pair[0].taken).num_milliseconds() > 2_000,
            "{pair:?}"
        );
    }
}
