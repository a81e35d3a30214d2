#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway end to end, with real clients on free ports: a real broker (rumqttd), readings
//! published over MQTT with rumqttc (or by the real publisher), WebSocket clients with
//! tokio-tungstenite, plain HTTP/1.1 over a TCP socket, and for the drain the real `k3sense`
//! binary stopped with SIGTERM.
//!
//! Each test starts its own broker on its own port (rumqttd's threads cannot be stopped; they
//! end with the test process). Every wait is on an event (a message, a close frame, a process
//! exit), or a poll with a deadline where the gateway offers no event (readiness, metrics).

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use futures_util::{SinkExt, StreamExt};
use k3sense_gateway::Options;
use k3sense_protocol::{Model, Reading, SensorId};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{self, Message, client::IntoClientRequest, protocol::frame::coding::CloseCode},
};
use tokio_util::sync::CancellationToken;

mod support;
use support::{
    Ws, free_port, http_get, metric, spawn_gateway, start_broker, wait_metric, wait_ready,
    ws_connect,
};

/// Upper bound for anything that should happen "at once".
const SOON: Duration = Duration::from_secs(5);

/// An MQTT client standing in for a publisher, its event loop polled in a task.
struct Mqtt {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Mqtt {
    async fn connect(broker: SocketAddr, id: &str) -> Self {
        let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 1000);
        let task = tokio::spawn(async move { while events.poll().await.is_ok() {} });
        Self { client, task }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

    async fn reading(&self, id: &str, seq: u64, temperature: f64) {
        let json = reading_json(id, seq, temperature);
        self.publish(&format!("k3sense/{id}/state"), json).await;
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A valid reading; `read_at` rises by a millisecond per `seq` from the test's start, so
/// readings published in the same millisecond still have distinct, ordered times.
fn reading_json(id: &str, seq: u64, temperature: f64) -> String {
    static START: OnceLock<DateTime<Utc>> = OnceLock::new();
    let start = *START.get_or_init(Utc::now);
    Reading::new(
        SensorId::new(id).unwrap(),
        Model::Dht22,
        temperature,
        40.0 + (seq % 10) as f64,
        start + chrono::Duration::milliseconds(seq as i64),
        seq,
    )
    .unwrap()
    .to_json()
    .unwrap()
}

/// The next text message as JSON (pings and pongs skipped).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(SOON, ws.next())
            .await
            .expect("no message in time")
            .expect("the stream ended")
            .expect("a WebSocket error");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// The next frame, which must be a close frame; returns its code.
async fn next_close(ws: &mut Ws) -> CloseCode {
    loop {
        let message = tokio::time::timeout(SOON, ws.next())
            .await
            .expect("no close frame in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Waits until the gateway holds `id`'s reading `seq` and `status` (the retained messages arrive
/// after its subscription, in either order): on a WebSocket of its own, in the snapshot or as
/// they arrive.
async fn wait_sensor(addr: SocketAddr, id: &str, seq: u64, status: &str) {
    let mut ws = ws_connect(addr).await;
    let snapshot = next_json(&mut ws).await;
    let known = snapshot["sensors"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["sensor_id"] == id);
    let mut has_seq = known.is_some_and(|s| s["latest"]["seq"] == seq);
    let mut has_status = known.is_some_and(|s| s["status"] == status);
    while !(has_seq && has_status) {
        let message = next_json(&mut ws).await;
        if message["sensor_id"] == id {
            has_seq |= message["type"] == "reading" && message["seq"] == seq;
            has_status |= message["type"] == "availability" && message["status"] == status;
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_live_readings_and_availability() {
    let broker = start_broker().await;
    let mqtt = Mqtt::connect(broker, "test-pub").await;
    mqtt.publish("k3sense/pi-1/availability", "online").await;
    mqtt.reading("pi-1", 1, 21.5).await;
    let mut gw = spawn_gateway(broker, Options::default()).await;
    wait_sensor(gw.addr, "pi-1", 1, "online").await;

    let mut ws = ws_connect(gw.addr).await;
    let snapshot = next_json(&mut ws).await;
    assert_eq!(snapshot["type"], "snapshot");
    let sensors = snapshot["sensors"].as_array().unwrap();
    assert_eq!(sensors.len(), 1);
    assert_eq!(sensors[0]["sensor_id"], "pi-1");
    assert_eq!(sensors[0]["status"], "online");
    assert_eq!(sensors[0]["latest"]["seq"], 1);
    assert_eq!(sensors[0]["latest"]["temperature_c"], 21.5);

    mqtt.reading("pi-1", 2, 22.0).await;
    let live = next_json(&mut ws).await;
    assert_eq!(live["type"], "reading");
    assert_eq!(live["sensor_id"], "pi-1");
    assert_eq!(live["seq"], 2);
    assert_eq!(live["temperature_c"], 22.0);

    mqtt.publish("k3sense/pi-1/availability", "offline").await;
    let offline = next_json(&mut ws).await;
    assert_eq!(
        offline,
        serde_json::json!({"type": "availability", "sensor_id": "pi-1", "status": "offline"})
    );

    let (status, body) = http_get(gw.addr, "/api/sensors").await;
    assert_eq!(status, 200);
    let api: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api[0]["status"], "offline");
    assert_eq!(api[0]["latest"]["seq"], 2);
    assert_eq!(
        metric(gw.addr, "k3sense_gateway_broker_connected").await,
        1.0
    );
    // One client: wait_sensor's has closed (the gateway counts it out once its handler ends).
    wait_metric(gw.addr, "k3sense_gateway_ws_clients", |v| v == 1.0).await;
    gw.shutdown.cancel();
    assert_eq!(next_close(&mut ws).await, CloseCode::Away);
    while let Some(Ok(_)) = ws.next().await {}
    tokio::time::timeout(SOON, &mut gw.task)
        .await
        .expect("serve returns once its clients are gone")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_publisher_reaches_websocket_clients() {
    let broker = start_broker().await;
    let gw = spawn_gateway(broker, Options::default()).await;
    let mut ws = ws_connect(gw.addr).await;
    assert_eq!(next_json(&mut ws).await["type"], "snapshot");

    let stop = CancellationToken::new();
    let publisher = tokio::spawn(k3sense_publisher::run(
        k3sense_publisher::Config {
            mqtt: k3sense_protocol::MqttConfig::new(broker.to_string()),
            sensor: k3sense_publisher::SensorConfig::sim("pi-7", Duration::from_millis(200)),
        },
        stop.clone(),
    ));
    let mut seqs = Vec::new();
    let mut online = false;
    while seqs.len() < 3 {
        let m = next_json(&mut ws).await;
        assert_eq!(m["sensor_id"], "pi-7");
        match m["type"].as_str().unwrap() {
            "reading" => seqs.push(m["seq"].as_u64().unwrap()),
            "availability" => online |= m["status"] == "online",
            // The sensor's own health: `ok` with its first reading.
            "sensor" => assert_eq!(m["status"], "ok"),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(online, "the publisher announced itself online");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    stop.cancel();
    publisher.await.unwrap().unwrap();
    loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "availability" {
            assert_eq!(m["status"], "offline");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api_limits_since_and_errors() {
    let broker = start_broker().await;
    let gw = spawn_gateway(
        broker,
        Options {
            history: 4,
            ..Options::default()
        },
    )
    .await;
    let mut ws = ws_connect(gw.addr).await;
    next_json(&mut ws).await;
    let mqtt = Mqtt::connect(broker, "test-pub").await;
    for seq in 1..=6 {
        mqtt.reading("pi-1", seq, 20.0 + seq as f64).await;
    }
    for seq in 1..=6 {
        assert_eq!(next_json(&mut ws).await["seq"], seq);
    }

    let history = |body: String| -> Vec<u64> {
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    let (status, body) = http_get(gw.addr, "/api/sensors/pi-1/history").await;
    assert_eq!(status, 200);
    assert_eq!(history(body.clone()), [3, 4, 5, 6], "bounded, oldest first");
    let third: Value = serde_json::from_str(&body).unwrap();
    let (_, body) = http_get(gw.addr, "/api/sensors/pi-1/history?limit=2").await;
    assert_eq!(history(body), [5, 6]);
    let (_, body) = http_get(gw.addr, "/api/sensors/pi-1/history?limit=1000").await;
    assert_eq!(history(body), [3, 4, 5, 6]);
    // Clamped to --history, as README documents (issue 14 row 11).
    let (status, body) = http_get(gw.addr, "/api/sensors/pi-1/history?limit=999999999").await;
    assert_eq!(status, 200);
    assert_eq!(history(body), [3, 4, 5, 6]);
    let since = third[1]["read_at"].as_str().unwrap();
    let (status, body) = http_get(
        gw.addr,
        &format!("/api/sensors/pi-1/history?since={since}&limit=10"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(history(body), [5, 6], "only readings after `since`");

    for bad in [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=",
        "limit=99999999999999999999999",
        "since=yesterday",
    ] {
        let (status, body) = http_get(gw.addr, &format!("/api/sensors/pi-1/history?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(error["error"].as_str().unwrap().contains("must"), "{body}");
    }
    for unknown in ["pi-2", "Not_A_Sensor"] {
        let (status, body) = http_get(gw.addr, &format!("/api/sensors/{unknown}/history")).await;
        assert_eq!(status, 404, "{unknown}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(error["error"].as_str().unwrap().contains("/api/sensors"));
    }
    let (status, _) = http_get(gw.addr, "/no/such/path").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_limit_ws_answers_503() {
    let broker = start_broker().await;
    let gw = spawn_gateway(
        broker,
        Options {
            max_clients: 2,
            ..Options::default()
        },
    )
    .await;
    let mut first = ws_connect(gw.addr).await;
    let mut second = ws_connect(gw.addr).await;
    next_json(&mut first).await;
    next_json(&mut second).await;
    match connect_async(format!("ws://{}/ws", gw.addr)).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    wait_metric(
        gw.addr,
        "k3sense_gateway_ws_rejected_total{reason=\"limit\"}",
        |v| v == 1.0,
    )
    .await;

    // A client that leaves frees its place.
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    let deadline = Instant::now() + SOON;
    let mut third = loop {
        match connect_async(format!("ws://{}/ws", gw.addr)).await {
            Ok((ws, _)) => break ws,
            Err(tungstenite::Error::Http(r)) if r.status() == 503 => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "the place was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(next_json(&mut third).await["type"], "snapshot");
}

/// Opens `/ws` with a tiny receive buffer and never reads: the kernel's buffers fill, then the
/// gateway's writes to it wait.
async fn stalled_client(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_while_the_others_keep_up() {
    let broker = start_broker().await;
    let gw = spawn_gateway(
        broker,
        Options {
            send_timeout: Duration::from_millis(500),
            ..Options::default()
        },
    )
    .await;
    let mut fast = [ws_connect(gw.addr).await, ws_connect(gw.addr).await];
    for ws in &mut fast {
        next_json(ws).await;
    }
    let mut stalled = stalled_client(gw.addr).await;
    let mqtt = Mqtt::connect(broker, "test-pub").await;
    let slow = "k3sense_gateway_ws_disconnects_total{reason=\"slow\"}";

    // Publish in bursts until the stalled client's buffers are full and it is dropped; the
    // fast clients must get every reading, in order, all along.
    let mut seq = 0;
    let mut dropped = false;
    for _burst in 0..100 {
        for _ in 0..200 {
            seq += 1;
            mqtt.reading("pi-1", seq, 20.0).await;
        }
        for ws in &mut fast {
            let mut expected = seq - 199;
            while expected <= seq {
                let m = next_json(ws).await;
                assert_eq!(m["seq"], expected, "a fast client missed a reading");
                expected += 1;
            }
        }
        if metric(gw.addr, slow).await >= 1.0 {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the stalled client was never dropped");
    assert_eq!(metric(gw.addr, slow).await, 1.0, "only the stalled client");
    wait_metric(gw.addr, "k3sense_gateway_ws_clients", |v| v == 2.0).await;

    // Still on time afterwards: a reading reaches both fast clients at once.
    let published = Instant::now();
    mqtt.reading("pi-1", seq + 1, 25.0).await;
    for ws in &mut fast {
        assert_eq!(next_json(ws).await["seq"], seq + 1);
    }
    assert!(
        published.elapsed() < Duration::from_secs(1),
        "{:?}",
        published.elapsed()
    );

    // The stalled client's connection is closed: reading it drains to its end.
    let mut sink = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(SOON, async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled connection was not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payloads_are_counted_and_never_forwarded() {
    let broker = start_broker().await;
    let gw = spawn_gateway(broker, Options::default()).await;
    let mut ws = ws_connect(gw.addr).await;
    assert_eq!(next_json(&mut ws).await["sensors"], serde_json::json!([]));
    let mqtt = Mqtt::connect(broker, "test-pub").await;

    mqtt.publish("k3sense/pi-1/state", "not json").await;
    mqtt.publish(
        "k3sense/pi-1/state",
        reading_json("pi-1", 1, 20.0).replace("20.0", "999.0"),
    )
    .await;
    mqtt.publish("k3sense/pi-1/state", reading_json("pi-2", 2, 20.0))
        .await;
    mqtt.publish("k3sense/pi-1/state", r#"{"sensor_id":"pi-1"}"#)
        .await;
    mqtt.publish("k3sense/Not_Valid/state", reading_json("pi-1", 3, 20.0))
        .await;
    mqtt.publish("k3sense/pi-1/availability", "maybe").await;
    mqtt.reading("pi-1", 7, 21.0).await;

    // Same topic, same order: the first thing forwarded is the valid reading.
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "reading");
    assert_eq!(first["seq"], 7);
    for (reason, count) in [
        ("malformed", 1.0),
        ("out_of_range", 1.0),
        ("id_mismatch", 1.0),
        ("missing_field", 1.0),
        ("unknown_topic", 1.0),
        ("bad_availability", 1.0),
    ] {
        let sample = format!("k3sense_gateway_invalid_messages_total{{reason=\"{reason}\"}}");
        wait_metric(gw.addr, &sample, |v| v == count).await;
    }
    // All refused messages are processed by now; the next message is the next valid one.
    mqtt.reading("pi-1", 8, 21.0).await;
    assert_eq!(next_json(&mut ws).await["seq"], 8);
    let (_, body) = http_get(gw.addr, "/api/sensors").await;
    let sensors: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sensors.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(sensors[0]["status"], "unknown");
    let (_, body) = http_get(gw.addr, "/api/sensors/pi-1/history").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_same_origin_and_listed_origins_may_open_ws() {
    let broker = start_broker().await;
    let gw = spawn_gateway(
        broker,
        Options {
            allowed_origins: vec!["https://sensors.example.org".to_owned()],
            ..Options::default()
        },
    )
    .await;
    let open = |origin: String| async move {
        let mut request = format!("ws://{}/ws", gw.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        connect_async(request).await
    };
    for allowed in [
        format!("http://{}", gw.addr),
        "https://sensors.example.org".to_owned(),
    ] {
        let (mut ws, _) = open(allowed.clone()).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "snapshot", "{allowed}");
    }
    for refused in [
        "http://evil.example",
        "https://sensors.example.org.evil.example",
        "null",
    ] {
        match open(refused.to_owned()).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 403, "{refused}");
            }
            other => panic!("{refused}: expected 403, got {other:?}"),
        }
    }
    wait_metric(
        gw.addr,
        "k3sense_gateway_ws_rejected_total{reason=\"origin\"}",
        |v| v == 3.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_of_ws_that_is_no_websocket_handshake_gets_400() {
    let broker = start_broker().await;
    let gw = spawn_gateway(broker, Options::default()).await;
    let (status, body) = http_get(gw.addr, "/ws").await;
    assert_eq!(status, 400, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("Upgrade: websocket")
    );
    wait_metric(
        gw.addr,
        "k3sense_gateway_ws_rejected_total{reason=\"handshake\"}",
        |v| v == 1.0,
    )
    .await;
    assert_eq!(metric(gw.addr, "k3sense_gateway_ws_clients").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_the_socket_with_1009() {
    let broker = start_broker().await;
    let gw = spawn_gateway(
        broker,
        Options {
            max_frame: 1024,
            ..Options::default()
        },
    )
    .await;
    let mut ws = ws_connect(gw.addr).await;
    next_json(&mut ws).await;
    ws.send(Message::text("x".repeat(100))).await.unwrap();
    ws.send(Message::text("x".repeat(5000))).await.unwrap();
    assert_eq!(next_close(&mut ws).await, CloseCode::Size);
    wait_metric(
        gw.addr,
        "k3sense_gateway_ws_disconnects_total{reason=\"oversized\"}",
        |v| v == 1.0,
    )
    .await;
}

/// Stops a child process if a test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_client_with_1001_then_exits() {
    let broker = start_broker().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_k3sense"))
            .args(["gateway", "--listen", &addr.to_string()])
            .args(["--broker", &broker.to_string(), "--drain-timeout", "10s"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(addr).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = ws_connect(addr).await;
        next_json(&mut ws).await;
        clients.push(ws);
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for ws in &mut clients {
        assert_eq!(next_close(ws).await, CloseCode::Away);
    }
    // The clients have not answered their close frames yet, so the gateway is still draining:
    // not ready, and refusing new WebSockets.
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    match connect_async(format!("ws://{addr}/ws")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503 while draining, got {other:?}"),
    }

    // Polling the clients sends their answers; the gateway then exits, cleanly and soon.
    let answered = Instant::now();
    for ws in &mut clients {
        while let Ok(Some(Ok(_))) = tokio::time::timeout(SOON, ws.next()).await {}
    }
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(answered.elapsed() < SOON, "the gateway did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "new connections are refused"
    );
}
