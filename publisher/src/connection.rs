//! The link's MQTT connection: the client it publishes through, whether it is connected, and
//! which acknowledgement belongs to which publish ([`Receipts`]). It turns the client's events
//! into the few the link acts on ([`Happened`]).
//!
//! The event loop is polled by a task of its own ([`k3sense_protocol::pump`]), never inside the
//! link's `select!`: a poll must run to its end, or a connection being opened is abandoned.

use k3sense_protocol::{Availability, MqttConfig, MqttEvents, SensorId, Topics};
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, Outgoing, Packet, Publish, QoS};

use crate::{
    error::Result,
    outbox::{Receipts, Sent},
};

/// How many publishes may be handed to the client at once; also how many readings may wait for
/// their PUBACKs.
pub const WINDOW: usize = 32;

/// A connect that got no CONNACK within this many seconds is given up and tried again: a broker
/// that answers answers in milliseconds, and after a silent network cut the attempt started
/// during the cut must not hold the reconnection back for rumqttc's default 5 s.
const CONNECT_TIMEOUT_SECS: u64 = 2;

/// What happened on the connection, as far as the link cares.
#[derive(Debug)]
pub enum Happened {
    /// The broker accepted a (new) connection.
    Connected,
    /// A message arrived on a subscription.
    Message(Publish),
    /// The broker acknowledged a publish; what it carried, if it was one of ours.
    Acked(Option<Sent>),
    /// The connection is gone or could not be made; it is retried with backoff.
    Lost {
        /// Whether it had been connected (as opposed to a failed attempt).
        was_connected: bool,
        /// Why.
        error: ConnectionError,
    },
    /// Our DISCONNECT went out.
    Closed,
    /// Nothing the link acts on.
    Nothing,
}

/// The client, the connection state and the receipts.
#[derive(Debug)]
pub struct Connection {
    client: AsyncClient,
    receipts: Receipts,
    connected: bool,
}

impl Connection {
    /// Starts connecting to the broker as sensor `id`'s publisher, with `offline` (retained) as
    /// the last will; events arrive on the returned channel.
    pub fn open(
        mqtt: &MqttConfig,
        id: &SensorId,
        topics: &Topics,
    ) -> Result<(Self, MqttEvents, tokio::task::JoinHandle<()>)> {
        let mut options = mqtt.mqtt_options(&format!("k3sense-publisher-{id}"))?;
        options.set_clean_session(true);
        options.set_last_will(LastWill::new(
            topics.availability(id),
            Availability::Offline.as_str(),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
        // Each message is small and wanted now: no Nagle delay behind an unacknowledged one.
        events.network_options.set_tcp_nodelay(true);
        events
            .network_options
            .set_connection_timeout(CONNECT_TIMEOUT_SECS);
        let (events, pump) = k3sense_protocol::pump(events, WINDOW);
        let connection = Self {
            client,
            receipts: Receipts::default(),
            connected: false,
        };
        Ok((connection, events, pump))
    }

    /// Whether the broker accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Queues a QoS 1 publish; false when the client cannot take it now (its queue is full).
    pub fn publish(
        &mut self,
        topic: String,
        payload: impl Into<Vec<u8>>,
        retain: bool,
        sent: Sent,
    ) -> bool {
        let queued = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_ok();
        if queued {
            self.receipts.queued(sent);
        }
        queued
    }

    /// Subscribes to `topic` (QoS 1); a failure is logged, it is retried on the next connect.
    pub fn subscribe(&mut self, topic: String) {
        if let Err(e) = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
            tracing::warn!(%topic, error = %e, "could not subscribe");
        }
    }

    /// Unsubscribes from `topic`.
    pub fn unsubscribe(&mut self, topic: String) {
        let _ = self.client.try_unsubscribe(topic);
    }

    /// Sends DISCONNECT: the broker then drops the will.
    pub fn disconnect(&mut self) {
        let _ = self.client.try_disconnect();
    }

    /// Takes in one event of the client's.
    pub fn happened(&mut self, event: Result<Event, ConnectionError>) -> Happened {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                self.connected = true;
                self.receipts.clear();
                Happened::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Happened::Message(publish),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                self.receipts.assigned(pkid);
                Happened::Nothing
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                Happened::Acked(self.receipts.acked(ack.pkid))
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Happened::Closed,
            Ok(_) => Happened::Nothing,
            Err(error) => {
                let was_connected = std::mem::replace(&mut self.connected, false);
                self.receipts.clear();
                Happened::Lost {
                    was_connected,
                    error,
                }
            }
        }
    }

    /// The connection is being given up without an error event (the events ended).
    pub fn forget(&mut self) {
        self.connected = false;
        self.receipts.clear();
    }
}
