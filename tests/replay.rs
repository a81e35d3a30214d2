//! The publisher is the source of truth: a gateway that starts late fills its history from the
//! publisher's recent readings (replay), and a restarted publisher continues its `seq`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use k3sense_protocol::Reading;
use support::*;
use tokio_util::sync::CancellationToken;

fn seqs(history: &[Reading]) -> Vec<u64> {
    history.iter().map(|r| r.seq).collect()
}

async fn history(gateway: std::net::SocketAddr, id: &str) -> Vec<Reading> {
    let (status, body) = http_get(gateway, &format!("/api/sensors/{id}/history")).await;
    if status != 200 {
        return Vec::new();
    }
    serde_json::from_str(&body).unwrap()
}

/// Polls the history until `pred` holds (or fails after 10 s with what it saw).
async fn history_until(
    gateway: std::net::SocketAddr,
    id: &str,
    pred: impl Fn(&[Reading]) -> bool,
) -> Vec<Reading> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = history(gateway, id).await;
        if pred(&h) {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history never satisfied the condition: {:?}",
            seqs(&h)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_gateway_gets_every_reading_and_a_restarted_publisher_continues_seq() {
    let broker = start_broker().await;
    let first = CancellationToken::new();
    let publisher = start_publisher(broker, "pi-9", Duration::from_millis(100), first.clone());

    // Let the publisher produce readings nobody is watching.
    let early = CancellationToken::new();
    let (watcher, _) = start_gateway(broker, early.clone()).await;
    history_until(watcher, "pi-9", |h| h.last().is_some_and(|r| r.seq >= 10)).await;
    early.cancel();

    // A gateway that starts now has missed seq 1..: the replay brings them all, in order.
    let stop = CancellationToken::new();
    let (gateway, _) = start_gateway(broker, stop.clone()).await;
    let h = history_until(gateway, "pi-9", |h| h.len() >= 12).await;
    let got = seqs(&h);
    let expected: Vec<u64> = (1..=got[got.len() - 1]).collect();
    assert_eq!(
        got, expected,
        "a late gateway holds every reading, in order, with no gap"
    );

    // A clean stop and a new publisher with the same id: seq goes on, no restart from 1.
    first.cancel();
    publisher.await.unwrap().unwrap();
    let last = history(gateway, "pi-9").await.last().unwrap().seq;
    let second = CancellationToken::new();
    let _publisher = start_publisher(broker, "pi-9", Duration::from_millis(100), second.clone());
    let h = history_until(gateway, "pi-9", |h| {
        h.last().is_some_and(|r| r.seq >= last + 3)
    })
    .await;
    let got = seqs(&h);
    let expected: Vec<u64> = (1..=got[got.len() - 1]).collect();
    assert_eq!(got, expected, "seq continues across a publisher restart");
    second.cancel();
    stop.cancel();
}
