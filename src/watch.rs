//! `k3sense watch`: live readings from the broker in the terminal, like `mosquitto_sub` but
//! decoded, checked against the contract and aligned.
//!
//! ```text
//! SENSOR            TEMP   HUMIDITY  READ_AT                       SEQ      AGE
//! pi-1           23.0 °C     41.0 %  2026-11-27T04:00:00.123Z       42     0.4s  retained
//! pi-1           23.1 °C     41.0 %  2026-11-27T04:00:10.123Z       43     0.1s
//! pi-1           availability: offline
//! pi-1           sensor: not_answering since 2026-11-27T14:02:00.000Z: no_response (check wiring/pull-up)  errors: no_response=31
//! pi-1           sensor: ok since 2026-11-27T14:09:12.301Z
//! pi-2           invalid reading: temperature_c 99 is outside dht11's range  {"sensor_id":…
//! ```
//!
//! Readings that skip or repeat a `seq` are marked, so lost and duplicated messages show.
//! Exit codes: 0 after `--count` readings or Ctrl-C, 1 when the broker cannot be used, 2 usage.

use std::{collections::HashMap, process::ExitCode, time::Duration};

use chrono::{TimeDelta, Utc};
use clap::Args;
use k3sense_protocol::{
    Availability, HealthStatus, MqttConfig, Reading, SensorHealth, TopicKind, Topics,
    mqtt::{ClientEvent, ConnectionError, QoS},
};
use tokio_util::sync::CancellationToken;

use crate::connect;

/// Settings of `k3sense watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub mqtt: MqttConfig,

    /// Show only this sensor.
    #[arg(long, env = "K3SENSE_SENSOR_ID")]
    pub sensor_id: Option<String>,

    /// Exit (status 0) after this many readings, counting the retained ones shown first.
    #[arg(long, env = "K3SENSE_WATCH_COUNT", value_name = "N")]
    pub count: Option<u64>,

    /// Leave out the column header.
    #[arg(long, env = "K3SENSE_NO_HEADER")]
    pub no_header: bool,

    /// How long connecting may take before giving up.
    #[arg(long, env = "K3SENSE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

/// The width of the sensor column; longer ids widen their own line only.
const SENSOR_WIDTH: usize = 14;

/// Prints readings until `--count` readings were shown or `shutdown`.
pub async fn run(args: WatchArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let topics = match args.mqtt.topics() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("k3sense watch: {e}; fix --topic-prefix");
            return Ok(ExitCode::from(2));
        }
    };
    let filter = format!("{}/#", topics.prefix());
    let client_id = format!("k3sense-watch-{}", std::process::id());
    let connected = tokio::select! {
        c = connect::connect(&args.mqtt, &client_id, args.connect_timeout) => c,
        () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
    };
    let mut connected = match connected {
        Ok(c) => c,
        Err(refusal) => {
            eprintln!("k3sense watch: {}\n  fix: {}", refusal.problem, refusal.fix);
            return Ok(ExitCode::FAILURE);
        }
    };
    // The header is printed once the broker granted the subscription, so whatever is
    // published after it appears below it.
    let mut header_due = !args.no_header;
    let mut view = View::new(topics, args.sensor_id.clone());
    // Subscribed now, and by the client again after every reconnect.
    if let Err(e) = connected
        .client
        .subscribe(filter.as_str(), QoS::AtLeastOnce)
    {
        eprintln!("k3sense watch: cannot subscribe to {filter}: {e}");
        return Ok(ExitCode::FAILURE);
    }
    loop {
        let event = tokio::select! {
            e = connected.events.recv() => e,
            () = shutdown.cancelled() => break,
        };
        let Some(event) = event else {
            break;
        };
        match event {
            ClientEvent::Connected { .. } => {
                eprintln!("k3sense watch: reconnected to {}", args.mqtt.broker);
            }
            ClientEvent::Subscribed { granted } => {
                if !granted {
                    eprintln!(
                        "k3sense watch: the broker refused the subscription to {filter} (SUBACK \
                         0x80)\n  fix: the user may not read these topics; check the broker's ACL"
                    );
                    return Ok(ExitCode::FAILURE);
                }
                if header_due {
                    header_due = false;
                    println!("{}", header());
                }
            }
            ClientEvent::Message(m) => {
                let (line, is_reading) = view.line(&m.topic, &m.payload, m.retain);
                if let Some(line) = line {
                    println!("{line}");
                    if is_reading {
                        view.readings += 1;
                    }
                }
                if args.count.is_some_and(|n| view.readings >= n) {
                    break;
                }
            }
            ClientEvent::Disconnected { reason, retry_in } => {
                let why = match reason.error() {
                    Some(e @ (ConnectionError::ConnectionRefused(_) | ConnectionError::Io(_))) => {
                        connect::explain(e, &args.mqtt).problem
                    }
                    Some(other) => other.to_string(),
                    None => break,
                };
                let delay = retry_in.unwrap_or_default();
                eprintln!(
                    "k3sense watch: connection lost ({why}); retrying in {}",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                );
            }
            _ => {}
        }
    }
    connected.client.goodbye(GOODBYE_TIMEOUT).await;
    Ok(ExitCode::SUCCESS)
}

/// How long a stopping `watch` waits for the broker to take its DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

fn header() -> String {
    format!(
        "{:<SENSOR_WIDTH$} {:>8} {:>10}  {:<24} {:>8} {:>8}",
        "SENSOR", "TEMP", "HUMIDITY", "READ_AT", "SEQ", "AGE"
    )
}

/// Turns messages into lines; remembers each sensor's last `seq` to mark gaps and repeats.
struct View {
    topics: Topics,
    only: Option<String>,
    last_seq: HashMap<String, u64>,
    readings: u64,
}

impl View {
    fn new(topics: Topics, only: Option<String>) -> Self {
        Self {
            topics,
            only,
            last_seq: HashMap::new(),
            readings: 0,
        }
    }

    /// The line for one message (None when filtered out), and whether it is a valid reading.
    fn line(&mut self, topic: &str, payload: &[u8], retained: bool) -> (Option<String>, bool) {
        let Some((id, kind)) = self.topics.parse(topic) else {
            return (
                Some(format!(
                    "{:<SENSOR_WIDTH$} not a k3sense topic: {topic}  {}",
                    "?",
                    preview(payload)
                )),
                false,
            );
        };
        if self.only.as_deref().is_some_and(|only| only != id.as_str()) {
            return (None, false);
        }
        let retained = if retained { "  retained" } else { "" };
        // SensorId's Display ignores width; pad the plain string.
        let id = id.as_str();
        match kind {
            TopicKind::Availability => {
                let text = match Availability::from_payload(payload) {
                    Ok(a) => format!("availability: {a}"),
                    Err(_) => format!("invalid availability: {}", preview(payload)),
                };
                (Some(format!("{id:<SENSOR_WIDTH$} {text}{retained}")), false)
            }
            TopicKind::Sensor => {
                let text = match SensorHealth::from_json(payload) {
                    Ok(h) => health_text(&h),
                    Err(_) if payload.is_empty() => "sensor: (cleared)".to_owned(),
                    Err(e) => format!("invalid sensor health: {e}  {}", preview(payload)),
                };
                (Some(format!("{id:<SENSOR_WIDTH$} {text}{retained}")), false)
            }
            TopicKind::State => match Reading::from_json(payload) {
                Ok(r) if r.sensor_id.as_str() != id => (
                    Some(format!(
                        "{id:<SENSOR_WIDTH$} invalid reading: sensor_id {} does not match the topic  {}",
                        r.sensor_id,
                        preview(payload)
                    )),
                    false,
                ),
                Ok(r) => {
                    let seq_note = match self.last_seq.insert(id.to_owned(), r.seq) {
                        Some(last) if r.seq == last + 1 => String::new(),
                        Some(last) if r.seq > last + 1 => {
                            format!("  {} missing", r.seq - last - 1)
                        }
                        Some(last) if r.seq == last => "  duplicate".to_owned(),
                        Some(_) => "  seq went back (publisher restarted?)".to_owned(),
                        None => String::new(),
                    };
                    let line = format!(
                        "{id:<SENSOR_WIDTH$} {:>5.1} °C {:>8.1} %  {:<24} {:>8} {:>8}{retained}{seq_note}",
                        r.temperature_c,
                        r.humidity_pct,
                        k3sense_protocol::format_read_at(&r.read_at),
                        r.seq,
                        format_age(Utc::now() - r.read_at),
                    );
                    (Some(line), true)
                }
                Err(e) => (
                    Some(format!(
                        "{id:<SENSOR_WIDTH$} invalid reading: {e}  {}",
                        preview(payload)
                    )),
                    false,
                ),
            },
        }
    }
}

/// `sensor: ok since …` or `sensor: not_answering since …: reason (hint)  errors: kind=n, …`.
pub fn health_text(h: &SensorHealth) -> String {
    let since = k3sense_protocol::format_read_at(&h.since);
    let mut text = format!("sensor: {} since {since}", h.status);
    if h.status == HealthStatus::NotAnswering {
        if let Some(reason) = h.reason {
            text.push_str(&format!(": {reason} ({})", reason.hint()));
        }
    }
    if !h.errors.is_empty() {
        let errors: Vec<String> = h.errors.iter().map(|(k, n)| format!("{k}={n}")).collect();
        text.push_str(&format!("  errors: {}", errors.join(", ")));
    }
    text
}

/// The start of a payload, printable, for lines about invalid messages.
fn preview(payload: &[u8]) -> String {
    const MAX: usize = 60;
    let text = String::from_utf8_lossy(payload);
    let mut shown: String = text
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if text.chars().count() > MAX {
        shown.push('…');
    }
    if shown.is_empty() {
        "(empty payload)".to_owned()
    } else {
        shown
    }
}

/// How old a reading is, compactly: `0.4s`, `12s`, `5m`, `3h`, `2d`; negative when the
/// sender's clock is ahead of ours.
pub fn format_age(age: TimeDelta) -> String {
    let ms = age.num_milliseconds();
    let sign = if ms < 0 { "-" } else { "" };
    let ms = ms.unsigned_abs();
    let text = match ms {
        0..10_000 => format!("{}.{}s", ms / 1000, (ms % 1000) / 100),
        10_000..120_000 => format!("{}s", ms / 1000),
        120_000..7_200_000 => format!("{}m", ms / 60_000),
        7_200_000..172_800_000 => format!("{}h", ms / 3_600_000),
        _ => format!("{}d", ms / 86_400_000),
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64, t: f64) -> Vec<u8> {
        format!(r#"{{"sensor_id":"pi-1","model":"dht11","temperature_c":{t},"humidity_pct":41.0,"read_at":"2026-11-27T04:00:00.123Z","seq":{seq}}}"#).into_bytes()
    }

    #[test]
    fn readings_are_decoded_aligned_and_sequence_checked() {
        let mut v = View::new(Topics::default(), None);
        let (line, ok) = v.line("k3sense/pi-1/state", &reading(42, 23.0), true);
        let line = line.unwrap();
        assert!(ok);
        assert!(line.starts_with("pi-1 "), "{line}");
        assert!(
            line.contains(" 23.0 °C ") && line.contains(" 41.0 % "),
            "{line}"
        );
        assert!(
            line.contains("2026-11-27T04:00:00.123Z") && line.contains(" 42 "),
            "{line}"
        );
        assert!(line.ends_with("retained"), "{line}");
        let header = header();
        let column = |text: &str, at: &str| text.find(at).map(|i| text[..i].chars().count());
        assert_eq!(
            column(&header, "READ_AT"),
            column(&line, "2026-"),
            "columns line up:\n{header}\n{line}"
        );
        let (line, _) = v.line("k3sense/pi-1/state", &reading(45, 23.0), false);
        assert!(line.unwrap().ends_with("2 missing"));
        let (line, _) = v.line("k3sense/pi-1/state", &reading(45, 23.0), false);
        assert!(line.unwrap().ends_with("duplicate"));
    }

    #[test]
    fn availability_invalid_and_foreign_messages_are_shown_as_such() {
        let mut v = View::new(Topics::default(), None);
        let (line, ok) = v.line("k3sense/pi-1/availability", b"offline", false);
        assert_eq!(
            line.unwrap().trim_end(),
            format!("{:<SENSOR_WIDTH$} availability: offline", "pi-1")
        );
        assert!(!ok);
        let (line, ok) = v.line("k3sense/pi-1/state", &reading(1, 99.0), false);
        let line = line.unwrap();
        assert!(!ok);
        assert!(
            line.contains("invalid reading: ") && line.contains("temperature_c"),
            "{line}"
        );
        let (line, _) = v.line("k3sense/pi-1/state", b"", false);
        assert!(line.unwrap().contains("(empty payload)"));
        let (line, _) = v.line("k3sense/pi-2/state", &reading(1, 20.0), false);
        assert!(line.unwrap().contains("does not match the topic"));
        let (line, _) = v.line("k3sense/x/y/z", b"hi", false);
        assert!(line.unwrap().contains("not a k3sense topic: k3sense/x/y/z"));
    }

    #[test]
    fn sensor_health_is_shown_with_its_reason_and_hint() {
        let mut v = View::new(Topics::default(), None);
        let (line, ok) = v.line(
            "k3sense/pi-1/sensor",
            br#"{"sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"no_response","errors":{"no_response":31,"checksum":2}}"#,
            true,
        );
        assert!(!ok);
        assert_eq!(
            line.unwrap(),
            format!(
                "{:<SENSOR_WIDTH$} sensor: not_answering since 2026-11-27T14:02:00.000Z: no_response (check wiring/pull-up)  errors: checksum=2, no_response=31  retained",
                "pi-1"
            )
        );
        let (line, _) = v.line(
            "k3sense/pi-1/sensor",
            br#"{"sensor_id":"pi-1","status":"ok","since":"2026-11-27T14:09:00.000Z"}"#,
            false,
        );
        assert!(
            line.unwrap()
                .ends_with("sensor: ok since 2026-11-27T14:09:00.000Z")
        );
    }

    #[test]
    fn a_sensor_filter_hides_the_others() {
        let mut v = View::new(Topics::default(), Some("pi-2".into()));
        assert_eq!(
            v.line("k3sense/pi-1/state", &reading(1, 20.0), false),
            (None, false)
        );
    }

    #[test]
    fn ages_are_compact() {
        let ms = TimeDelta::milliseconds;
        assert_eq!(format_age(ms(400)), "0.4s");
        assert_eq!(format_age(ms(12_300)), "12s");
        assert_eq!(format_age(ms(300_000)), "5m");
        assert_eq!(format_age(ms(3 * 3_600_000)), "3h");
        assert_eq!(format_age(ms(3 * 86_400_000)), "3d");
        assert_eq!(format_age(ms(-1500)), "-1.5s");
    }
}
