//! `k3sense all` as a newcomer runs it: started, used by a few MQTT and WebSocket clients that
//! come and go, stopped with Ctrl-C. Its log must hold no ERROR and no WARN line but the
//! documented anonymous-broker warning, although the embedded rumqttd logs every normal
//! disconnect at ERROR (`router-drop error=Recv(Disconnected)`, filtered in src/logging.rs).
//! And the filter must not hide real trouble: a real rumqttd error, and a port already taken,
//! still show.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::*;
use tokio::io::AsyncWriteExt;

/// The one WARN line `k3sense all` prints by design (broker/README.md, docs/cli.md): its broker
/// has no users file.
const ANONYMOUS_WARNING: &str = "no --users-file: the broker accepts anonymous clients";

/// The log lines at ERROR or WARN, but the anonymous-broker warning. (Text format without a
/// terminal: `<time>  WARN <target>: …`, `<time> ERROR <target>: …`, no colours.)
fn alarms(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(" ERROR ") || line.contains(" WARN "))
        .filter(|line| !line.contains(ANONYMOUS_WARNING))
        .collect()
}

/// `k3sense all` on free ports, the simulated sensor read every second, logging at `info`, which
/// also lets rumqttd's own `info` lines through: the test sees each disconnect rumqttd handled.
fn start_all() -> (Proc, SocketAddr, SocketAddr) {
    let (mqtt, http) = (free_addr(), free_addr());
    let all = Proc::start(
        K3SENSE,
        &[
            "all",
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &http.to_string(),
            "--interval",
            "1s",
        ],
    );
    (all, mqtt, http)
}

/// Polls the log (a file; there is no event for it) until `done` holds, for at most 20 s.
async fn wait_log(all: &Proc, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = all.log();
        if done(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "never saw {what}; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// rumqttd's `info` line for each connection its router lets go (rumqttd 0.20,
/// `router/routing.rs`); the `router-drop` ERROR line follows each one unless filtered.
const DISCONNECTING: &str = "rumqttd::router::routing: Disconnecting connection";

fn disconnects(log: &str) -> usize {
    log.matches(DISCONNECTING).count()
}

/// An MQTT client that subscribes, gets the retained reading, then leaves: with a DISCONNECT
/// (`clean`) or by dropping its socket, as a killed client or a lost Wi-Fi link does.
async fn mqtt_visit(broker: SocketAddr, id: &str, clean: bool) {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client
        .subscribe("k3sense/+/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(_)) = events.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("the retained reading came");
    if clean {
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }
}

/// A WebSocket client that gets a reading, then closes with a close frame (`clean`) or drops
/// its socket.
async fn ws_visit(http: SocketAddr, clean: bool) -> Ws {
    let mut ws = ws_connect(http).await;
    ws_until(&mut ws, Duration::from_secs(10), |m| {
        m["type"] == "reading" || (m["type"] == "snapshot" && m["sensors"][0]["latest"].is_object())
    })
    .await;
    if clean {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_clients_coming_and_going_and_ctrl_c_log_no_error_or_warning() {
    let (all, mqtt, http) = start_all();
    wait_ready(http).await;
    // It serves a reading. This client stays, reading as a browser does (so it answers the
    // gateway's close frame at shutdown).
    let mut staying_ws = ws_visit(http, false).await;
    let staying_ws =
        tokio::spawn(async move { while let Some(Ok(_)) = staying_ws.next().await {} });
    let mut staying_mqtt = mqtt_subscriber(mqtt, "k3sense/+/state").await;
    next_on(
        &mut staying_mqtt,
        "k3sense/sim-1/state",
        Duration::from_secs(10),
    )
    .await;

    let before = disconnects(&all.log());
    mqtt_visit(mqtt, "quiet-clean", true).await;
    mqtt_visit(mqtt, "quiet-dropped", false).await;
    // A TCP probe (a load balancer's or Kubernetes' tcpSocket check): connects, sends nothing.
    drop(tokio::net::TcpStream::connect(mqtt).await.unwrap());
    // One that sends bytes that are not MQTT, then goes.
    let mut garbage = tokio::net::TcpStream::connect(mqtt).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(garbage);
    drop(ws_visit(http, true).await);
    drop(ws_visit(http, false).await);
    // rumqttd has let both MQTT visitors go (so each would have logged its ERROR by now).
    wait_log(&all, "rumqttd letting both MQTT visitors go", |log| {
        disconnects(log) >= before + 2
    })
    .await;

    // Stopped with one MQTT and one WebSocket client still connected.
    let (_, status, log) = all.stop("INT");
    drop(staying_mqtt);
    tokio::time::timeout(Duration::from_secs(5), staying_ws)
        .await
        .expect("the gateway closed the staying WebSocket")
        .unwrap();
    assert!(status.success(), "exit: {status:?}\n{log}");
    assert!(log.contains("MQTT broker ready"), "{log}");
    assert!(log.contains("interrupted: shutting down"), "{log}");
    // The start-up probe, the readiness check, both visitors, and the publisher's and
    // gateway's goodbyes: every one a normal disconnect rumqttd handled.
    assert!(disconnects(&log) >= 6, "{log}");
    assert!(!log.contains("router-drop"), "{log}");
    assert_eq!(alarms(&log), Vec::<&str>::new(), "\n{log}");
    assert_eq!(
        log.matches(ANONYMOUS_WARNING).count(),
        1,
        "the anonymous-broker warning, once:\n{log}"
    );
}

/// The filter keeps rumqttd's real errors: bytes that are not a CONNECT sent straight to the
/// embedded rumqttd's internal port (which the proxy never does) make rumqttd log an ERROR, and
/// it reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_rumqttd_error_still_reaches_the_log() {
    let (all, _, http) = start_all();
    wait_ready(http).await;
    // rumqttd's own info line names the internal listener's address.
    let log = wait_log(&all, "rumqttd's internal listener", |log| {
        log.contains("config=\"internal\" listen_addr=")
    })
    .await;
    let internal: SocketAddr = log
        .split("config=\"internal\" listen_addr=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no internal address in\n{log}"));
    let mut tcp = tokio::net::TcpStream::connect(internal).await.unwrap();
    // PINGREQ where rumqttd expects CONNECT.
    tcp.write_all(&[0xC0, 0x00]).await.unwrap();
    let log = wait_log(&all, "rumqttd's ERROR line", |log| {
        log.contains("Error while handling MQTT connect packet")
    })
    .await;
    drop(tcp);
    let alarms = alarms(&log);
    assert_eq!(alarms.len(), 1, "{log}");
    assert!(alarms[0].contains(" ERROR "), "{log}");
    assert!(alarms[0].contains("rumqttd::server::broker"), "{log}");
    assert!(alarms[0].contains("NotConnectPacket"), "{log}");
    let (_, status, _) = all.stop("INT");
    assert!(status.success());
}

/// A genuine start-up error still prints, and the exit status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_already_taken_prints_the_error_and_fails() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mqtt = taken.local_addr().unwrap();
    let all = Proc::start(
        K3SENSE,
        &[
            "all",
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &free_addr().to_string(),
        ],
    );
    let (_, status, log) = all.wait(Instant::now());
    drop(taken);
    assert!(!status.success(), "{log}");
    let error = log
        .lines()
        .find(|line| line.starts_with("Error: "))
        .unwrap_or_else(|| panic!("no error line in\n{log}"));
    assert!(error.contains("cannot start the MQTT broker"), "{log}");
    assert!(log.contains(&format!("cannot listen on {mqtt}")), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
}
