//! Standard MQTT clients and another broker: Debian's `mosquitto_sub` / `mosquitto_pub` and
//! Python's paho-mqtt against our broker, and our publisher and gateway against Debian's
//! Mosquitto broker — with the same end-to-end result as with ours.
//!
//! Also the clients rumqttd alone mistreats (it closes the socket without a CONNACK or SUBACK):
//! keepalive 0, a wrong password, a `$SYS/#` subscription. k3sense's broker answers them the way
//! MQTT 3.1.1 says, each beside a control test showing Mosquitto answering the same bytes.
//!
//! Needs `mosquitto`, `mosquitto-clients` (Debian) and `python3 -m pip install paho-mqtt`; a
//! missing one fails in CI and skips elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{net::SocketAddr, time::Duration};

use k3sense_protocol::Reading;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);

/// A reading by the contract, as a third-party publisher would send it.
fn reading_json(id: &str, seq: u64) -> String {
    format!(
        r#"{{"sensor_id":"{id}","model":"dht22","temperature_c":21.5,"humidity_pct":55.0,"read_at":"2026-11-27T04:00:00.123Z","seq":{seq}}}"#
    )
}

/// Runs `mosquitto_sub` printing `retain qos topic payload` per message; returns the lines.
async fn mosquitto_sub(broker: SocketAddr, filters: &[&str], count: usize) -> Vec<String> {
    let mut command = tokio::process::Command::new("mosquitto_sub");
    command.args([
        "-h",
        "127.0.0.1",
        "-p",
        &broker.port().to_string(),
        "-q",
        "1",
    ]);
    for f in filters {
        command.args(["-t", f]);
    }
    command.args(["-C", &count.to_string(), "-W", "10", "-F", "%r %q %t %p"]);
    let output = command.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "mosquitto_sub failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// Standard clients against our broker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_gets_live_and_retained_readings_with_wildcards_at_qos1() {
    if !tool_available("mosquitto_sub") {
        return;
    }
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let publisher = start_publisher(broker, "pi-1", Duration::from_millis(200), stop.clone());

    // `+` matches any sensor: a live (or already retained) reading arrives.
    let live = mosquitto_sub(broker, &["k3sense/+/state"], 1).await;
    let (flags, payload) = live[0].split_once(" k3sense/pi-1/state ").unwrap();
    assert!(flags.ends_with(" 1"), "delivered at QoS 1: {flags}");
    Reading::from_json(payload.as_bytes()).unwrap();

    // Publisher gone: `#` brings exactly the retained state, availability and sensor health, at
    // QoS 1.
    stop.cancel();
    tokio::time::timeout(5 * SECOND, publisher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let retained = mosquitto_sub(broker, &["k3sense/#"], 3).await;
    let state = retained
        .iter()
        .find_map(|l| l.strip_prefix("1 1 k3sense/pi-1/state "))
        .unwrap_or_else(|| panic!("no retained QoS 1 state in {retained:?}"));
    Reading::from_json(state.as_bytes()).unwrap();
    assert!(
        retained.contains(&"1 1 k3sense/pi-1/availability offline".to_owned()),
        "{retained:?}"
    );
    assert!(
        retained
            .iter()
            .any(|l| l
                .starts_with("1 1 k3sense/pi-1/sensor {\"sensor_id\":\"pi-1\",\"status\":\"ok\"")),
        "{retained:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_readings_reach_the_gateway_and_late_subscribers() {
    if !tool_available("mosquitto_pub") || !tool_available("mosquitto_sub") {
        return;
    }
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let (gateway, _) = start_gateway(broker, stop.clone()).await;
    let mut ws = ws_connect(gateway).await;
    assert_eq!(ws_next(&mut ws, SECOND).await["type"], "snapshot");

    let port = broker.port().to_string();
    let publish = |topic: String, message: String| {
        let port = port.clone();
        async move {
            let status = tokio::process::Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-r"])
                .args(["-t", &topic, "-m", &message])
                .status()
                .await
                .unwrap();
            assert!(status.success(), "mosquitto_pub {topic}");
        }
    };
    // An invalid payload first: dropped by the gateway, never forwarded.
    publish(
        "k3sense/mp-1/state".into(),
        r#"{"sensor_id":"mp-1"}"#.into(),
    )
    .await;
    publish("k3sense/mp-1/availability".into(), "online".into()).await;
    publish("k3sense/mp-1/state".into(), reading_json("mp-1", 7)).await;

    let reading = ws_until(&mut ws, 5 * SECOND, |m| m["type"] == "reading").await;
    assert_eq!(reading["sensor_id"], "mp-1");
    assert_eq!(reading["seq"], 7, "the invalid payload was not forwarded");
    assert_eq!(reading["temperature_c"], 21.5);

    let late = mosquitto_sub(broker, &["k3sense/mp-1/#"], 2).await;
    assert!(
        late.contains(&format!(
            "1 1 k3sense/mp-1/state {}",
            reading_json("mp-1", 7)
        )),
        "{late:?}"
    );
    assert!(
        late.contains(&"1 1 k3sense/mp-1/availability online".to_owned()),
        "{late:?}"
    );
    stop.cancel();
}

/// paho-mqtt subscriber: prints one JSON object per message, then exits after `count`.
const PAHO_SUBSCRIBE: &str = r#"
import json, sys
import paho.mqtt.client as mqtt
port, count, filters = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
got = []
def on_connect(client, userdata, flags, reason_code, properties):
    assert not reason_code.is_failure, reason_code
    client.subscribe([(f, 1) for f in filters])
def on_message(client, userdata, msg):
    got.append({"topic": msg.topic, "retain": msg.retain, "qos": msg.qos, "payload": msg.payload.decode()})
    print(json.dumps(got[-1]), flush=True)
    if len(got) >= count:
        client.disconnect()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-sub")
c.on_connect, c.on_message = on_connect, on_message
c.connect("127.0.0.1", port, keepalive=30)
c.loop_forever(timeout=1.0)
"#;

/// paho-mqtt publisher: QoS 1, retained, waits for the PUBACK.
const PAHO_PUBLISH: &str = r#"
import sys
import paho.mqtt.client as mqtt
port, topic, payload = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub")
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
info = c.publish(topic, payload, qos=1, retain=True)
info.wait_for_publish(timeout=5)
assert info.is_published(), "no PUBACK"
c.disconnect()
c.loop_stop()
print("published")
"#;

async fn python(script: &str, args: &[String]) -> Vec<String> {
    let output = tokio::time::timeout(
        15 * SECOND,
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 took too long")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "python3 failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_subscribes_with_wildcards_and_receives_retained_at_qos1() {
    if !python_module_available("paho.mqtt.client") {
        return;
    }
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let mut sub = mqtt_subscriber(broker, "k3sense/pi-3/state").await;
    let publisher = start_publisher(broker, "pi-3", Duration::from_millis(200), stop.clone());
    next_on(&mut sub, "k3sense/pi-3/state", 5 * SECOND).await;
    stop.cancel();
    tokio::time::timeout(5 * SECOND, publisher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let args = [
        broker.port().to_string(),
        "2".into(),
        "k3sense/+/state".into(),
        "k3sense/+/availability".into(),
    ];
    let lines = python(PAHO_SUBSCRIBE, &args).await;
    let messages: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(messages.len(), 2, "{lines:?}");
    for m in &messages {
        assert_eq!(m["retain"], true, "{m}");
        assert_eq!(m["qos"], 1, "{m}");
    }
    let state = messages
        .iter()
        .find(|m| m["topic"] == "k3sense/pi-3/state")
        .unwrap();
    let reading = Reading::from_json(state["payload"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(reading.sensor_id.as_str(), "pi-3");
    assert!(
        messages
            .iter()
            .any(|m| m["topic"] == "k3sense/pi-3/availability" && m["payload"] == "offline"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_publishes_qos1_retained_and_the_gateway_and_rumqttc_see_it() {
    if !python_module_available("paho.mqtt.client") {
        return;
    }
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let (gateway, _) = start_gateway(broker, stop.clone()).await;
    let mut ws = ws_connect(gateway).await;
    assert_eq!(ws_next(&mut ws, SECOND).await["type"], "snapshot");

    let args = [
        broker.port().to_string(),
        "k3sense/paho-1/state".into(),
        reading_json("paho-1", 3),
    ];
    assert_eq!(python(PAHO_PUBLISH, &args).await, ["published"]);
    let reading = ws_until(&mut ws, 5 * SECOND, |m| m["type"] == "reading").await;
    assert_eq!(reading["sensor_id"], "paho-1");
    assert_eq!(reading["seq"], 3);

    let mut late = mqtt_subscriber(broker, "k3sense/+/state").await;
    let (payload, retained) = next_on(&mut late, "k3sense/paho-1/state", 5 * SECOND).await;
    assert!(retained);
    assert_eq!(payload, reading_json("paho-1", 3).into_bytes());
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Our publisher and gateway against Debian's Mosquitto broker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_gateway_work_end_to_end_through_mosquitto() {
    let Some(mosquitto) = Mosquitto::start().await else {
        return;
    };
    // Exactly the promise tests/e2e.rs checks against our broker.
    end_to_end(mosquitto.addr, "pi-m").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_delivers_the_publishers_last_will_when_it_is_killed() {
    let Some(mosquitto) = Mosquitto::start().await else {
        return;
    };
    let broker = mosquitto.addr;
    let id = format!("killed-{}", broker.port());
    let (availability, state) = (
        format!("k3sense/{id}/availability"),
        format!("k3sense/{id}/state"),
    );
    let mut sub = mqtt_subscriber(broker, &format!("k3sense/{id}/#")).await;
    let mut publisher = tokio::process::Command::new(env!("CARGO_BIN_EXE_k3sense"))
        .args([
            "publisher",
            "--broker",
            &broker.to_string(),
            "--sensor",
            "sim",
        ])
        .args([
            "--sensor-id",
            &id,
            "--interval",
            "200ms",
            "--keepalive",
            "1s",
        ])
        .env_remove("K3SENSE_PASSWORD")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = 10 * SECOND;
    // Online (whatever came before it, e.g. a retained value from a slow start).
    while next_on(&mut sub, &availability, deadline).await.0 != b"online" {}
    next_on(&mut sub, &state, deadline).await;
    // SIGKILL: no goodbye; the broker must publish the will.
    publisher.start_kill().unwrap();
    publisher.wait().await.unwrap();
    let (will, _) = next_on(&mut sub, &availability, deadline).await;
    assert_eq!(String::from_utf8_lossy(&will), "offline");
}

// ---------------------------------------------------------------------------------------------
// Clients rumqttd mistreats: current behaviour, next to Mosquitto's proper answer
// ---------------------------------------------------------------------------------------------

/// What came back on a raw MQTT socket.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A packet: its fixed-header type byte and its body.
    Packet(u8, Vec<u8>),
    /// The broker closed the socket (EOF or reset) without answering.
    Closed,
}

fn connect_packet(client_id: &str, keepalive: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&keepalive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

fn subscribe_packet(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0); // requested QoS 0
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend(body);
    packet
}

/// Reads one packet (short ones only: CONNACK, SUBACK), or notices the socket closing.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> Answer {
    let read = async {
        let mut header = [0u8; 2];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(_) => return Answer::Closed,
        }
        let mut body = vec![0u8; usize::from(header[1])];
        match stream.read_exact(&mut body).await {
            Ok(_) => Answer::Packet(header[0], body),
            Err(_) => Answer::Closed,
        }
    };
    tokio::time::timeout(5 * SECOND, read)
        .await
        .expect("the broker neither answered nor closed the socket in 5 s")
}

async fn raw_connect(broker: SocketAddr, keepalive: u16) -> (tokio::net::TcpStream, Answer) {
    let mut stream = tokio::net::TcpStream::connect(broker).await.unwrap();
    stream
        .write_all(&connect_packet(&format!("raw-{}", free_port()), keepalive))
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    (stream, answer)
}

fn connack_accepted() -> Answer {
    Answer::Packet(0x20, vec![0, 0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_is_served_with_connack_0() {
    let broker = start_broker().await;
    let (_, answer) = raw_connect(broker, 0).await;
    // MQTT 3.1.1 allows keepalive 0 ("no keepalive"); rumqttd alone closes the socket, our
    // broker's front accepts it.
    assert_eq!(answer, connack_accepted());
    // The same client with keepalive 30 is accepted, so the packet itself is fine.
    let (_, answer) = raw_connect(broker, 30).await;
    assert_eq!(answer, connack_accepted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gets_connack_4() {
    let addr = free_addr();
    let dir = std::env::temp_dir().join(format!("k3sense-interop-users-{}", addr.port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("users"), "gateway:right-password\n").unwrap();
    let mut config = k3sense_broker::Config::new(addr);
    config.options.users_file = Some(dir.join("users"));
    let started = k3sense_broker::start(&config).await.unwrap();
    tokio::spawn(started.serve(CancellationToken::new()));
    std::fs::remove_dir_all(&dir).unwrap();

    let login = |password: &str| {
        let mut stream_bytes = connect_packet("raw-login", 30);
        // Set the user name and password flags, append both to the payload.
        stream_bytes[9] |= 0xC0;
        for field in ["gateway", password] {
            stream_bytes.extend_from_slice(&(field.len() as u16).to_be_bytes());
            stream_bytes.extend_from_slice(field.as_bytes());
        }
        stream_bytes[1] = (stream_bytes.len() - 2) as u8;
        stream_bytes
    };
    let answer = |packet: Vec<u8>| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&packet).await.unwrap();
        read_answer(&mut stream).await
    };
    assert_eq!(answer(login("right-password")).await, connack_accepted());
    // MQTT 3.1.1 answers a wrong password with CONNACK 4 ("bad user name or password"), so
    // clients can tell it from a network fault (rumqttd alone closes the socket).
    assert_eq!(
        answer(login("wrong")).await,
        Answer::Packet(0x20, vec![0, 4])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_accepts_keepalive_zero_with_connack() {
    let Some(mosquitto) = Mosquitto::start().await else {
        return;
    };
    let (_, answer) = raw_connect(mosquitto.addr, 0).await;
    assert_eq!(answer, connack_accepted());
}

#[tokio::test]
async fn mosquitto_sub_itself_refuses_keepalive_zero() {
    if !tool_available("mosquitto_sub") {
        return;
    }
    // Debian's mosquitto_sub (2.0) cannot even send keepalive 0: `-k` must be 5..=65535. Such
    // clients come from libraries (paho: `keepalive=0`) and embedded devices.
    let output = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-k",
            "0",
            "-t",
            "x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keepalive"), "{stderr}");
}

/// SUBSCRIBE `$SYS/#` on a raw connection: SUBACK granting QoS 0, then a retained QoS 0
/// PUBLISH of a `$SYS/broker/…` topic; UNSUBSCRIBE then answered, and the connection still
/// grants a normal subscription (rumqttd alone closes the socket at the SUBSCRIBE, and
/// mosquitto_sub then reconnects in a loop).
async fn a_sys_subscription_is_answered_as_mosquitto_does(broker: SocketAddr) {
    let (mut stream, answer) = raw_connect(broker, 30).await;
    assert_eq!(answer, connack_accepted());
    stream
        .write_all(&subscribe_packet(1, "$SYS/#"))
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut stream).await,
        Answer::Packet(0x90, vec![0, 1, 0])
    );
    // PUBLISH (0x3_), QoS 0, retain 1: topic length, then the topic.
    let Answer::Packet(0x31, body) = read_answer(&mut stream).await else {
        panic!("no retained QoS 0 PUBLISH after the SUBACK");
    };
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8_lossy(&body[2..2 + topic_len]);
    assert!(topic.starts_with("$SYS/broker/"), "{topic}");
    stream
        .write_all(&unsubscribe_packet(2, "$SYS/#"))
        .await
        .unwrap();
    stream
        .write_all(&subscribe_packet(3, "k3sense/#"))
        .await
        .unwrap();
    // The rest of the tree (Mosquitto has dozens of topics) may come before the UNSUBACK.
    let mut seen = Vec::new();
    loop {
        match read_answer(&mut stream).await {
            Answer::Packet(0x30 | 0x31, _) => {}
            Answer::Packet(0xb0, body) => seen.push(("UNSUBACK", body)),
            Answer::Packet(0x90, body) => {
                seen.push(("SUBACK", body));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, [("UNSUBACK", vec![0, 2]), ("SUBACK", vec![0, 3, 0])]);
}

fn unsubscribe_packet(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    let mut packet = vec![0xa2, body.len() as u8];
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sys_subscription_is_served_and_the_connection_stays() {
    a_sys_subscription_is_answered_as_mosquitto_does(start_broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_answers_a_sys_subscription_the_same_way() {
    let Some(mosquitto) = Mosquitto::start().await else {
        return;
    };
    a_sys_subscription_is_answered_as_mosquitto_does(mosquitto.addr).await;
}
