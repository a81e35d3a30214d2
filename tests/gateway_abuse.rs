#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Bad input where it enters the gateway, each case end to end against a real gateway on a
//! free port: slow or silent TCP connections (slowloris), connection floods beyond and within
//! `--max-connections`, running out of file descriptors (the real binary under `ulimit -n`),
//! and WebSocket clients that send binary messages, too much, or a frame that never ends.
//!
//! In every case a WebSocket client connected at the same time keeps receiving live readings
//! (a feed publishes one every 50 ms), the refusal is counted in `/metrics`, and the gateway
//! serves normally afterwards. Waits are on events (a close frame, end of stream, a metric
//! reaching its value), never fixed sleeps; durations are measured and printed, and only lower
//! bounds (a timer cannot fire early) and generous upper bounds are asserted.

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
    sync::mpsc,
    task::JoinHandle,
};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};
use tokio_util::sync::CancellationToken;

mod support;
use support::{
    Gateway, free_addr, http_get, metric, spawn_gateway, start_broker, try_http_get, wait_metric,
    wait_ready,
};

/// Upper bound for anything that should happen "at once". Generous: CI has two cores, and the
/// tests of this file run side by side (the flood alone opens 6,000 descriptors in this
/// process); what is measured is printed, not asserted.
const SOON: Duration = Duration::from_secs(20);

/// Connections open now; a scrape sees its own connection too.
const OPEN: &str = "k3sense_gateway_connections";

const WS_DISCONNECTS: &str = "k3sense_gateway_ws_disconnects_total";

fn disconnects(reason: &str) -> String {
    format!("{WS_DISCONNECTS}{{reason=\"{reason}\"}}")
}

// ---------------------------------------------------------------------------------------------
// live readings: a feed over MQTT and a WebSocket client that watches it
// ---------------------------------------------------------------------------------------------

/// A valid reading; `read_at` rises by a millisecond per `seq`.
fn reading_json(id: &str, seq: u64) -> String {
    static START: OnceLock<DateTime<Utc>> = OnceLock::new();
    let start = *START.get_or_init(Utc::now);
    Reading::new(
        SensorId::new(id).unwrap(),
        Model::Dht22,
        21.0,
        40.0,
        start + chrono::Duration::milliseconds(seq as i64),
        seq,
    )
    .unwrap()
    .to_json()
    .unwrap()
}

/// Publishes a reading of `pi-1` every 50 ms until dropped.
struct Feed {
    task: JoinHandle<()>,
    events: JoinHandle<()>,
}

impl Feed {
    async fn start(broker: SocketAddr) -> Self {
        let mut options = MqttOptions::new(
            format!("feed-{}", free_addr().port()),
            "127.0.0.1",
            broker.port(),
        );
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 100);
        let events = tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(50));
            for seq in 1.. {
                ticks.tick().await;
                let _ = client
                    .publish(
                        "k3sense/pi-1/state",
                        QoS::AtLeastOnce,
                        false,
                        reading_json("pi-1", seq),
                    )
                    .await;
            }
        });
        Self { task, events }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
        self.events.abort();
    }
}

/// A WebSocket client read all the time (so it answers pings), its readings handed over a
/// channel.
struct Watcher {
    readings: mpsc::UnboundedReceiver<u64>,
    task: JoinHandle<()>,
    ended: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Watcher {
    async fn connect(addr: SocketAddr) -> Self {
        let (mut ws, _) = connect_async(format!("ws://{addr}/ws")).await.unwrap();
        let (tx, readings) = mpsc::unbounded_channel();
        let ended = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let why = std::sync::Arc::clone(&ended);
        let task = tokio::spawn(async move {
            let end = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let m: Value = serde_json::from_str(&text).unwrap();
                        if m["type"] == "reading" {
                            let _ = tx.send(m["seq"].as_u64().unwrap());
                        }
                    }
                    Some(Ok(Message::Close(frame))) => break format!("closed: {frame:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("error: {e}"),
                    None => break "the stream ended".to_owned(),
                }
            };
            *why.lock().unwrap() = end;
        });
        Self {
            readings,
            task,
            ended,
        }
    }

    /// Three more live readings arrive, in order, each within `SOON`.
    async fn keeps_receiving(&mut self, when: &str) {
        while self.readings.try_recv().is_ok() {}
        let mut last = 0;
        for _ in 0..3 {
            let seq = tokio::time::timeout(SOON, self.readings.recv())
                .await
                .unwrap_or_else(|_| panic!("{when}: the watching client got no reading in time"))
                .unwrap_or_else(|| {
                    let why = self.ended.lock().unwrap().clone();
                    panic!("{when}: the watching client was disconnected ({why})")
                });
            assert!(seq > last, "{when}: readings out of order");
            last = seq;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A broker, a feed, a gateway with `options` and a watching client already receiving.
async fn scene(options: Options) -> (Gateway, Feed, Watcher) {
    let broker = start_broker().await;
    let gateway = spawn_gateway(broker, options).await;
    let feed = Feed::start(broker).await;
    let mut watcher = Watcher::connect(gateway.addr).await;
    watcher.keeps_receiving("before").await;
    (gateway, feed, watcher)
}

/// Waits until the server closes `stream` (end of stream or reset), reading whatever it sends;
/// returns what it sent.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the gateway did not close the connection in time");
    seen
}

/// Open descriptors and resident memory of this process (client and server sides of every
/// connection when the gateway runs in-process).
fn fds_and_rss_kib() -> (usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

/// The soft open-file limit of this process.
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Opens `n` TCP connections, `parallel` at a time.
async fn open_many(addr: SocketAddr, n: usize, parallel: usize) -> Vec<TcpStream> {
    futures_util::stream::iter(0..n)
        .map(|_| async move { TcpStream::connect(addr).await.unwrap() })
        .buffer_unordered(parallel)
        .collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// slow and silent HTTP connections
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_silent_and_idle_connections_are_cut_after_the_header_timeout() {
    let timeout = Duration::from_millis(500);
    let (gw, _feed, mut watcher) = scene(Options {
        header_timeout: timeout,
        ..Options::default()
    })
    .await;
    let addr = gw.addr;

    // Connects and sends nothing.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Slowloris: a request line, then one header byte every 50 ms, forever.
    let mut slowloris = TcpStream::connect(addr).await.unwrap();
    slowloris
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let (mut slow_read, mut slow_write) = slowloris.into_split();
    let trickle = tokio::spawn(async move {
        let mut sent = 0;
        while slow_write.write_all(b"a").await.is_ok() {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    });
    // Keep-alive: one request answered, then idle.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let answered = Instant::now();

    // Meanwhile everyone else is served.
    watcher
        .keeps_receiving("while slow clients hold connections")
        .await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    until_closed(&mut silent, SOON).await;
    let silent_lived = opened.elapsed();
    until_closed(&mut idle, SOON).await;
    let idle_lived = answered.elapsed();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(SOON, slow_read.read_to_end(&mut rest))
        .await
        .expect("the slowloris connection was not closed");
    let slow_lived = opened.elapsed();
    assert!(rest.is_empty(), "no answer to an unfinished request");
    let trickled = trickle.await.unwrap();
    println!(
        "header timeout {timeout:?}: silent connection lived {silent_lived:?}, slowloris \
         {slow_lived:?} ({trickled} header bytes trickled), idle keep-alive {idle_lived:?} after \
         its answer"
    );
    for lived in [silent_lived, slow_lived, idle_lived] {
        assert!(lived >= timeout, "cut before the timeout: {lived:?}");
    }

    let header = "k3sense_gateway_connection_timeouts_total{reason=\"header\"}";
    let idle_timeouts = "k3sense_gateway_connection_timeouts_total{reason=\"idle\"}";
    wait_metric(addr, header, |v| v == 2.0).await;
    wait_metric(addr, idle_timeouts, |v| v == 1.0).await;

    // A request head over 16 KiB is refused at once (431), nothing is kept.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = big.write_all(huge.as_bytes()).await;
    let answer = until_closed(&mut big, SOON).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // And afterwards everything is as before.
    watcher.keeps_receiving("after").await;
    let (status, body) = http_get(addr, "/api/sensors").await;
    assert_eq!(status, 200, "{body}");
    wait_metric(addr, OPEN, |v| v == 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_of_its_answers_is_cut_after_twice_the_send_timeout() {
    let send_timeout = Duration::from_millis(300);
    let (gw, _feed, mut watcher) = scene(Options {
        send_timeout,
        ..Options::default()
    })
    .await;
    let addr = gw.addr;
    // A slow-read attack: pipelined requests for ~1.5 MB of answers, a tiny receive window,
    // and nothing ever read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    let request = format!("GET /app.js HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(200);
    slow.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let stalled = "k3sense_gateway_connection_timeouts_total{reason=\"write\"}";
    wait_metric(addr, stalled, |v| v >= 1.0).await;
    let cut_after = started.elapsed();
    println!("a client reading nothing was cut {cut_after:?} after its requests");
    assert!(
        cut_after >= send_timeout * 2,
        "cut after {cut_after:?}, before twice --send-timeout"
    );
    watcher.keeps_receiving("after a client read nothing").await;
    // What the kernel holds is still readable, then the connection ends.
    let answered = until_closed(&mut slow, SOON).await;
    assert!(answered.starts_with(b"HTTP/1.1 200"));
    assert!(
        answered.len() < 1_000_000,
        "{} bytes arrived: the answers were not cut short",
        answered.len()
    );
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
}

// ---------------------------------------------------------------------------------------------
// connection floods
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_churning_connections_leaves_health_api_and_live_readings_alone() {
    let timeout = Duration::from_secs(3);
    let (gw, _feed, mut watcher) = scene(Options {
        header_timeout: timeout,
        ..Options::default()
    })
    .await;
    let addr = gw.addr;
    // Each connection costs two descriptors here: the gateway runs in this process.
    let flood_size = 3_000.min(open_file_limit().saturating_sub(1_000) / 2);
    assert!(
        flood_size >= 500,
        "open-file limit too low: {}",
        open_file_limit()
    );
    let (fds_before, rss_before) = fds_and_rss_kib();

    // Thousands of connections at once, held open, sending nothing. They are opened in batches,
    // each accepted before the next: were the listen backlog to overflow, the kernel would answer
    // with SYN cookies, and a client that then sends nothing is never handed to the gateway at
    // all (no cost to it, but no connection for this test to watch being cut).
    let accepted = "k3sense_gateway_connections_accepted_total";
    let accepted_before = metric(addr, accepted).await;
    let started = Instant::now();
    let mut flood = Vec::with_capacity(flood_size);
    while flood.len() < flood_size {
        let batch = (flood_size - flood.len()).min(500);
        flood.extend(open_many(addr, batch, 100).await);
        let want = accepted_before + flood.len() as f64;
        wait_metric(addr, accepted, |v| v >= want).await;
    }
    let opened_in = started.elapsed();
    let open = metric(addr, OPEN).await;
    let (fds_during, rss_during) = fds_and_rss_kib();
    let served_at = Instant::now();
    watcher.keeps_receiving("during the idle flood").await;
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(addr, "/api/sensors").await;
    assert_eq!(status, 200);
    assert!(body.contains("pi-1"), "{body}");
    println!(
        "{flood_size} idle connections opened in {opened_in:?}, {open} open at once; health, \
         API and live readings served within {:?}; this process (both sides): {} → {} fds, \
         RSS {} → {} KiB ({:.1} KiB per connection)",
        served_at.elapsed(),
        fds_before,
        fds_during,
        rss_before,
        rss_during,
        (rss_during.saturating_sub(rss_before)) as f64 / flood_size as f64
    );

    // The header timeout cuts every one of them.
    let cut = "k3sense_gateway_connection_timeouts_total{reason=\"header\"}";
    let deadline = Instant::now() + timeout + SOON;
    for stream in &mut flood {
        let left = deadline.saturating_duration_since(Instant::now());
        until_closed(stream, left).await;
    }
    let all_cut = started.elapsed();
    drop(flood);
    wait_metric(addr, cut, |v| v == flood_size as f64).await;
    println!("all {flood_size} cut {all_cut:?} after the flood began");

    // Connections opened and closed as fast as possible.
    let churn = 2_000;
    let started = Instant::now();
    futures_util::stream::iter(0..churn)
        .map(|_| async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            drop(stream);
        })
        .buffer_unordered(100)
        .collect::<Vec<()>>()
        .await;
    println!(
        "{churn} connections opened and closed in {:?}",
        started.elapsed()
    );
    watcher.keeps_receiving("after the churn").await;

    // Back to normal: only the watcher's connection is open, nothing leaked.
    wait_metric(addr, OPEN, |v| v == 2.0).await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    // (Descriptors of this process are only printed: tests running beside this one open some.)
    let (fds_after, rss_after) = fds_and_rss_kib();
    println!("afterwards: {fds_after} fds, RSS {rss_after} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_ones_get_503_and_close_while_existing_clients_continue() {
    let max = 50;
    let (gw, _feed, mut watcher) = scene(Options {
        max_connections: max,
        max_clients: 10,
        header_timeout: Duration::from_secs(60),
        ..Options::default()
    })
    .await;
    let addr = gw.addr;

    // Connections over the cap get a 503 that says why, then the end of the stream; the
    // others are held (the header timeout is long). A refused connection is answered at once,
    // so after 3 s every connection has either been answered or is held.
    let flood_size = 300;
    let flood = open_many(addr, flood_size, 50).await;
    let checks: Vec<_> = flood
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut answer = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
                        .await;
                (stream, read.is_ok().then_some(answer))
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut refused = 0;
    for check in checks {
        let (stream, answer) = check.await.unwrap();
        match answer {
            Some(answer) => {
                let text = String::from_utf8_lossy(&answer);
                assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                assert!(text.contains("too many connections"), "{text}");
                refused += 1;
            }
            None => held.push(stream),
        }
    }
    println!(
        "{flood_size} connections over a cap of {max}: {} held, {refused} answered 503 and closed",
        held.len()
    );
    assert!(
        held.len() < max,
        "the cap was not kept: {} held",
        held.len()
    );
    assert_eq!(held.len() + refused, flood_size);

    // Full: the existing WebSocket client is not affected; a new request is refused too (a
    // client that sent its request before the gateway closed may read a reset, not the 503).
    watcher.keeps_receiving("while the gateway is full").await;
    match try_http_get(addr, "/healthz").await {
        Ok((status, body)) => assert_eq!(status, 503, "{body}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    refused += 1;

    // The flood goes away; the gateway serves again.
    drop(held);
    let deadline = Instant::now() + SOON;
    loop {
        match try_http_get(addr, "/healthz").await {
            Ok((200, _)) => break,
            Ok((503, _)) => refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => refused += 1,
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counted = metric(
        addr,
        "k3sense_gateway_connections_refused_total{reason=\"limit\"}",
    )
    .await;
    assert_eq!(counted, refused as f64, "every refusal counted once");
    wait_metric(addr, OPEN, |v| v == 2.0).await;
    watcher.keeps_receiving("after the flood").await;
}

/// Kills the child process if the test fails.
struct Child(std::process::Child, std::path::PathBuf);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_is_logged_and_counted_without_spinning() {
    let broker = start_broker().await;
    let addr = free_addr();
    let log = std::env::temp_dir().join(format!("k3sense-abuse-{}.log", addr.port()));
    // The real binary, with a hard open-file limit of 64 it cannot raise.
    let script = format!(
        "ulimit -n 64 && exec '{}' gateway --listen {addr} --broker {broker}",
        env!("CARGO_BIN_EXE_k3sense")
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Child(child, log.clone());
    wait_ready(addr).await;
    let startup = std::fs::read_to_string(&log).unwrap();
    assert!(
        startup.contains("the open-file limit is below --max-connections"),
        "{startup}"
    );
    let feed = Feed::start(broker).await;
    let mut watcher = Watcher::connect(addr).await;
    watcher.keeps_receiving("before").await;

    // More connections than descriptors: accept fails with EMFILE.
    let started = Instant::now();
    let flood = open_many(addr, 150, 50).await;
    let deadline = Instant::now() + SOON;
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("out of file descriptors")
    {
        assert!(Instant::now() < deadline, "no EMFILE logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // About a second of live readings while the gateway cannot accept.
    for _ in 0..7 {
        watcher.keeps_receiving("while out of descriptors").await;
    }
    assert!(child.0.try_wait().unwrap().is_none(), "the gateway died");

    drop(flood);
    let held = started.elapsed();
    let deadline = Instant::now() + SOON;
    while !matches!(try_http_get(addr, "/healthz").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let errors = metric(
        addr,
        "k3sense_gateway_accept_errors_total{reason=\"fd_limit\"}",
    )
    .await;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.matches("out of file descriptors").count();
    println!(
        "flood of 150 under ulimit -n 64 held {held:?}: {errors} failed accepts counted, {lines} \
         log line(s) in {elapsed:?}"
    );
    assert!(errors >= 1.0);
    // One retry per 100 ms, not a busy loop; one log line per 10 s.
    assert!(
        errors <= elapsed.as_secs_f64() * 10.0 + 5.0,
        "{errors} failed accepts in {elapsed:?}: spinning"
    );
    assert!(lines as f64 <= elapsed.as_secs_f64() / 10.0 + 1.0, "{text}");
    watcher.keeps_receiving("after").await;
    drop(feed);
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients that send what they must not
// ---------------------------------------------------------------------------------------------

/// Opens `/ws` on a raw socket: the 101 is read, frames are up to the test.
async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
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

/// The header of a masked client frame announcing `len` payload bytes (mask key 0: the
/// payload goes out as is).
fn frame_header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// Reads server frames from a raw socket until a close frame; returns its code.
async fn raw_close_code(stream: &mut tokio::net::tcp::OwnedReadHalf) -> u16 {
    loop {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.unwrap();
        let opcode = head[0] & 0x0f;
        let len = match head[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                stream.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                stream.read_exact(&mut l).await.unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "a close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_message_closes_with_1003_while_others_keep_receiving() {
    let (gw, _feed, mut watcher) = scene(Options::default()).await;
    let (mut ws, _) = connect_async(format!("ws://{}/ws", gw.addr)).await.unwrap();
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let code = tokio::time::timeout(SOON, async {
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| f.code);
            }
        }
        None
    })
    .await
    .expect("no close frame in time");
    assert_eq!(code, Some(CloseCode::Unsupported));
    wait_metric(gw.addr, &disconnects("binary"), |v| v == 1.0).await;
    watcher.keeps_receiving("after the binary client").await;
}

/// Writes `frames` (made by `next`) as fast as the gateway takes them while reading for the
/// close frame; returns its code and how many frames went out before it.
async fn flood_until_closed(
    stream: TcpStream,
    first: Vec<u8>,
    next: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> (u16, u64) {
    let (mut read, mut write) = stream.into_split();
    let stop = CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            if write.write_all(&first).await.is_err() {
                return sent;
            }
            while !stop.is_cancelled() {
                // Batches of frames, so the test's own syscalls do not set the pace.
                let mut batch = Vec::new();
                for i in 0..64 {
                    batch.extend(next(sent + i));
                }
                if write.write_all(&batch).await.is_err() {
                    break;
                }
                sent += 64;
            }
            sent
        })
    };
    let code = tokio::time::timeout(Duration::from_secs(20), raw_close_code(&mut read))
        .await
        .expect("the flooding client was never closed");
    stop.cancel();
    let sent = writer.await.unwrap();
    (code, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_too_much_is_closed_with_1008_flood_while_others_keep_receiving() {
    let (gw, _feed, mut watcher) = scene(Options::default()).await;

    // A stream of small text messages.
    let texts = raw_ws(gw.addr).await;
    let (code, sent) = flood_until_closed(texts, Vec::new(), |i| {
        let text = format!("hello {i}");
        let mut frame = frame_header(true, 0x1, text.len());
        frame.extend_from_slice(text.as_bytes());
        frame
    })
    .await;
    assert_eq!(code, 1008, "text flood");
    println!("text flood: closed with {code} after about {sent} messages");
    wait_metric(gw.addr, &disconnects("flood"), |v| v == 1.0).await;
    watcher.keeps_receiving("after the text flood").await;

    // A message that never ends: a text frame without FIN, then empty continuation frames.
    let endless = raw_ws(gw.addr).await;
    let (code, sent) = flood_until_closed(endless, frame_header(false, 0x1, 0), |_| {
        frame_header(false, 0x0, 0)
    })
    .await;
    assert_eq!(code, 1008, "endless continuation frames");
    println!("empty continuation frames: closed with {code} after about {sent} frames");
    wait_metric(gw.addr, &disconnects("flood"), |v| v == 2.0).await;
    watcher.keeps_receiving("after the endless message").await;
    assert_eq!(http_get(gw.addr, "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_never_completes_is_dropped_as_silent_while_others_keep_receiving() {
    let ping = Duration::from_millis(200);
    let (gw, _feed, mut watcher) = scene(Options {
        ping_interval: ping,
        ..Options::default()
    })
    .await;

    // One announces 1000 bytes and sends 10; the other trickles its 1000 bytes, one per 50 ms.
    let opened = Instant::now();
    let mut stopped = raw_ws(gw.addr).await;
    let mut frame = frame_header(true, 0x1, 1000);
    frame.extend_from_slice(b"0123456789");
    stopped.write_all(&frame).await.unwrap();
    let (mut stopped_read, _stopped_write) = stopped.into_split();

    let trickler = raw_ws(gw.addr).await;
    let (mut trickle_read, mut trickle_write) = trickler.into_split();
    trickle_write
        .write_all(&frame_header(true, 0x1, 1000))
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..1000 {
            if trickle_write.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let code = tokio::time::timeout(SOON, raw_close_code(&mut stopped_read))
        .await
        .expect("the stopped frame was never dropped");
    let stopped_lived = opened.elapsed();
    assert_eq!(code, 1001, "stopped mid-frame");
    let code = tokio::time::timeout(SOON, raw_close_code(&mut trickle_read))
        .await
        .expect("the trickled frame was never dropped");
    let trickle_lived = opened.elapsed();
    assert_eq!(code, 1001, "trickled frame");
    trickle.abort();
    println!(
        "ping interval {ping:?}: a frame stopped mid-way dropped after {stopped_lived:?}, a \
         trickled one after {trickle_lived:?}"
    );
    assert!(stopped_lived >= ping * 3 && trickle_lived >= ping * 3);
    wait_metric(gw.addr, &disconnects("silent"), |v| v == 2.0).await;
    // The watcher answers its pings: it is neither dropped nor behind.
    watcher.keeps_receiving("after the incomplete frames").await;
}
