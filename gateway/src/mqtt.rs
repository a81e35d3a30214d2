//! The gateway's MQTT side: subscribe to every sensor's state, availability, health and replays,
//! validate each message, feed the [`Hub`]. The connection, its reconnecting (jittered
//! backoff) and re-subscribing are `k3sense_protocol::mqtt::Client`'s. The link's
//! state (subscribed or not, since when) goes to the hub, which tells pages and the API; losing
//! it never closes a WebSocket or makes the gateway unready (see `crate::link`).
//!
//! Missing readings are asked for again (see `k3sense_protocol::ReplayRequest`): everything the
//! publisher keeps when a sensor is first seen (a new gateway pod starts with a full chart), the
//! range in between when a live reading's `seq` jumps, and everything after the newest held
//! after the broker connection comes back.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::Utc;

use k3sense_protocol::{
    Availability, LogThrottle, MqttConfig, Reading, ReplayRequest, SensorHealth, SensorId,
    TopicKind, Topics,
    mqtt::{Client, ClientEvent, Disconnect, QoS},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Result,
    guard::{Guard, Verdict},
    hub::Hub,
    metrics::Metrics,
};

/// Shared between the MQTT task and the HTTP handlers.
pub(crate) struct Link {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// `--max-clock-skew`: how far in the future a reading may be stamped.
    pub max_clock_skew: Duration,
}

impl Link {
    /// Counts an update's WebSocket messages (one per client it went to).
    fn sent(&self, sent: crate::hub::Sent) {
        if let Some(clients) = sent {
            self.metrics.ws_messages_sent.inc_by(clients as u64);
        }
    }
}

/// Runs until `shutdown`.
pub(crate) async fn run(mqtt: MqttConfig, link: Link, shutdown: CancellationToken) -> Result<()> {
    let topics = mqtt.topics()?;
    // Replicas must not share a client id: the broker would disconnect one for the other.
    let client_id = format!("k3sense-gateway-{:08x}", rand::random::<u32>());
    // The client subscribes again after every CONNACK (a restarted broker forgot us).
    let (client, mut events) = mqtt
        .client(&client_id)?
        .subscribe(topics.filter(TopicKind::State), QoS::AtLeastOnce)
        .subscribe(topics.filter(TopicKind::Availability), QoS::AtLeastOnce)
        .subscribe(topics.filter(TopicKind::Sensor), QoS::AtLeastOnce)
        .subscribe(topics.replay_filter(), QoS::AtLeastOnce)
        .start();
    // Requests can be lost (a publisher not yet subscribed, a connection dropped mid-replay):
    // look for holes now and then and ask again, a few times per hole.
    let mut hole_check = tokio::time::interval(HOLE_CHECK);
    hole_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut subscriber = Subscriber {
        client,
        topics,
        guard: Guard::new(link.max_clock_skew),
        link,
        complaints: Complaints::default(),
        asked: HashMap::new(),
        resume: false,
        subscribed: false,
        broker: mqtt.broker.clone(),
    };
    tracing::info!(broker = %mqtt.broker, client_id, "connecting to the MQTT broker");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = hole_check.tick() => subscriber.ask_for_holes(),
            event = events.recv() => match event {
                Some(event) => subscriber.event(event),
                None => break,
            },
        }
    }
    subscriber.client.goodbye(GOODBYE_TIMEOUT).await;
    Ok(())
}

/// How long a stopping gateway waits for the broker to take its DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// The subscription's state between events.
struct Subscriber {
    client: Client,
    topics: Topics,
    link: Link,
    complaints: Complaints,
    guard: Guard,
    /// How often each hole was asked for.
    asked: HashMap<(SensorId, u64), u32>,
    /// Set when the connection was lost: after the next subscription, ask every publisher for
    /// what came after the newest reading held.
    resume: bool,
    /// Connected and subscribed.
    subscribed: bool,
    broker: String,
}

impl Subscriber {
    fn event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::Connected { .. } => {
                tracing::info!(broker = %self.broker, "connected to the MQTT broker");
            }
            ClientEvent::Subscribed { granted } => self.subscribed(granted),
            ClientEvent::Message(m) => self.handle(&m.topic, &m.payload),
            ClientEvent::Disconnected { reason, .. } => self.lost(&reason),
            _ => {}
        }
    }

    fn subscribed(&mut self, granted: bool) {
        if !granted {
            tracing::error!(
                "the broker refused the subscription to {}: check this user's permissions",
                self.topics.prefix()
            );
            return;
        }
        self.subscribed = true;
        self.link.metrics.broker_connected.set(1);
        self.link.sent(self.link.hub.broker_connected(Utc::now()));
        tracing::info!(
            prefix = self.topics.prefix(),
            "subscribed; readings flow live"
        );
        if std::mem::take(&mut self.resume) {
            for (id, seq) in self.link.hub.newest_seqs() {
                let request = ReplayRequest {
                    after_seq: seq,
                    until_seq: None,
                };
                self.ask(&id, request);
            }
        }
    }

    fn lost(&mut self, reason: &Disconnect) {
        let Some(e) = reason.error() else {
            return;
        };
        self.resume = true;
        self.link.metrics.broker_connected.set(0);
        self.link.sent(self.link.hub.broker_lost(Utc::now()));
        let broker = &self.broker;
        if std::mem::take(&mut self.subscribed) {
            self.link.metrics.broker_disconnects.inc();
            tracing::warn!(broker = %broker, error = %e, "MQTT connection lost; serving the readings held, WebSocket clients stay connected; readings resume once the broker is back (retrying with backoff)");
        } else {
            self.complaints.say("broker_unreachable", || {
                format!("cannot reach the MQTT broker at {broker}: {e}; serving the readings held and retrying with backoff (check --broker, --username and the password if this lasts)")
            });
        }
    }

    fn ask_for_holes(&mut self) {
        if !self.subscribed {
            return;
        }
        let holes = self.link.hub.holes(4);
        // Forget holes that were filled, so the map stays as small as the gaps.
        self.asked.retain(|key, _| {
            holes
                .iter()
                .any(|(id, r)| (id, r.after_seq) == (&key.0, key.1))
        });
        for (id, request) in holes {
            let attempts = self
                .asked
                .entry((id.clone(), request.after_seq))
                .or_insert(0);
            if *attempts < HOLE_ATTEMPTS {
                *attempts += 1;
                self.ask(&id, request);
            }
        }
    }

    fn ask(&mut self, id: &SensorId, request: ReplayRequest) {
        ask_replay(
            &self.client,
            &self.topics,
            &self.link,
            &mut self.complaints,
            id,
            request,
        );
    }
}

/// How often the history is checked for holes to ask for again.
const HOLE_CHECK: Duration = Duration::from_secs(3);
/// How many times one hole is asked for before the gateway gives up on it (the publisher may
/// no longer keep those readings).
const HOLE_ATTEMPTS: u32 = 3;

/// Asks the publisher of `id` to send readings again. A request that cannot be queued (the
/// client's queue of 64 is full, e.g. while the connection is down) is dropped and counted, and
/// logged once per 10 s with the count: the hole check asks again once the link is back.
fn ask_replay(
    client: &Client,
    topics: &Topics,
    link: &Link,
    complaints: &mut Complaints,
    id: &SensorId,
    request: ReplayRequest,
) {
    tracing::debug!(sensor_id = %id, ?request, "asking for missing readings");
    match client.publish(
        topics.replay_request(id),
        QoS::AtLeastOnce,
        false,
        request.to_json(),
    ) {
        Ok(_) => {
            link.metrics.replay_requests.inc();
        }
        Err(e) => {
            link.metrics.replay_requests_unsent.inc();
            complaints.say("replay_unsent", || {
                format!("cannot queue a replay request for {id}: {e}; it is asked for again later")
            });
        }
    }
}

impl Subscriber {
    /// Validates one message and feeds it to the hub; counts and logs what it refuses.
    fn handle(&mut self, topic: &str, payload: &[u8]) {
        if let Some(id) = self.topics.parse_replay(topic) {
            self.on_replay(id, topic, payload);
            return;
        }
        let Some((id, kind)) = self.topics.parse(topic) else {
            self.on_unknown_topic(topic);
            return;
        };
        match kind {
            TopicKind::State => self.on_state(id, topic, payload),
            TopicKind::Sensor => self.on_sensor(id, topic, payload),
            TopicKind::Availability => self.on_availability(id, topic, payload),
        }
    }

    /// A reading its publisher sent again, on the replay topic.
    fn on_replay(&mut self, id: SensorId, topic: &str, payload: &[u8]) {
        self.link.metrics.received("replay");
        match Reading::from_json(payload) {
            Ok(reading) if reading.sensor_id == id => {
                if let Some(held) = self.link.hub.conflicting(&reading) {
                    // The publisher's answer on its replay topic replaces the copy held.
                    conflict(
                        &self.link,
                        &mut self.complaints,
                        &held,
                        &reading,
                        "replaced by the replayed copy",
                    );
                    self.link.sent(self.link.hub.replace_reading(reading));
                    return;
                }
                for reading in judge(&self.link, &mut self.complaints, &mut self.guard, reading) {
                    self.link.sent(self.link.hub.reading(reading));
                }
            }
            Ok(_) => self.link.metrics.invalid("id_mismatch"),
            Err(e) => {
                let reason = reason_of(&e);
                self.link.metrics.invalid(reason);
                self.complaints.say(reason, || {
                    format!("dropping an invalid replayed reading on {topic}: {e}")
                });
            }
        }
    }

    fn on_unknown_topic(&mut self, topic: &str) {
        self.link.metrics.invalid("unknown_topic");
        self.complaints.say("unknown_topic", || {
            // The topic is the sender's: at most its first 120 characters go in the log.
            let shown: String = topic.chars().take(120).collect();
            let cut = if shown.len() < topic.len() { "…" } else { "" };
            format!(
                "ignoring a message on unexpected topic {shown:?}{cut} ({} bytes)",
                topic.len()
            )
        });
    }

    /// A live (or retained) reading on the state topic.
    fn on_state(&mut self, id: SensorId, topic: &str, payload: &[u8]) {
        self.link.metrics.received("state");
        // An empty retained message clears the topic: nothing to show.
        let Some(reading) = self.parsed(&id, topic, payload, "reading", Reading::from_json, |r| {
            &r.sensor_id
        }) else {
            return;
        };
        if let Some(held) = self.link.hub.conflicting(&reading) {
            conflict(
                &self.link,
                &mut self.complaints,
                &held,
                &reading,
                "kept the first copy; asking the publisher to replay it",
            );
            let request = ReplayRequest {
                after_seq: reading.seq.saturating_sub(1),
                until_seq: Some(reading.seq.saturating_add(1)),
            };
            self.ask(&id, request);
            return;
        }
        for reading in judge(&self.link, &mut self.complaints, &mut self.guard, reading) {
            let (sent, gap) = self.link.hub.live_reading(reading);
            self.link.sent(sent);
            self.link
                .metrics
                .sensors
                .set(self.link.hub.sensor_count() as i64);
            if let Some(request) = gap {
                self.ask(&id, request);
            }
        }
    }

    /// The sensor's own health, from its publisher.
    fn on_sensor(&mut self, id: SensorId, topic: &str, payload: &[u8]) {
        self.link.metrics.received("sensor");
        let Some(health) = self.parsed(
            &id,
            topic,
            payload,
            "sensor health",
            SensorHealth::from_json,
            |h| &h.sensor_id,
        ) else {
            return;
        };
        self.link.sent(self.link.hub.health(health));
        self.link
            .metrics
            .sensors
            .set(self.link.hub.sensor_count() as i64);
    }

    /// The payload of a `what` (a reading, a sensor health) on `topic`, parsed, when it is
    /// sensor `id`'s: an empty payload, one that does not parse or one naming another sensor
    /// is counted, logged (throttled) and `None`.
    fn parsed<T>(
        &mut self,
        id: &SensorId,
        topic: &str,
        payload: &[u8],
        what: &str,
        parse: impl FnOnce(&[u8]) -> k3sense_protocol::Result<T>,
        sensor_of: impl Fn(&T) -> &SensorId,
    ) -> Option<T> {
        if payload.is_empty() {
            self.link.metrics.invalid("empty");
            return None;
        }
        match parse(payload) {
            Ok(value) if *sensor_of(&value) == *id => Some(value),
            Ok(value) => {
                self.link.metrics.invalid("id_mismatch");
                self.complaints.say("id_mismatch", || {
                    format!("dropping a {what} of sensor {} sent on {topic}: the id in the payload must match the topic", sensor_of(&value))
                });
                None
            }
            Err(e) => {
                let reason = reason_of(&e);
                self.link.metrics.invalid(reason);
                self.complaints.say(reason, || {
                    format!("dropping an invalid {what} on {topic}: {e}")
                });
                None
            }
        }
    }

    /// `online` / `offline` of the sensor's publisher.
    fn on_availability(&mut self, id: SensorId, topic: &str, payload: &[u8]) {
        self.link.metrics.received("availability");
        match Availability::from_payload(payload) {
            Ok(a) => {
                self.link.sent(self.link.hub.availability(&id, a));
                // A publisher says `online` each time it (re)connects: whatever it kept
                // while away, or sent before this gateway was listening, is asked for now.
                if a == Availability::Online {
                    if let Some(seq) = self.link.hub.newest_seq(&id) {
                        let request = ReplayRequest {
                            after_seq: seq,
                            until_seq: None,
                        };
                        self.ask(&id, request);
                    }
                }
                self.link
                    .metrics
                    .sensors
                    .set(self.link.hub.sensor_count() as i64);
            }
            Err(e) if payload.is_empty() => {
                let _ = e;
                self.link.metrics.invalid("empty");
            }
            Err(e) => {
                self.link.metrics.invalid("bad_availability");
                self.complaints.say("bad_availability", || {
                    format!("dropping availability on {topic}: {e}")
                });
            }
        }
    }
}

/// Applies the reading rules of `crate::guard`: the readings to take, in order (none when
/// refused or held; the refusal is counted and logged).
fn judge(
    link: &Link,
    complaints: &mut Complaints,
    guard: &mut Guard,
    reading: Reading,
) -> Vec<Reading> {
    let newest = link.hub.newest(&reading.sensor_id);
    let (id, seq, read_at) = (reading.sensor_id.clone(), reading.seq, reading.read_at);
    match guard.check(reading, newest, Utc::now()) {
        Verdict::Accept(readings) => readings,
        Verdict::Future => {
            link.metrics.invalid("future");
            complaints.say("future", || {
                format!("dropping a reading of {id} (seq {seq}) stamped {read_at}, further in the future than --max-clock-skew allows")
            });
            Vec::new()
        }
        Verdict::Unconfirmed => {
            link.metrics.invalid("unconfirmed_jump");
            complaints.say("unconfirmed_jump", || {
                format!("holding a reading of {id}: seq {seq} jumps more than {} above the newest held ({:?}); it is shown once the next reading continues from it", crate::guard::MAX_SEQ_JUMP, newest.map(|n| n.0))
            });
            Vec::new()
        }
    }
}

/// Counts and logs a conflicting duplicate.
fn conflict(
    link: &Link,
    complaints: &mut Complaints,
    held: &Reading,
    other: &Reading,
    outcome: &str,
) {
    link.metrics.invalid("conflict");
    complaints.say("conflict", || {
        format!(
            "two different readings of {} with seq {} and read_at {}: held {} °C / {} %, got {} °C / {} %; {outcome}",
            held.sensor_id,
            held.seq,
            k3sense_protocol::format_read_at(&held.read_at),
            held.temperature_c,
            held.humidity_pct,
            other.temperature_c,
            other.humidity_pct
        )
    });
}

fn reason_of(e: &k3sense_protocol::Error) -> &'static str {
    use k3sense_protocol::Error as E;
    match e {
        E::TooLarge { .. } => "too_large",
        E::MissingField(_) => "missing_field",
        E::NotFinite { .. } | E::OutOfRange { .. } => "out_of_range",
        E::BadSensorId(_) => "bad_sensor_id",
        E::UnknownModel(_) => "unknown_model",
        E::BadTimestamp(_) => "bad_timestamp",
        E::SeqTooLarge(_) => "seq_too_large",
        _ => "malformed",
    }
}

/// Logs each kind of complaint at most once per interval (the shared [`LogThrottle`]), with how
/// many were suppressed, so a misbehaving client cannot flood the log.
#[derive(Default)]
struct Complaints(LogThrottle);

impl Complaints {
    fn say(&self, kind: &'static str, message: impl FnOnce() -> String) {
        match self.0.allow(kind) {
            Some(0) => tracing::warn!("{}", message()),
            Some(suppressed) => tracing::warn!(suppressed, "{}", message()),
            None => {}
        }
    }
}
