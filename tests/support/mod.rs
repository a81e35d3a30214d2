//! Shared by the end-to-end tests: free ports, real components started in-process, and small
//! real clients (HTTP over a raw socket, WebSocket, MQTT).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    let addr = free_addr();
    let started = k3sense_broker::start(&k3sense_broker::Config::new(addr))
        .await
        .unwrap();
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = k3sense_gateway::Config::new(addr, broker.to_string());
    let task = tokio::spawn(k3sense_gateway::serve(listener, config, shutdown));
    wait_ready(addr).await;
    (addr, task)
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
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `/readyz` says ready (subscribed to the broker).
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            drop(stream);
            if http_get(addr, "/readyz").await.0 == 200 {
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
