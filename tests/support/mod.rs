//! Shared by the end-to-end tests: free ports, real components started in-process, and small
//! real clients (HTTP over a raw socket, WebSocket, MQTT).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod browser;

use std::{net::SocketAddr, process::Command, time::Duration};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A port nobody listens on right now (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Starts a real broker in this process; it lives until the test process ends.
pub async fn start_broker() -> SocketAddr {
    // Port 0: the kernel picks a free port, so no other test can take it in between.
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let started = k3sense_broker::start(&k3sense_broker::Config::new(any_port))
        .await
        .unwrap();
    let addr = started.local_addr();
    tokio::spawn(started.serve(CancellationToken::new()));
    addr
}

/// Starts a gateway on a port-0 listener against `broker`; returns its address.
pub async fn start_gateway(
    broker: SocketAddr,
    shutdown: CancellationToken,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<k3sense_gateway::Result<()>>,
) {
    start_gateway_with(broker, None, shutdown).await
}

/// [`start_gateway`] with other options than the defaults.
pub async fn start_gateway_with(
    broker: SocketAddr,
    options: Option<k3sense_gateway::Options>,
    shutdown: CancellationToken,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<k3sense_gateway::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = k3sense_gateway::Config::new(addr, broker.to_string());
    if let Some(options) = options {
        config.options = options;
    }
    let task = tokio::spawn(k3sense_gateway::serve(listener, config, shutdown));
    wait_ready(addr).await;
    (addr, task)
}

/// A gateway started by [`spawn_gateway`]; dropping it stops it.
pub struct Gateway {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<k3sense_gateway::Result<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A gateway with `options` against `broker`, ready (subscribed).
pub async fn spawn_gateway(broker: SocketAddr, options: k3sense_gateway::Options) -> Gateway {
    let shutdown = CancellationToken::new();
    let (addr, task) = start_gateway_with(broker, Some(options), shutdown.clone()).await;
    Gateway {
        addr,
        shutdown,
        task,
    }
}

/// Starts a simulated publisher for `id`, reading every `interval`.
pub fn start_publisher(
    broker: SocketAddr,
    id: &str,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<k3sense_publisher::Result<()>> {
    let config = k3sense_publisher::Config {
        mqtt: k3sense_protocol::MqttConfig::new(broker.to_string()),
        sensor: k3sense_publisher::SensorConfig::sim(id, interval),
    };
    tokio::spawn(k3sense_publisher::run(config, shutdown))
}

/// GET over a plain socket: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).await.unwrap()
}

/// GET over a plain socket, for a server that may refuse or cut the connection: (status, body),
/// or why there is none (an answer must come within 5 s).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one sample in a gateway's or broker's `/metrics` text (0 when absent), e.g.
/// `k3sense_gateway_invalid_messages_total{reason="malformed"}`.
pub async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    sample_value(&text, sample)
}

/// The value of one sample in a `/metrics` text (0 when absent).
pub fn sample_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `/metrics` (there is no event for it) until `sample` satisfies `done`, for at most
/// 20 s; returns its value, or panics with every metric.
pub async fn wait_metric(addr: SocketAddr, sample: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = metric(addr, sample).await;
        if done(now) {
            return now;
        }
        if tokio::time::Instant::now() >= deadline {
            let (_, all) = http_get(addr, "/metrics").await;
            panic!("{sample} stayed at {now}; all metrics:\n{all}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `/readyz` says ready and `/api/status` says the gateway is subscribed to its
/// broker (readiness alone no longer says that: a gateway stays ready when the broker goes).
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            drop(stream);
            if http_get(addr, "/readyz").await.0 == 200
                && http_get(addr, "/api/status")
                    .await
                    .1
                    .contains(r#""status":"connected""#)
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway at {addr} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn ws_connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    ws
}

/// The next text message as JSON, within `within`.
pub async fn ws_next(ws: &mut Ws, within: Duration) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(within, ws.next())
            .await
            .expect("no WebSocket message in time")
            .expect("WebSocket closed")
            .expect("WebSocket error");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// Waits for a message satisfying `pred`.
pub async fn ws_until(
    ws: &mut Ws,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message = ws_next(ws, left).await;
        if pred(&message) {
            return message;
        }
    }
}

/// Whether an external tool is installed. In CI a missing tool fails the test; elsewhere the
/// test is skipped with a notice.
pub fn tool_available(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required in CI but is not installed (see .ci/run)");
        }
        eprintln!("SKIPPED: {tool} is not installed; install it to run this test");
    }
    found
}

/// Whether `python3` can import `module` (e.g. `paho.mqtt.client`). Like [`tool_available`]: a
/// missing module fails in CI and skips elsewhere.
pub fn python_module_available(module: &str) -> bool {
    if !tool_available("python3") {
        return false;
    }
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("python module {module} is required in CI but is not installed (see .ci/run)");
        }
        eprintln!(
            "SKIPPED: python module {module} is not installed; `python3 -m pip install paho-mqtt`"
        );
    }
    found
}

/// Debian's Mosquitto broker (`/usr/sbin/mosquitto`), anonymous, on a free port of 127.0.0.1;
/// killed when dropped.
pub struct Mosquitto {
    pub addr: SocketAddr,
    child: tokio::process::Child,
    dir: std::path::PathBuf,
}

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

impl Mosquitto {
    /// Starts it and returns once it logs that it is running; `None` when it is not installed
    /// (outside CI).
    pub async fn start() -> Option<Self> {
        Self::start_with("allow_anonymous true\n").await
    }

    /// [`Mosquitto::start`] with `extra` lines of mosquitto.conf after the listener (e.g. a
    /// password file and an ACL instead of `allow_anonymous true`).
    pub async fn start_with(extra: &str) -> Option<Self> {
        use tokio::io::AsyncBufReadExt;
        if !tool_available(MOSQUITTO) {
            return None;
        }
        let addr = free_addr();
        let dir = std::env::temp_dir().join(format!("k3sense-mosquitto-{}", addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\npersistence false\nlog_dest stderr\n{extra}",
                addr.port()
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let running = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.push_str(&line);
                log.push('\n');
                if line.contains(" running") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(running, Ok(true)),
            "mosquitto did not start:\n{log}"
        );
        // Keep draining its log so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(Self { addr, child, dir })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real `k3sense` binary of this package, for tests that run the components as processes.
pub const K3SENSE: &str = env!("CARGO_BIN_EXE_k3sense");

/// `k3sense broker` as a process of its own on `addr`, anonymous.
pub fn broker_proc(addr: SocketAddr) -> Proc {
    Proc::start(K3SENSE, &["broker", "--listen", &addr.to_string()])
}

/// `k3sense publisher` as a process of its own: the simulated sensor `id` read every 200 ms,
/// a 2 s keepalive (so a lost broker is noticed quickly), metrics on `metrics`, no Home
/// Assistant discovery.
pub fn sim_publisher_proc(broker: SocketAddr, id: &str, metrics: SocketAddr) -> Proc {
    Proc::start(
        K3SENSE,
        &[
            "publisher",
            "--broker",
            &broker.to_string(),
            "--sensor",
            "sim",
            "--sensor-id",
            id,
            "--interval",
            "200ms",
            "--keepalive",
            "2s",
            "--metrics-listen",
            &metrics.to_string(),
            "--ha-discovery",
            "false",
        ],
    )
}

/// `k3sense gateway` as a process of its own on `listen`, with a 2 s keepalive.
pub fn gateway_proc(broker: SocketAddr, listen: SocketAddr) -> Proc {
    Proc::start(
        K3SENSE,
        &[
            "gateway",
            "--broker",
            &broker.to_string(),
            "--listen",
            &listen.to_string(),
            "--keepalive",
            "2s",
        ],
    )
}

/// A child process of the real binary, killed if the test ends before stopping it. Its stderr
/// goes to a file (a pipe nobody reads would fill up and stall a long-running process).
pub struct Proc(pub std::process::Child, std::path::PathBuf);

impl Proc {
    /// Starts `bin` with `args` (read its log with [`Proc::stop`] / [`Proc::wait`]).
    pub fn start(bin: &str, args: &[&str]) -> Self {
        Self::start_logging(bin, args, "info")
    }

    /// Like [`Proc::start`], with `RUST_LOG` set to `filter` (say `info,rumqttd=warn` where
    /// thousands of connections would each log a line at `info`).
    pub fn start_logging(bin: &str, args: &[&str], filter: &str) -> Self {
        Self::start_with_env(bin, args, filter, &[])
    }

    /// Like [`Proc::start_logging`], with these environment variables set as well (say the
    /// `K3SENSE_*` values of a rendered pod spec); the caller's own `K3SENSE_*` are still removed.
    pub fn start_with_env(bin: &str, args: &[&str], filter: &str, env: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "k3sense-test-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let mut command = Command::new(bin);
        // Nothing from the caller's environment may change what the test asked for.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("K3SENSE_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", filter)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self(child, log)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Sends `signal`, waits for the exit; returns how long it took, the status and stderr.
    pub fn stop(self, signal: &str) -> (Duration, std::process::ExitStatus, String) {
        let started = std::time::Instant::now();
        self.signal(signal);
        self.wait(started)
    }

    /// Waits (at most 10 s) for the exit; returns the time since `started`, the status and stderr.
    pub fn wait(
        mut self,
        started: std::time::Instant,
    ) -> (Duration, std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit after the signal"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = started.elapsed();
        let stderr = std::fs::read_to_string(&self.1).unwrap_or_default();
        (elapsed, status, stderr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::env::var_os("K3SENSE_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.1);
        }
    }
}

/// Subscribes with rumqttc to `filter` (QoS 1); yields (topic, payload, retained) as they come.
pub async fn mqtt_subscriber(
    broker: SocketAddr,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)> {
    subscriber(broker, &[filter], None).await
}

/// [`mqtt_subscriber`] for a broker with a users file: logs in as `(username, password)` and
/// subscribes to every filter of `filters` (QoS 1).
pub async fn mqtt_subscriber_as(
    broker: SocketAddr,
    filters: &[&str],
    login: (&str, &str),
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)> {
    subscriber(broker, filters, Some(login)).await
}

async fn subscriber(
    broker: SocketAddr,
    filters: &[&str],
    login: Option<(&str, &str)>,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(format!("test-{}", free_port()), "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    let (client, mut events) = AsyncClient::new(options, 10);
    for filter in filters {
        client.subscribe(*filter, QoS::AtLeastOnce).await.unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Returns once every SUBACK is in: what is published after that is delivered.
    let (subscribed, mut acked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::SubAck(_)) = event {
                let _ = subscribed.send(());
            }
            if let Event::Incoming(Packet::Publish(p)) = event {
                if tx
                    .send((p.topic.clone(), p.payload.to_vec(), p.retain))
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    for _ in filters {
        tokio::time::timeout(Duration::from_secs(10), acked.recv())
            .await
            .expect("no SUBACK within 10 s")
            .expect("the subscriber's connection ended before its SUBACK");
    }
    rx
}

/// The next message on exactly `topic` from an [`mqtt_subscriber`]: (payload, retained).
pub async fn next_on(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    topic: &str,
    within: Duration,
) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (t, payload, retained) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing on {topic} in time"))
            .unwrap();
        if t == topic {
            return (payload, retained);
        }
    }
}

/// The end-to-end promise, against whatever MQTT broker listens at `broker` (ours, or a
/// Mosquitto a user already runs): a simulated publisher `id` and a gateway; a WebSocket client
/// gets the snapshot and then readings in sequence; an MQTT subscriber gets valid readings on the
/// state topic; a late subscriber gets the retained latest at once; a clean stop turns the sensor
/// offline for WebSocket and MQTT clients and in the API.
pub async fn end_to_end(broker: SocketAddr, id: &str) {
    use k3sense_protocol::Reading;
    let second = Duration::from_secs(1);
    let gateway_stop = CancellationToken::new();
    let (gateway, _) = start_gateway(broker, gateway_stop.clone()).await;
    let mut ws = ws_connect(gateway).await;
    assert_eq!(ws_next(&mut ws, second).await["type"], "snapshot");

    let (state, availability) = (
        format!("k3sense/{id}/state"),
        format!("k3sense/{id}/availability"),
    );
    let mut mqtt = mqtt_subscriber(broker, "k3sense/#").await;
    let publisher_stop = CancellationToken::new();
    let publisher = start_publisher(
        broker,
        id,
        Duration::from_millis(200),
        publisher_stop.clone(),
    );

    // Readings reach the WebSocket client, flattened beside their type, in sequence.
    let reading = ws_until(&mut ws, 5 * second, |m| m["type"] == "reading").await;
    assert_eq!(reading["sensor_id"], id);
    assert_eq!(reading["model"], "dht11");
    let first: Reading = serde_json::from_value(reading).unwrap();
    let next = ws_until(&mut ws, 5 * second, |m| m["type"] == "reading").await;
    assert_eq!(
        next["seq"].as_u64().unwrap(),
        first.seq + 1,
        "seq rises by one per reading"
    );

    // The MQTT subscriber gets readings on the state topic, valid by the contract.
    for _ in 0..2 {
        let (payload, _) = next_on(&mut mqtt, &state, 5 * second).await;
        Reading::from_json(&payload).unwrap();
    }

    // A late subscriber gets the retained latest at once.
    let mut late = mqtt_subscriber(broker, &state).await;
    let (payload, retained) = next_on(&mut late, &state, second).await;
    assert!(
        retained,
        "the first message to a new subscriber is the retained reading"
    );
    Reading::from_json(&payload).unwrap();

    // A clean stop turns the sensor offline, for WebSocket and MQTT clients alike.
    publisher_stop.cancel();
    tokio::time::timeout(5 * second, publisher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let offline = ws_until(&mut ws, 5 * second, |m| {
        m["type"] == "availability" && m["status"] == "offline"
    })
    .await;
    assert_eq!(offline["sensor_id"], id);
    loop {
        let (payload, _) = next_on(&mut mqtt, &availability, 5 * second).await;
        if payload == b"offline" {
            break;
        }
    }
    let (status, body) = http_get(gateway, "/api/sensors").await;
    assert_eq!(status, 200);
    let sensors: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sensors[0]["sensor_id"], id);
    assert_eq!(sensors[0]["status"], "offline");
    gateway_stop.cancel();
}

/// An MQTT 3.1.1 packet, for tests that speak the protocol byte by byte.
pub type Raw = rumqttc::mqttbytes::v4::Packet;

/// `packet` as bytes on the wire.
pub fn bytes_of(packet: &Raw) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    packet.write(&mut buf, usize::MAX).unwrap();
    buf.to_vec()
}

/// The next MQTT packet, or `None` once the broker closed the connection; panics after 10 s of
/// neither.
pub async fn read_raw<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut bytes::BytesMut,
) -> Option<Raw> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(packet) = Raw::read(buf, 1 << 20) {
                return Some(packet);
            }
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the broker neither answered nor closed the connection in 10 s")
}

/// Polls a rumqttc event loop until an incoming packet satisfies `pick`; panics when nothing
/// does within `within` or on a connection error.
pub async fn mqtt_until<T>(
    events: &mut rumqttc::EventLoop,
    within: Duration,
    mut pick: impl FnMut(&rumqttc::Packet) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("nothing in time")
            .expect("connection error");
        if let rumqttc::Event::Incoming(packet) = event {
            if let Some(found) = pick(&packet) {
                return found;
            }
        }
    }
}

/// Publishes at QoS 1 and waits for the PUBACK (which our broker sends for dropped ones too).
pub async fn mqtt_publish_acked(
    client: &rumqttc::AsyncClient,
    events: &mut rumqttc::EventLoop,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    retain: bool,
) {
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.into())
        .await
        .unwrap();
    mqtt_until(events, Duration::from_secs(2), |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
}

/// Subscribes to `filters` at QoS 1 and returns the SUBACK's codes.
pub async fn mqtt_subscribe_codes(
    client: &rumqttc::AsyncClient,
    events: &mut rumqttc::EventLoop,
    filters: &[impl AsRef<str>],
) -> Vec<rumqttc::SubscribeReasonCode> {
    let filters: Vec<_> = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.as_ref().to_owned(), rumqttc::QoS::AtLeastOnce))
        .collect();
    client.subscribe_many(filters).await.unwrap();
    mqtt_until(events, Duration::from_secs(2), |p| match p {
        rumqttc::Packet::SubAck(ack) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await
}

/// The resident memory of process `pid` in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until `GET path` on `addr` answers 200 (a process just started listening).
pub async fn wait_http(addr: SocketAddr, path: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() || http_get(addr, path).await.0 != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr}{path} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gateway's `GET /api/sensors/{id}/history`, or nothing while it does not know `id`.
pub async fn sensor_history(gateway: SocketAddr, id: &str) -> Vec<k3sense_protocol::Reading> {
    match http_get(gateway, &format!("/api/sensors/{id}/history")).await {
        (200, body) => serde_json::from_str(&body).unwrap(),
        _ => Vec::new(),
    }
}

/// The next event of a k3sense MQTT client (`k3sense_protocol::mqtt`) that `pick` accepts,
/// within 10 s; every other event is passed over.
pub async fn client_event_until<T>(
    events: &mut k3sense_protocol::mqtt::Events,
    mut pick: impl FnMut(k3sense_protocol::mqtt::ClientEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.expect("the client stopped");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("no such event in time")
}

/// Waits (10 s) for a k3sense MQTT client's SUBACK; every filter must be granted.
pub async fn client_subscribed(events: &mut k3sense_protocol::mqtt::Events) {
    let granted = client_event_until(events, |e| match e {
        k3sense_protocol::mqtt::ClientEvent::Subscribed { granted } => Some(granted),
        _ => None,
    })
    .await;
    assert!(granted, "the broker refused the subscription");
}
