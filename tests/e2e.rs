//! End to end, in one process: a real broker, a simulated publisher and a gateway on free
//! ports, watched by real clients — a WebSocket client, rumqttc and Debian's `mosquitto_sub`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use k3sense_protocol::Reading;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use support::*;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_travels_from_sensor_to_websocket_and_mqtt_clients() {
    end_to_end(start_broker().await, "pi-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_prints_the_retained_reading_at_once() {
    if !tool_available("mosquitto_sub") {
        return;
    }
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let publisher = start_publisher(broker, "pi-2", Duration::from_millis(200), stop.clone());
    // Wait until a reading is retained.
    let mut sub = mqtt_subscriber(broker, "k3sense/pi-2/state").await;
    tokio::time::timeout(5 * SECOND, sub.recv())
        .await
        .unwrap()
        .unwrap();
    stop.cancel();
    // A clean stop returns once `offline` is published and the publisher has disconnected.
    tokio::time::timeout(5 * SECOND, publisher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The publisher is gone: whatever mosquitto_sub prints now comes from retained messages.
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-t",
            "k3sense/#",
            "-v",
            // state, availability and the sensor's health: three retained messages.
            "-C",
            "3",
            "-W",
            "5",
        ])
        .output()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mosquitto_sub failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state = stdout
        .lines()
        .find_map(|l| l.strip_prefix("k3sense/pi-2/state "))
        .unwrap_or_else(|| panic!("no retained state in {stdout:?}"));
    Reading::from_json(state.as_bytes()).unwrap();
    assert!(
        stdout.contains("k3sense/pi-2/availability offline"),
        "{stdout}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "retained messages took {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_reports_a_taken_port_and_refuses_bad_passwords() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = k3sense_broker::start(&k3sense_broker::Config::new(addr))
        .await
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(
        text.contains("cannot listen on") && text.contains("--listen"),
        "{text}"
    );

    let dir = std::env::temp_dir().join(format!("k3sense-users-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let users = dir.join("users");
    std::fs::write(&users, "gateway:right-password\n").unwrap();
    let addr = free_addr();
    let mut config = k3sense_broker::Config::new(addr);
    config.options.users_file = Some(users);
    let started = k3sense_broker::start(&config).await.unwrap();
    tokio::spawn(started.serve(CancellationToken::new()));

    let connects = |login: Option<(&str, &str)>| {
        let mut options =
            MqttOptions::new(format!("auth-{}", free_port()), "127.0.0.1", addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = login {
            options.set_credentials(u, p);
        }
        async move {
            let (_client, mut events) = AsyncClient::new(options, 10);
            matches!(
                tokio::time::timeout(SECOND * 2, events.poll()).await,
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == rumqttc::ConnectReturnCode::Success
            )
        }
    };
    assert!(connects(Some(("gateway", "right-password"))).await);
    assert!(!connects(Some(("gateway", "wrong"))).await);
    assert!(
        !connects(None).await,
        "anonymous clients are refused when a users file is set"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
