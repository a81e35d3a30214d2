#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `--forget-after` (issue 14, the gateway's part of "cleanup and blast radius", and row 7's
//! retained fake sensors as the gateway sees them): a real broker and a real gateway in this
//! process on free ports, sensors published over MQTT by a rumqttc client (retained, as a
//! publisher and row 7's attacker do), watched through the HTTP API, `/metrics` and a
//! WebSocket.
//!
//! Every wait is on an event (a WebSocket message) or a poll with a deadline where the gateway
//! offers none (the API, metrics, the page's DOM); `--forget-after` is 5 s, so each test takes
//! a few seconds.
//!
//! The page test needs Debian's `chromium` and `chromium-driver` (see tests/browser.rs); without
//! them it prints a notice and passes, unless `CI` is set.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use chrono::{DateTime, Utc};
use k3sense_gateway::Options;
use k3sense_protocol::{Model, Reading, SensorId};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

mod support;
use support::{
    browser::{Browser, tools},
    http_get, metric, spawn_gateway, start_broker, wait_metric, ws_connect, ws_next, ws_until,
};

const FORGET_AFTER: Duration = Duration::from_secs(5);
/// Enough for anything that happens once `FORGET_AFTER` has passed, on a loaded machine.
const WITHIN: Duration = Duration::from_secs(30);
const FAKES: usize = 20;

fn reading(id: &str, seq: u64, read_at: DateTime<Utc>) -> String {
    Reading::new(
        SensorId::new(id).unwrap(),
        Model::Dht22,
        21.0,
        40.0,
        read_at,
        seq,
    )
    .unwrap()
    .to_json()
    .unwrap()
}

async fn publish(client: &AsyncClient, topic: &str, payload: impl Into<Vec<u8>>) {
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .unwrap();
}

/// The ids `GET /api/sensors` lists.
async fn listed(gateway: SocketAddr) -> BTreeSet<String> {
    let (status, body) = http_get(gateway, "/api/sensors").await;
    assert_eq!(status, 200);
    let sensors: Vec<Value> = serde_json::from_str(&body).unwrap();
    sensors
        .iter()
        .map(|s| s["sensor_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls the API (no event for it) until it lists `count` sensors.
async fn wait_listed(gateway: SocketAddr, count: usize) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let ids = listed(gateway).await;
        if ids.len() == count {
            return ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API lists {ids:?}, not {count} sensors"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn snapshot_ids(snapshot: &Value) -> BTreeSet<String> {
    assert_eq!(snapshot["type"], "snapshot");
    snapshot["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sensor_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A broker and a gateway forgetting after [`FORGET_AFTER`], and an MQTT client (`name`, queue
/// `capacity`) on that broker whose event loop runs in the returned task.
async fn forgetting_gateway(
    name: &str,
    capacity: usize,
) -> (support::Gateway, AsyncClient, tokio::task::JoinHandle<()>) {
    let broker = start_broker().await;
    let gw = spawn_gateway(
        broker,
        Options {
            forget_after: FORGET_AFTER,
            ..Options::default()
        },
    )
    .await;
    let mut options = MqttOptions::new(name, broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (mqtt, mut events) = AsyncClient::new(options, capacity);
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    (gw, mqtt, pump)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensors_gone_for_forget_after_are_forgotten_and_a_new_reading_brings_one_back() {
    let (gw, mqtt, pump) = forgetting_gateway("forget-test", 1000).await;

    // pi-gone: a reading, then its publisher's `offline`. pi-live: a reading and `online`.
    // fake-N: retained readings and nothing else (row 7: no availability at all).
    let t0 = Utc::now();
    let gone_reading = reading("pi-gone", 1, t0);
    publish(&mqtt, "k3sense/pi-gone/state", gone_reading.clone()).await;
    publish(&mqtt, "k3sense/pi-gone/availability", "offline").await;
    publish(&mqtt, "k3sense/pi-live/state", reading("pi-live", 1, t0)).await;
    publish(&mqtt, "k3sense/pi-live/availability", "online").await;
    for n in 0..FAKES {
        let id = format!("fake-{n}");
        publish(&mqtt, &format!("k3sense/{id}/state"), reading(&id, 1, t0)).await;
    }
    let all = wait_listed(gw.addr, FAKES + 2).await;
    assert!(all.contains("pi-gone") && all.contains("pi-live"));

    // An open page is told about each sensor forgotten.
    let mut page = ws_connect(gw.addr).await;
    let snapshot = ws_next(&mut page, WITHIN).await;
    let mut expected: BTreeSet<String> = (0..FAKES).map(|n| format!("fake-{n}")).collect();
    expected.insert("pi-gone".to_owned());
    // Every sensor the page was shown (all of them, unless the machine stalled for
    // FORGET_AFTER since they were listed) goes with a message.
    let shown: BTreeSet<String> = snapshot_ids(&snapshot)
        .intersection(&expected)
        .cloned()
        .collect();
    assert!(shown.contains("pi-gone"), "the page was shown {shown:?}");
    let mut forgotten = BTreeSet::new();
    while forgotten.len() < shown.len() {
        let message = ws_until(&mut page, WITHIN, |m| m["type"] == "forgotten").await;
        let id = message["sensor_id"].as_str().unwrap().to_owned();
        assert_ne!(id, "pi-live", "an online sensor is never forgotten");
        assert!(forgotten.insert(id), "each is forgotten once");
    }
    assert_eq!(forgotten, shown);

    // Gone from the API, its history, a new page's snapshot; counted.
    assert_eq!(
        listed(gw.addr).await,
        BTreeSet::from(["pi-live".to_owned()])
    );
    assert_eq!(
        http_get(gw.addr, "/api/sensors/pi-gone/history").await.0,
        404
    );
    let mut late = ws_connect(gw.addr).await;
    assert_eq!(
        snapshot_ids(&ws_next(&mut late, WITHIN).await),
        BTreeSet::from(["pi-live".to_owned()])
    );
    let counted = wait_metric(gw.addr, "k3sense_gateway_sensors_forgotten_total", |v| {
        v >= (FAKES + 1) as f64
    })
    .await;
    assert_eq!(counted, (FAKES + 1) as f64);
    assert_eq!(metric(gw.addr, "k3sense_gateway_sensors").await, 1.0);

    // Its retained state and `offline` sent again (what a broker does after a reconnect) do
    // not bring it back: a marker published after them on the same topic filter arrives with
    // the stale ones handled before it.
    publish(&mqtt, "k3sense/pi-gone/state", gone_reading).await;
    publish(&mqtt, "k3sense/pi-gone/availability", "offline").await;
    publish(
        &mqtt,
        "k3sense/pi-live/state",
        reading("pi-live", 2, Utc::now()),
    )
    .await;
    let marker = ws_until(&mut page, WITHIN, |m| m["type"] == "reading").await;
    assert_eq!(
        (marker["sensor_id"].as_str(), marker["seq"].as_u64()),
        (Some("pi-live"), Some(2)),
        "the stale pi-gone reading is not sent to pages"
    );
    assert_eq!(
        listed(gw.addr).await,
        BTreeSet::from(["pi-live".to_owned()])
    );

    // A new reading brings it back, to the API and to open pages.
    publish(
        &mqtt,
        "k3sense/pi-gone/state",
        reading("pi-gone", 2, Utc::now()),
    )
    .await;
    let back = ws_until(&mut page, WITHIN, |m| m["type"] == "reading").await;
    assert_eq!(
        (back["sensor_id"].as_str(), back["seq"].as_u64()),
        (Some("pi-gone"), Some(2))
    );
    assert_eq!(
        listed(gw.addr).await,
        BTreeSet::from(["pi-gone".to_owned(), "pi-live".to_owned()])
    );
    let (status, history) = http_get(gw.addr, "/api/sensors/pi-gone/history").await;
    assert_eq!(status, 200);
    let history: Vec<Value> = serde_json::from_str(&history).unwrap();
    assert_eq!(history.len(), 1, "the forgotten history stays forgotten");
    pump.abort();
}

/// The cards the page shows, by sensor id, and whether its "waiting for the first reading"
/// notice is visible.
async fn cards(browser: &Browser) -> (BTreeSet<String>, bool) {
    let shown = browser
        .client
        .execute(
            r##"return {
                ids: [...document.querySelectorAll("#sensors [data-sensor]")].map((c) => c.dataset.sensor),
                empty: !document.getElementById("empty").hidden,
            };"##,
            vec![],
        )
        .await
        .unwrap();
    let ids = shown["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    (ids, shown["empty"].as_bool().unwrap())
}

/// Polls the page (the DOM offers no event to wait on) until it shows exactly `ids`.
async fn wait_cards(browser: &Browser, ids: &[&str]) {
    let wanted: BTreeSet<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let (shown, empty) = cards(browser).await;
        if shown == wanted {
            assert_eq!(empty, wanted.is_empty(), "the empty notice");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page shows {shown:?}, not {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_removes_a_forgotten_sensor_and_shows_it_again_when_it_is_back() {
    let Some((chromium, driver)) = tools() else {
        return;
    };
    let (gw, mqtt, pump) = forgetting_gateway("forget-page", 100).await;
    publish(
        &mqtt,
        "k3sense/pi-keep/state",
        reading("pi-keep", 1, Utc::now()),
    )
    .await;
    publish(&mqtt, "k3sense/pi-keep/availability", "online").await;
    publish(
        &mqtt,
        "k3sense/pi-drop/state",
        reading("pi-drop", 1, Utc::now()),
    )
    .await;
    publish(&mqtt, "k3sense/pi-drop/availability", "offline").await;
    wait_listed(gw.addr, 2).await;

    let browser = Browser::start(&chromium, &driver, false).await;
    browser
        .client
        .goto(&format!("http://{}/", gw.addr))
        .await
        .unwrap();
    // Both shown (unless the machine stalled past FORGET_AFTER: then pi-drop is already gone).
    let (first, _) = cards(&browser).await;
    assert!(first.contains("pi-keep") || first.is_empty(), "{first:?}");
    wait_cards(&browser, &["pi-keep"]).await;
    assert_eq!(
        metric(gw.addr, "k3sense_gateway_sensors_forgotten_total").await,
        1.0
    );

    publish(
        &mqtt,
        "k3sense/pi-drop/state",
        reading("pi-drop", 2, Utc::now()),
    )
    .await;
    wait_cards(&browser, &["pi-drop", "pi-keep"]).await;
    browser.close().await;
    pump.abort();
}
