//! The publisher's MQTT connection: one task owns the client, its event loop and the
//! [`Outbox`], so ordering and acknowledgements are tracked in one place.
//!
//! On every connect it announces the sensor to Home Assistant (when discovery is on: the
//! retained configs of `discovery.rs`, and a subscription to Home Assistant's status topic, so
//! a restarted Home Assistant gets them again), publishes `online` (retained) and then every
//! unacknowledged reading in order (and the sensor's health, retained, once known); the broker announces `offline` (the last will) if the
//! connection dies; on shutdown it publishes `offline` itself and disconnects cleanly. It keeps
//! the connection, buffer and reading metrics up to date.
//!
//! rumqttc's event loop runs in a task of its own ([`k3sense_protocol::pump`]) and hands every
//! event over a channel: `EventLoop::poll` must not be dropped half-way, and in a `select!`
//! beside the readings it would be, whenever a reading arrived while it was connecting. That
//! dropped the half-open connection, which the broker took for a crash: it published the last
//! will (`offline`, retained) just after the next connection had said `online`.
//!
//! It also makes the publisher the source of truth for gateways:
//! - `seq` continues across publisher restarts: before its first reading goes out, the link
//!   reads its own retained state (waiting at most [`SEQ_WAIT`] after connecting) and numbers on
//!   from there.
//! - After a broker restart (which loses retained messages) it publishes its newest reading
//!   again, retained, so a new subscriber still gets the latest value at once.
//! - It answers replay requests (`<prefix>/<id>/replay/request`) from its [`Recent`] readings on
//!   `<prefix>/<id>/replay`.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use k3sense_protocol::{
    Availability, HealthStatus, MqttConfig, MqttEvents, Reading, ReplayRequest, SensorHealth,
    SensorId, Topics,
};
use rumqttc::Publish;
use rumqttc::{AsyncClient, Event, LastWill, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Result, discovery, discovery::Announcement, metrics::Metrics, outbox::Outbox, recent::Recent,
};

/// What the reader hands to the link.
#[derive(Debug)]
pub enum Update {
    /// A fresh reading to publish.
    Reading(Reading),
    /// The sensor became readable (`Online`) or unreadable (`Offline`).
    Sensor(Availability),
    /// The sensor's own health changed (`<prefix>/<id>/sensor`).
    Health(SensorHealth),
}

/// How many readings may be handed to rumqttc before their PUBACKs arrive.
const WINDOW: usize = 32;

/// See where the event loop is set up.
const CONNECT_TIMEOUT_SECS: u64 = 2;
/// How long a clean shutdown waits for the broker to take `offline` and the disconnect.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for buffered readings to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after the first connect the link waits for its own retained reading, to continue
/// its `seq`, before numbering from 1.
pub const SEQ_WAIT: Duration = Duration::from_secs(1);

/// What a PUBLISH we queued was, so its PUBACK can be matched.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    Reading(u64),
    Other,
}

/// What the link is told once, at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker and topic prefix.
    pub mqtt: MqttConfig,
    /// The sensor's id in topics.
    pub id: SensorId,
    /// Readings kept while the broker is away.
    pub buffer: usize,
    /// Recent readings kept to answer replay requests.
    pub replay_buffer: usize,
    /// What to announce to Home Assistant; `None` when discovery is off.
    pub discovery: Option<Announcement>,
}

struct Link {
    client: AsyncClient,
    discovery: Option<Announcement>,
    metrics: Metrics,
    topics: Topics,
    id: SensorId,
    outbox: Outbox,
    /// Queued publishes in the order rumqttc will send them, until it assigns a packet id.
    queued: VecDeque<Sent>,
    /// Packet id → what it carried, until acknowledged.
    by_pkid: HashMap<u16, Sent>,
    connected: bool,
    sensor: Availability,
    /// The sensor's health, published retained on every change and every connect.
    health: Option<SensorHealth>,
    /// Readings kept for replays.
    recent: Recent,
    /// Readings waiting to go out on the replay topic.
    replays: VecDeque<Reading>,
    /// Added to the reader's `seq`; `None` until the retained state told where to continue.
    seq_offset: Option<u64>,
    /// Readings that arrived before `seq_offset` was known.
    early: VecDeque<Reading>,
    /// When to stop waiting for the retained state.
    seq_deadline: Option<tokio::time::Instant>,
    /// Our own `online` came back on the availability topic since the last connect: an
    /// `offline` after it is someone else's.
    own_online_seen: bool,
    /// Replay answers coalesced and paced (`crate::replaypace`).
    pace: crate::replaypace::ReplayPace,
    /// When the pace lets the next replayed reading go.
    replay_wake: Option<tokio::time::Instant>,
}

/// Runs until `shutdown`, publishing what arrives on `updates`; `sensor` is the sensor's
/// availability until an update says otherwise.
pub async fn run(
    settings: Settings,
    sensor: Availability,
    metrics: Metrics,
    mut updates: mpsc::Receiver<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
    let Settings {
        mqtt,
        id,
        buffer,
        replay_buffer,
        discovery,
    } = settings;
    let topics = mqtt.topics()?;
    let mut options = mqtt.mqtt_options(&format!("k3sense-publisher-{id}"))?;
    options.set_clean_session(true);
    options.set_last_will(LastWill::new(
        topics.availability(&id),
        Availability::Offline.as_str(),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
    // Each message is small and wanted now: no Nagle delay behind an unacknowledged one.
    events.network_options.set_tcp_nodelay(true);
    // A connect that got no CONNACK within this many seconds is given up and tried again: a
    // broker that answers answers in milliseconds, and after a silent network cut the attempt
    // started during the cut must not hold the reconnection back for rumqttc's default 5 s.
    events
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT_SECS);
    metrics
        .buffer_capacity
        .set(i64::try_from(buffer).unwrap_or(i64::MAX));
    metrics
        .sensor_available
        .set(i64::from(sensor == Availability::Online));
    let mut link = Link {
        client,
        discovery,
        metrics,
        topics,
        id,
        outbox: Outbox::new(buffer),
        queued: VecDeque::new(),
        by_pkid: HashMap::new(),
        connected: false,
        sensor,
        health: None,
        recent: Recent::new(replay_buffer),
        replays: VecDeque::new(),
        seq_offset: None,
        early: VecDeque::new(),
        seq_deadline: None,
        own_online_seen: false,
        pace: crate::replaypace::ReplayPace::new(std::time::Instant::now()),
        replay_wake: None,
    };
    tracing::info!(broker = %mqtt.broker, sensor_id = %link.id, "connecting to the MQTT broker");
    let (mut events, pump) = k3sense_protocol::pump(events, WINDOW);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = until(link.seq_deadline) => link.resolve_seq(0),
            () = until(link.replay_wake) => {
                link.replay_wake = None;
                link.pump();
            }
            update = updates.recv() => match update {
                Some(Update::Reading(reading)) => link.push(reading),
                Some(Update::Sensor(a)) => link.sensor_changed(a),
                Some(Update::Health(h)) => link.health_changed(h),
                None => break,
            },
            event = events.recv() => match event {
                Some(Ok(event)) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        tracing::info!(broker = %mqtt.broker, backlog = link.outbox.len(), "connected to the MQTT broker");
                    }
                    link.handle(event);
                }
                Some(Err(e)) => {
                    if link.connected {
                        tracing::warn!(error = %e, "lost the MQTT broker; keeping readings until it is back");
                    }
                    link.disconnected();
                    tracing::debug!(error = %e, "MQTT connect failed; retrying with backoff");
                }
                None => break,
            }
        }
    }
    link.goodbye(&mut events).await;
    pump.abort();
    Ok(())
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Link {
    fn push(&mut self, mut reading: Reading) {
        let Some(offset) = self.seq_offset else {
            // Numbering is not settled yet: hold it (bounded like the outbox).
            if self.early.len() >= self.outbox.capacity() {
                self.early.pop_front();
                self.metrics.dropped_readings.inc();
            }
            self.early.push_back(reading);
            self.count_buffered();
            return;
        };
        // Saturating: `seq` never wraps (the protocol refuses anything above MAX_SEQ).
        reading.seq = reading.seq.saturating_add(offset);
        self.recent.push(reading.clone());
        self.metrics.observe(&reading);
        if let Some(lost) = self.outbox.push(reading) {
            self.metrics.dropped_readings.inc();
            tracing::warn!(
                seq = lost.seq,
                "buffer full: dropped the oldest unsent reading; raise --buffer to keep more"
            );
        }
        self.pump();
        self.count_buffered();
    }

    /// Settles the numbering: `last_seq` is the newest `seq` this sensor published before
    /// (0 if none is known); held readings go out numbered after it.
    fn resolve_seq(&mut self, last_seq: u64) {
        if self.seq_offset.is_some() {
            return;
        }
        self.seq_offset = Some(last_seq);
        self.seq_deadline = None;
        if last_seq > 0 {
            tracing::info!(last_seq, "continuing seq after the retained reading");
        }
        let _ = self.client.try_unsubscribe(self.topics.state(&self.id));
        for reading in std::mem::take(&mut self.early) {
            self.push(reading);
        }
    }

    /// Where to continue `seq` from a retained reading: its `seq` if a real publisher could
    /// have written it, else 0 (see `crate::seqguard`).
    fn trusted_seq(&self, retained: &Reading) -> u64 {
        match crate::seqguard::continue_from(retained, chrono::Utc::now()) {
            Ok(seq) => seq,
            Err(why) => {
                self.metrics.anomaly("retained_seq_refused");
                tracing::warn!(
                    seq = retained.seq,
                    read_at = %k3sense_protocol::format_read_at(&retained.read_at),
                    ?why,
                    "not continuing seq from the retained reading: no real publisher could have written it; numbering from 1"
                );
                0
            }
        }
    }

    /// Our availability topic carried `payload`. Another client saying `offline` for us while
    /// we are connected and the sensor is readable would leave us shown offline until we
    /// reconnect: say `online` again at once (retained) and count it. The broker's retained
    /// copy, which arrives before our own `online` after each connect, is older than it and
    /// ignored.
    fn availability_seen(&mut self, payload: &[u8]) {
        let Ok(seen) = Availability::from_payload(payload) else {
            return;
        };
        if seen == Availability::Online {
            self.own_online_seen = true;
            return;
        }
        if self.connected && self.own_online_seen && self.sensor == Availability::Online {
            self.metrics.anomaly("foreign_offline");
            tracing::warn!(
                "another client published offline for this sensor; saying online again (give each publisher node its own account)"
            );
            self.publish_availability(Availability::Online);
        }
    }

    /// A gateway asks for readings again.
    fn replay(&mut self, payload: &[u8]) {
        let request = match ReplayRequest::from_json(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed replay request");
                return;
            }
        };
        self.metrics.replay_requests.inc();
        let capacity = self.recent.kept();
        let wanted: Vec<Reading> = self.recent.wanted(&request).cloned().collect();
        tracing::debug!(?request, readings = wanted.len(), "replaying");
        let now = std::time::Instant::now();
        for reading in wanted {
            if self.replays.len() >= capacity.max(1) {
                break;
            }
            if self.pace.admit(reading.seq, now) {
                self.replays.push_back(reading);
            } else {
                self.metrics.replays_coalesced.inc();
            }
        }
        self.pump();
    }

    fn count_buffered(&self) {
        // Readings held until the numbering is settled are buffered too.
        let depth = i64::try_from(self.outbox.len() + self.early.len()).unwrap_or(i64::MAX);
        self.metrics.buffered_readings.set(depth);
    }

    fn sensor_changed(&mut self, availability: Availability) {
        self.sensor = availability;
        self.metrics
            .sensor_available
            .set(i64::from(availability == Availability::Online));
        if self.connected {
            self.publish_availability(availability);
        }
    }

    fn health_changed(&mut self, health: SensorHealth) {
        self.metrics
            .sensor_answering
            .set(i64::from(health.status == HealthStatus::Ok));
        self.health = Some(health);
        if self.connected {
            self.publish_health();
        }
    }

    /// Publishes the sensor's health, retained (after a reconnect too: a restarted broker
    /// lost it).
    fn publish_health(&mut self) {
        let Some(health) = &self.health else {
            return;
        };
        let topic = self.topics.sensor(&self.id);
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, health.to_json())
            .is_ok()
        {
            self.queued.push_back(Sent::Other);
        }
    }

    fn publish_availability(&mut self, availability: Availability) {
        let topic = self.topics.availability(&self.id);
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, availability.as_str())
            .is_ok()
        {
            self.queued.push_back(Sent::Other);
        }
    }

    /// Publishes the Home Assistant discovery configs (retained), if discovery is on.
    fn announce(&mut self) {
        let Some(announcement) = &self.discovery else {
            return;
        };
        let mut published = 0;
        for message in &announcement.messages {
            match self.client.try_publish(
                message.topic.clone(),
                QoS::AtLeastOnce,
                true,
                message.payload.clone(),
            ) {
                Ok(()) => {
                    self.queued.push_back(Sent::Other);
                    published += 1;
                }
                Err(e) => {
                    tracing::warn!(topic = %message.topic, error = %e, "could not queue a Home Assistant discovery message");
                }
            }
        }
        if published == announcement.messages.len() {
            self.metrics.ha_announcements.inc();
            tracing::debug!(
                status_topic = %announcement.status_topic,
                "announced the sensor to Home Assistant"
            );
        }
    }

    /// Subscribes to Home Assistant's status topic, to announce again when it restarts.
    fn watch_home_assistant(&mut self) {
        let Some(announcement) = &self.discovery else {
            return;
        };
        if let Err(e) = self
            .client
            .try_subscribe(announcement.status_topic.clone(), QoS::AtLeastOnce)
        {
            tracing::warn!(error = %e, "could not subscribe to Home Assistant's status topic");
        }
    }

    /// A message arrived: Home Assistant saying `online` gets a new announcement. A retained
    /// `online` arrives right after our own announcement on connect and is skipped.
    fn received(&mut self, publish: &Publish) {
        if publish.topic == self.topics.replay_request(&self.id) {
            self.replay(&publish.payload);
            return;
        }
        if self.seq_offset.is_none() && publish.topic == self.topics.state(&self.id) {
            let last = Reading::from_json(&publish.payload)
                .ok()
                .filter(|r| r.sensor_id == self.id)
                .map_or(0, |r| self.trusted_seq(&r));
            self.resolve_seq(last);
            return;
        }
        if publish.topic == self.topics.availability(&self.id) {
            self.availability_seen(&publish.payload);
            return;
        }
        let Some(announcement) = &self.discovery else {
            return;
        };
        if publish.topic == announcement.status_topic
            && !publish.retain
            && discovery::is_online(&publish.payload)
        {
            tracing::info!("Home Assistant came online; announcing the sensor again");
            self.announce();
        }
    }

    /// Hands unsent readings to rumqttc, at most [`WINDOW`] unacknowledged at a time.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while self.outbox.in_flight() < WINDOW {
            let Some(reading) = self.outbox.next_unsent() else {
                break;
            };
            let seq = reading.seq;
            let payload = match reading.to_json() {
                Ok(p) => p,
                Err(e) => {
                    // Readings are validated when built; this cannot happen, but never send it.
                    tracing::error!(seq, error = %e, "refusing to publish an invalid reading");
                    self.outbox.acked(seq);
                    continue;
                }
            };
            let topic = self.topics.state(&self.id);
            match self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload)
            {
                Ok(()) => self.queued.push_back(Sent::Reading(seq)),
                Err(_) => {
                    self.outbox.unsend(seq);
                    break;
                }
            }
        }
        while let Some(reading) = self.replays.front() {
            if let Err(at) = self.pace.take(std::time::Instant::now()) {
                self.replay_wake = Some(tokio::time::Instant::from_std(at));
                break;
            }
            let Ok(payload) = reading.to_json() else {
                self.replays.pop_front();
                continue;
            };
            let topic = self.topics.replay(&self.id);
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                break;
            }
            self.replays.pop_front();
            self.queued.push_back(Sent::Other);
            self.metrics.replayed_readings.inc();
        }
    }

    /// After a broker restart its retained messages are gone: publish the newest reading again
    /// (same `seq`, same `read_at`) unless newer ones are about to go out anyway.
    fn restore_retained(&mut self) {
        if !self.outbox.is_empty() {
            return;
        }
        let Some(latest) = self.recent.latest() else {
            return;
        };
        let Ok(payload) = latest.to_json() else {
            return;
        };
        if self
            .client
            .try_publish(self.topics.state(&self.id), QoS::AtLeastOnce, true, payload)
            .is_ok()
        {
            self.queued.push_back(Sent::Other);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.connected = true;
                self.metrics.broker_connected.set(1);
                self.metrics.broker_connects.inc();
                self.queued.clear();
                self.by_pkid.clear();
                self.outbox.resend_all();
                // Subscribe first: once our announcement is seen, Home Assistant's next
                // `online` reaches us.
                self.watch_home_assistant();
                self.announce();
                // Subscribe before saying `online`: gateways answer `online` with a replay
                // request, which must find the subscription in place.
                if let Err(e) = self
                    .client
                    .try_subscribe(self.topics.replay_request(&self.id), QoS::AtLeastOnce)
                {
                    tracing::warn!(error = %e, "cannot subscribe to replay requests");
                }
                // Our own availability, to answer a foreign `offline` (issue 14, row 6).
                self.own_online_seen = false;
                let _ = self
                    .client
                    .try_subscribe(self.topics.availability(&self.id), QoS::AtLeastOnce);
                self.publish_availability(self.sensor);
                self.publish_health();
                if self.seq_offset.is_none() {
                    // Our own retained reading, if the broker has one, says where seq goes on.
                    let _ = self
                        .client
                        .try_subscribe(self.topics.state(&self.id), QoS::AtLeastOnce);
                    self.seq_deadline = Some(tokio::time::Instant::now() + SEQ_WAIT);
                }
                self.restore_retained();
                self.pump();
            }
            Event::Incoming(Packet::Publish(publish)) => self.received(&publish),
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(sent) = self.queued.pop_front() {
                    self.by_pkid.insert(pkid, sent);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Sent::Reading(seq)) = self.by_pkid.remove(&ack.pkid) {
                    self.outbox.acked(seq);
                    self.metrics.acknowledged_readings.inc();
                    tracing::debug!(seq, "reading acknowledged");
                }
                self.pump();
                self.count_buffered();
            }
            _ => {}
        }
    }

    fn disconnected(&mut self) {
        self.connected = false;
        self.metrics.broker_connected.set(0);
        self.queued.clear();
        self.by_pkid.clear();
        self.outbox.resend_all();
    }

    /// Publishes `offline` and disconnects, so the broker does not fire the will and
    /// subscribers see a deliberate stop.
    async fn goodbye(&mut self, events: &mut MqttEvents) {
        if self.connected && !self.outbox.is_empty() {
            // Hand over what is still buffered before saying goodbye, within a bound: a stop
            // (a rollout, Ctrl-C) must not lose readings the broker could still take.
            let flushed = tokio::time::timeout(FLUSH_TIMEOUT, async {
                while self.connected && !self.outbox.is_empty() {
                    match events.recv().await {
                        Some(Ok(event)) => self.handle(event),
                        Some(Err(_)) | None => self.disconnected(),
                    }
                }
            })
            .await;
            if flushed.is_err() {
                tracing::warn!(
                    backlog = self.outbox.len(),
                    "stopping before the broker took every buffered reading"
                );
            }
        }
        self.metrics.broker_connected.set(0);
        if !self.connected {
            return;
        }
        let topic = self.topics.availability(&self.id);
        let offline = self.client.try_publish(
            topic,
            QoS::AtLeastOnce,
            true,
            Availability::Offline.as_str(),
        );
        if offline.is_err() {
            let _ = self.client.try_disconnect();
            return;
        }
        // DISCONNECT only once the broker acknowledged `offline`, so it is known to be there
        // before the connection closes: closing while the broker still sends (an
        // acknowledgement) can make the kernel answer with a reset, which may discard what the
        // broker received but had not read yet.
        let done = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            let mut offline_pkid = None;
            loop {
                match events.recv().await {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid))))
                        if offline_pkid.is_none() =>
                    {
                        offline_pkid = Some(pkid);
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack))))
                        if Some(ack.pkid) == offline_pkid =>
                    {
                        let _ = self.client.try_disconnect();
                    }
                    Some(Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        if done.is_err() {
            tracing::warn!(
                "the broker did not take the goodbye in time; it will announce offline by the last will"
            );
        } else {
            tracing::info!(
                backlog = self.outbox.len(),
                "published offline and disconnected"
            );
        }
    }
}
