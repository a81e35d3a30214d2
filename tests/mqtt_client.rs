//! The one MQTT client (`k3sense_protocol::mqtt`) against a real broker: the `k3sense broker`
//! binary as a process of its own on a free port, killed and started again where a test needs
//! a broker restart. The other side of each test is an independent rumqttc client.
//!
//! - it reconnects after the broker restarts, subscribes again by itself and receives;
//! - a publish the broker never acknowledged is reported lost when the connection breaks, and a
//!   publish queued while the broker is down goes out and is acknowledged once it is back;
//! - a goodbye sends DISCONNECT, so a subscriber sees no last will (and, as the control, a client
//!   that stops without one does fire its will);
//! - nothing listening is reported as a failed connect with a retry delay.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{net::SocketAddr, time::Duration};

use k3sense_protocol::{
    MqttConfig,
    mqtt::{ClientEvent, Disconnect, Events, Goodbye, PublishId, QoS},
};
use support::*;

const WITHIN: Duration = Duration::from_secs(10);

async fn connected(events: &mut Events) {
    client_event_until(events, |e| {
        matches!(e, ClientEvent::Connected { .. }).then_some(())
    })
    .await;
}

async fn acked(events: &mut Events, id: PublishId) {
    client_event_until(events, |e| {
        matches!(e, ClientEvent::Acked(a) if a == id).then_some(())
    })
    .await;
}

/// Publishes from an independent rumqttc client at QoS 1 and waits for its PUBACK.
async fn peer_publish(broker: SocketAddr, topic: &str, payload: &str, retain: bool) {
    let mut options =
        rumqttc::MqttOptions::new(format!("peer-{}", free_port()), "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    mqtt_publish_acked(&client, &mut events, topic, payload, retain).await;
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

#[tokio::test]
async fn reconnects_and_resubscribes_after_a_broker_restart() {
    let addr = free_addr();
    let broker = broker_proc(addr);
    let (client, mut events) = MqttConfig::new(addr.to_string())
        .client("test-restart")
        .unwrap()
        .subscribe("t/#", QoS::AtLeastOnce)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .start();
    connected(&mut events).await;
    client_subscribed(&mut events).await;
    peer_publish(addr, "t/before", "1", false).await;
    let m = client_event_until(&mut events, |e| match e {
        ClientEvent::Message(m) => Some(m),
        _ => None,
    })
    .await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("t/before", &b"1"[..]));

    // A frozen broker takes the publish but never acknowledges it; killed, it never will.
    broker.signal("STOP");
    let lost = client
        .publish("t/lost", QoS::AtLeastOnce, false, "l")
        .unwrap();
    drop(broker); // SIGKILL: the connection breaks without a goodbye
    client_event_until(&mut events, |e| {
        matches!(e, ClientEvent::Lost(id) if id == lost).then_some(())
    })
    .await;
    assert_eq!(client.outstanding(), 0);
    let reason = client_event_until(&mut events, |e| match e {
        ClientEvent::Disconnected { reason, retry_in } => {
            assert!(retry_in.is_some(), "it must try again");
            Some(reason)
        }
        _ => None,
    })
    .await;
    assert!(matches!(reason, Disconnect::Lost(_)), "{reason:?}");
    assert!(!client.is_connected());
    // Queued while the broker is down: goes out after the reconnect.
    let queued = client
        .publish("t/queued", QoS::AtLeastOnce, false, "q")
        .unwrap();

    let _broker = broker_proc(addr);
    connected(&mut events).await;
    // Nobody asked it to subscribe again: the restarted broker forgot the subscription, and
    // the client subscribes after every CONNACK.
    // The queued publish went out first, so its PUBACK may come before the SUBACK.
    let (mut was_acked, mut was_subscribed) = (false, false);
    client_event_until(&mut events, |e| {
        match e {
            ClientEvent::Acked(id) if id == queued => was_acked = true,
            ClientEvent::Subscribed { granted } => {
                assert!(granted);
                was_subscribed = true;
            }
            _ => {}
        }
        (was_acked && was_subscribed).then_some(())
    })
    .await;
    peer_publish(addr, "t/after", "2", false).await;
    let m = client_event_until(&mut events, |e| match e {
        ClientEvent::Message(m) if m.topic == "t/after" => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(&m.payload[..], b"2");
    assert!(!m.retain);
    assert_eq!(client.goodbye(Duration::from_secs(2)).await, Goodbye::Clean);
}

#[tokio::test]
async fn a_goodbye_does_not_fire_the_will_and_a_crash_does() {
    let addr = free_addr();
    let _broker = broker_proc(addr);
    let start = |id: &str| {
        MqttConfig::new(addr.to_string())
            .client(id)
            .unwrap()
            .will(format!("w/{id}"), "offline", QoS::AtLeastOnce, false)
            .start()
    };
    let (polite, mut polite_events) = start("polite");
    let (_crash, mut crash_events) = start("crash");
    connected(&mut polite_events).await;
    connected(&mut crash_events).await;
    let mut watcher = mqtt_subscriber(addr, "w/#").await;
    // The watcher's subscription is in place once a message of its own comes back.
    tokio::time::timeout(WITHIN, async {
        loop {
            peer_publish(addr, "w/ping", "", false).await;
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(500), watcher.recv()).await
            {
                break;
            }
        }
    })
    .await
    .expect("the watcher never subscribed");

    // A published-and-acknowledged message first: the goodbye comes after it.
    let id = polite
        .publish("w/polite/hello", QoS::AtLeastOnce, false, "hi")
        .unwrap();
    acked(&mut polite_events, id).await;
    assert_eq!(polite.goodbye(Duration::from_secs(2)).await, Goodbye::Clean);
    assert!(
        polite_events.recv().await.is_some_and(|e| matches!(
            e,
            ClientEvent::Disconnected {
                reason: Disconnect::Goodbye,
                retry_in: None
            }
        )),
        "the last event says goodbye"
    );
    assert!(polite_events.recv().await.is_none(), "the client stopped");
    assert!(matches!(
        polite.publish("w/x", QoS::AtLeastOnce, false, "x"),
        Err(k3sense_protocol::Error::ClientStopped)
    ));

    // The control: dropping the events stops the other client without DISCONNECT.
    drop(crash_events);
    let (will, _) = next_on(&mut watcher, "w/crash", WITHIN).await;
    assert_eq!(will, b"offline");
    // Both stops happened before this marker; the polite one's will must not be among what
    // arrived.
    peer_publish(addr, "w/marker", "", false).await;
    let mut seen = Vec::new();
    loop {
        let (topic, payload, _) = tokio::time::timeout(WITHIN, watcher.recv())
            .await
            .expect("the marker never came")
            .unwrap();
        if topic == "w/marker" {
            break;
        }
        seen.push((topic, payload));
    }
    assert!(
        !seen.iter().any(|(t, _)| t == "w/polite"),
        "the polite client's will fired: {seen:?}"
    );
}

#[tokio::test]
async fn nothing_listening_is_a_failed_connect_with_a_retry() {
    let addr = free_addr();
    let (client, mut events) = MqttConfig::new(addr.to_string())
        .client("test-nobody")
        .unwrap()
        .start();
    let (reason, retry_in) = client_event_until(&mut events, |e| match e {
        ClientEvent::Disconnected { reason, retry_in } => Some((reason, retry_in)),
        _ => None,
    })
    .await;
    assert!(
        matches!(&reason, Disconnect::ConnectFailed(rumqttc::ConnectionError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{reason:?}"
    );
    assert!(retry_in.is_some_and(|d| d <= Duration::from_millis(200)));
    assert_eq!(
        client.goodbye(Duration::from_secs(1)).await,
        Goodbye::NotConnected
    );
}
