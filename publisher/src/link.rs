//! The publisher's MQTT link: one task that routes between the reader's [`Update`]s, the
//! broker's events and the small pure parts that decide what goes out:
//!
//! | part | module | keeps / decides |
//! |---|---|---|
//! | [`Numbering`] | `numbering` | `seq`: continues from the retained reading, numbers each measurement |
//! | [`Outbox`] | `outbox` | readings until the broker acknowledged them, re-sent in order after a reconnect |
//! | [`Replayer`] | `replay` | recent readings; answers replay requests, coalesced and paced |
//! | [`Presence`] | `presence` | the sensor's availability and health; answers a foreign `offline` |
//! | [`Announcement`] | `discovery` | the Home Assistant discovery configs and when to send them again |
//! | [`Connection`] | `connection` | the MQTT client, whether it is connected, what each publish carried |
//!
//! Every message is QoS 1; `offline` (retained) is the last will. On every connect it runs
//! [`Link::greet`]; on shutdown [`Link::goodbye`] hands over what is buffered, says `offline`
//! and disconnects, so the stop is deliberate and the broker does not fire the will.

use std::time::Duration;

use k3sense_protocol::{
    Availability, HealthStatus, MqttConfig, ReplayRequest, SensorHealth, SensorId, Topics,
    mqtt::{ClientEvent, Events, Goodbye, Message},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    connection::{Connection, Happened, WINDOW},
    discovery::Announcement,
    error::Result,
    metrics::Metrics,
    numbering::{Measured, Numbered, Numbering, resume_point},
    outbox::{Outbox, Sent},
    presence::Presence,
    replay::{Due, Replayer},
};

/// What the reader hands to the link.
#[derive(Debug)]
pub enum Update {
    /// A confirmed measurement to number and publish.
    Measured(Measured),
    /// The sensor became readable (`Online`) or unreadable (`Offline`).
    Sensor(Availability),
    /// The sensor's own health changed (`<prefix>/<id>/sensor`).
    Health(SensorHealth),
}

/// How long a clean shutdown waits for the broker to take `offline` and the disconnect.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for buffered readings to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after the first connect the link waits for its own retained reading, to continue
/// its `seq`, before numbering from 1.
pub const SEQ_WAIT: Duration = Duration::from_secs(1);

/// What the link is told once, at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker and topic prefix.
    pub mqtt: MqttConfig,
    /// The sensor's id in topics.
    pub id: SensorId,
    /// The sensor's model, named in its readings.
    pub model: k3sense_protocol::Model,
    /// Readings kept while the broker is away.
    pub buffer: usize,
    /// Recent readings kept to answer replay requests.
    pub replay_buffer: usize,
    /// What to announce to Home Assistant; `None` when discovery is off.
    pub discovery: Option<Announcement>,
}

/// The sensor's own topics, built once.
#[derive(Debug)]
struct OwnTopics {
    state: String,
    availability: String,
    health: String,
    replay: String,
    replay_request: String,
}

impl OwnTopics {
    fn new(topics: &Topics, id: &SensorId) -> Self {
        Self {
            state: topics.state(id),
            availability: topics.availability(id),
            health: topics.sensor(id),
            replay: topics.replay(id),
            replay_request: topics.replay_request(id),
        }
    }
}

/// When the link has something to do without an event.
#[derive(Debug, Default)]
struct Wakeups {
    /// Stop waiting for the retained reading and number from 1.
    seq: Option<Instant>,
    /// The pace lets the next replayed reading go.
    replay: Option<Instant>,
}

struct Link {
    connection: Connection,
    topics: OwnTopics,
    metrics: Metrics,
    numbering: Numbering,
    outbox: Outbox,
    replays: Replayer,
    presence: Presence,
    discovery: Option<Announcement>,
    wake: Wakeups,
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
    let (mut link, mut events) = Link::start(settings, sensor, metrics)?;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = until(link.wake.seq) => link.settle_seq(0),
            () = until(link.wake.replay) => {
                link.wake.replay = None;
                link.pump();
            }
            update = updates.recv() => match update {
                Some(update) => link.update(update),
                None => break,
            },
            event = events.recv() => match event {
                Some(event) => link.event(event),
                None => break,
            },
        }
    }
    link.goodbye(&mut events).await;
    Ok(())
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Link {
    fn start(settings: Settings, sensor: Availability, metrics: Metrics) -> Result<(Self, Events)> {
        let topics = settings.mqtt.topics()?;
        let own = OwnTopics::new(&topics, &settings.id);
        // Subscribed again on every connection, before `greet` publishes anything: see there.
        let subscriptions: Vec<String> = settings
            .discovery
            .as_ref()
            .map(|a| a.status_topic.clone())
            .into_iter()
            .chain([
                own.replay_request.clone(),
                own.availability.clone(),
                own.state.clone(),
            ])
            .collect();
        let (connection, events) =
            Connection::open(&settings.mqtt, &settings.id, &topics, &subscriptions)?;
        metrics
            .buffer_capacity
            .set(i64::try_from(settings.buffer).unwrap_or(i64::MAX));
        metrics
            .sensor_available
            .set(i64::from(sensor == Availability::Online));
        tracing::info!(broker = %settings.mqtt.broker, sensor_id = %settings.id, "connecting to the MQTT broker");
        let link = Self {
            connection,
            topics: own,
            metrics,
            numbering: Numbering::new(settings.id, settings.model, settings.buffer),
            outbox: Outbox::new(settings.buffer),
            replays: Replayer::new(settings.replay_buffer, std::time::Instant::now()),
            presence: Presence::new(sensor),
            discovery: settings.discovery,
            wake: Wakeups::default(),
        };
        Ok((link, events))
    }

    fn update(&mut self, update: Update) {
        match update {
            Update::Measured(measured) => {
                let numbered = self.numbering.number(measured);
                self.take(numbered);
            }
            Update::Sensor(availability) => {
                self.presence.set_sensor(availability);
                self.metrics
                    .sensor_available
                    .set(i64::from(availability == Availability::Online));
                if self.connection.is_connected() {
                    self.publish_availability(availability);
                }
            }
            Update::Health(health) => {
                self.metrics
                    .sensor_answering
                    .set(i64::from(health.status == HealthStatus::Ok));
                self.presence.set_health(health);
                if self.connection.is_connected() {
                    self.publish_health();
                }
            }
        }
    }

    fn event(&mut self, event: ClientEvent) {
        match self.connection.happened(event) {
            Happened::Connected => {
                tracing::info!(
                    broker = self.connection.broker(),
                    backlog = self.outbox.len(),
                    "connected to the MQTT broker"
                );
                self.greet();
            }
            Happened::Message(publish) => self.received(&publish),
            Happened::Acked(sent) => {
                if let Some(Sent::Reading(seq)) = sent {
                    self.outbox.acked(seq);
                    self.metrics.acknowledged_readings.inc();
                    tracing::debug!(seq, "reading acknowledged");
                }
                self.pump();
                self.count_buffered();
            }
            Happened::Lost {
                was_connected,
                error,
            } => {
                if was_connected {
                    tracing::warn!(%error, "lost the MQTT broker; keeping readings until it is back");
                }
                tracing::debug!(%error, "MQTT connect failed; retrying with backoff");
                self.disconnected();
            }
            Happened::Nothing => {}
        }
    }

    /// What every new connection needs, in this order (each step relies on those before it).
    /// The client has already subscribed again to Home Assistant's status topic, to replay
    /// requests, to our own availability and, until `seq` is settled, to our own state:
    /// before anything below is published.
    ///
    /// 1. Every unacknowledged reading goes again: the old connection's acknowledgements are
    ///    void.
    /// 2. Announce to Home Assistant: subscribed first, so once the announcement is seen, Home
    ///    Assistant's next `online` reaches us.
    /// 3. Say the sensor's availability and health, retained. Subscribed first to replay
    ///    requests (gateways answer `online` with one) and to our own availability (to answer
    ///    a foreign `offline`; what arrives first is the broker's old retained copy).
    /// 4. Until `seq` is settled, wait at most [`SEQ_WAIT`] for our own retained reading, which
    ///    says where `seq` continues.
    /// 5. A restarted broker lost its retained messages: publish the newest reading again (same
    ///    `seq`, same `read_at`), unless newer ones are about to go out anyway.
    /// 6. Send the buffered readings.
    fn greet(&mut self) {
        self.metrics.broker_connected.set(1);
        self.metrics.broker_connects.inc();
        self.outbox.resend_all();
        self.announce();
        self.presence.reconnected();
        self.publish_availability(self.presence.sensor());
        self.publish_health();
        if !self.numbering.is_settled() {
            self.wake.seq = Some(Instant::now() + SEQ_WAIT);
        }
        self.restore_retained();
        self.pump();
    }

    fn disconnected(&mut self) {
        self.metrics.broker_connected.set(0);
        self.outbox.resend_all();
    }

    /// A message arrived on one of our subscriptions.
    fn received(&mut self, publish: &Message) {
        let topic = publish.topic.as_str();
        if topic == self.topics.replay_request {
            self.replay(&publish.payload);
        } else if topic == self.topics.state && !self.numbering.is_settled() {
            let last = self.resume_point(&publish.payload);
            self.settle_seq(last);
        } else if topic == self.topics.availability {
            let foreign = self.presence.seen(&publish.payload);
            if foreign && self.connection.is_connected() {
                self.metrics.anomaly("foreign_offline");
                tracing::warn!(
                    "another client published offline for this sensor; saying online again (give each publisher node its own account)"
                );
                self.publish_availability(Availability::Online);
            }
        } else if self
            .discovery
            .as_ref()
            .is_some_and(|a| a.asked_again(topic, publish.retain, &publish.payload))
        {
            tracing::info!("Home Assistant came online; announcing the sensor again");
            self.announce();
        }
    }

    /// Where `seq` continues after the retained `payload`; a reading no real publisher could
    /// have written is logged and counted, and numbering starts from 1.
    fn resume_point(&self, payload: &[u8]) -> u64 {
        let id = self.numbering.id();
        match resume_point(payload, id, chrono::Utc::now()) {
            Ok(last) => last,
            Err((retained, why)) => {
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

    /// Settles the numbering after `last_seq` (0: from 1); held measurements go out.
    fn settle_seq(&mut self, last_seq: u64) {
        if self.numbering.is_settled() {
            return;
        }
        self.wake.seq = None;
        if last_seq > 0 {
            tracing::info!(last_seq, "continuing seq after the retained reading");
        }
        self.connection.unsubscribe(&self.topics.state);
        for numbered in self.numbering.settle(last_seq) {
            self.take(numbered);
        }
        self.count_buffered();
    }

    /// What the numbering made of a measurement: a reading goes into the outbox.
    fn take(&mut self, numbered: Numbered) {
        match numbered {
            Numbered::Reading(reading) => {
                self.replays.remember(reading.clone());
                self.metrics.observe(&reading);
                if let Some(lost) = self.outbox.push(reading) {
                    self.metrics.dropped_readings.inc();
                    tracing::warn!(
                        seq = lost.seq,
                        "buffer full: dropped the oldest unsent reading; raise --buffer to keep more"
                    );
                }
                self.pump();
            }
            Numbered::Held { dropped } => {
                if dropped {
                    self.metrics.dropped_readings.inc();
                }
            }
            Numbered::Refused(e) => tracing::warn!(error = %e, "discarding an invalid reading"),
        }
        self.count_buffered();
    }

    fn count_buffered(&self) {
        // Measurements held until the numbering is settled are buffered too.
        let depth = self.outbox.len() + self.numbering.held();
        self.metrics
            .buffered_readings
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
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
        let asked = self.replays.ask(&request, std::time::Instant::now());
        self.metrics.replays_coalesced.inc_by(asked.coalesced);
        tracing::debug!(?request, readings = asked.queued, "replaying");
        self.pump();
    }

    /// Hands what may go now to the connection: unsent readings, at most [`WINDOW`]
    /// unacknowledged at a time, then replayed readings as their pace allows.
    fn pump(&mut self) {
        if !self.connection.is_connected() {
            return;
        }
        while self.outbox.in_flight() < WINDOW {
            let Some(reading) = self.outbox.next_unsent() else {
                break;
            };
            let seq = reading.seq;
            let Ok(payload) = reading.to_json() else {
                // Numbered readings validate; one that does not is never sent.
                self.outbox.acked(seq);
                continue;
            };
            let topic = self.topics.state.clone();
            if !self
                .connection
                .publish(topic, payload, true, Sent::Reading(seq))
            {
                self.outbox.unsend(seq);
                break;
            }
        }
        self.send_replays();
    }

    fn send_replays(&mut self) {
        loop {
            let payload = match self.replays.due(std::time::Instant::now()) {
                Due::Idle => return,
                Due::At(at) => {
                    self.wake.replay = Some(Instant::from_std(at));
                    return;
                }
                Due::Now(reading) => reading.to_json(),
            };
            let Ok(payload) = payload else {
                self.replays.sent();
                continue;
            };
            let topic = self.topics.replay.clone();
            if !self.connection.publish(topic, payload, false, Sent::Other) {
                return;
            }
            self.replays.sent();
            self.metrics.replayed_readings.inc();
        }
    }

    /// See [`Link::greet`], step 5.
    fn restore_retained(&mut self) {
        if !self.outbox.is_empty() {
            return;
        }
        let Some(Ok(payload)) = self.replays.latest().map(|r| r.to_json()) else {
            return;
        };
        let topic = self.topics.state.clone();
        self.connection.publish(topic, payload, true, Sent::Other);
    }

    fn publish_availability(&mut self, availability: Availability) {
        let topic = self.topics.availability.clone();
        self.connection
            .publish(topic, availability.as_str(), true, Sent::Other);
    }

    /// The sensor's health, retained, once known.
    fn publish_health(&mut self) {
        let Some(payload) = self.presence.health().map(SensorHealth::to_json) else {
            return;
        };
        let topic = self.topics.health.clone();
        self.connection.publish(topic, payload, true, Sent::Other);
    }

    /// Publishes the Home Assistant discovery configs (retained), if discovery is on.
    fn announce(&mut self) {
        let Some(announcement) = &self.discovery else {
            return;
        };
        let mut published = 0;
        for message in &announcement.messages {
            if self.connection.publish(
                message.topic.clone(),
                message.payload.clone(),
                true,
                Sent::Other,
            ) {
                published += 1;
            } else {
                tracing::warn!(topic = %message.topic, "could not queue a Home Assistant discovery message");
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

    /// Hands the broker what is still buffered, says `offline` and disconnects, so the broker
    /// does not fire the will and subscribers see a deliberate stop.
    async fn goodbye(&mut self, events: &mut Events) {
        self.flush(events).await;
        self.metrics.broker_connected.set(0);
        let was_connected = self.connection.is_connected();
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        let offline = was_connected && self.say_offline(events, deadline).await;
        let left = deadline.saturating_duration_since(Instant::now());
        let goodbye = self.connection.goodbye(left).await;
        if offline && goodbye == Goodbye::Clean {
            tracing::info!(
                backlog = self.outbox.len(),
                "published offline and disconnected"
            );
        } else if was_connected {
            tracing::warn!(
                "the broker did not take the goodbye in time; it will announce offline by the last will"
            );
        }
    }

    /// Publishes `offline` and waits until `deadline` for the broker to acknowledge it: the
    /// DISCONNECT goes only after that, so `offline` is known to be there before the connection
    /// closes (closing while the broker still sends, an acknowledgement, can make the kernel
    /// answer with a reset, which may discard what the broker received but had not read yet).
    async fn say_offline(&mut self, events: &mut Events, deadline: Instant) -> bool {
        let topic = self.topics.availability.clone();
        let offline = Availability::Offline.as_str();
        if !self.connection.publish(topic, offline, true, Sent::Goodbye) {
            return false;
        }
        let acked = tokio::time::timeout_at(deadline, async {
            while let Some(event) = events.recv().await {
                match self.connection.happened(event) {
                    Happened::Acked(Some(Sent::Goodbye)) => return true,
                    Happened::Lost { .. } => return false,
                    _ => {}
                }
            }
            false
        })
        .await;
        acked.unwrap_or(false)
    }

    /// Waits, within a bound, until the broker acknowledged every buffered reading: a stop (a
    /// rollout, Ctrl-C) must not lose readings the broker could still take.
    async fn flush(&mut self, events: &mut Events) {
        if !self.connection.is_connected() || self.outbox.is_empty() {
            return;
        }
        let flushed = tokio::time::timeout(FLUSH_TIMEOUT, async {
            while self.connection.is_connected() && !self.outbox.is_empty() {
                match events.recv().await {
                    Some(event) => self.event(event),
                    None => break,
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
}
