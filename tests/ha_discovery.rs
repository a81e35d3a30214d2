//! Home Assistant MQTT discovery, end to end: a real broker, a simulated publisher, and a
//! rumqttc subscriber that checks every discovery message against the schema Home Assistant
//! documents for MQTT sensors (<https://www.home-assistant.io/integrations/sensor.mqtt/>) and
//! discovery (`<prefix>/<component>/<node_id>/<object_id>/config`, retained, re-sent when
//! `<prefix>/status` says `online`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use support::{free_port, start_broker};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Message {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    qos: QoS,
}

/// A subscriber to `filter`; also returns its client, to publish with.
async fn subscriber(broker: SocketAddr, filter: &str) -> (AsyncClient, UnboundedReceiver<Message>) {
    let mut options = MqttOptions::new(
        format!("ha-test-{}", free_port()),
        "127.0.0.1",
        broker.port(),
    );
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    // Subscribed before anything is published: a subscription the broker takes while a retained
    // publish is on its way may get both the retained copy and the live one, which would look
    // like a second announcement.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Message {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                        qos: p.qos,
                    });
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    })
    .await
    .expect("no SUBACK");
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let message = Message {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                    qos: p.qos,
                };
                if tx.send(message).is_err() {
                    return;
                }
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut UnboundedReceiver<Message>) -> Message {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no MQTT message in time")
        .expect("subscriber ended")
}

/// The next `n` messages on topics ending in `/config`, by topic.
async fn configs(rx: &mut UnboundedReceiver<Message>, n: usize) -> BTreeMap<String, Message> {
    let mut seen = BTreeMap::new();
    while seen.len() < n {
        let m = next(rx).await;
        if m.topic.ends_with("/config") {
            seen.insert(m.topic.clone(), m);
        }
    }
    seen
}

fn publisher_config(broker: SocketAddr, id: &str, interval: Duration) -> k3sense_publisher::Config {
    k3sense_publisher::Config {
        mqtt: k3sense_protocol::MqttConfig::new(broker.to_string()),
        sensor: k3sense_publisher::SensorConfig::sim(id, interval),
    }
}

fn string<'a>(config: &'a Value, key: &str) -> &'a str {
    config[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} must be a string in {config}"))
}

/// Checks one sensor entity's config against Home Assistant's MQTT sensor schema and our
/// contract; returns the parsed config.
fn check_entity(message: &Message, id: &str, entity: &str) -> Value {
    let expected_topic = format!("homeassistant/sensor/k3sense_{id}/{entity}/config");
    assert_eq!(message.topic, expected_topic);
    // Discovery topic layout: <prefix>/<component>/<node_id>/<object_id>/config, node_id and
    // object_id of [a-zA-Z0-9_-].
    let levels: Vec<&str> = message.topic.split('/').collect();
    assert_eq!(levels.len(), 5, "{}", message.topic);
    for level in &levels[2..4] {
        assert!(
            level
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "node_id/object_id {level:?} has characters Home Assistant refuses"
        );
    }
    assert_eq!(message.qos, QoS::AtLeastOnce);
    let config: Value = serde_json::from_slice(&message.payload).expect("config is JSON");
    let object = config.as_object().expect("config is a JSON object");

    // Every key we send is one the MQTT sensor schema knows (a typo would be silently ignored
    // by Home Assistant, or make it refuse the config).
    let known = [
        "name",
        "unique_id",
        "state_topic",
        "value_template",
        "device_class",
        "unit_of_measurement",
        "state_class",
        "suggested_display_precision",
        "expire_after",
        "availability_mode",
        "availability",
        "qos",
        "device",
        "origin",
    ];
    for key in object.keys() {
        assert!(
            known.contains(&key.as_str()),
            "unknown key {key} in {config}"
        );
    }
    // Required by the sensor schema: state_topic. Required for a device and for discovery
    // updates: unique_id.
    assert_eq!(
        string(&config, "state_topic"),
        format!("k3sense/{id}/state")
    );
    assert_eq!(
        string(&config, "unique_id"),
        format!("k3sense_{id}_{entity}")
    );
    assert!(!string(&config, "name").is_empty());
    // Two availability topics, both must say available (availability_mode: all): the
    // publisher's, and the sensor's own health. Each entry uses only keys of Home Assistant's
    // availability list (topic, payload_available, payload_not_available, value_template).
    assert_eq!(string(&config, "availability_mode"), "all");
    let availability = config["availability"]
        .as_array()
        .expect("availability is a list");
    assert_eq!(availability.len(), 2, "{config}");
    for entry in availability {
        for key in entry.as_object().expect("an object").keys() {
            assert!(
                [
                    "topic",
                    "payload_available",
                    "payload_not_available",
                    "value_template"
                ]
                .contains(&key.as_str()),
                "unknown availability key {key}"
            );
        }
    }
    assert_eq!(
        string(&availability[0], "topic"),
        format!("k3sense/{id}/availability")
    );
    assert_eq!(string(&availability[0], "payload_available"), "online");
    assert_eq!(string(&availability[0], "payload_not_available"), "offline");
    assert_eq!(
        string(&availability[1], "topic"),
        format!("k3sense/{id}/sensor")
    );
    assert_eq!(
        string(&availability[1], "value_template"),
        "{{ value_json.status }}"
    );
    assert_eq!(string(&availability[1], "payload_available"), "ok");
    assert_eq!(
        string(&availability[1], "payload_not_available"),
        "not_answering"
    );
    assert_eq!(string(&config, "state_class"), "measurement");
    assert_eq!(config["qos"].as_u64(), Some(1));
    let (device_class, unit, field) = match entity {
        "temperature" => ("temperature", "°C", "temperature_c"),
        "humidity" => ("humidity", "%", "humidity_pct"),
        other => panic!("unexpected entity {other}"),
    };
    assert_eq!(string(&config, "device_class"), device_class);
    assert_eq!(string(&config, "unit_of_measurement"), unit);
    assert_eq!(
        string(&config, "value_template"),
        format!("{{{{ value_json.{field} }}}}")
    );
    // expire_after: a positive integer number of seconds; 3 intervals of (at least) 1 s here.
    let expire = config["expire_after"]
        .as_u64()
        .expect("expire_after is an integer");
    assert_eq!(expire, 3);
    assert_eq!(config["suggested_display_precision"].as_u64(), Some(1));

    let device = config["device"].as_object().expect("device is an object");
    for key in device.keys() {
        assert!(
            ["identifiers", "name", "model", "manufacturer", "sw_version"].contains(&key.as_str()),
            "unknown device key {key}"
        );
    }
    let identifiers = device["identifiers"]
        .as_array()
        .expect("identifiers is a list");
    assert_eq!(identifiers, &[Value::from(format!("k3sense_{id}"))]);
    assert_eq!(device["model"], "DHT11");
    assert!(device["name"].as_str().unwrap().contains(id));
    assert!(!device["manufacturer"].as_str().unwrap().is_empty());
    assert_eq!(device["sw_version"], env!("CARGO_PKG_VERSION"));
    // origin: `name` is required when origin is given.
    let origin = config["origin"].as_object().expect("origin is an object");
    assert_eq!(origin["name"], "k3sense");
    for key in origin.keys() {
        assert!(
            ["name", "sw_version", "support_url"].contains(&key.as_str()),
            "unknown origin key {key}"
        );
    }
    config
}

/// Applies a value template the way Home Assistant would for `{{ value_json.<field> }}`.
fn render(template: &str, state: &Value) -> Value {
    let field = template
        .strip_prefix("{{ value_json.")
        .and_then(|t| t.strip_suffix(" }}"))
        .expect("template of the form {{ value_json.<field> }}");
    state[field].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_configs_follow_the_documented_schema_and_are_retained() {
    let broker = start_broker().await;
    let (_live, mut live) = subscriber(broker, "homeassistant/#").await;
    let (_state_client, mut state) = subscriber(broker, "k3sense/ha-1/state").await;
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(k3sense_publisher::run(
        publisher_config(broker, "ha-1", Duration::from_millis(200)),
        stop.clone(),
    ));

    let seen = configs(&mut live, 2).await;
    let temperature = check_entity(
        &seen["homeassistant/sensor/k3sense_ha-1/temperature/config"],
        "ha-1",
        "temperature",
    );
    let humidity = check_entity(
        &seen["homeassistant/sensor/k3sense_ha-1/humidity/config"],
        "ha-1",
        "humidity",
    );
    assert_eq!(
        temperature["device"], humidity["device"],
        "one device, two entities"
    );
    assert_ne!(temperature["unique_id"], humidity["unique_id"]);

    // The templates pick plausible numbers out of a real state message.
    let reading: Value = serde_json::from_slice(&next(&mut state).await.payload).unwrap();
    let t = render(temperature["value_template"].as_str().unwrap(), &reading);
    let h = render(humidity["value_template"].as_str().unwrap(), &reading);
    assert!((-20.0..=60.0).contains(&t.as_f64().unwrap()), "{t}");
    assert!((0.0..=100.0).contains(&h.as_f64().unwrap()), "{h}");

    // A Home Assistant that connects later gets both configs as retained messages.
    let (_late, mut late) = subscriber(broker, "homeassistant/sensor/k3sense_ha-1/+/config").await;
    let retained = configs(&mut late, 2).await;
    for (topic, message) in &retained {
        assert!(message.retain, "{topic} is not retained");
        assert_eq!(message.payload, seen[topic].payload);
    }

    stop.cancel();
    publisher.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_online_triggers_a_new_announcement() {
    let broker = start_broker().await;
    let (client, mut live) = subscriber(broker, "homeassistant/sensor/#").await;
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(k3sense_publisher::run(
        publisher_config(broker, "ha-2", Duration::from_millis(200)),
        stop.clone(),
    ));
    let first = configs(&mut live, 2).await;

    // `offline` (Home Assistant's will) asks for nothing; `online` (its birth message) for a
    // new announcement with the same configs.
    client
        .publish("homeassistant/status", QoS::AtLeastOnce, false, "offline")
        .await
        .unwrap();
    client
        .publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
        .await
        .unwrap();
    let again = configs(&mut live, 2).await;
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>()
    );
    for (topic, message) in &again {
        assert_eq!(message.payload, first[topic].payload, "{topic} changed");
    }
    // Exactly one re-announcement: `offline` did not cause one.
    let extra = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let m = next(&mut live).await;
            if m.topic.ends_with("/config") {
                return m.topic;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "unexpected announcement on {extra:?}");

    stop.cancel();
    publisher.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_can_be_turned_off_and_moved_to_another_prefix() {
    let broker = start_broker().await;
    let (_c, mut live) = subscriber(broker, "#").await;
    let stop = CancellationToken::new();

    let mut off = publisher_config(broker, "ha-off", Duration::from_millis(200));
    off.sensor.ha.discovery = false;
    let mut moved = publisher_config(broker, "ha-moved", Duration::from_millis(200));
    moved.sensor.ha.prefix = "site-a/ha".into();
    let off = tokio::spawn(k3sense_publisher::run(off, stop.clone()));
    let moved = tokio::spawn(k3sense_publisher::run(moved, stop.clone()));

    // Wait for a reading from each publisher: both have connected and announced what they
    // announce, which is ordered before their readings on the same connection.
    let mut readings = std::collections::BTreeSet::new();
    let mut config_topics = Vec::new();
    while readings.len() < 2 {
        let m = next(&mut live).await;
        if m.topic.ends_with("/state") {
            readings.insert(m.topic.clone());
        } else if m.topic.ends_with("/config") {
            config_topics.push(m.topic);
        }
    }
    config_topics.sort();
    assert_eq!(
        config_topics,
        [
            "site-a/ha/sensor/k3sense_ha-moved/humidity/config",
            "site-a/ha/sensor/k3sense_ha-moved/temperature/config"
        ]
    );

    stop.cancel();
    off.await.unwrap().unwrap();
    moved.await.unwrap().unwrap();
}
