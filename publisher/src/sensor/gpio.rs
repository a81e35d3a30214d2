//! DHT11/DHT22 on a GPIO pin, bit-banged with rppal.
//!
//! The host pulls the data line low (the start pulse: DHT11 ≥ 18 ms, DHT22 ~1 ms), releases it
//! (input with the pull-up), then busy-polls the line and timestamps every edge until the frame
//! is over or a deadline passes; [`dht::decode`] turns the edges into a reading.
//!
//! A frame's bits differ by ~43 µs, so the polling thread must not be preempted mid-frame. It is
//! therefore a dedicated OS thread (never a runtime or blocking-pool thread) that asks for
//! `SCHED_FIFO` real-time priority and locks the process's memory (`mlockall`) so no page fault
//! lands inside a frame; both need privileges a pod may not have, so each is best effort and
//! the log says whether it worked. Reads that still fail are retried by the read policy.

use std::{
    sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender},
    thread,
    time::{Duration, Instant},
};

use k3sense_protocol::Model;
use rppal::gpio::{Bias, Gpio, IoPin, Mode};

use super::{
    device::{OpenError, ReadError, Sensor},
    gpio_devices,
};
use crate::dht::{self, Edge, Level, Measurement, timing::FRAME_BITS};

/// How long the busy-poll may run after the release: the whole frame takes about 5 ms.
const CAPTURE_DEADLINE_US: u64 = 10_000;
/// The line idle (high) this long after a frame's worth of edges means the frame is over.
const IDLE_AFTER_FRAME_US: u64 = 500;
/// More edges than any frame has (start, release, response, 40 bits, final low, idle).
const MAX_EDGES: usize = 2 * FRAME_BITS + 16;
/// How long `read` waits for the GPIO thread before calling the sensor unavailable.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// `SCHED_FIFO` priority of the polling thread: above ordinary threads, below the kernel's
/// own interrupt threads (50).
const REALTIME_PRIORITY: u8 = 40;

/// The start pulse the host sends for `model`, in microseconds.
pub fn start_pulse_us(model: Model) -> u64 {
    match model {
        Model::Dht11 => 20_000,
        Model::Dht22 => 1_100,
    }
}

/// The data line as the capture loop sees it, so the loop can be tested without hardware.
pub trait DataLine {
    /// Drives the line low (output, low).
    fn drive_low(&mut self);
    /// Releases the line: input with the pull-up, so the sensor can pull it low.
    fn release(&mut self);
    /// The line's level now.
    fn is_high(&mut self) -> bool;
    /// A monotonic clock in microseconds.
    fn now_us(&mut self) -> u64;
    /// Waits about `us` microseconds (the start pulse; precision does not matter there).
    fn sleep_us(&mut self, us: u64);
}

/// One read's edges: start pulse, release, then every edge until the frame is over (the line
/// idle after a frame's worth of edges), [`CAPTURE_DEADLINE_US`] passes, or too many edges.
pub fn capture(line: &mut impl DataLine, model: Model) -> Vec<Edge> {
    let mut edges = Vec::with_capacity(MAX_EDGES + 1);
    line.drive_low();
    line.sleep_us(start_pulse_us(model));
    line.release();
    let start = line.now_us();
    let mut high = line.is_high();
    let mut since = start;
    let mut now = start;
    while now.saturating_sub(start) < CAPTURE_DEADLINE_US && edges.len() < MAX_EDGES {
        now = line.now_us();
        let level = line.is_high();
        if level != high {
            edges.push(edge(high, now - since));
            high = level;
            since = now;
        } else if high && edges.len() > 2 * FRAME_BITS && now - since > IDLE_AFTER_FRAME_US {
            break;
        }
    }
    edges.push(edge(high, now.saturating_sub(since)));
    edges
}

fn edge(high: bool, duration_us: u64) -> Edge {
    Edge {
        level: if high { Level::High } else { Level::Low },
        duration_us: u32::try_from(duration_us).unwrap_or(u32::MAX),
    }
}

/// The real line: an rppal pin switched between output-low and input-with-pull-up.
struct PinLine {
    pin: IoPin,
    epoch: Instant,
}

impl DataLine for PinLine {
    fn drive_low(&mut self) {
        self.pin.set_low();
        self.pin.set_mode(Mode::Output);
    }

    fn release(&mut self) {
        self.pin.set_bias(Bias::PullUp);
        self.pin.set_mode(Mode::Input);
    }

    fn is_high(&mut self) -> bool {
        self.pin.is_high()
    }

    fn now_us(&mut self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn sleep_us(&mut self, us: u64) {
        thread::sleep(Duration::from_micros(us));
    }
}

/// A DHT11/DHT22 read by bit-banging a GPIO pin on a dedicated real-time thread.
pub struct GpioSensor {
    model: Model,
    pin: u8,
    requests: SyncSender<()>,
    frames: Receiver<Vec<Edge>>,
}

impl GpioSensor {
    /// Opens BCM pin `pin` and starts the polling thread. Fails with what to do when this is
    /// not a Raspberry Pi, the GPIO device is missing or not ours, or the pin is taken.
    pub fn open(model: Model, pin: u8) -> Result<Self, OpenError> {
        let gpio = Gpio::new().map_err(|e| open_error(model, pin, &e))?;
        let io = gpio
            .get(pin)
            .map_err(|e| open_error(model, pin, &e))?
            .into_io(Mode::Input);
        let mut line = PinLine {
            pin: io,
            epoch: Instant::now(),
        };
        line.release();
        let (requests, wanted) = mpsc::sync_channel::<()>(1);
        let (sender, frames) = mpsc::sync_channel::<Vec<Edge>>(1);
        thread::Builder::new()
            .name(format!("dht-gpio{pin}"))
            .spawn(move || {
                reduce_preemption(pin);
                while wanted.recv().is_ok() {
                    if sender.send(capture(&mut line, model)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| {
                OpenError(format!(
                    "cannot start the GPIO polling thread for the {model} on GPIO {pin}: {e}"
                ))
            })?;
        tracing::info!(%model, gpio = pin, "reading the sensor by bit-banging GPIO with rppal");
        Ok(Self {
            model,
            pin,
            requests,
            frames,
        })
    }
}

impl Sensor for GpioSensor {
    fn model(&self) -> Model {
        self.model
    }

    fn read(&mut self) -> Result<Measurement, ReadError> {
        let gone = || {
            ReadError::Unavailable(format!(
                "the GPIO polling thread for GPIO {} stopped; reopening the sensor",
                self.pin
            ))
        };
        self.requests.send(()).map_err(|_| gone())?;
        let edges = match self.frames.recv_timeout(READ_TIMEOUT) {
            Ok(edges) => edges,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return Err(gone()),
        };
        Ok(dht::decode(self.model, &edges)?)
    }
}

/// Asks for `SCHED_FIFO` and locked memory for the polling thread, and logs what it got.
fn reduce_preemption(pin: u8) {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let realtime = ThreadPriorityValue::try_from(REALTIME_PRIORITY)
        .map_err(|e| e.to_string())
        .and_then(|value| {
            set_thread_priority_and_policy(
                thread_native_id(),
                ThreadPriority::Crossplatform(value),
                ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
            )
            .map_err(|e| format!("{e:?}"))
        });
    // MCL_CURRENT only: with MCL_FUTURE, an allocation beyond RLIMIT_MEMLOCK would fail
    // instead of merely being unlocked. The capture buffer is allocated before each frame.
    let locked = nix::sys::mman::mlockall(nix::sys::mman::MlockAllFlags::MCL_CURRENT)
        .map_err(|e| e.to_string());
    match (&realtime, &locked) {
        (Ok(()), Ok(())) => tracing::info!(
            gpio = pin,
            "GPIO polling thread runs SCHED_FIFO with locked memory: few reads will be lost to preemption"
        ),
        _ => tracing::warn!(
            gpio = pin,
            realtime = %realtime.err().unwrap_or_else(|| "ok".into()),
            mlockall = %locked.err().unwrap_or_else(|| "ok".into()),
            "could not fully protect the GPIO polling thread from preemption (needs CAP_SYS_NICE \
             and CAP_IPC_LOCK, or rtprio/memlock limits); more reads will fail and be retried — \
             the iio backend (dtoverlay=dht11) avoids this"
        ),
    }
}

/// Whether this Pi's GPIO is the Pi 5's RP1, whose registers are /dev/gpiomem0.
fn is_rp1() -> bool {
    use rppal::system::{DeviceInfo, Model as Pi};
    DeviceInfo::new().is_ok_and(|info| {
        matches!(
            info.model(),
            Pi::RaspberryPi5
                | Pi::RaspberryPi500
                | Pi::RaspberryPiComputeModule5
                | Pi::RaspberryPiComputeModule5Lite
        )
    })
}

/// For a failed device open, the file that failed and why, found by opening what rppal opens
/// under /dev (rppal's own error keeps too little; see [`gpio_devices`]).
fn diagnose(error: &rppal::gpio::Error) -> Option<String> {
    use rppal::gpio::Error as E;
    let not_found = match error {
        E::PermissionDenied(_) => false,
        E::Io(e) => e.kind() == std::io::ErrorKind::NotFound,
        _ => return None,
    };
    let failure = gpio_devices::probe(std::path::Path::new("/dev"), is_rp1(), not_found)?;
    Some(gpio_devices::explain(
        &failure,
        &gpio_devices::Identity::current(),
    ))
}

/// The one message for a GPIO open failure: the cause, then the fix.
fn open_error(model: Model, pin: u8, error: &rppal::gpio::Error) -> OpenError {
    open_error_with(model, pin, error, diagnose(error))
}

/// [`open_error`] with the device diagnosis given (`None`: none found or not a device error).
fn open_error_with(
    model: Model,
    pin: u8,
    error: &rppal::gpio::Error,
    diagnosis: Option<String>,
) -> OpenError {
    use rppal::gpio::Error as E;
    let what = format!("cannot read the {model} on GPIO {pin}");
    let device_fix = "pass /dev/gpiomem (Pi 5: /dev/gpiomem0) and /dev/gpiochip0 to the \
         publisher with the gpio-device-plugin overlay (deploy/overlays/gpio-device-plugin), and \
         give it their group (the gpio group id setting there); outside Kubernetes add the user \
         to that group (`sudo usermod -aG gpio $USER`); or use --sensor iio with \
         `dtoverlay=dht11,gpiopin=N`, which needs no device access";
    if let Some(diagnosis) = diagnosis {
        return OpenError(format!(
            "{what}: {diagnosis} (rppal: {error}). Or use --sensor iio with \
             `dtoverlay=dht11,gpiopin=N`, which needs no device access"
        ));
    }
    let text = match error {
        E::UnknownModel => format!(
            "{what}: this machine is not a Raspberry Pi (rppal: {error}). Run the publisher on \
             the Pi the sensor is wired to: label that node with `kubectl label node <node> \
             k3sense.io/sensor=dht11` so the publisher is scheduled there; without hardware use \
             --sensor sim"
        ),
        E::PermissionDenied(path) => {
            format!("{what}: permission denied opening {path}. Fix: {device_fix}")
        }
        E::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            format!("{what}: permission denied opening the GPIO device ({e}). Fix: {device_fix}")
        }
        E::Io(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
            "{what}: a GPIO device file (/dev/gpiomem, /dev/gpiomem0 or /dev/gpiochipN) does not \
             exist in this container or host ({e}). Fix: {device_fix}"
        ),
        E::PinNotAvailable(_) => format!(
            "{what}: this Pi has no GPIO {pin}; --gpio takes the BCM number (GPIO4 is physical \
             pin 7)"
        ),
        E::PinUsed(_) => format!(
            "{what}: the pin is in use by another process or driver; stop it, or if the kernel \
             dht11 overlay owns the pin use --sensor iio"
        ),
        other => format!("{what}: {other}. Fix: {device_fix}"),
    };
    OpenError(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dht::{Measurement, edges_for_frame, encode_frame};

    /// A line that plays back an edge train in virtual time; every poll costs `poll_us`.
    struct FakeLine {
        now: u64,
        poll_us: u64,
        released_at: Option<u64>,
        /// (level high?, until this many µs after the release)
        script: Vec<(bool, u64)>,
        low_for_us: u64,
    }

    impl FakeLine {
        fn new(train: &[Edge], poll_us: u64) -> Self {
            let mut at = 30; // the pull-up holds the line high until the sensor answers
            let mut script = vec![(true, at)];
            for e in train {
                at += u64::from(e.duration_us);
                script.push((e.level == Level::High, at));
            }
            Self {
                now: 0,
                poll_us,
                released_at: None,
                script,
                low_for_us: 0,
            }
        }
    }

    impl DataLine for FakeLine {
        fn drive_low(&mut self) {}
        fn release(&mut self) {
            self.released_at = Some(self.now);
        }
        fn is_high(&mut self) -> bool {
            self.now += self.poll_us;
            let Some(r) = self.released_at else {
                return false;
            };
            let t = self.now - r;
            self.script
                .iter()
                .find(|(_, until)| t < *until)
                .is_none_or(|(high, _)| *high)
        }
        fn now_us(&mut self) -> u64 {
            self.now
        }
        fn sleep_us(&mut self, us: u64) {
            self.low_for_us += us;
            self.now += us;
        }
    }

    #[test]
    fn captured_edges_decode_to_what_the_sensor_sent() {
        for (model, m) in [
            (
                Model::Dht11,
                Measurement {
                    temperature_c: 23.0,
                    humidity_pct: 41.0,
                },
            ),
            (
                Model::Dht22,
                Measurement {
                    temperature_c: -7.3,
                    humidity_pct: 88.8,
                },
            ),
        ] {
            for poll_us in [1, 2, 5] {
                let mut line = FakeLine::new(&edges_for_frame(encode_frame(model, m)), poll_us);
                let edges = capture(&mut line, model);
                assert_eq!(line.low_for_us, start_pulse_us(model));
                assert!(edges.len() >= 2 * FRAME_BITS + 3, "{}", edges.len());
                assert_eq!(dht::decode(model, &edges), Ok(m), "poll every {poll_us} µs");
                // It stopped soon after the frame, not at the deadline.
                assert!(line.now < 7_000 + start_pulse_us(model), "{}", line.now);
            }
        }
    }

    #[test]
    fn a_silent_line_stops_at_the_deadline_and_reports_no_response() {
        let mut line = FakeLine::new(&[], 1);
        let edges = capture(&mut line, Model::Dht11);
        assert!(line.now >= CAPTURE_DEADLINE_US);
        assert!(dht::decode(Model::Dht11, &edges).is_err());
    }

    #[test]
    fn off_a_pi_the_message_names_the_cause_and_the_fix() {
        let e = open_error(Model::Dht11, 4, &rppal::gpio::Error::UnknownModel);
        assert!(e.0.contains("not a Raspberry Pi"), "{e}");
        assert!(e.0.contains("k3sense.io/sensor=dht11"), "{e}");
        let e = open_error_with(
            Model::Dht22,
            4,
            &rppal::gpio::Error::PermissionDenied("/dev/gpiomem".into()),
            None,
        );
        assert!(
            e.0.contains("gpio-device-plugin") && e.0.contains("/dev/gpiochip0"),
            "{e}"
        );
        // With a diagnosis, the message is the diagnosis, with rppal's words after it.
        let e = open_error_with(
            Model::Dht11,
            4,
            &rppal::gpio::Error::PermissionDenied("/dev/gpiochip0".into()),
            Some("permission denied opening /dev/gpiochip0 (…)".into()),
        );
        assert!(
            e.0.starts_with(
                "cannot read the dht11 on GPIO 4: permission denied opening /dev/gpiochip0"
            ),
            "{e}"
        );
        assert!(
            e.0.contains("rppal: Permission denied: /dev/gpiochip0"),
            "{e}"
        );
    }
}
