#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The sensor's own health, end to end, through the real binary: `k3sense all` with a simulated
//! sensor driven by `--sim-control FILE`, told to stop answering (`silent`) and to answer again
//! (`ok`) while it runs. Watched the ways a user would: an MQTT subscriber (rumqttc) on the
//! publisher's topics, `GET /api/sensors`, `k3sense watch` and `k3sense check` (the real binary),
//! and the page in headless Chromium (WebDriver).
//!
//! What it proves:
//! - within `--unhealthy-after` (3) intervals of the sensor going silent, all four say
//!   "not answering", with the reason `no_response` and the page's hint "check wiring/pull-up";
//! - the first good read makes all four live again;
//! - the publisher's availability stays `online` throughout (no `offline` is ever published);
//! - the health is retained: a subscriber that arrives later gets it at once.
//!
//! The page part needs Debian's `chromium` and `chromium-driver`; without them it prints a
//! notice and checks the rest, unless `CI` is set: then it fails.

mod support;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{
    Proc,
    browser::{Browser, Child, tools},
    free_addr, free_port, http_get, mqtt_subscriber, next_on,
};

const BIN: &str = env!("CARGO_BIN_EXE_k3sense");
const ID: &str = "pi-h";
/// The publish interval (sim: two reads 20 ms apart per interval).
const INTERVAL_S: u64 = 1;
/// `--unhealthy-after`.
const UNHEALTHY_AFTER: u64 = 3;
/// Generous: the promise is N intervals; the bound only keeps a broken build from hanging.
const WITHIN: Duration = Duration::from_secs(UNHEALTHY_AFTER * INTERVAL_S + 10);

impl Browser {
    /// What the sensor's card shows.
    async fn card(&self) -> Value {
        self.client
            .execute(
                r#"
                const card = document.querySelector(`[data-sensor="${arguments[0]}"]`);
                if (!card) return {};
                const health = card.querySelector(".health");
                return {
                    status: card.dataset.status,
                    badge: card.querySelector(".badge-text").textContent,
                    health: health.hidden ? "" : health.textContent,
                };
                "#,
                vec![json!(ID)],
            )
            .await
            .unwrap()
    }

    async fn wait_for(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let card = self.card().await;
            if wanted(&card) {
                return card;
            }
            assert!(
                start.elapsed() < WITHIN,
                "the page: {what} not seen; the card shows {card}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `/api/sensors`' entry for [`ID`].
async fn api_sensor(http: std::net::SocketAddr) -> Value {
    let (status, body) = http_get(http, "/api/sensors").await;
    assert_eq!(status, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["sensor_id"] == ID)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn wait_api(http: std::net::SocketAddr, what: &str, wanted: impl Fn(&Value) -> bool) {
    let start = Instant::now();
    loop {
        let entry = api_sensor(http).await;
        if wanted(&entry) {
            return;
        }
        assert!(
            start.elapsed() < WITHIN,
            "/api/sensors: {what} not seen; it says {entry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next health on the sensor topic whose status is `status`; every availability seen on
/// the way must be `online`.
async fn wait_health(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    status: &str,
) -> Value {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let (topic, payload, _) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("MQTT: no `{status}` on k3sense/{ID}/sensor in time"))
            .unwrap();
        if topic == format!("k3sense/{ID}/availability") {
            assert_eq!(payload, b"online", "the publisher must stay online");
        }
        if topic == format!("k3sense/{ID}/sensor") {
            let health: Value = serde_json::from_slice(&payload).unwrap();
            if health["status"] == status {
                return health;
            }
        }
    }
}

/// `k3sense watch` with its stdout in a file (what a user sees in the terminal).
struct Watch {
    _child: Child,
    out: PathBuf,
}

impl Watch {
    fn start(broker: std::net::SocketAddr) -> Self {
        let out = std::env::temp_dir().join(format!(
            "k3sense-health-watch-{}-{}.out",
            std::process::id(),
            free_port()
        ));
        let child = Command::new(BIN)
            .args(["watch", "--broker", &broker.to_string(), "--sensor-id", ID])
            .env_remove("K3SENSE_SENSOR_ID")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            _child: Child(child),
            out,
        }
    }
}

impl Watch {
    fn out(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.out);
    }
}

/// Waits until `k3sense watch` printed `line` `times` times.
fn wait_printed(watch: &Watch, line: &str, times: usize) {
    let start = Instant::now();
    while watch.out().matches(line).count() < times {
        assert!(
            start.elapsed() < WITHIN,
            "`k3sense watch` did not print {line:?}; it printed:\n{}",
            watch.out()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_is_not_answering_everywhere_and_live_again_on_its_first_good_read() {
    let control = std::env::temp_dir().join(format!(
        "k3sense-health-control-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&control, "ok\n").unwrap();
    let mqtt = free_addr();
    let http = free_addr();
    let interval = format!("{INTERVAL_S}s");
    let unhealthy = UNHEALTHY_AFTER.to_string();
    let all = Proc::start(
        BIN,
        &[
            "all",
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &http.to_string(),
            "--sensor-id",
            ID,
            "--interval",
            &interval,
            "--unhealthy-after",
            &unhealthy,
            "--sim-control",
            control.to_str().unwrap(),
        ],
    );
    support::wait_ready(http).await;
    let mut rx = mqtt_subscriber(mqtt, &format!("k3sense/{ID}/#")).await;
    wait_api(http, "a first reading and `ok`", |s| {
        !s["latest"].is_null() && s["sensor_health"]["status"] == "ok" && s["status"] == "online"
    })
    .await;
    let browser = match tools() {
        Some((chromium, driver)) => Some(Browser::start(&chromium, &driver, false).await),
        None => None,
    };
    if let Some(b) = &browser {
        b.client.goto(&format!("http://{http}/")).await.unwrap();
        b.wait_for("live", |c| c["status"] == "live").await;
    }
    let watch = Watch::start(mqtt);
    wait_printed(&watch, "sensor: ok since", 1);

    // The sensor stops answering.
    let silenced = Instant::now();
    let silenced_at = chrono::Utc::now();
    std::fs::write(&control, "silent\n").unwrap();
    let health = wait_health(&mut rx, "not_answering").await;
    let took = silenced.elapsed();
    eprintln!("not_answering on MQTT {took:?} after the sensor went silent");
    assert_eq!(health["sensor_id"], ID);
    assert_eq!(health["reason"], "no_response", "{health}");
    assert!(
        health["errors"]["no_response"].as_u64() >= Some(UNHEALTHY_AFTER),
        "{health}"
    );
    let since: chrono::DateTime<chrono::Utc> = health["since"].as_str().unwrap().parse().unwrap();
    assert!(
        since >= silenced_at - chrono::Duration::milliseconds(1500),
        "since {since} is before the sensor went silent at {silenced_at}"
    );
    wait_api(http, "not_answering, publisher online", |s| {
        s["sensor_health"]["status"] == "not_answering"
            && s["sensor_health"]["reason"] == "no_response"
            && s["status"] == "online"
    })
    .await;
    wait_printed(&watch, "sensor: not_answering since", 1);
    assert!(
        watch.out().contains("no_response (check wiring/pull-up)"),
        "{}",
        watch.out()
    );
    if let Some(b) = &browser {
        let card = b
            .wait_for("not answering", |c| c["status"] == "not_answering")
            .await;
        assert_eq!(card["badge"], "not answering", "{card}");
        let text = card["health"].as_str().unwrap();
        assert!(
            text.contains("sensor not answering since ")
                && text.contains("check wiring/pull-up")
                && text.contains("no response"),
            "{card}"
        );
        b.screenshot("sensor-not-answering").await;
    }
    // `k3sense check` fails its `sensors` line and says what to check.
    let check = tokio::process::Command::new(BIN)
        .args(["check", "--broker", &mqtt.to_string(), "--skip", "sensor"])
        .env_remove("K3SENSE_SENSOR_ID")
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains(&format!(
            "{ID} online, but its sensor is not answering since"
        )) && printed.contains(&format!("{ID}: check wiring/pull-up")),
        "{printed}"
    );
    // A subscriber arriving now gets it at once, retained.
    let mut late = mqtt_subscriber(mqtt, &format!("k3sense/{ID}/sensor")).await;
    let (payload, retained) = next_on(&mut late, &format!("k3sense/{ID}/sensor"), WITHIN).await;
    assert!(retained);
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["status"],
        "not_answering"
    );

    // It answers again: live on the first good (confirmed) read.
    std::fs::write(&control, "ok\n").unwrap();
    let health = wait_health(&mut rx, "ok").await;
    assert!(health.get("reason").is_none(), "{health}");
    wait_api(http, "ok again", |s| {
        s["sensor_health"]["status"] == "ok" && s["status"] == "online"
    })
    .await;
    wait_printed(&watch, "sensor: ok since", 2);
    if let Some(b) = browser {
        b.wait_for("live again", |c| c["status"] == "live" && c["health"] == "")
            .await;
        // The chart's range buttons: 24 h, then everything kept (here a few seconds, shown as
        // at least a minute), each pressed alone, the axis following.
        for (range, axis) in [("24h", "24 h ago"), ("all", "1 min ago"), ("1h", "1 h ago")] {
            let shown = b
                .client
                .execute(
                    r#"
                    const card = document.querySelector(`[data-sensor="${arguments[0]}"]`);
                    card.querySelector(`.ranges [data-range="${arguments[1]}"]`).click();
                    return {
                        axis: card.querySelector(".axis-start").textContent,
                        pressed: [...card.querySelectorAll(".ranges button")]
                            .filter((b) => b.getAttribute("aria-pressed") === "true")
                            .map((b) => b.dataset.range),
                    };
                    "#,
                    vec![json!(ID), json!(range)],
                )
                .await
                .unwrap();
            assert_eq!(shown["axis"], axis, "{range}: {shown}");
            assert_eq!(shown["pressed"], json!([range]), "{range}: {shown}");
        }
        b.close().await;
    }
    // The publisher said `online` throughout: the only availability ever retained is online.
    assert_eq!(api_sensor(http).await["status"], "online");
    let (_, status, log) = all.stop("TERM");
    assert!(status.success(), "{log}");
    assert!(log.contains("the sensor is not answering"), "{log}");
    let _ = std::fs::remove_file(&control);
}

/// The gateway's side of the sensor topic, with a stand-in publisher (rumqttc): what is not a
/// valid health of the topic's sensor is dropped and counted; a valid one reaches WebSocket
/// clients as `{"type":"sensor",…}` and `/api/sensors` as `sensor_health`; the same payload
/// again (a publisher reconnecting) is not sent twice; a new WebSocket client gets it in its
/// snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_relays_valid_sensor_health_only() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let broker = support::start_broker().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (gateway, _) = support::start_gateway(broker, stop.clone()).await;
    let mut ws = support::ws_connect(gateway).await;
    assert_eq!(
        support::ws_next(&mut ws, Duration::from_secs(1)).await["type"],
        "snapshot"
    );
    let mut options = MqttOptions::new("stand-in", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let silent = r#"{"sensor_id":"gw-1","status":"not_answering","since":"2026-11-27T14:02:00.000Z","reason":"checksum","errors":{"checksum":40}}"#;
    for (topic, payload) in [
        (
            "k3sense/gw-1/sensor",
            r#"{"sensor_id":"gw-1","status":"fine"}"#,
        ),
        (
            "k3sense/gw-1/sensor",
            silent.replace("gw-1", "gw-2").as_str(),
        ),
        ("k3sense/gw-1/sensor", silent),
        ("k3sense/gw-1/sensor", silent),
        ("k3sense/gw-1/availability", "online"),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, true, payload.to_owned())
            .await
            .unwrap();
    }
    let first = support::ws_next(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(first["type"], "sensor", "{first}");
    assert_eq!(first["reason"], "checksum");
    assert_eq!(first["errors"]["checksum"], 40);
    // The repeat was not sent: the next message is the availability published after it.
    let next = support::ws_next(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(next["type"], "availability", "{next}");
    let (_, body) = http_get(gateway, "/api/sensors").await;
    let sensors: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sensors.as_array().unwrap().len(), 1, "{sensors}");
    assert_eq!(sensors[0]["sensor_health"]["status"], "not_answering");
    let invalid = support::metric(
        gateway,
        "k3sense_gateway_invalid_messages_total{reason=\"malformed\"}",
    )
    .await;
    let mismatched = support::metric(
        gateway,
        "k3sense_gateway_invalid_messages_total{reason=\"id_mismatch\"}",
    )
    .await;
    assert_eq!((invalid, mismatched), (1.0, 1.0));
    let mut late = support::ws_connect(gateway).await;
    let snapshot = support::ws_next(&mut late, Duration::from_secs(1)).await;
    assert_eq!(
        snapshot["sensors"][0]["sensor_health"]["reason"], "checksum",
        "{snapshot}"
    );
    stop.cancel();
}
