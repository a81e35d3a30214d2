//! `k3sense check`: diagnoses a node, one line per check, each `ok` or what to fix.
//!
//! ```text
//! broker   ok    127.0.0.1:1883 accepted the connection (CONNACK 0: connection accepted), no username
//! sensors  info  pi-1 online, last reading 23.0 °C 41.0 % 4s ago (seq 42)
//! sensor   ok    dht11 on GPIO 4 read 23.0 °C 41.0 % (first attempt)
//! sensors  FAIL  pi-2 online, but its sensor is not answering since 14:02 UTC (no_response)
//!          fix:  pi-2: check wiring/pull-up
//! gateway  FAIL  http://gateway:8080/readyz answered 503: not subscribed to the MQTT broker
//!          fix:  the gateway cannot reach the broker; check its --broker and credentials
//! ```
//!
//! Exit codes: 0 every check passed, 1 at least one failed, 2 the command line is wrong.

use std::{collections::BTreeMap, fmt, process::ExitCode, time::Duration};

use chrono::Utc;
use clap::Args;
use k3sense_protocol::{
    Availability, HealthStatus, MqttConfig, Reading, SensorHealth, SensorId, TopicKind,
    mqtt::{ClientEvent, QoS},
};
use k3sense_publisher::{SensorBackend, SensorConfig, SensorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{connect, watch::format_age};

/// Settings of `k3sense check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub mqtt: MqttConfig,

    /// Gateway to check (GET /healthz and /readyz), e.g. http://127.0.0.1:8080 or
    /// http://gateway.k3sense:8080. Not checked when not given.
    #[arg(long, env = "K3SENSE_GATEWAY", value_name = "URL", value_parser = GatewayUrl::parse)]
    pub gateway: Option<GatewayUrl>,

    /// Checks to leave out, comma-separated: broker, sensor (e.g. on a node without a sensor).
    #[arg(long, env = "K3SENSE_SKIP", value_enum, value_delimiter = ',')]
    pub skip: Vec<Part>,

    /// How long each check may take.
    #[arg(long, env = "K3SENSE_CHECK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// The sensor to try: the publisher's own flags and variables, so inside a publisher pod
    /// `check` reads the backend that publisher is configured for. Last, because the heading
    /// applies to every flag after it.
    #[command(flatten, next_help_heading = "Sensor")]
    pub backend: SensorBackend,
}

/// A check that `--skip` can leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// MQTT CONNECT with the given credentials, and what the broker holds.
    Broker,
    /// One read of the sensor.
    Sensor,
}

/// A plain-HTTP gateway address: host, port and a base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    host: String,
    port: u16,
    base: String,
}

impl GatewayUrl {
    /// Accepts `http://host[:port][/base]` or `host:port`; port 80 when not given.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("https://") {
            return Err(
                "https is not supported by check: give the gateway's plain-HTTP \
                        address inside the cluster, e.g. http://gateway.k3sense:8080"
                    .into(),
            );
        }
        let rest = s.strip_prefix("http://").unwrap_or(s);
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let bad = || format!("{s:?} is not a gateway URL; write it as http://host:port");
        let (host, port) = match authority.rsplit_once(':') {
            _ if authority.ends_with(']') => (authority, 80),
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (authority, 80),
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            base: path.trim_end_matches('/').to_owned(),
        })
    }
}

impl fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.base)
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok(String),
    Info(String),
    Fail { problem: String, fix: String },
}

/// Runs every check that applies, prints one line each, and says how it went as an exit code.
pub async fn run(args: CheckArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut report = |name: &str, outcome: Outcome| {
        let (status, text, fix) = match outcome {
            Outcome::Ok(text) => ("ok", text, None),
            Outcome::Info(text) => ("info", text, None),
            Outcome::Fail { problem, fix } => {
                failed = true;
                ("FAIL", problem, Some(fix))
            }
        };
        println!("{name:<8} {status:<5} {text}");
        if let Some(fix) = fix {
            println!("{:<8} {:<5} {fix}", "", "fix:");
        }
    };
    let checks = async {
        if !args.skip.contains(&Part::Broker) {
            for (name, outcome) in check_broker(&args.mqtt, args.timeout).await {
                report(name, outcome);
            }
        }
        if !args.skip.contains(&Part::Sensor) {
            report("sensor", check_sensor(&args).await);
        }
        if let Some(url) = &args.gateway {
            report("gateway", check_gateway(url, args.timeout).await);
        }
    };
    tokio::select! {
        () = checks => {}
        () = shutdown.cancelled() => {
            println!("interrupted");
            return Ok(ExitCode::from(130));
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How long `check` waits for the broker to take its DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after the SUBACK retained messages may take to arrive (they follow it at once).
const RETAINED_GRACE: Duration = Duration::from_millis(500);

/// CONNECT → CONNACK with the given credentials; then what the broker holds for k3sense.
async fn check_broker(mqtt: &MqttConfig, timeout: Duration) -> Vec<(&'static str, Outcome)> {
    let client_id = format!("k3sense-check-{}", std::process::id());
    let mut connected = match connect::connect(mqtt, &client_id, timeout).await {
        Ok(c) => c,
        Err(refusal) => {
            return vec![(
                "broker",
                Outcome::Fail {
                    problem: refusal.problem,
                    fix: refusal.fix,
                },
            )];
        }
    };
    let who = match &mqtt.username {
        Some(user) => format!("as user {user:?}"),
        None => "without a username".to_owned(),
    };
    let broker_line = Outcome::Ok(format!(
        "{} accepted the connection {who} (CONNACK {})",
        mqtt.broker,
        connect::connack_meaning(rumqttc::ConnectReturnCode::Success)
    ));
    let sensors = match mqtt.topics() {
        Ok(topics) => {
            let seen =
                retained_sensors(&mut connected, &format!("{}/#", topics.prefix()), timeout).await;
            describe_sensors(&topics, seen)
        }
        Err(e) => Outcome::Fail {
            problem: e.to_string(),
            fix: "fix --topic-prefix (no wildcards, no leading $, no empty levels)".into(),
        },
    };
    connected.client.goodbye(GOODBYE_TIMEOUT).await;
    vec![("broker", broker_line), ("sensors", sensors)]
}

/// Subscribes to the prefix and gathers the retained messages that follow the SUBACK.
async fn retained_sensors(
    connected: &mut connect::Connected,
    filter: &str,
    timeout: Duration,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    if let Err(e) = connected.client.subscribe(filter, QoS::AtMostOnce) {
        return Err(e.to_string());
    }
    let mut seen = Vec::new();
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut acked = false;
    loop {
        match tokio::time::timeout_at(deadline, connected.events.recv()).await {
            Err(_) if acked => return Ok(seen),
            Err(_) => return Err(format!("no SUBACK for {filter}")),
            Ok(None) => return Err(format!("the client stopped after SUBSCRIBE {filter}")),
            Ok(Some(ClientEvent::Disconnected { reason, .. })) => {
                let why = reason
                    .error()
                    .map_or_else(|| "goodbye".to_owned(), ToString::to_string);
                return Err(format!(
                    "the broker closed the connection after SUBSCRIBE {filter}: {why}"
                ));
            }
            Ok(Some(ClientEvent::Subscribed { .. })) => {
                acked = true;
                deadline = tokio::time::Instant::now() + RETAINED_GRACE;
            }
            Ok(Some(ClientEvent::Message(m))) => {
                seen.push((m.topic, m.payload.to_vec()));
            }
            Ok(Some(_)) => {}
        }
    }
}

fn describe_sensors(
    topics: &k3sense_protocol::Topics,
    seen: Result<Vec<(String, Vec<u8>)>, String>,
) -> Outcome {
    let seen = match seen {
        Ok(seen) => seen,
        Err(problem) => {
            return Outcome::Fail {
                problem,
                fix: "the user may not subscribe to the prefix, or --topic-prefix is wrong".into(),
            };
        }
    };
    #[derive(Default)]
    struct Seen {
        status: Option<Availability>,
        latest: Option<Result<Reading, String>>,
        health: Option<SensorHealth>,
    }
    let mut sensors: BTreeMap<SensorId, Seen> = BTreeMap::new();
    for (topic, payload) in seen {
        let Some((id, kind)) = topics.parse(&topic) else {
            continue;
        };
        let entry = sensors.entry(id).or_default();
        match kind {
            TopicKind::State => {
                entry.latest = Some(Reading::from_json(&payload).map_err(|e| e.to_string()));
            }
            TopicKind::Availability => entry.status = Availability::from_payload(&payload).ok(),
            TopicKind::Sensor => entry.health = SensorHealth::from_json(&payload).ok(),
        }
    }
    if sensors.is_empty() {
        return Outcome::Info(format!(
            "no retained readings under {}/ yet: no publisher has published to this broker \
             (or it uses another --topic-prefix)",
            topics.prefix()
        ));
    }
    let now = Utc::now();
    let mut fixes = Vec::new();
    let parts: Vec<String> = sensors
        .into_iter()
        .map(|(id, seen)| {
            let status = seen.status.map_or("status unknown", Availability::as_str);
            if let Some(h) = seen
                .health
                .filter(|h| h.status == HealthStatus::NotAnswering)
            {
                let reason = h.reason.map_or("no reason given", |r| r.as_str());
                fixes.push(format!(
                    "{id}: {}",
                    h.reason.map_or("see its publisher's log", |r| r.hint())
                ));
                return format!(
                    "{id} {status}, but its sensor is not answering since {} ({reason}, {} ago)",
                    h.since.format("%H:%M UTC"),
                    format_age(now - h.since)
                );
            }
            match seen.latest {
                Some(Ok(r)) => format!(
                    "{id} {status}, last reading {:.1} °C {:.1} % {} ago (seq {})",
                    r.temperature_c,
                    r.humidity_pct,
                    format_age(now - r.read_at),
                    r.seq
                ),
                Some(Err(e)) => format!("{id} {status}, retained state is invalid: {e}"),
                None => format!("{id} {status}, no reading yet"),
            }
        })
        .collect();
    if fixes.is_empty() {
        Outcome::Info(parts.join("; "))
    } else {
        Outcome::Fail {
            problem: parts.join("; "),
            fix: fixes.join("; "),
        }
    }
}

/// How many reads the sensor check tries; userspace GPIO reads fail a fraction of the time.
const SENSOR_ATTEMPTS: u32 = 5;

/// Opens the backend and reads it once (a few attempts, paced like the publisher reads).
async fn check_sensor(args: &CheckArgs) -> Outcome {
    let backend = &args.backend;
    let config = SensorConfig {
        backend: backend.clone(),
        ..SensorConfig::sim("check", Duration::from_secs(1))
    };
    let what = match backend.sensor {
        SensorKind::Sim => format!("simulated {}", config.effective_model()),
        SensorKind::Dht11 | SensorKind::Dht22 => {
            format!("{} on GPIO {}", config.effective_model(), backend.gpio)
        }
        SensorKind::Iio => match &backend.iio_device {
            Some(path) => format!("iio {} at {}", config.effective_model(), path.display()),
            None => format!("iio {}", config.effective_model()),
        },
    };
    let attempt = tokio::task::spawn_blocking(move || read_once(&config));
    match attempt.await {
        Ok(Ok((t, h, attempts))) => {
            let tries = if attempts == 1 {
                "first attempt".to_owned()
            } else {
                format!("attempt {attempts} of {SENSOR_ATTEMPTS}")
            };
            let note = if backend.sensor == SensorKind::Sim {
                "; no hardware involved: give --sensor dht11|dht22|iio to check the real one"
            } else {
                ""
            };
            Outcome::Ok(format!("{what} read {t:.1} °C {h:.1} % ({tries}){note}"))
        }
        Ok(Err(SensorFailure::Open(e))) => Outcome::Fail {
            problem: format!("cannot open the {what}: {e}"),
            fix: "see the message above; on a Pi without GPIO access use --sensor iio with \
                  dtoverlay=dht11,gpiopin=N (deploy/README.md)"
                .into(),
        },
        Ok(Err(SensorFailure::Clone)) => Outcome::Fail {
            problem: format!(
                "the {what} read about -3270 °C: a DHT22 clone that sends negatives in two's \
                 complement, which the kernel driver decodes as sign and magnitude"
            ),
            fix: "read it with the GPIO backend, whose decoder reads both (--sensor dht22, \
                  deploy/overlays/gpio-device-plugin), or use a genuine AM2302"
                .into(),
        },
        Ok(Err(SensorFailure::KernelEio(e))) => Outcome::Fail {
            problem: format!(
                "the {what} failed all {SENSOR_ATTEMPTS} reads with EIO (the driver refused \
                 every frame): {e}"
            ),
            fix: KERNEL_TENTHS_FIX.into(),
        },
        Ok(Err(SensorFailure::Read(e))) => Outcome::Fail {
            problem: format!(
                "the {what} did not give a valid reading in {SENSOR_ATTEMPTS} attempts: {e}"
            ),
            fix: "check the wiring (data pin, 3.3 V, a 4.7–10 kΩ pull-up) and --gpio; a running \
                  publisher on this node holds the sensor, so stop it or run check inside its pod"
                .into(),
        },
        Err(e) => Outcome::Fail {
            problem: format!("the sensor read crashed: {e}"),
            fix: "report this as a bug".into(),
        },
    }
}

enum SensorFailure {
    Open(String),
    Read(String),
    /// Every read failed with EIO from the kernel driver.
    KernelEio(String),
    /// A two's-complement DHT22 clone read through the kernel driver.
    Clone,
}

/// What to do when the kernel driver fails every read with EIO. Newer DHT11 chips send tenths
/// (byte 1 and 3 not zero); the driver took them for garbage ("Don't know how to decode
/// data") until "iio: humidity: dht11: Allow non-zero decimals" (raspberrypi/linux pull
/// request 6454, merged into the Raspberry Pi kernel 2024-11-06).
pub const KERNEL_TENTHS_FIX: &str = "if `dmesg` shows \"dht11 … Don't know how to decode data\", \
     this is a DHT11 that sends tenths and the kernel predates the fix \"iio: humidity: dht11: \
     Allow non-zero decimals\" (Raspberry Pi kernel, November 2024): update the kernel (`sudo apt \
     full-upgrade` and reboot), or read the sensor with the GPIO backend (--sensor dht11), whose \
     decoder reads tenths. Otherwise EIO means bad frames: check the wiring and the pull-up";

/// Blocking: opens the backend and tries up to [`SENSOR_ATTEMPTS`] reads, paced by the sensor.
fn read_once(config: &SensorConfig) -> Result<(f64, f64, u32), SensorFailure> {
    let mut sensor =
        k3sense_publisher::sensor::open(config).map_err(|e| SensorFailure::Open(e.0))?;
    let pacing = sensor.pacing();
    std::thread::sleep(pacing.settle);
    let id = SensorId::new("check").map_err(|e| SensorFailure::Read(e.to_string()))?;
    let mut last = String::new();
    let mut eio = 0;
    for attempt in 1..=SENSOR_ATTEMPTS {
        if attempt > 1 {
            std::thread::sleep(pacing.min_spacing);
        }
        match sensor.read() {
            Ok(m) => match Reading::new(
                id.clone(),
                sensor.model(),
                m.temperature_c,
                m.humidity_pct,
                Utc::now(),
                0,
            ) {
                Ok(r) => return Ok((r.temperature_c, r.humidity_pct, attempt)),
                Err(e) => last = format!("implausible values: {e}"),
            },
            Err(e) if e.is_twos_complement_clone() => return Err(SensorFailure::Clone),
            Err(e) => {
                eio += u32::from(e.is_kernel_eio());
                last = e.to_string();
            }
        }
    }
    if eio == SENSOR_ATTEMPTS {
        return Err(SensorFailure::KernelEio(last));
    }
    Err(SensorFailure::Read(last))
}

/// GET /healthz, /readyz and /api/status (a ready gateway may have lost its broker: it then
/// serves the last readings, and says so there).
async fn check_gateway(url: &GatewayUrl, timeout: Duration) -> Outcome {
    let mut answers = Vec::new();
    for path in ["/healthz", "/readyz", "/api/status"] {
        let full = format!("{url}{path}");
        let (status, body) = match tokio::time::timeout(timeout, http_get(url, path)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Outcome::Fail {
                    problem: format!("cannot reach {full}: {e}"),
                    fix: "is the gateway running and listening there (k3sense gateway --listen)? \
                          In the cluster: http://gateway.k3sense:8080"
                        .into(),
                };
            }
            Err(_) => {
                return Outcome::Fail {
                    problem: format!(
                        "{full} did not answer within {}",
                        humantime::format_duration(timeout)
                    ),
                    fix: "the gateway is overloaded or a firewall drops the connection".into(),
                };
            }
        };
        let said = body.lines().next().unwrap_or_default().trim().to_owned();
        if status != 200 {
            let fix = match (path, status) {
                ("/readyz", 503) if said.contains("subscribed") => {
                    "the gateway cannot reach the broker: check its --broker, --username and \
                     password, and run `k3sense check` with the same settings"
                }
                ("/readyz", 503) => "the gateway is shutting down or not yet started",
                // A gateway from before /api/status: /readyz 200 meant subscribed there.
                ("/api/status", 404) => break,
                (_, 404) => "this is not a k3sense gateway (or the URL has a wrong base path)",
                _ => "look at the gateway's log",
            };
            return Outcome::Fail {
                problem: format!("{full} answered {status}: {said}"),
                fix: fix.into(),
            };
        }
        if path == "/api/status" {
            // {"broker":{"status":"connected","since":"…"}}, written compactly by the gateway.
            let field = |name: &str| {
                body.split(&format!("\"{name}\":\""))
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or("unknown")
                    .to_owned()
            };
            if field("status") != "connected" {
                return Outcome::Fail {
                    problem: format!(
                        "{full}: broker {} since {} (the page shows the last readings)",
                        field("status"),
                        field("since")
                    ),
                    fix: "the gateway cannot reach the broker: check that the broker runs, the \
                          gateway's --broker, --username and password, and run `k3sense check` \
                          with the same settings"
                        .into(),
                };
            }
            continue;
        }
        answers.push(format!("{path} 200"));
    }
    Outcome::Ok(format!(
        "{url}: {} (live, and subscribed to its broker)",
        answers.join(", ")
    ))
}

/// A minimal HTTP/1.1 GET: (status, body). The gateway answers health checks in plain text.
async fn http_get(url: &GatewayUrl, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect((
        url.host.trim_start_matches('[').trim_end_matches(']'),
        url.port,
    ))
    .await?;
    let request = format!(
        "GET {}{path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: k3sense-check\r\nConnection: close\r\n\r\n",
        url.base, url.host, url.port
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("the answer is not HTTP"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls() {
        let u = GatewayUrl::parse("http://gateway.k3sense:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("gateway.k3sense", 8080, "")
        );
        let u = GatewayUrl::parse("127.0.0.1:9000/sensors/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("127.0.0.1", 9000, "/sensors")
        );
        assert_eq!(u.to_string(), "http://127.0.0.1:9000/sensors");
        assert_eq!(GatewayUrl::parse("http://gw").unwrap().port, 80);
        assert!(
            GatewayUrl::parse("https://gw")
                .unwrap_err()
                .contains("https")
        );
        assert!(GatewayUrl::parse("http://gw:http").is_err());
        assert!(GatewayUrl::parse("http://:80").is_err());
    }

    #[test]
    fn sensors_on_the_broker_are_summarised() {
        let topics = k3sense_protocol::Topics::default();
        let none = describe_sensors(&topics, Ok(vec![]));
        assert!(matches!(none, Outcome::Info(t) if t.contains("no retained readings")));
        let reading = br#"{"sensor_id":"pi-1","model":"dht11","temperature_c":23.0,"humidity_pct":41.0,"read_at":"2026-11-27T04:00:00.123Z","seq":42}"#;
        let some = describe_sensors(
            &topics,
            Ok(vec![
                ("k3sense/pi-1/state".into(), reading.to_vec()),
                ("k3sense/pi-1/availability".into(), b"online".to_vec()),
                ("k3sense/pi-2/state".into(), b"{}".to_vec()),
            ]),
        );
        let Outcome::Info(text) = some else {
            panic!("{some:?}")
        };
        assert!(
            text.contains("pi-1 online, last reading 23.0 °C 41.0 %"),
            "{text}"
        );
        assert!(text.contains("(seq 42)"), "{text}");
        assert!(
            text.contains("pi-2 status unknown, retained state is invalid"),
            "{text}"
        );
        let refused = describe_sensors(&topics, Err("no SUBACK".into()));
        assert!(matches!(refused, Outcome::Fail { .. }));
        let silent = describe_sensors(
            &topics,
            Ok(vec![
                ("k3sense/pi-1/state".into(), reading.to_vec()),
                ("k3sense/pi-1/availability".into(), b"online".to_vec()),
                (
                    "k3sense/pi-1/sensor".into(),
                    br#"{"sensor_id":"pi-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"no_response","errors":{"no_response":9}}"#.to_vec(),
                ),
            ]),
        );
        let Outcome::Fail { problem, fix } = silent else {
            panic!("{silent:?}")
        };
        assert!(
            problem.contains(
                "pi-1 online, but its sensor is not answering since 14:02 UTC (no_response"
            ),
            "{problem}"
        );
        assert_eq!(fix, "pi-1: check wiring/pull-up");
    }
}
