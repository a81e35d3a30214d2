//! The broker's security rules, each proven with real clients against a real broker on free
//! ports: authentication (CONNACK 4 and 5), the roles' rules for PUBLISH and SUBSCRIBE, readings
//! that no empty publish can erase, `$SYS/#` and keepalive 0 answered instead of dropped, a silent
//! client (plain and TLS) that delays nobody, and bad bytes that close only their own connection.
//!
//! Clients: rumqttc, raw MQTT packets (rumqttc's `mqttbytes` codec) over TCP and over TLS
//! (tokio-rustls, with a certificate made by `rcgen` for the test), `mosquitto_sub` and paho-mqtt
//! (a missing tool fails in CI and skips elsewhere).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::BytesMut;
use k3sense_broker::{Metrics, Reason};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, QoS, SubscribeReasonCode,
    mqttbytes::v4::{Connect, Login, Packet as Raw, Publish, Subscribe},
};
use support::*;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);

const USERS: &str = "\
# one account per role, as deploy/gen-secrets.sh writes them
admin:admin-pw:admin
reader:reader-pw:reader
pub:pub-pw:publisher:pi-1
";

struct Broker {
    addr: SocketAddr,
    tls: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    cert_pem: Option<String>,
    _dir: tempdir::Dir,
}

/// A minimal self-deleting temporary directory (no extra dev-dependency).
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "k3sense-broker-security-{}-{}",
                std::process::id(),
                super::free_port()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Starts a broker with the users above; with `tls`, a second listener with a fresh self-signed
/// certificate for `localhost`.
async fn start(tls: bool, connect_timeout: Duration) -> Broker {
    let dir = tempdir::Dir::new();
    let users: PathBuf = dir.0.join("users");
    std::fs::write(&users, USERS).unwrap();
    let mut config = k3sense_broker::Config::new(free_addr());
    config.options.users_file = Some(users);
    config.options.connect_timeout = connect_timeout;
    config.options.max_payload = 4096;
    let mut cert_pem = None;
    if tls {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        config.tls.tls_listen = Some(free_addr());
        config.tls.tls_cert = Some(cert);
        config.tls.tls_key = Some(key);
        cert_pem = Some(generated.cert.pem());
    }
    let started = k3sense_broker::start(&config).await.unwrap();
    let broker = Broker {
        addr: started.local_addr(),
        tls: started.tls_local_addr(),
        metrics: started.metrics(),
        cert_pem,
        _dir: dir,
    };
    tokio::spawn(started.serve(CancellationToken::new()));
    broker
}

/// A rumqttc client that has its CONNACK; panics on any other answer.
async fn client(addr: SocketAddr, login: Option<(&str, &str)>) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(format!("sec-{}", free_port()), "127.0.0.1", addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = login {
        options.set_credentials(u, p);
    }
    let (client, mut events) = AsyncClient::new(options, 20);
    match tokio::time::timeout(2 * SECOND, events.poll()).await {
        Ok(Ok(Event::Incoming(rumqttc::Packet::ConnAck(ack))))
            if ack.code == ConnectReturnCode::Success => {}
        other => panic!("no successful CONNACK: {other:?}"),
    }
    (client, events)
}

/// The next PUBLISH: (topic, payload).
async fn next_publish(events: &mut EventLoop, within: Duration) -> (String, String) {
    mqtt_until(events, within, |p| match p {
        rumqttc::Packet::Publish(p) => Some((
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        )),
        _ => None,
    })
    .await
}

// ---- raw MQTT over any stream ----

fn connect_bytes(keepalive: u16, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut connect = Connect::new(format!("raw-{}", free_port()));
    connect.keep_alive = keepalive;
    connect.login = login.map(|(u, p)| Login::new(u, p));
    bytes_of(&Raw::Connect(connect))
}

async fn raw_connack<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keepalive: u16,
    login: Option<(&str, &str)>,
) -> Option<ConnectReturnCode> {
    stream
        .write_all(&connect_bytes(keepalive, login))
        .await
        .unwrap();
    match read_raw(stream, &mut BytesMut::new()).await {
        Some(Raw::ConnAck(ack)) => Some(ack.code),
        Some(other) => panic!("expected CONNACK, got {other:?}"),
        None => None,
    }
}

/// Whether the broker closes `stream` within 3 s (EOF or reset), reading and discarding.
async fn closed_soon(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 256];
    tokio::time::timeout(3 * SECOND, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_get_connack_5_and_wrong_passwords_connack_4() {
    let broker = start(false, 5 * SECOND).await;
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    assert_eq!(
        raw_connack(&mut tcp, 30, None).await,
        Some(ConnectReturnCode::NotAuthorized),
        "no credentials where a users file is set: CONNACK 5"
    );
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    assert_eq!(
        raw_connack(&mut tcp, 30, Some(("reader", "wrong"))).await,
        Some(ConnectReturnCode::BadUserNamePassword),
        "wrong password: CONNACK 4"
    );
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    assert_eq!(
        raw_connack(&mut tcp, 30, Some(("nobody", "reader-pw"))).await,
        Some(ConnectReturnCode::BadUserNamePassword),
        "unknown user: CONNACK 4, the same as a wrong password"
    );
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    assert_eq!(
        raw_connack(&mut tcp, 30, Some(("reader", "reader-pw"))).await,
        Some(ConnectReturnCode::Success)
    );
    let m = broker.metrics.snapshot();
    assert_eq!(m.refused(Reason::NotAuthorised), 1);
    assert_eq!(m.refused(Reason::BadCredentials), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_can_neither_publish_a_reading_nor_erase_the_retained_one() {
    let broker = start(false, 5 * SECOND).await;
    let reading = r#"{"sensor_id":"pi-1","model":"dht11","temperature_c":21.0,"humidity_pct":40.0,"read_at":"2026-11-27T04:00:00.000Z","seq":1}"#;
    let (publisher, mut pub_events) = client(broker.addr, Some(("pub", "pub-pw"))).await;
    mqtt_publish_acked(
        &publisher,
        &mut pub_events,
        "k3sense/pi-1/state",
        reading,
        true,
    )
    .await;

    let (reader, mut events) = client(broker.addr, Some(("reader", "reader-pw"))).await;
    let fake = reading.replace("21.0", "99.0");
    // Each is acknowledged (MQTT 3.1.1 has no negative PUBACK) and dropped.
    mqtt_publish_acked(
        &reader,
        &mut events,
        "k3sense/pi-1/state",
        fake.as_str(),
        true,
    )
    .await;
    mqtt_publish_acked(&reader, &mut events, "k3sense/pi-1/state", "", true).await;
    mqtt_publish_acked(&reader, &mut events, "k3sense/pi-1/state", "", false).await;
    mqtt_publish_acked(
        &reader,
        &mut events,
        "k3sense/pi-1/availability",
        "offline",
        true,
    )
    .await;
    // Even an admin's empty *non-retained* publish cannot erase a reading (rumqttd would erase
    // it even with retain=0); only a retained empty one clears it, as MQTT says
    // (tests/broker_hostile.rs, `an_admin_clears_a_retained_reading_and_a_reader_cannot`).
    let (admin, mut admin_events) = client(broker.addr, Some(("admin", "admin-pw"))).await;
    mqtt_publish_acked(&admin, &mut admin_events, "k3sense/pi-1/state", "", false).await;

    // A new subscriber still gets the publisher's reading, unchanged, at once.
    let (late, mut late_events) = client(broker.addr, Some(("reader", "reader-pw"))).await;
    let codes = mqtt_subscribe_codes(&late, &mut late_events, &["k3sense/#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let (topic, payload) = next_publish(&mut late_events, 2 * SECOND).await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("k3sense/pi-1/state", reading)
    );
    assert!(
        tokio::time::timeout(SECOND / 2, next_publish(&mut late_events, SECOND))
            .await
            .is_err(),
        "nothing else is retained (no availability from the reader)"
    );

    // The reader's connection is still up after its refusals.
    let codes = mqtt_subscribe_codes(&reader, &mut events, &["k3sense/+/state"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let m = broker.metrics.snapshot();
    assert_eq!(m.publishes_forbidden, 4);
    assert_eq!(m.publishes_would_erase, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_cannot_publish_another_sensors_topics_or_read_readings() {
    let broker = start(false, 5 * SECOND).await;
    let (admin, mut watch) = client(broker.addr, Some(("admin", "admin-pw"))).await;
    mqtt_subscribe_codes(&admin, &mut watch, &["k3sense/#"]).await;

    let (publisher, mut events) = client(broker.addr, Some(("pub", "pub-pw"))).await;
    mqtt_publish_acked(
        &publisher,
        &mut events,
        "k3sense/pi-2/state",
        "{\"forged\":1}",
        true,
    )
    .await;
    mqtt_publish_acked(
        &publisher,
        &mut events,
        "k3sense/pi-2/availability",
        "online",
        true,
    )
    .await;
    mqtt_publish_acked(
        &publisher,
        &mut events,
        "k3sense/pi-1/state",
        "{\"own\":1}",
        true,
    )
    .await;
    // Same connection, in order: had the forged ones passed, they would arrive first.
    let first = next_publish(&mut watch, 2 * SECOND).await;
    assert_eq!(
        first,
        ("k3sense/pi-1/state".to_owned(), "{\"own\":1}".to_owned())
    );

    let codes = mqtt_subscribe_codes(
        &publisher,
        &mut events,
        &["k3sense/#", "k3sense/pi-1/replay/#", "homeassistant/status"],
    )
    .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ],
        "a publisher reads only its control topics; the refused filter keeps its place"
    );
    assert_eq!(broker.metrics.snapshot().publishes_forbidden, 2);
}

/// The next PUBLISH whose topic `keep` accepts: (topic, payload, retain, QoS).
async fn next_publish_where(
    events: &mut EventLoop,
    within: Duration,
    keep: impl Fn(&str) -> bool,
) -> (String, String, bool, QoS) {
    mqtt_until(events, within, |p| match p {
        rumqttc::Packet::Publish(p) if keep(&p.topic) => Some((
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
            p.retain,
            p.qos,
        )),
        _ => None,
    })
    .await
}

/// `$SYS/…` is served by the front (issue 16; rumqttd alone closes the connection): granted,
/// the value now at once (retained, QoS 0, as Mosquitto sends it). Any other `$` filter gets
/// 0x80 and the connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_subscriptions_are_served_and_other_dollar_filters_get_0x80() {
    let broker = start(false, 5 * SECOND).await;
    let (reader, mut events) = client(broker.addr, Some(("reader", "reader-pw"))).await;
    let codes =
        mqtt_subscribe_codes(&reader, &mut events, &["$SYS/broker/clients/connected"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let (_, connected, retain, qos) =
        next_publish_where(&mut events, 2 * SECOND, |t| t.starts_with("$SYS/")).await;
    assert_eq!(
        (connected.as_str(), retain, qos),
        ("1", true, QoS::AtMostOnce)
    );

    let codes = mqtt_subscribe_codes(
        &reader,
        &mut events,
        &["#", "$other/x", "$SYS/broker/uptime", "k3sense/#"],
    )
    .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    // Still connected and subscribed: a reading published now arrives.
    let (publisher, mut pub_events) = client(broker.addr, Some(("pub", "pub-pw"))).await;
    mqtt_publish_acked(
        &publisher,
        &mut pub_events,
        "k3sense/pi-1/state",
        "{}",
        false,
    )
    .await;
    let (topic, ..) =
        next_publish_where(&mut events, 2 * SECOND, |t| !t.starts_with("$SYS/")).await;
    assert_eq!(topic, "k3sense/pi-1/state");
    let m = broker.metrics.snapshot();
    assert_eq!(m.subscriptions_system, 1);
    assert_eq!(m.subscriptions_sys, 2);
    assert_eq!(m.subscriptions_forbidden, 1);

    // An admin's `#` matches no `$SYS` topic [MQTT-4.7.2-1]; its `$SYS/#` gets the tree.
    let (admin, mut admin_events) = client(broker.addr, Some(("admin", "admin-pw"))).await;
    let codes = mqtt_subscribe_codes(&admin, &mut admin_events, &["#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let codes = mqtt_subscribe_codes(&admin, &mut admin_events, &["$SYS/#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let (topic, version, ..) = next_publish_where(&mut admin_events, 2 * SECOND, |_| true).await;
    assert_eq!(
        topic, "$SYS/broker/version",
        "the first $SYS topic, and no earlier one via #"
    );
    assert!(version.starts_with("k3sense version "), "{version}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_zero_client_is_served() {
    let broker = start(false, 5 * SECOND).await;
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    assert_eq!(
        raw_connack(&mut tcp, 0, Some(("reader", "reader-pw"))).await,
        Some(ConnectReturnCode::Success),
        "keepalive 0 gets a CONNACK, not a closed socket"
    );
    let mut subscribe = Subscribe::new("k3sense/#", rumqttc::mqttbytes::QoS::AtMostOnce);
    subscribe.pkid = 1;
    tcp.write_all(&bytes_of(&Raw::Subscribe(subscribe)))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_raw(&mut tcp, &mut buf).await,
        Some(Raw::SubAck(_))
    ));
    tcp.write_all(&bytes_of(&Raw::PingReq)).await.unwrap();
    assert_eq!(read_raw(&mut tcp, &mut buf).await, Some(Raw::PingResp));

    // paho-mqtt with keepalive=0 (mosquitto_sub cannot send 0: its -k must be 5 or more).
    if !python_module_available("paho.mqtt.client") {
        return;
    }
    let script = r#"
import sys
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-k0")
c.username_pw_set("reader", "reader-pw")
result = []
c.on_connect = lambda *a: result.append("connack %s" % a[3])
c.on_disconnect = lambda *a: result.append("disconnected")
c.connect("127.0.0.1", int(sys.argv[1]), keepalive=0)
for _ in range(50):
    c.loop(0.1)
    if result:
        break
print(result[0] if result else "silence")
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, &broker.addr.port().to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim(), "connack Success", "{output:?}");
}

/// A TLS client that trusts only `cert_pem`.
async fn tls_connect(
    addr: SocketAddr,
    cert_pem: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_does_not_delay_another_clients_connect() {
    let connect_timeout = 3 * SECOND;
    let broker = start(true, connect_timeout).await;
    let tls_addr = broker.tls.unwrap();
    let cert = broker.cert_pem.clone().unwrap();

    // Silent clients: TCP open, not one byte, on both listeners; and one that sends half a
    // TLS ClientHello and stops.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(tls_addr).await.unwrap());
        silent.push(TcpStream::connect(broker.addr).await.unwrap());
    }
    let mut half_hello = TcpStream::connect(tls_addr).await.unwrap();
    half_hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    tokio::time::sleep(SECOND / 10).await;

    let started = Instant::now();
    let mut tls = tls_connect(tls_addr, &cert).await;
    let code = raw_connack(&mut tls, 30, Some(("reader", "reader-pw"))).await;
    let tls_latency = started.elapsed();
    assert_eq!(code, Some(ConnectReturnCode::Success));

    let started = Instant::now();
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    let code = raw_connack(&mut tcp, 30, Some(("reader", "reader-pw"))).await;
    let plain_latency = started.elapsed();
    assert_eq!(code, Some(ConnectReturnCode::Success));
    eprintln!(
        "connect with 11 silent clients present: TLS handshake + CONNACK {tls_latency:?}, plain CONNACK {plain_latency:?}"
    );
    assert!(
        tls_latency < SECOND && plain_latency < SECOND,
        "a silent client stalled a connect: TLS {tls_latency:?}, plain {plain_latency:?}"
    );

    // The TLS client works beyond CONNACK: subscribe over TLS, receive a reading published on
    // the plain listener.
    let mut subscribe = Subscribe::new("k3sense/#", rumqttc::mqttbytes::QoS::AtMostOnce);
    subscribe.pkid = 1;
    tls.write_all(&bytes_of(&Raw::Subscribe(subscribe)))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_raw(&mut tls, &mut buf).await,
        Some(Raw::SubAck(_))
    ));
    let (publisher, mut pub_events) = client(broker.addr, Some(("pub", "pub-pw"))).await;
    mqtt_publish_acked(
        &publisher,
        &mut pub_events,
        "k3sense/pi-1/state",
        "{\"tls\":1}",
        false,
    )
    .await;
    match read_raw(&mut tls, &mut buf).await {
        Some(Raw::Publish(p)) => assert_eq!(&p.payload[..], b"{\"tls\":1}"),
        other => panic!("expected the reading over TLS, got {other:?}"),
    }

    // The silent ones are closed after --connect-timeout, and counted.
    for stream in &mut silent {
        assert!(
            closed_soon(stream).await,
            "a silent client was never closed"
        );
    }
    assert!(closed_soon(&mut half_hello).await);
    let m = broker.metrics.snapshot();
    assert_eq!(m.refused(Reason::ConnectTimeout), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_absurd_packets_close_only_their_connection() {
    let broker = start(false, 5 * SECOND).await;
    let (watcher, mut watch) = client(broker.addr, Some(("reader", "reader-pw"))).await;
    mqtt_subscribe_codes(&watcher, &mut watch, &["k3sense/#"]).await;
    let (publisher, mut pub_events) = client(broker.addr, Some(("pub", "pub-pw"))).await;

    let login = connect_bytes(30, Some(("pub", "pub-pw")));
    let absurd_publish: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, b'x'];
    let oversized = {
        let publish = Publish::new(
            "k3sense/pi-1/state",
            rumqttc::mqttbytes::QoS::AtMostOnce,
            vec![b'x'; 8192],
        );
        bytes_of(&Raw::Publish(publish))
    };
    let wildcard_publish = {
        let publish = Publish::new("k3sense/+/state", rumqttc::mqttbytes::QoS::AtMostOnce, "{}");
        bytes_of(&Raw::Publish(publish))
    };
    // (name, bytes before CONNECT?, bytes, then close our side?)
    let cases: Vec<(&str, bool, Vec<u8>, bool)> = vec![
        (
            "HTTP request instead of MQTT",
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        (
            "random bytes",
            false,
            vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x13, 0x37],
            false,
        ),
        (
            "absurd remaining length before CONNECT",
            false,
            vec![0x10, 0xff, 0xff, 0xff, 0x7f],
            false,
        ),
        (
            "five remaining-length bytes",
            false,
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
            false,
        ),
        (
            "truncated CONNECT, then EOF",
            false,
            login[..login.len() / 2].to_vec(),
            true,
        ),
        (
            "absurd remaining length after CONNECT",
            true,
            absurd_publish.to_vec(),
            false,
        ),
        ("PUBLISH over --max-payload", true, oversized, false),
        ("PUBLISH to a wildcard topic", true, wildcard_publish, false),
        ("a second CONNECT", true, login.clone(), false),
        (
            "truncated PUBLISH, then EOF",
            true,
            vec![0x30, 0x40, 0x00, 0x12, b'k'],
            true,
        ),
    ];
    for (seq, (name, after_connect, bytes, then_eof)) in cases.into_iter().enumerate() {
        let mut bad = TcpStream::connect(broker.addr).await.unwrap();
        if after_connect {
            bad.write_all(&login).await.unwrap();
            let mut buf = BytesMut::new();
            assert!(
                matches!(read_raw(&mut bad, &mut buf).await, Some(Raw::ConnAck(_))),
                "{name}"
            );
        }
        bad.write_all(&bytes).await.unwrap();
        if then_eof {
            bad.shutdown().await.unwrap();
        }
        assert!(
            closed_soon(&mut bad).await,
            "{name}: the connection was not closed"
        );

        // Everyone else is still served.
        let payload = format!("{{\"seq\":{seq}}}");
        mqtt_publish_acked(
            &publisher,
            &mut pub_events,
            "k3sense/pi-1/state",
            payload.as_str(),
            false,
        )
        .await;
        let (_, got) = next_publish(&mut watch, 2 * SECOND).await;
        assert_eq!(got, payload, "after {name}");
    }
    let m = broker.metrics.snapshot();
    assert!(m.refused(Reason::Malformed) >= 7, "{m:?}");
    assert_eq!(m.refused(Reason::Oversized), 3, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_reads_the_retained_reading_with_reader_credentials() {
    if !tool_available("mosquitto_sub") {
        return;
    }
    let broker = start(false, 5 * SECOND).await;
    let (publisher, mut events) = client(broker.addr, Some(("pub", "pub-pw"))).await;
    mqtt_publish_acked(
        &publisher,
        &mut events,
        "k3sense/pi-1/state",
        "{\"seq\":7}",
        true,
    )
    .await;
    let port = broker.addr.port().to_string();
    let sub = |user: &'static str, password: &'static str, topic: &'static str| {
        let port = port.clone();
        async move {
            tokio::process::Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port, "-u", user, "-P", password])
                .args(["-t", topic, "-v", "-C", "1", "-W", "3"])
                .output()
                .await
                .unwrap()
        }
    };
    let output = sub("reader", "reader-pw", "k3sense/#").await;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "k3sense/pi-1/state {\"seq\":7}",
        "{output:?}"
    );
    let output = sub("reader", "wrong", "k3sense/#").await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(
        stderr.contains("password") || stderr.contains("not authorised"),
        "mosquitto_sub explains the refusal: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_secrets_gives_the_publisher_and_the_gateway_their_roles() {
    let dir = tempdir::Dir::new();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gen-secrets.sh");
    // One account per sensor node, bound to the node's sensor id (deploy/README.md step 5).
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg("--dir")
        .arg(&dir.0)
        .arg("node-7")
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let password = |name: &str| std::fs::read_to_string(dir.0.join(name)).unwrap();
    let gateway_pw = password("gateway.password");
    let passwords = password("publisher-passwords.env");
    let publisher_pw = passwords.trim().strip_prefix("node-7=").unwrap().to_owned();
    let mut config = k3sense_broker::Config::new(free_addr());
    config.options.users_file = Some(dir.0.join("users.txt"));
    let started = k3sense_broker::start(&config).await.unwrap();
    let addr = started.local_addr();
    let metrics = started.metrics();
    tokio::spawn(started.serve(CancellationToken::new()));

    // The gateway reads every sensor and the replays; it publishes nothing but replay requests.
    let (gateway, mut gw_events) = client(addr, Some(("gateway", &gateway_pw))).await;
    let codes = mqtt_subscribe_codes(
        &gateway,
        &mut gw_events,
        &["k3sense/+/state", "k3sense/+/replay"],
    )
    .await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce); 2]);
    mqtt_publish_acked(&gateway, &mut gw_events, "k3sense/node-1/state", "{}", true).await;
    assert_eq!(metrics.snapshot().publishes_forbidden, 1);
    mqtt_publish_acked(
        &gateway,
        &mut gw_events,
        "k3sense/node-7/replay/request",
        "{}",
        false,
    )
    .await;
    assert_eq!(
        metrics.snapshot().publishes_forbidden,
        1,
        "a replay request passes"
    );
    // The node's publisher publishes its own sensor's readings, and no other sensor's.
    let (publisher, mut events) = client(addr, Some(("publisher-node-7", &publisher_pw))).await;
    mqtt_publish_acked(&publisher, &mut events, "k3sense/node-1/state", "{}", true).await;
    assert_eq!(metrics.snapshot().publishes_forbidden, 2);
    mqtt_publish_acked(
        &publisher,
        &mut events,
        "k3sense/node-7/state",
        "{\"seq\":1}",
        true,
    )
    .await;
    let (topic, payload) = next_publish(&mut gw_events, 2 * SECOND).await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("k3sense/node-7/state", "{\"seq\":1}")
    );
    // ... and answers replay requests.
    let codes =
        mqtt_subscribe_codes(&publisher, &mut events, &["k3sense/node-7/replay/request"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    mqtt_publish_acked(
        &publisher,
        &mut events,
        "k3sense/node-7/replay",
        "{}",
        false,
    )
    .await;
    let (topic, _) = next_publish(&mut gw_events, 2 * SECOND).await;
    assert_eq!(topic, "k3sense/node-7/replay");

    // The example file parses too (with its placeholders as passwords).
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/base/secrets/users.txt.example"
    );
    let users = k3sense_broker::Users::from_file(std::path::Path::new(example)).unwrap();
    assert!(
        users.authenticate("gateway", "REPLACE-ME-gateway-password")
            == Some(&k3sense_broker::Role::Gateway)
    );
    assert!(users.unscoped().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_id_takes_over_with_the_old_will_first_and_only_within_one_account() {
    let broker = start(false, 5 * SECOND).await;
    let (watcher, mut watch) = client(broker.addr, Some(("reader", "reader-pw"))).await;
    mqtt_subscribe_codes(&watcher, &mut watch, &["k3sense/+/availability"]).await;
    let connect_as = |user: &'static str, password: &'static str| async move {
        let mut c = Connect::new("k3sense-publisher-pi-1");
        c.keep_alive = 30;
        c.login = Some(Login::new(user, password));
        c.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
            "k3sense/pi-1/availability",
            "offline",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            true,
        ));
        let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
        tcp.write_all(&bytes_of(&Raw::Connect(c))).await.unwrap();
        let answer = read_raw(&mut tcp, &mut BytesMut::new()).await;
        (tcp, answer)
    };
    let (mut first, answer) = connect_as("pub", "pub-pw").await;
    assert!(matches!(answer, Some(Raw::ConnAck(_))));
    // Another account with the same client id is someone else: no takeover. (An admin may
    // publish this will.)
    let (_other, answer) = connect_as("admin", "admin-pw").await;
    assert!(matches!(answer, Some(Raw::ConnAck(_))));
    assert!(
        !closed_soon_within(&mut first, SECOND / 2).await,
        "another account's client id took this connection over"
    );
    // The same account and id again: the first connection is closed and its will published, as
    // Mosquitto does (issue 16; tests/mqtt_fidelity.rs) — before the second gets its CONNACK, so
    // the will cannot follow anything the second publishes.
    let (mut second, answer) = connect_as("pub", "pub-pw").await;
    assert!(matches!(answer, Some(Raw::ConnAck(_))));
    assert!(closed_soon(&mut first).await, "the old connection stayed");
    let (topic, payload) = next_publish(&mut watch, 3 * SECOND).await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("k3sense/pi-1/availability", "offline"),
        "the taken-over connection's will"
    );
    // Killing the new one (no DISCONNECT) publishes its will, as it should.
    second.shutdown().await.unwrap();
    drop(second);
    let (topic, payload) = next_publish(&mut watch, 3 * SECOND).await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("k3sense/pi-1/availability", "offline")
    );
}

/// Whether the broker closes `stream` within `within`.
async fn closed_soon_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
