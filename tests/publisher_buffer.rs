//! The publisher keeps readings while the broker is unreachable and delivers every one of them
//! when it is back: in order, with consecutive `seq`, stamped with the time they were read.
//!
//! A real broker runs in this process; the publisher reaches it through a TCP proxy the test
//! cuts and restores (rumqttd cannot be stopped in-process). A rumqttc subscriber connected to
//! the broker directly sees what arrives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{net::SocketAddr, time::Duration};

use chrono::{DateTime, Utc};
use k3sense_protocol::{MqttConfig, Reading};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::start_broker;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

/// A TCP proxy to `target` that can be cut (every connection closed, new ones refused) and
/// restored.
async fn start_proxy(target: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (up, up_rx) = watch::channel(true);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            if !*up_rx.borrow() {
                continue; // dropped: the connection is closed at once
            }
            let mut down = up_rx.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = down.wait_for(|up| !*up) => {}
                }
            });
        }
    });
    (addr, up)
}

/// Subscribes to `topic` on `broker`; every message arrives with the time it arrived.
async fn subscribe(
    broker: SocketAddr,
    topic: &str,
) -> mpsc::UnboundedReceiver<(Reading, DateTime<Utc>)> {
    let mut options = MqttOptions::new("test-subscriber", broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 100);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed, mut ready) = watch::channel(false);
    tokio::spawn(async move {
        let _client = client;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed.send_replace(true);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let reading = Reading::from_json(&p.payload).unwrap();
                    if tx.send((reading, Utc::now())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber lost the broker: {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_taken_while_the_broker_is_unreachable_all_arrive_in_order_with_their_read_time() {
    let broker = start_broker().await;
    let (proxy, up) = start_proxy(broker).await;
    let mut arrived = subscribe(broker, "k3sense/pi-buf/state").await;

    let interval = Duration::from_millis(500);
    let shutdown = CancellationToken::new();
    let publisher = tokio::spawn(k3sense_publisher::run(
        k3sense_publisher::Config {
            mqtt: MqttConfig::new(proxy.to_string()),
            sensor: k3sense_publisher::SensorConfig::sim("pi-buf", interval),
        },
        shutdown.clone(),
    ));

    // Up: readings flow live.
    let first = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.0.seq, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Down for 4 s: the publisher keeps reading and keeps what it read.
    up.send_replace(false);
    let cut_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    up.send_replace(true);
    let restored_at = Utc::now();

    // Back: everything read meanwhile arrives. Wait until readings taken after the restore do.
    let mut messages = vec![first];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while messages
        .last()
        .is_none_or(|(r, _)| r.read_at < restored_at + chrono::Duration::seconds(1))
    {
        let next = tokio::time::timeout_at(deadline, arrived.recv())
            .await
            .expect("readings stopped arriving after the broker came back")
            .unwrap();
        messages.push(next);
    }
    shutdown.cancel();
    publisher.await.unwrap().unwrap();

    // QoS 1 may deliver a reading twice (sent just before the cut, acknowledged after); a
    // repeat must be identical, and every new one must be the next seq.
    let mut readings: Vec<(Reading, DateTime<Utc>)> = Vec::new();
    for (reading, at) in messages {
        match readings.iter().find(|(r, _)| r.seq == reading.seq) {
            Some((earlier, _)) => assert_eq!(earlier, &reading, "a repeat must be identical"),
            None => {
                let expected = readings.last().map_or(1, |(r, _)| r.seq + 1);
                assert_eq!(reading.seq, expected, "seq must be consecutive, in order");
                readings.push((reading, at));
            }
        }
    }
    for pair in readings.windows(2) {
        let gap = pair[1].0.read_at - pair[0].0.read_at;
        assert!(
            gap >= chrono::Duration::milliseconds(250)
                && gap <= chrono::Duration::milliseconds(1500),
            "read_at must be the time of each read, one interval apart: {} then {}",
            pair[0].0.read_at,
            pair[1].0.read_at
        );
    }
    let buffered: Vec<_> = readings
        .iter()
        .filter(|(r, _)| {
            r.read_at > cut_at + chrono::Duration::milliseconds(100) && r.read_at < restored_at
        })
        .collect();
    assert!(
        buffered.len() >= 6,
        "only {} readings taken while cut off",
        buffered.len()
    );
    for (reading, arrived_at) in &buffered {
        assert!(
            *arrived_at >= restored_at,
            "seq {} read at {} arrived at {}, while the broker was unreachable",
            reading.seq,
            reading.read_at,
            arrived_at
        );
    }
    eprintln!(
        "{} readings, {} of them read while the broker was unreachable, delivered after it came back",
        readings.len(),
        buffered.len()
    );
}
