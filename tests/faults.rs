//! The fault suite: while readings flow through the real binary (broker, publisher and gateway
//! as separate processes), inject the faults a Pi cluster sees and prove that, once the system
//! has recovered, the gateway's history holds every reading the sensor produced — in order, with
//! no gap in `seq` — and measure how long recovery took and what a browser saw.
//!
//! Faults: the broker killed (SIGKILL) and restarted, repeatedly; the gateway killed and
//! restarted with a browser connected; the publisher killed (its will fires) and restarted; the
//! network between publisher and broker cut silently (a proxy that stops forwarding, so only
//! keepalives can notice). Each scenario prints a line of the table kept in RELIABILITY.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k3sense_protocol::Reading;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SENSOR: &str = "pi-f";

async fn history(gateway: SocketAddr) -> Vec<Reading> {
    sensor_history(gateway, SENSOR).await
}

/// Readings the publisher has produced so far: those the broker acknowledged plus those it still
/// keeps for the broker (both kept by the MQTT link as they happen).
async fn produced(metrics: SocketAddr) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").await;
    let value = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    value("k3sense_publisher_acknowledged_readings_total")
        + value("k3sense_publisher_buffered_readings")
}

/// Waits until the gateway holds `count` readings numbered `first..first+count` with no gap, and
/// returns what it holds then (or fails with what it saw).
async fn all_delivered(gateway: SocketAddr, first: u64, count: u64) -> Vec<Reading> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = history(gateway).await;
        let seqs: Vec<u64> = h.iter().map(|r| r.seq).filter(|s| *s >= first).collect();
        if seqs.len() as u64 >= count {
            let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
            assert_eq!(
                seqs, expected,
                "history must be in order with no gap in seq"
            );
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "gateway holds {} of {count} readings: {seqs:?}",
            seqs.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the gateway holds every reading the publisher has produced so far (its
/// `readings_total`), then stops the publisher cleanly and checks the rest arrived too.
/// Returns (readings produced, readings held).
async fn settle(
    gateway: SocketAddr,
    metrics: SocketAddr,
    publisher: Proc,
    first_life: u64,
) -> (u64, usize) {
    let so_far = first_life + produced(metrics).await;
    all_delivered(gateway, 1, so_far).await;
    let (_, status, log) = publisher.stop("TERM");
    assert!(status.success(), "{log}");
    assert!(
        log.contains("published offline and disconnected backlog=0"),
        "the publisher stopped with readings the broker never took:\n{log}"
    );
    let total = history(gateway).await.last().map_or(0, |r| r.seq);
    assert!(total >= so_far);
    let h = all_delivered(gateway, 1, total).await;
    (total, h.len())
}

/// Waits for a live reading with a `seq` above `after`; returns how long it took.
async fn next_live(ws: &mut Ws, after: u64) -> Duration {
    let started = Instant::now();
    ws_until(ws, Duration::from_secs(20), |m| {
        m["type"] == "reading" && m["seq"].as_u64().unwrap_or(0) > after
    })
    .await;
    started.elapsed()
}

fn report(
    fault: &str,
    injected: usize,
    produced: u64,
    delivered: usize,
    recovery: &[Duration],
    saw: &str,
) {
    let mut sorted = recovery.to_vec();
    sorted.sort();
    let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    let max = sorted.last().copied().unwrap_or_default();
    println!(
        "| {fault} | {injected} | {produced} | {delivered} | {} | {:.2} s | {:.2} s | {saw} |",
        produced.saturating_sub(delivered as u64),
        p50.as_secs_f64(),
        max.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_three_times() {
    let (mqtt, http, metrics) = (free_addr(), free_addr(), free_addr());
    let mut b = broker_proc(mqtt);
    let p = sim_publisher_proc(mqtt, SENSOR, metrics);
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    wait_http(metrics, "/healthz").await;
    let mut ws = ws_connect(http).await;
    next_live(&mut ws, 0).await;

    let mut recovery = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        b.signal("KILL");
        drop(b);
        // Readings go on while the broker is down: the publisher keeps them.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let last_seen = history(http).await.last().map_or(0, |r| r.seq);
        b = broker_proc(mqtt);
        recovery.push(next_live(&mut ws, last_seen).await);
    }
    let (total, held) = settle(http, metrics, p, 0).await;
    assert!(total >= 15, "too few readings to prove anything: {total}");
    report(
        "broker SIGKILL + restart",
        3,
        total,
        held,
        &recovery,
        "reconnected; every reading, late ones filled in by replay",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_and_restarted_with_a_browser_connected() {
    let (mqtt, http, metrics) = (free_addr(), free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    let p = sim_publisher_proc(mqtt, SENSOR, metrics);
    let g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let mut ws = ws_connect(http).await;
    next_live(&mut ws, 0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    g.signal("KILL");
    drop(g);
    // The browser's socket breaks without a close frame.
    let broke = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match futures_util::StreamExt::next(&mut ws).await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(
            broke,
            None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))
        ),
        "expected the socket to break, got {broke:?}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let restarted = Instant::now();
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let mut ws = ws_connect(http).await;
    let snapshot = ws_next(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(snapshot["type"], "snapshot");
    let before = snapshot["sensors"][0]["latest"]["seq"]
        .as_u64()
        .unwrap_or(0);
    next_live(&mut ws, before).await;
    let recovery = restarted.elapsed();

    // The new gateway pod starts with the whole history, not an empty chart.
    let (total, held) = settle(http, metrics, p, 0).await;
    report(
        "gateway SIGKILL + restart",
        1,
        total,
        held,
        &[recovery],
        "socket dropped; reconnected to a full chart",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_killed_its_will_fires_then_it_comes_back() {
    let (mqtt, http, metrics) = (free_addr(), free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    let p = sim_publisher_proc(mqtt, SENSOR, metrics);
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let mut ws = ws_connect(http).await;
    next_live(&mut ws, 0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    p.signal("KILL");
    drop(p);
    let killed = Instant::now();
    ws_until(&mut ws, Duration::from_secs(10), |m| {
        m["type"] == "availability" && m["status"] == "offline"
    })
    .await;
    let will_after = killed.elapsed();
    let last_before = history(http).await.last().map_or(0, |r| r.seq);

    let restarted = Instant::now();
    let p = sim_publisher_proc(mqtt, SENSOR, metrics);
    ws_until(&mut ws, Duration::from_secs(10), |m| {
        m["type"] == "availability" && m["status"] == "online"
    })
    .await;
    next_live(&mut ws, last_before).await;
    let recovery = restarted.elapsed();
    wait_http(metrics, "/healthz").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // seq goes on from the retained reading: the second life's readings follow the first's,
    // so every seq up to the first life's last plus the second life's count must be there.
    let (total, held) = settle(http, metrics, p, last_before).await;
    report(
        "publisher SIGKILL + restart",
        1,
        total,
        held,
        &[recovery],
        &format!(
            "offline (last will) after {:.1} s, then online",
            will_after.as_secs_f64()
        ),
    );
}

/// A TCP proxy that can go silent: while cut, it forwards nothing and closes nothing, like a
/// pulled cable or a dead switch; only keepalives can notice.
async fn silent_proxy(upstream: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, Arc::clone(&cut)));
            tokio::spawn(pipe(sr, cw, Arc::clone(&cut)));
        }
    });
    addr
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            // Swallow the bytes and keep the connection open: nothing is refused, nothing arrives.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cut_silently_between_publisher_and_broker() {
    let (mqtt, http, metrics) = (free_addr(), free_addr(), free_addr());
    let _b = broker_proc(mqtt);
    let cut = Arc::new(AtomicBool::new(false));
    let proxy = silent_proxy(mqtt, Arc::clone(&cut)).await;
    let p = sim_publisher_proc(proxy, SENSOR, metrics);
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let mut ws = ws_connect(http).await;
    next_live(&mut ws, 0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    cut.store(true, Ordering::SeqCst);
    // The broker notices the silence only by the publisher's keepalive (2 s × 1.5) and fires
    // its will; the page shows the sensor offline.
    let cut_at = Instant::now();
    ws_until(&mut ws, Duration::from_secs(15), |m| {
        m["type"] == "availability" && m["status"] == "offline"
    })
    .await;
    let noticed = cut_at.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let last_before = history(http).await.last().map_or(0, |r| r.seq);
    cut.store(false, Ordering::SeqCst);
    let healed = Instant::now();
    next_live(&mut ws, last_before).await;
    let recovery = healed.elapsed();

    let (total, held) = settle(http, metrics, p, 0).await;
    report(
        "network cut silently (publisher ↔ broker)",
        1,
        total,
        held,
        &[recovery],
        &format!(
            "offline after {:.1} s (keepalive), readings from the cut delivered after it",
            noticed.as_secs_f64()
        ),
    );
}
