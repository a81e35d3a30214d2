//! The broker's local socket: `k3sense all` starts its broker with one (an abstract Unix socket)
//! and its gateway and publisher reach it there, by `--broker unix:@NAME`, instead of over
//! loopback TCP. It must be the same broker behind another door: the same logins, the same rules
//! per role, and messages crossing between it and the TCP listener both ways.
//!
//! Clients: k3sense's own MQTT client (`MqttConfig` with a `unix:@` address, as `all` uses it)
//! and plain rumqttc over TCP; a real `k3sense all` process for the wiring; and `--broker
//! unix:PATH` against a real peer, Debian's Mosquitto with a Unix socket listener (fails in CI
//! when Mosquitto is missing, skips elsewhere).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{path::PathBuf, time::Duration};

use k3sense_protocol::{
    MqttConfig,
    mqtt::{ClientEvent, Disconnect, Events, QoS},
};
use rumqttc::{ConnectReturnCode, ConnectionError};
use support::*;
use tokio_util::sync::CancellationToken;

const USERS: &str = "\
admin:admin-pw:admin
reader:reader-pw:reader
pub:pub-pw:publisher:pi-1
";

const READING: &str = r#"{"sensor_id":"pi-1","model":"dht22","temperature_c":21.5,"humidity_pct":40.0,"read_at":"2026-11-29T01:00:00.000Z","seq":1}"#;

/// The client's first connection outcome.
async fn connected(events: &mut Events) -> Result<(), Disconnect> {
    client_event_until(events, |e| match e {
        ClientEvent::Connected { .. } => Some(Ok(())),
        ClientEvent::Disconnected { reason, .. } => Some(Err(reason)),
        _ => None,
    })
    .await
}

/// The next message from a k3sense client: (topic, payload).
async fn next_message(events: &mut Events) -> (String, String) {
    client_event_until(events, |e| match e {
        ClientEvent::Message(m) => {
            Some((m.topic, String::from_utf8_lossy(&m.payload).into_owned()))
        }
        _ => None,
    })
    .await
}

fn on_local(local: &str, user: &str, password: &str) -> MqttConfig {
    let mut config = MqttConfig::new(local);
    config.username = Some(user.to_owned());
    config.password = Some(password.to_owned());
    config
}

#[tokio::test]
async fn the_local_socket_logs_in_and_judges_as_tcp_does_and_carries_messages_both_ways() {
    let dir = std::env::temp_dir().join(format!("k3sense-local-socket-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let users: PathBuf = dir.join("users");
    std::fs::write(&users, USERS).unwrap();
    let mut config = k3sense_broker::Config::new(free_addr());
    config.options.users_file = Some(users);
    config.local_socket = true;
    let started = k3sense_broker::start(&config).await.unwrap();
    let tcp = started.local_addr();
    let local = started
        .local_address()
        .expect("Linux binds the local socket")
        .to_owned();
    assert!(local.starts_with("unix:@k3sense-"), "{local}");
    let metrics = started.metrics();
    tokio::spawn(started.serve(CancellationToken::new()));

    // A wrong password is refused on the local socket as on TCP, and counted.
    let (_wrong, mut wrong_events) = on_local(&local, "reader", "nope")
        .client("local-wrong")
        .unwrap()
        .start();
    match connected(&mut wrong_events).await {
        Err(Disconnect::ConnectFailed(ConnectionError::ConnectionRefused(code))) => {
            assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
        }
        other => panic!("a wrong password got in on the local socket: {other:?}"),
    }
    let refused = metrics.snapshot().refused;
    assert!(
        refused
            .iter()
            .any(|(reason, n)| *reason == k3sense_broker::Reason::BadCredentials && *n >= 1),
        "the refusal is counted: {refused:?}"
    );

    // A reader on the local socket gets what a publisher sends over TCP.
    let (_reader, mut reader_events) = on_local(&local, "reader", "reader-pw")
        .client("local-reader")
        .unwrap()
        .subscribe("k3sense/#", QoS::AtLeastOnce)
        .start();
    connected(&mut reader_events).await.unwrap();
    client_subscribed(&mut reader_events).await;
    let (tcp_pub, mut tcp_pub_events) = {
        let mut options = rumqttc::MqttOptions::new("tcp-pub", "127.0.0.1", tcp.port());
        options.set_credentials("pub", "pub-pw");
        rumqttc::AsyncClient::new(options, 10)
    };
    tokio::spawn(async move { while tcp_pub_events.poll().await.is_ok() {} });
    tcp_pub
        .publish(
            "k3sense/pi-1/state",
            rumqttc::QoS::AtLeastOnce,
            true,
            READING,
        )
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut reader_events).await,
        ("k3sense/pi-1/state".to_owned(), READING.to_owned())
    );

    // A publisher on the local socket reaches a TCP subscriber; its role still binds it to its
    // own sensor: pi-2 is dropped, the pi-1 reading after it arrives.
    let mut watcher = mqtt_subscriber_as(tcp, &["k3sense/+/state"], ("admin", "admin-pw")).await;
    let _retained = next_on(&mut watcher, "k3sense/pi-1/state", Duration::from_secs(5)).await;
    let (local_pub, mut local_pub_events) = on_local(&local, "pub", "pub-pw")
        .client("local-pub")
        .unwrap()
        .start();
    connected(&mut local_pub_events).await.unwrap();
    let forged = READING.replace("pi-1", "pi-2");
    local_pub
        .publish("k3sense/pi-2/state", QoS::AtLeastOnce, false, forged)
        .unwrap();
    let second = READING.replace("\"seq\":1", "\"seq\":2");
    local_pub
        .publish(
            "k3sense/pi-1/state",
            QoS::AtLeastOnce,
            false,
            second.clone(),
        )
        .unwrap();
    let (topic, payload, _) = tokio::time::timeout(Duration::from_secs(5), watcher.recv())
        .await
        .expect("nothing reached the TCP subscriber within 5 s")
        .unwrap();
    assert_eq!(
        (topic.as_str(), String::from_utf8(payload).unwrap()),
        ("k3sense/pi-1/state", second)
    );
    assert!(
        metrics.snapshot().publishes_forbidden >= 1,
        "the forged publish is counted as forbidden"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn k3sense_all_connects_its_gateway_and_publisher_on_the_local_socket() {
    let mqtt = free_addr();
    let http = free_addr();
    let all = Proc::start_logging(
        K3SENSE,
        &[
            "all",
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &http.to_string(),
            "--interval",
            "200ms",
        ],
        "info,k3sense_broker::session=debug",
    );
    wait_ready(http).await;
    // A reading reaches the page's API: the path through the local socket works.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(http, "/api/sensors").await;
        if body.contains("\"temperature_c\"") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reading: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = all.log();
    for client in ["k3sense-gateway-", "k3sense-publisher-sim-1"] {
        assert!(
            log.lines().any(|l| l.contains("client connected")
                && l.contains("peer=local socket")
                && l.contains(client)),
            "{client} did not connect on the local socket:\n{log}"
        );
    }
}

/// `--broker unix:PATH` against a real peer: Mosquitto 2's Unix socket listener (`listener 0
/// PATH`, mosquitto.conf(5)). A simulated publisher process reaches it by the socket file, and a
/// TCP subscriber of the same Mosquitto gets its readings.
#[tokio::test]
async fn a_publisher_reaches_mosquitto_by_a_unix_socket_file() {
    let dir = std::env::temp_dir().join(format!("k3sense-unix-path-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    // Mosquitto started as root drops to its own user before it binds: let it create the file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.join("mqtt.sock");
    let extra = format!("listener 0 {}\nallow_anonymous true\n", socket.display());
    let Some(mosquitto) = Mosquitto::start_with(&extra).await else {
        return;
    };
    let mut readings = mqtt_subscriber(mosquitto.addr, "k3sense/pi-unix/state").await;
    let broker = format!("unix:{}", socket.display());
    let _publisher = Proc::start(
        K3SENSE,
        &[
            "publisher",
            "--broker",
            &broker,
            "--sensor",
            "sim",
            "--sensor-id",
            "pi-unix",
            "--interval",
            "200ms",
            "--metrics-listen",
            "off",
            "--ha-discovery",
            "false",
        ],
    );
    let (payload, _) = next_on(
        &mut readings,
        "k3sense/pi-unix/state",
        Duration::from_secs(10),
    )
    .await;
    let reading = k3sense_protocol::Reading::from_json(&payload).unwrap();
    assert_eq!(reading.sensor_id.as_str(), "pi-unix");
    drop(mosquitto);
    let _ = std::fs::remove_dir_all(&dir);
}
