//! Hostile clients, the reading side (issue 14, rows 3, 3b, 4, 6): real processes — the
//! `k3sense` broker, publisher and gateway binaries — and a second MQTT client playing the
//! attacker with what a `publisher:*` account may do (the broker here runs without a users file,
//! so every client may; the ACL tests in broker/ show which account may do what).
//!
//! Each test asserts the bounded or refused outcome and prints the figure RELIABILITY.md quotes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use chrono::Utc;
use k3sense_protocol::{Model, Reading, SensorId, format_read_at};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::*;

/// The attacker: a plain rumqttc client that may send packets up to 1 MiB, and hands over
/// whatever it receives.
async fn attacker(
    broker: SocketAddr,
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let mut options = MqttOptions::new(
        format!("attacker-{}", free_port()),
        "127.0.0.1",
        broker.port(),
    );
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 256);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .expect("the attacker never connected")
        .unwrap();
    (client, rx)
}

/// The entry of `id` in `/api/sensors`.
async fn sensor(gateway: SocketAddr, id: &str) -> Option<serde_json::Value> {
    let (_, body) = http_get(gateway, "/api/sensors").await;
    let sensors: serde_json::Value = serde_json::from_str(&body).unwrap();
    sensors
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sensor_id"] == id)
        .cloned()
}

/// The `latest` reading of `id` in `/api/sensors`.
async fn latest(gateway: SocketAddr, id: &str) -> Option<Reading> {
    serde_json::from_value(sensor(gateway, id).await?["latest"].clone()).ok()
}

/// Waits until `/api/sensors` shows `id` offline.
async fn wait_offline(gateway: SocketAddr, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entry = sensor(gateway, id).await;
        if entry.as_ref().is_some_and(|s| s["status"] == "offline") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never went offline: {entry:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the history holds a reading with `seq` ≥ `at_least`; returns the history.
async fn history_reaching(gateway: SocketAddr, id: &str, at_least: u64) -> Vec<Reading> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = sensor_history(gateway, id).await;
        if h.iter().any(|r| r.seq >= at_least) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "no reading with seq ≥ {at_least}: {:?}",
            h.iter().map(|r| r.seq).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sample of a `/metrics` text whose line contains every one of `parts`.
fn sample_with(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn forged(id: &str, temperature_c: f64, read_at: chrono::DateTime<Utc>, seq: u64) -> String {
    Reading::new(
        SensorId::new(id).unwrap(),
        Model::Dht22,
        temperature_c,
        50.0,
        read_at,
        seq,
    )
    .unwrap()
    .to_json()
    .unwrap()
}

/// Row 4: 64 KiB messages (the broker's `--max-payload`) on every topic the gateway subscribes
/// to never disconnect it, and no real reading goes missing from history. Through our broker,
/// which drops them by topic family before they reach the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_at_the_broker_limit_never_disconnect_the_gateway() {
    let mqtt = free_addr();
    let _b = broker_proc(mqtt);
    flood_the_gateways_topics(mqtt, "pi-h4", true).await;
}

/// Row 4 through a broker that forwards them (Debian's Mosquitto, which users may run instead of
/// ours, docs/own-broker.md): the gateway receives every 64 KiB message, drops and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_at_the_broker_limit_through_mosquitto_never_disconnect_the_gateway() {
    let Some(mosquitto) = Mosquitto::start().await else {
        return;
    };
    flood_the_gateways_topics(mosquitto.addr, "pi-h4m", false).await;
}

async fn flood_the_gateways_topics(mqtt: SocketAddr, id: &str, broker_caps: bool) {
    let (http, metrics) = (free_addr(), free_addr());
    let _p = sim_publisher_proc(mqtt, id, metrics);
    let g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let first = history_reaching(http, id, 2).await.last().unwrap().seq;
    let disconnects = "k3sense_gateway_broker_disconnects_total";
    assert_eq!(metric(http, disconnects).await, 0.0);

    let (evil, _) = attacker(mqtt).await;
    let big = vec![b'x'; 64 * 1024];
    let topics = [
        format!("k3sense/{id}/replay"),
        format!("k3sense/{id}/state"),
        format!("k3sense/{id}/availability"),
    ];
    let rounds = 40;
    let started = Instant::now();
    for _ in 0..rounds {
        for topic in &topics {
            evil.publish(topic.clone(), QoS::AtLeastOnce, false, big.clone())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = rounds * topics.len();
    if broker_caps {
        // Our broker caps each topic family (a reading or replay ≤ 1 KiB, an availability
        // ≤ 16 bytes) and drops the rest, acknowledged: none of them reaches the gateway. A
        // reading published after the flood has reached history, so the flood is behind it.
        let after = sensor_history(http, id).await.last().unwrap().seq + 2;
        history_reaching(http, id, after).await;
        for reason in ["too_large", "bad_availability"] {
            let sample = format!(r#"k3sense_gateway_invalid_messages_total{{reason="{reason}"}}"#);
            assert_eq!(metric(http, &sample).await, 0.0, "{sample}");
        }
    } else {
        // A broker without such caps (Mosquitto) delivers every one: the gateway drops them
        // itself.
        wait_metric(
            http,
            r#"k3sense_gateway_invalid_messages_total{reason="too_large"}"#,
            |n| n >= (2 * rounds) as f64,
        )
        .await;
        wait_metric(
            http,
            r#"k3sense_gateway_invalid_messages_total{reason="bad_availability"}"#,
            |n| n >= rounds as f64,
        )
        .await;
    }
    let flood = started.elapsed();
    assert_eq!(
        metric(http, disconnects).await,
        0.0,
        "the gateway's broker connection dropped"
    );
    assert_eq!(metric(http, "k3sense_gateway_broker_connected").await, 1.0);

    // No real reading went missing: every seq from before the flood to well after it.
    let last = sensor_history(http, id).await.last().unwrap().seq + 5;
    let h = history_reaching(http, id, last).await;
    let seqs: Vec<u64> = h
        .iter()
        .map(|r| r.seq)
        .filter(|s| (first..=last).contains(s))
        .collect();
    assert_eq!(
        seqs,
        (first..=last).collect::<Vec<_>>(),
        "a real reading is missing from history"
    );
    // A 60 KB topic level the gateway's filters match: dropped, and logged clipped.
    let long_topic = format!("k3sense/{}/state", "a".repeat(60_000));
    evil.publish(long_topic, QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    wait_metric(
        http,
        r#"k3sense_gateway_invalid_messages_total{reason="unknown_topic"}"#,
        |n| n >= 1.0,
    )
    .await;
    assert_eq!(metric(http, disconnects).await, 0.0);
    // The log says so in a few rate-limited lines, not one per message.
    let (_, _, log) = g.stop("TERM");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2_000, "a log line of {longest} bytes");
    let lines = log.lines().filter(|l| l.contains("dropping")).count();
    assert!(lines <= 6, "{lines} log lines for {sent} messages:\n{log}");
    println!(
        "row 4 ({}): {sent} messages of 64 KiB in {:.1} s on replay/state/availability: broker_disconnects 0, readings {first}..={last} all held, {lines} log lines; a 60 KB topic logged in a line of ≤ {longest} bytes",
        if broker_caps {
            "k3sense broker"
        } else {
            "Mosquitto"
        },
        flood.as_secs_f64()
    );
}

/// Row 3: a forged reading with seq 10^15 (stamped now, and stamped 2099) never becomes
/// `latest` (API and WebSocket); the real publisher, restarted over a forged retained reading,
/// refuses to number on from it, and its readings are shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_seq_or_future_reading_never_becomes_latest() {
    let id = "pi-h3";
    let (mqtt, http, metrics) = (free_addr(), free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    let p = sim_publisher_proc(mqtt, id, metrics);
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    wait_http(metrics, "/healthz").await;
    history_reaching(http, id, 3).await;
    let (_, _, log) = p.stop("TERM");
    assert!(log.contains("published offline"), "{log}");
    // The last real reading: read once the gateway has the publisher's `offline`, which follows
    // its last reading on the same connection (a reading still on its way when the publisher
    // stopped would otherwise arrive after this line and become `latest`).
    wait_offline(http, id).await;
    let before = latest(http, id).await.unwrap().seq;

    // While the real publisher is away, the forgeries go in, retained.
    let (evil, _) = attacker(mqtt).await;
    let state = format!("k3sense/{id}/state");
    let far = 1_000_000_000_000_000;
    let future = chrono::DateTime::parse_from_rfc3339("2099-01-01T00:00:00.000Z")
        .unwrap()
        .with_timezone(&Utc);
    evil.publish(
        &state,
        QoS::AtLeastOnce,
        true,
        forged(id, -19.0, future, far),
    )
    .await
    .unwrap();
    wait_metric(
        http,
        r#"k3sense_gateway_invalid_messages_total{reason="future"}"#,
        |n| n >= 1.0,
    )
    .await;
    evil.publish(
        &state,
        QoS::AtLeastOnce,
        true,
        forged(id, -19.0, Utc::now(), far),
    )
    .await
    .unwrap();
    wait_metric(
        http,
        r#"k3sense_gateway_invalid_messages_total{reason="unconfirmed_jump"}"#,
        |n| n >= 1.0,
    )
    .await;
    // 2^64 − 1 is not even a valid reading.
    let wrapped =
        forged(id, -19.0, Utc::now(), 1).replace(r#""seq":1"#, r#""seq":18446744073709551615"#);
    evil.publish(&state, QoS::AtLeastOnce, true, wrapped)
        .await
        .unwrap();
    wait_metric(
        http,
        r#"k3sense_gateway_invalid_messages_total{reason="seq_too_large"}"#,
        |n| n >= 1.0,
    )
    .await;
    assert_eq!(latest(http, id).await.unwrap().seq, before);
    // Put the plausible-time forgery back as the retained reading the publisher finds.
    evil.publish(
        &state,
        QoS::AtLeastOnce,
        true,
        forged(id, -19.0, Utc::now(), far),
    )
    .await
    .unwrap();
    let mut ws = ws_connect(http).await;

    // The real publisher comes back: it refuses the retained seq and numbers from 1.
    let p = sim_publisher_proc(mqtt, id, metrics);
    wait_http(metrics, "/healthz").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http_get(metrics, "/metrics").await;
        if sample_with(&text, &["anomalies_total", "retained_seq_refused"]) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no anomaly counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its readings are shown live, numbered from its own start, and become `latest`.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let m = ws_until(&mut ws, Duration::from_secs(20), |m| m["type"] == "reading").await;
        let seq = m["seq"].as_u64().unwrap();
        assert!(seq < 1_000_000, "the page was sent seq {seq}: {m}");
        assert_ne!(m["temperature_c"], -19.0, "{m}");
        seen.push(seq);
    }
    assert_eq!(
        seen[0], 1,
        "the restarted publisher numbers from 1: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    let now = latest(http, id).await.unwrap();
    assert!(now.seq < 1_000_000 && now.temperature_c != -19.0, "{now:?}");
    assert!(now.seq >= seen[4], "{now:?} vs {seen:?}");
    // The API never lists the forgery.
    assert!(
        sensor_history(http, id)
            .await
            .iter()
            .all(|r| r.seq < 1_000_000)
    );
    // While it runs, a forged 2099 reading changes nothing either.
    evil.publish(
        &state,
        QoS::AtLeastOnce,
        false,
        forged(id, -19.0, future, 50),
    )
    .await
    .unwrap();
    wait_metric(
        http,
        r#"k3sense_gateway_invalid_messages_total{reason="future"}"#,
        |n| n >= 2.0,
    )
    .await;
    let after = history_reaching(http, id, seen[4] + 3).await;
    assert!(after.iter().all(|r| r.temperature_c != -19.0));
    drop(p);
    println!(
        "row 3: seq 10^15 (now / 2099) and 2^64−1 forged retained: latest stayed real (seq {before}, then 1…{}), publisher refused the retained seq and numbered from 1",
        now.seq
    );
}

/// Row 3b: a forged copy with the `(seq, read_at)` of a real reading but other values. The
/// gateway counts the conflict, asks the publisher to replay that `seq`, and the publisher's
/// replayed copy wins even when the forgery came first. The "publisher" here is a test client
/// answering the replay request the real gateway sends, so the order can be forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_duplicate_is_counted_and_the_replayed_copy_wins() {
    let id = "pi-h3b";
    let (mqtt, http) = (free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let (real, mut requests) = attacker(mqtt).await;
    real.subscribe(format!("k3sense/{id}/replay/request"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (evil, _) = attacker(mqtt).await;
    let state = format!("k3sense/{id}/state");
    let at = Utc::now();
    let real_copy = forged(id, 21.5, at, 1);
    // The forgery arrives first…
    evil.publish(&state, QoS::AtLeastOnce, false, forged(id, -19.0, at, 1))
        .await
        .unwrap();
    history_reaching(http, id, 1).await;
    // …then the real one, live: a conflict; the gateway asks for seq 1 again.
    real.publish(&state, QoS::AtLeastOnce, false, real_copy.clone())
        .await
        .unwrap();
    wait_metric(
        http,
        r#"k3sense_gateway_invalid_messages_total{reason="conflict"}"#,
        |n| n >= 1.0,
    )
    .await;
    let request = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, payload) = requests.recv().await.unwrap();
            let r: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            if r["after_seq"] == 0 && r["until_seq"] == 2 {
                return r;
            }
        }
    })
    .await
    .expect("the gateway did not ask for the conflicting seq");
    // The publisher answers on its replay topic: its copy replaces the forgery.
    real.publish(
        format!("k3sense/{id}/replay"),
        QoS::AtLeastOnce,
        false,
        real_copy,
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = sensor_history(http, id).await;
        if h.len() == 1 && h[0].temperature_c == 21.5 {
            break;
        }
        assert!(Instant::now() < deadline, "history kept the forgery: {h:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(latest(http, id).await.unwrap().temperature_c, 21.5);
    println!(
        "row 3b: forged copy of (seq 1, {}) first, real second: conflict counted, replay asked ({request}), replayed copy kept",
        format_read_at(&at)
    );
}

/// Row 6: another client publishes a retained `offline` for a running publisher; the publisher
/// sees it on its own availability topic and says `online` again (retained), counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_offline_is_answered_with_online() {
    let id = "pi-h6";
    let (mqtt, metrics) = (free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    wait_http_tcp(mqtt).await;
    let mut watch = mqtt_subscriber(mqtt, &format!("k3sense/{id}/availability")).await;
    let _p = sim_publisher_proc(mqtt, id, metrics);
    wait_http(metrics, "/healthz").await;
    let topic = format!("k3sense/{id}/availability");
    loop {
        let (payload, _) = next_on(&mut watch, &topic, Duration::from_secs(20)).await;
        if payload == b"online" {
            break;
        }
    }
    let (evil, _) = attacker(mqtt).await;
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        evil.publish(&topic, QoS::AtLeastOnce, true, "offline")
            .await
            .unwrap();
        let (payload, _) = next_on(&mut watch, &topic, Duration::from_secs(10)).await;
        assert_eq!(payload, b"offline");
        let (payload, _) = next_on(&mut watch, &topic, Duration::from_secs(10)).await;
        assert_eq!(payload, b"online", "the publisher did not say online again");
        took.push(started.elapsed());
    }
    // The retained value is `online` again: a client arriving now sees the truth.
    let mut late = mqtt_subscriber(mqtt, &topic).await;
    let (payload, retained) = next_on(&mut late, &topic, Duration::from_secs(10)).await;
    assert_eq!((payload.as_slice(), retained), (b"online".as_slice(), true));
    let (_, text) = http_get(metrics, "/metrics").await;
    assert_eq!(
        sample_with(&text, &["anomalies_total", "foreign_offline"]),
        3.0,
        "{text}"
    );
    println!("row 6: forged retained offline answered with online after {took:?}");
}

async fn wait_http_tcp(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Row 5: 20 replay requests a second for 3 s, each asking for everything the publisher keeps.
/// Each reading is replayed at most once per 2 s cooldown instead of once per request, and a
/// QoS 1 subscriber to the state topic gets every live reading meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_flood_is_coalesced_and_live_readings_all_arrive() {
    let id = "pi-h5";
    let (mqtt, metrics) = (free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    wait_http_tcp(mqtt).await;
    let mut all = mqtt_subscriber(mqtt, &format!("k3sense/{id}/#")).await;
    let _p = sim_publisher_proc(mqtt, id, metrics);
    wait_http(metrics, "/healthz").await;
    let state = format!("k3sense/{id}/state");
    let replay = format!("k3sense/{id}/replay");
    let mut live = Vec::new();
    while live.len() < 10 {
        let (payload, _) = next_on(&mut all, &state, Duration::from_secs(20)).await;
        live.push(Reading::from_json(&payload).unwrap().seq);
    }
    let (evil, _) = attacker(mqtt).await;
    let requests = 60;
    for _ in 0..requests {
        evil.publish(
            format!("k3sense/{id}/replay/request"),
            QoS::AtLeastOnce,
            false,
            r#"{"after_seq":0}"#,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the last answers and a few more live readings arrive.
    let mut replayed = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(Some((topic, payload, _))) =
        tokio::time::timeout_at(until.into(), all.recv()).await
    {
        if topic == replay {
            replayed += 1;
        } else if topic == state {
            live.push(Reading::from_json(&payload).unwrap().seq);
        }
    }
    let newest = *live.last().unwrap();
    assert!(
        live.windows(2).all(|w| w[1] == w[0] + 1),
        "a live reading is missing: {live:?}"
    );
    let (_, text) = http_get(metrics, "/metrics").await;
    // The broker passes 10 at once, then 2 a second per connection (broker/src/replays.rs).
    let asked = sample_with(&text, &["replay_requests_total"]);
    assert!(
        (10.0..=10.0 + 2.0 * 4.0).contains(&asked),
        "{asked}: {text}"
    );
    assert!(
        sample_with(&text, &["replays_coalesced_total"]) > 0.0,
        "{text}"
    );
    // Over ~3 s and a 2 s cooldown each reading goes out at most twice (thrice at a boundary).
    let bound = 3 * newest;
    assert!(
        replayed <= bound,
        "{replayed} readings replayed for {requests} requests (bound {bound})"
    );
    println!(
        "row 5: {requests} requests for everything in 3 s ({asked} past the broker's rate limit) over ≤ {newest} readings: {replayed} replayed (uncoalesced: up to {}), live readings {}..={newest} all received",
        requests as u64 * newest,
        live[0]
    );
}
