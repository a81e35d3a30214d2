#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Fan-out measurement: how long from a reading's publish over MQTT until the *last* of N
//! WebSocket clients has it, and how much memory the gateway spends per connected client.
//!
//! ```text
//! cargo run --release -p k3sense-gateway --example ws_fanout -- [clients] [readings]
//! ```
//!
//! The broker and the gateway run in a child process (this program, re-run with `serve`), with
//! two runtime workers like the `k3sense` binary; the clients and the publisher run here, so the
//! child's resident memory (VmRSS in /proc) is the gateway's (plus the broker's, which holds
//! two clients throughout). Each reading is published (QoS 1) only after every client got the
//! previous one, 100 ms apart. Results are printed as a Markdown table for BENCHMARKS.md.
//! Needs a file-descriptor limit above `clients` + 100 (`ulimit -n 4096`).

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k3sense_protocol::mqtt::QoS;
use tokio::sync::mpsc;
use tokio_tungstenite::{connect_async, tungstenite::Message};
use tokio_util::sync::CancellationToken;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some("serve") {
        runtime.block_on(serve(args[2].parse().unwrap(), args[3].parse().unwrap()));
    } else {
        let clients = args.get(1).map_or(1000, |a| a.parse().unwrap());
        let readings = args.get(2).map_or(50, |a| a.parse().unwrap());
        runtime.block_on(measure(clients, readings));
    }
}

/// The child: broker and gateway until killed.
async fn serve(mqtt: SocketAddr, http: SocketAddr) {
    let broker = k3sense_broker::start(&k3sense_broker::Config::new(mqtt))
        .await
        .unwrap();
    let _broker = tokio::spawn(broker.serve(CancellationToken::new()));
    k3sense_gateway::run(
        k3sense_gateway::Config::new(http, mqtt.to_string()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn ready(http: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200")
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn measure(clients: usize, readings: u64) {
    let (mqtt, http) = (free_addr(), free_addr());
    let child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args(["serve", &mqtt.to_string(), &http.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(http).await {
        assert!(Instant::now() < deadline, "the gateway never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);

    // Every client reports (seq, arrival) for each reading it gets.
    let (tx, mut arrivals) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut sockets = Vec::with_capacity(clients);
    let connect_start = Instant::now();
    for _ in 0..clients {
        let (mut ws, _) = connect_async(format!("ws://{http}/ws")).await.unwrap();
        let snapshot = ws.next().await.unwrap().unwrap();
        assert!(
            snapshot
                .to_text()
                .unwrap()
                .starts_with("{\"type\":\"snapshot\"")
        );
        sockets.push(ws);
    }
    let connect_time = connect_start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    for mut ws in sockets {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Text(text) = message {
                    let arrived = Instant::now();
                    let seq = text
                        .split("\"seq\":")
                        .nth(1)
                        .and_then(|rest| rest.trim_end_matches('}').parse().ok());
                    if let Some(seq) = seq {
                        let _ = tx.send((seq, arrived));
                    }
                }
            }
        });
    }

    let mut config = k3sense_protocol::MqttConfig::new(mqtt.to_string());
    config.keepalive = Duration::from_secs(30);
    let (publisher, mut events) = config
        .client("bench-publisher")
        .unwrap()
        .capacity(100)
        .start();
    tokio::spawn(async move { while events.recv().await.is_some() {} });

    // Reading 0 is a warm-up (the first write to each connection allocates its buffers); it is
    // reported on its own and left out of the percentiles.
    let mut latencies = Vec::new();
    for seq in 0..=readings {
        let reading = k3sense_protocol::Reading::new(
            k3sense_protocol::SensorId::new("bench-1").unwrap(),
            k3sense_protocol::Model::Dht22,
            21.0,
            40.0,
            chrono::Utc::now(),
            seq,
        )
        .unwrap()
        .to_json()
        .unwrap();
        let published = Instant::now();
        publisher
            .publish_when_room("k3sense/bench-1/state", QoS::AtLeastOnce, true, reading)
            .await
            .unwrap();
        let mut got = 0;
        let mut last = published;
        while got < clients {
            let (s, at) = tokio::time::timeout(Duration::from_secs(30), arrivals.recv())
                .await
                .expect("a client never got the reading")
                .unwrap();
            assert_eq!(s, seq, "readings arrive in order");
            got += 1;
            last = last.max(at);
        }
        latencies.push(last - published);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = latencies.remove(0);
    latencies.sort();
    let per_client = (after.saturating_sub(before)) as f64 / clients as f64;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cpu}, {cores} cores");
    println!("clients: {clients} connected in {connect_time:.2?}; readings: {readings}");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| publish → last of {clients} clients, p50 | {:.2?} |",
        percentile(&latencies, 50.0)
    );
    println!(
        "| publish → last of {clients} clients, p99 | {:.2?} |",
        percentile(&latencies, 99.0)
    );
    println!(
        "| publish → last of {clients} clients, max | {:.2?} |",
        latencies[latencies.len() - 1]
    );
    println!("| first reading after connecting (warm-up, not in the percentiles) | {first:.2?} |");
    println!(
        "| gateway+broker RSS before clients | {:.1} MiB |",
        before as f64 / 1024.0
    );
    println!(
        "| gateway+broker RSS with {clients} clients | {:.1} MiB |",
        after as f64 / 1024.0
    );
    println!("| memory per connected client | {per_client:.1} KiB |");
}
