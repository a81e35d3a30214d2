//! Broker loss never blanks the page: with the real binary running as broker, publisher and
//! gateway processes and one WebSocket client connected, the broker is killed (SIGKILL), kept
//! down for ten seconds and started again on the same port. Throughout, `/readyz` is polled every
//! 200 ms and must answer 200 every time (a 503 would make Kubernetes take the gateway out of its
//! Service, and Traefik would answer 503 for the page); the WebSocket must stay open; it must be
//! told `broker` `unreachable` and later `connected`; and the readings on that one socket — live
//! ones and those the publisher kept while the broker was down, delivered by the gateway's replay
//! — must cover every `seq` with no gap.
//!
//! Prints the figures quoted in gateway/README.md ("When the broker goes away").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

const SENSOR: &str = "pi-r";
const DOWN: Duration = Duration::from_secs(10);

/// Every WebSocket message read goes through here, so no reading is overlooked while the test
/// waits for something else.
struct Socket {
    ws: Ws,
    /// Every `seq` received in a `reading` (live or replayed).
    seqs: BTreeSet<u64>,
}

impl Socket {
    /// The next message satisfying `pred`, within `within`; the socket must stay open.
    async fn until(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "nothing matching in {within:?}");
            // Panics if the socket closes or breaks: it must stay connected throughout.
            let m = ws_next(&mut self.ws, left).await;
            if m["type"] == "reading" {
                self.seqs.insert(m["seq"].as_u64().unwrap());
            }
            if pred(&m) {
                return m;
            }
        }
    }

    /// Reads (and so answers pings) until `at`; returns how many messages came.
    async fn read_until(&mut self, at: Instant) -> usize {
        let mut count = 0;
        while Instant::now() < at {
            let left = at.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, futures_util::StreamExt::next(&mut self.ws)).await {
                Err(_) => break,
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => {
                    let m: Value = serde_json::from_str(&text).unwrap();
                    if m["type"] == "reading" {
                        self.seqs.insert(m["seq"].as_u64().unwrap());
                    }
                    count += 1;
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("the WebSocket closed while the broker was down: {other:?}"),
            }
        }
        count
    }

    /// The seqs from `first` on that have not arrived, up to the highest that did.
    fn missing_from(&self, first: u64) -> Vec<u64> {
        let last = self.seqs.last().copied().unwrap_or(first);
        (first..=last).filter(|s| !self.seqs.contains(s)).collect()
    }
}

/// Polls `/readyz` every 200 ms until `stop`; every answer's status (0: no answer).
fn poll_readyz(http: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            statuses.push(try_http_get(http, "/readyz").await.map_or(0, |(s, _)| s));
        }
        statuses
    })
}

async fn broker_link(http: SocketAddr) -> Value {
    let (status, body) = http_get(http, "/api/status").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["broker"].clone()
}

/// Readings the publisher has numbered so far (acknowledged plus kept for the broker).
async fn produced(metrics: SocketAddr) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").await;
    let sample = format!("{{sensor_id=\"{SENSOR}\"}}");
    let value = |name: &str| {
        let found = sample_value(&body, &format!("{name}{sample}"));
        assert!(body.contains(name), "no {name} in {body}");
        found as u64
    };
    value("k3sense_publisher_acknowledged_readings_total")
        + value("k3sense_publisher_buffered_readings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_ten_seconds_keeps_the_gateway_ready_and_the_socket_whole() {
    let (mqtt, http, metrics) = (free_addr(), free_addr(), free_addr());
    let mut b = broker_proc(mqtt);
    let _p = sim_publisher_proc(mqtt, SENSOR, metrics);
    let _g = gateway_proc(mqtt, http);
    wait_ready(http).await;
    let mut socket = Socket {
        ws: ws_connect(http).await,
        seqs: BTreeSet::new(),
    };
    let snapshot = socket.until(Duration::from_secs(2), |_| true).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["broker"]["status"], "connected", "{snapshot}");
    // The first live reading sets where the no-gap check starts (the snapshot's latest, if any,
    // may be older than what follows it by more than one when the client joins mid-replay).
    let first = socket
        .until(Duration::from_secs(10), |m| m["type"] == "reading")
        .await["seq"]
        .as_u64()
        .unwrap();
    socket
        .until(Duration::from_secs(10), |m| {
            m["type"] == "reading" && m["seq"].as_u64() >= Some(first + 3)
        })
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let readyz = poll_readyz(http, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(600)).await;

    // SIGKILL: no goodbye to anyone; the gateway sees its connection reset.
    b.signal("KILL");
    let killed = Instant::now();
    drop(b);
    let last_before = *socket.seqs.last().unwrap();
    let down = socket
        .until(Duration::from_secs(5), |m| m["type"] == "broker")
        .await;
    let told = killed.elapsed();
    assert_eq!(down["status"], "unreachable", "{down}");
    let link = broker_link(http).await;
    assert_eq!(link["status"], "unreachable");
    assert_eq!(link["since"], down["since"]);
    assert_eq!(metric(http, "k3sense_gateway_broker_connected").await, 0.0);
    assert_eq!(
        metric(http, "k3sense_gateway_broker_disconnects_total").await,
        1.0
    );
    // The page and the API still serve what the gateway holds.
    let (status, body) = http_get(http, &format!("/api/sensors/{SENSOR}/history")).await;
    assert_eq!(status, 200);
    assert!(body.contains(&format!("\"seq\":{last_before}")), "{body}");

    let while_down = socket.read_until(killed + DOWN).await;
    let kept = produced(metrics).await;
    let restarted = Instant::now();
    b = broker_proc(mqtt);

    let up = socket
        .until(Duration::from_secs(15), |m| m["type"] == "broker")
        .await;
    let reconnected = restarted.elapsed();
    assert_eq!(up["status"], "connected", "{up}");
    socket
        .until(Duration::from_secs(15), |m| {
            m["type"] == "reading" && m["seq"].as_u64() > Some(kept)
        })
        .await;
    let live_again = restarted.elapsed();
    // Everything the publisher kept while the broker was down arrives too (replayed).
    let deadline = Instant::now() + Duration::from_secs(20);
    while (first..=kept + 3).any(|s| !socket.seqs.contains(&s))
        || !socket.missing_from(first).is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "seqs missing on the socket: {:?} (received {}..={})",
            socket.missing_from(first),
            first,
            socket.seqs.last().unwrap()
        );
        socket
            .until(deadline.saturating_duration_since(Instant::now()), |m| {
                m["type"] == "reading"
            })
            .await;
    }
    let filled = restarted.elapsed();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::SeqCst);
    let statuses = readyz.await.unwrap();
    let not_ready: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        not_ready.is_empty(),
        "/readyz answered {not_ready:?} among {} polls",
        statuses.len()
    );
    assert!(statuses.len() >= 50, "too few polls: {}", statuses.len());
    assert_eq!(broker_link(http).await["status"], "connected");
    assert!(socket.missing_from(first).is_empty());
    let last = *socket.seqs.last().unwrap();
    println!(
        "broker down {:.1} s: /readyz {} polls, all 200; socket told `unreachable` {:.2} s after the \
         kill, {} messages while down; `connected` {:.2} s after the restart, first new live reading \
         {:.2} s, every seq {first}..={last} ({} readings, {} of them numbered between the last one seen \
         before the kill and the restart) after {:.2} s",
        DOWN.as_secs_f64(),
        statuses.len(),
        told.as_secs_f64(),
        while_down,
        reconnected.as_secs_f64(),
        live_again.as_secs_f64(),
        last - first + 1,
        kept - last_before,
        filled.as_secs_f64(),
    );
    drop(b);
}
