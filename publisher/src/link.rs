//! The publisher's MQTT connection: one task owns the client, its event loop and the
//! [`Outbox`], so ordering and acknowledgements are tracked in one place.
//!
//! On every connect it announces the sensor to Home Assistant (when discovery is on: the
//! retained configs of `discovery.rs`, and a subscription to Home Assistant's status topic, so
//! a restarted Home Assistant gets them again), publishes `online` (retained) and then every
//! unacknowledged reading in order; the broker announces `offline` (the last will) if the
//! connection dies; on shutdown it publishes `offline` itself and disconnects cleanly. It keeps
//! the connection, buffer and reading metrics up to date.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use k3sense_protocol::{Availability, Backoff, MqttConfig, Reading, SensorId, Topics};
use rumqttc::Publish;
use rumqttc::{AsyncClient, Event, LastWill, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Result, discovery, discovery::Announcement, metrics::Metrics, outbox::Outbox};

/// What the reader hands to the link.
#[derive(Debug)]
pub enum Update {
    /// A fresh reading to publish.
    Reading(Reading),
    /// The sensor became readable (`Online`) or unreadable (`Offline`).
    Sensor(Availability),
}

/// How many readings may be handed to rumqttc before their PUBACKs arrive.
const WINDOW: usize = 32;
/// How long a clean shutdown waits for the broker to take `offline` and the disconnect.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

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
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    tracing::info!(broker = %mqtt.broker, sensor_id = %link.id, "connecting to the MQTT broker");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            update = updates.recv() => match update {
                Some(Update::Reading(reading)) => link.push(reading),
                Some(Update::Sensor(a)) => link.sensor_changed(a),
                None => break,
            },
            event = events.poll() => match event {
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        backoff.reset();
                        tracing::info!(broker = %mqtt.broker, backlog = link.outbox.len(), "connected to the MQTT broker");
                    }
                    link.handle(event);
                }
                Err(e) => {
                    if link.connected {
                        tracing::warn!(error = %e, "lost the MQTT broker; keeping readings until it is back");
                    }
                    link.disconnected();
                    let delay = backoff.next_delay();
                    tracing::debug!(error = %e, retry_in = ?delay, "MQTT connect failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
    link.goodbye(&mut events).await;
    Ok(())
}

impl Link {
    fn push(&mut self, reading: Reading) {
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

    fn count_buffered(&self) {
        let depth = i64::try_from(self.outbox.len()).unwrap_or(i64::MAX);
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
                self.publish_availability(self.sensor);
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
    async fn goodbye(&mut self, events: &mut rumqttc::EventLoop) {
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
        let _ = self.client.try_disconnect();
        if offline.is_err() {
            return;
        }
        let done = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
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
