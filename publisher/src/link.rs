//! The publisher's MQTT connection: one task owns the client, its event loop and the
//! [`Outbox`], so ordering and acknowledgements are tracked in one place.
//!
//! On every connect it publishes `online` (retained) and then every unacknowledged reading in
//! order; the broker announces `offline` (the last will) if the connection dies; on shutdown it
//! publishes `offline` itself and disconnects cleanly.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use k3sense_protocol::{Availability, Backoff, MqttConfig, Reading, SensorId, Topics};
use rumqttc::{AsyncClient, Event, LastWill, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Result, outbox::Outbox};

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

struct Link {
    client: AsyncClient,
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
    mqtt: MqttConfig,
    id: SensorId,
    buffer: usize,
    sensor: Availability,
    mut updates: mpsc::Receiver<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
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
    let mut link = Link {
        client,
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
        if let Some(lost) = self.outbox.push(reading) {
            tracing::warn!(
                seq = lost.seq,
                "buffer full: dropped the oldest unsent reading; raise --buffer to keep more"
            );
        }
        self.pump();
    }

    fn sensor_changed(&mut self, availability: Availability) {
        self.sensor = availability;
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
                self.queued.clear();
                self.by_pkid.clear();
                self.outbox.resend_all();
                self.publish_availability(self.sensor);
                self.pump();
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(sent) = self.queued.pop_front() {
                    self.by_pkid.insert(pkid, sent);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Sent::Reading(seq)) = self.by_pkid.remove(&ack.pkid) {
                    self.outbox.acked(seq);
                    tracing::debug!(seq, "reading acknowledged");
                }
                self.pump();
            }
            _ => {}
        }
    }

    fn disconnected(&mut self) {
        self.connected = false;
        self.queued.clear();
        self.by_pkid.clear();
        self.outbox.resend_all();
    }

    /// Publishes `offline` and disconnects, so the broker does not fire the will and
    /// subscribers see a deliberate stop.
    async fn goodbye(&mut self, events: &mut rumqttc::EventLoop) {
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
