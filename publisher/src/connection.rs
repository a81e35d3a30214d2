//! The link's MQTT connection: the one k3sense client ([`k3sense_protocol::mqtt::Client`]),
//! whether it is connected, and what each publish carried ([`Receipts`]). It turns the
//! client's events into the few the link acts on ([`Happened`]).
//!
//! The client subscribes again after every CONNACK, before it reports the connection: the
//! subscriptions made at [`Connection::open`] are therefore in place before anything the link
//! publishes on a new connection (see `Link::greet`).

use std::time::Duration;

use k3sense_protocol::{
    Availability, MqttConfig, SensorId, Topics,
    mqtt::{Client, ClientEvent, Disconnect, Events, Goodbye, Message, PublishId, QoS},
};

use crate::{
    error::Result,
    outbox::{Receipts, Sent},
};

/// How many readings may wait for their PUBACKs at once; the client queues twice as many
/// publishes.
pub const WINDOW: usize = 32;

/// A connect that got no CONNACK within this is given up and tried again: a broker that
/// answers answers in milliseconds, and after a silent network cut the attempt started during
/// the cut must not hold the reconnection back for the client's default 5 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What happened on the connection, as far as the link cares.
#[derive(Debug)]
pub enum Happened {
    /// The broker accepted a (new) connection; the subscriptions are queued.
    Connected,
    /// A message arrived on a subscription.
    Message(Message),
    /// The broker acknowledged a publish; what it carried, if it was one of ours.
    Acked(Option<Sent>),
    /// The connection is gone or could not be made; the client retries with backoff.
    Lost {
        /// Whether it had been connected (as opposed to a failed attempt).
        was_connected: bool,
        /// Why.
        error: String,
    },
    /// Nothing the link acts on.
    Nothing,
}

/// The client, the connection state and the receipts.
#[derive(Debug)]
pub struct Connection {
    client: Client,
    /// The broker's address, for logs.
    broker: String,
    receipts: Receipts<PublishId>,
    connected: bool,
}

impl Connection {
    /// Starts connecting to the broker as sensor `id`'s publisher, with `offline` (retained) as
    /// the last will, subscribed to `subscriptions` on every connection.
    pub fn open(
        mqtt: &MqttConfig,
        id: &SensorId,
        topics: &Topics,
        subscriptions: &[String],
    ) -> Result<(Self, Events)> {
        let mut builder = mqtt
            .client(&format!("k3sense-publisher-{id}"))?
            .will(
                topics.availability(id),
                Availability::Offline.as_str(),
                QoS::AtLeastOnce,
                true,
            )
            .capacity(WINDOW * 2)
            .connect_timeout(CONNECT_TIMEOUT);
        for filter in subscriptions {
            builder = builder.subscribe(filter.clone(), QoS::AtLeastOnce);
        }
        let (client, events) = builder.start();
        let connection = Self {
            client,
            broker: mqtt.broker.clone(),
            receipts: Receipts::default(),
            connected: false,
        };
        Ok((connection, events))
    }

    /// The broker's address (host:port).
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// Whether the broker accepted the current connection (as the events so far say).
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
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(id) => {
                self.receipts.sent(id, sent);
                true
            }
            Err(_) => false,
        }
    }

    /// Stops subscribing to `filter`.
    pub fn unsubscribe(&mut self, filter: &str) {
        if let Err(e) = self.client.unsubscribe(filter) {
            tracing::debug!(filter, error = %e, "could not unsubscribe");
        }
    }

    /// Ends the connection with DISCONNECT, so the broker drops the will; at most `timeout`.
    pub async fn goodbye(&mut self, timeout: Duration) -> Goodbye {
        self.connected = false;
        self.receipts.clear();
        self.client.goodbye(timeout).await
    }

    /// Takes in one event of the client's.
    pub fn happened(&mut self, event: ClientEvent) -> Happened {
        match event {
            ClientEvent::Connected { .. } => {
                self.connected = true;
                self.receipts.clear();
                Happened::Connected
            }
            ClientEvent::Message(message) => Happened::Message(message),
            ClientEvent::Acked(id) => Happened::Acked(self.receipts.settled(&id)),
            ClientEvent::Lost(id) => {
                // The reconnect sends what matters again (the outbox, availability, health).
                self.receipts.settled(&id);
                Happened::Nothing
            }
            ClientEvent::Disconnected { reason, .. } => {
                let was_connected = std::mem::replace(&mut self.connected, false);
                self.receipts.clear();
                let error = match reason {
                    Disconnect::Lost(e) | Disconnect::ConnectFailed(e) => e.to_string(),
                    Disconnect::Goodbye => "said goodbye".to_owned(),
                };
                Happened::Lost {
                    was_connected,
                    error,
                }
            }
            ClientEvent::Subscribed { granted: false } => {
                tracing::debug!(
                    "the broker refused a subscription (replay requests, our own availability or state, Home Assistant's status)"
                );
                Happened::Nothing
            }
            _ => Happened::Nothing,
        }
    }
}
