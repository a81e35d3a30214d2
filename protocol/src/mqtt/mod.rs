//! The one MQTT client of k3sense: the publisher, the gateway, `check`, `watch`, the broker's
//! readiness probe and the load tools all reach a broker through it.
//!
//! It owns what every one of them needs and none should write again:
//!
//! - **the options**: from [`MqttConfig`] (keepalive above 0, credentials, packet limits), a
//!   clean session, TCP_NODELAY (each message is small and wanted now: no Nagle delay behind
//!   an unacknowledged one), a connect timeout;
//! - **the event-loop pump**: rumqttc's `EventLoop::poll` runs in a task of its own, always to
//!   the end of each poll. A poll dropped half-way (as a `select!` beside a timer drops it when
//!   the timer fires first) abandons a connection it was opening; the broker takes that for a
//!   crash and publishes the client's last will. [`Events::recv`] is cancel-safe instead;
//! - **reconnecting** with jittered exponential [`Backoff`], and **subscribing again** to every
//!   filter of [`ClientBuilder::subscribe`] / [`Client::subscribe`] after every CONNACK (a
//!   restarted broker forgets subscriptions);
//! - **acknowledged publishes**: [`Client::publish`] returns a [`PublishId`]; the events say
//!   when the broker acknowledged it ([`ClientEvent::Acked`]) or when a lost connection took it
//!   ([`ClientEvent::Lost`]: publish it again if it matters);
//! - **a deliberate goodbye**: [`Client::goodbye`] sends DISCONNECT and waits for the broker to
//!   close the connection, so the last will does not fire.
//!
//! ```no_run
//! # async fn demo() -> k3sense_protocol::Result<()> {
//! use k3sense_protocol::{MqttConfig, mqtt::{ClientEvent, QoS}};
//! let (client, mut events) = MqttConfig::new("127.0.0.1:1883")
//!     .client("k3sense-demo")?
//!     .subscribe("k3sense/#", QoS::AtLeastOnce)
//!     .start();
//! while let Some(event) = events.recv().await {
//!     match event {
//!         ClientEvent::Connected { .. } => { client.publish("k3sense/demo", QoS::AtLeastOnce, false, "hi")?; }
//!         ClientEvent::Message(m) => println!("{} {:?}", m.topic, m.payload),
//!         ClientEvent::Acked(_) => break,
//!         _ => {}
//!     }
//! }
//! client.goodbye(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `mod.rs` | [`ClientBuilder`], [`Client`] (the handle), [`Events`] and [`ClientEvent`] |
//! | `pump` | the task that polls rumqttc's event loop and turns its events into [`ClientEvent`]s |
//! | `tracker` | pure bookkeeping: which [`PublishId`] was written, acknowledged or lost |

mod pump;
mod tracker;

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use rumqttc::{AsyncClient, LastWill, MqttOptions};
pub use rumqttc::{ConnectionError, QoS};
use tokio::sync::{Notify, mpsc, watch};

pub use tracker::PublishId;

use crate::{Backoff, Error, MqttConfig, Result};

/// What the client reports, in the order it happened.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The broker accepted the connection (CONNACK 0); the subscriptions are already queued.
    Connected {
        /// The broker kept a session (never, as the client asks for a clean one; a broker that
        /// says so anyway is not following MQTT 3.1.1 section 3.2.2.2).
        session_present: bool,
    },
    /// The connection ended or could not be made; the client tries again after `retry_in`
    /// (`None`: it does not, after [`Disconnect::Goodbye`]).
    Disconnected {
        /// Why.
        reason: Disconnect,
        /// When the next attempt starts.
        retry_in: Option<Duration>,
    },
    /// The broker answered a SUBSCRIBE.
    Subscribed {
        /// Every filter of it was granted (no SUBACK return code 0x80).
        granted: bool,
    },
    /// A message on a subscribed topic.
    Message(Message),
    /// The broker acknowledged this publish (PUBACK for QoS 1, PUBCOMP for QoS 2), or, for
    /// QoS 0, it was written to the socket.
    Acked(PublishId),
    /// The connection died before this publish was acknowledged: the broker may or may not
    /// have it. The client does not send it again; the caller may.
    Lost(PublishId),
}

/// Why a connection ended.
#[derive(Debug)]
pub enum Disconnect {
    /// A connection that was up broke (the broker went away, the network cut, keepalive).
    Lost(ConnectionError),
    /// An attempt failed: nothing listens, a refusal (CONNACK 1–5), no CONNACK in time.
    ConnectFailed(ConnectionError),
    /// [`Client::goodbye`] said DISCONNECT; the client stopped.
    Goodbye,
}

impl Disconnect {
    /// The rumqttc error behind it, if any.
    pub fn error(&self) -> Option<&ConnectionError> {
        match self {
            Self::Lost(e) | Self::ConnectFailed(e) => Some(e),
            Self::Goodbye => None,
        }
    }
}

/// A message the broker forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload, as sent.
    pub payload: Bytes,
    /// The broker kept it (a retained message sent on subscribing).
    pub retain: bool,
    /// The QoS it was delivered with.
    pub qos: QoS,
}

/// How [`Client::goodbye`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    /// DISCONNECT went out and the broker closed the connection: no last will.
    Clean,
    /// There was no connection to close (or the client had stopped already).
    NotConnected,
    /// The connection broke first, or the broker did not close it in time: it may publish the
    /// last will.
    Abrupt,
}

/// Settings of a client before it starts; from [`MqttConfig::client`].
#[derive(Debug)]
pub struct ClientBuilder {
    options: MqttOptions,
    subscriptions: Vec<(String, QoS)>,
    capacity: usize,
    connect_timeout: Duration,
    backoff: Backoff,
}

impl MqttConfig {
    /// A client called `client_id` of the broker in this config: reads the password file, so a
    /// missing one is reported here, at start-up.
    pub fn client(&self, client_id: &str) -> Result<ClientBuilder> {
        let mut options = self.mqtt_options(client_id)?;
        // The client re-subscribes and the callers re-publish what matters after each CONNACK;
        // a kept session would replay it a second time.
        options.set_clean_session(true);
        Ok(ClientBuilder {
            options,
            subscriptions: Vec::new(),
            capacity: 64,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        })
    }
}

/// How long a connect may take before it is given up and tried again.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl ClientBuilder {
    /// The last will: what the broker publishes for this client if its connection dies without
    /// a DISCONNECT.
    pub fn will(
        mut self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Self {
        self.options
            .set_last_will(LastWill::new(topic, payload, qos, retain));
        self
    }

    /// A filter to subscribe to after every CONNACK.
    pub fn subscribe(mut self, filter: impl Into<String>, qos: QoS) -> Self {
        self.subscriptions.push((filter.into(), qos));
        self
    }

    /// How many requests may wait for the connection, and how many events for the caller
    /// (default 64). A full request queue makes [`Client::publish`] fail with
    /// [`Error::ClientBusy`]; unread events hold the client back.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How long a connect (TCP, CONNECT, CONNACK) may take before it is given up and tried
    /// again; whole seconds, at least 1 (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The reconnect delays (default 200 ms doubling to 5 s, jittered).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    /// Starts connecting, in a task of its own (call inside a Tokio runtime). The client keeps
    /// trying until [`Client::goodbye`] or until [`Events`] is dropped.
    pub fn start(self) -> (Client, Events) {
        let (requests, mut events) = AsyncClient::new(self.options, self.capacity);
        events.network_options.set_tcp_nodelay(true);
        events
            .network_options
            .set_connection_timeout(self.connect_timeout.as_secs().max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                subscriptions: self.subscriptions,
                ..State::default()
            }),
            room: Notify::new(),
            bye: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(self.capacity);
        let (done_tx, done_rx) = watch::channel(false);
        let pump = pump::Pump {
            events,
            requests: requests.clone(),
            shared: shared.clone(),
            tx,
            backoff: self.backoff,
            done: done_tx,
        };
        let task = tokio::spawn(pump.run());
        let abort = task.abort_handle();
        let client = Client {
            requests,
            shared,
            abort: abort.clone(),
            done: done_rx,
        };
        (client, Events { rx, abort })
    }
}

/// What the handle and the pump share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Woken whenever rumqttc takes a request off its queue.
    room: Notify,
    /// Woken by [`Client::goodbye`], so a pump waiting for the caller to read an event does
    /// not hold the goodbye up.
    bye: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under every lock (no panics in between): a poisoned lock
        // still holds good data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct State {
    tracker: tracker::Tracker,
    subscriptions: Vec<(String, QoS)>,
    connected: bool,
    /// [`Client::goodbye`] asked for DISCONNECT.
    goodbye: bool,
    /// The DISCONNECT was written.
    said_goodbye: bool,
    stopped: bool,
}

/// The handle: publish, subscribe, say goodbye. Cheap to clone; every clone is the same client.
#[derive(Debug, Clone)]
pub struct Client {
    requests: AsyncClient,
    shared: Arc<Shared>,
    abort: tokio::task::AbortHandle,
    done: watch::Receiver<bool>,
}

impl Client {
    /// Queues a publish without waiting; the events say when it is acknowledged (or lost).
    /// Queued while disconnected, it goes out after the next CONNACK. Fails with
    /// [`Error::ClientBusy`] when the queue is full and [`Error::ClientStopped`] after
    /// [`Client::goodbye`].
    pub fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishId> {
        let mut state = self.shared.lock();
        if state.stopped || state.goodbye {
            return Err(Error::ClientStopped);
        }
        // Under the lock: tickets enter the tracker in the order requests enter the queue.
        let id = state.tracker.issue();
        match self.requests.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                state.tracker.queued(id, qos);
                Ok(id)
            }
            Err(_) if self.abort.is_finished() => Err(Error::ClientStopped),
            Err(_) => Err(Error::ClientBusy),
        }
    }

    /// Like [`Client::publish`], but waits for room in the queue instead of failing.
    pub async fn publish_when_room(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PublishId> {
        let (topic, payload) = (topic.into(), payload.into());
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.publish(topic.clone(), qos, retain, payload.clone()) {
                Err(Error::ClientBusy) => room.await,
                other => return other,
            }
        }
    }

    /// Subscribes to `filter` now (when connected) and after every later CONNACK.
    pub fn subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<()> {
        let filter = filter.into();
        let mut state = self.shared.lock();
        if state.stopped {
            return Err(Error::ClientStopped);
        }
        if !state.subscriptions.iter().any(|(f, _)| *f == filter) {
            state.subscriptions.push((filter.clone(), qos));
        }
        if state.connected {
            self.requests
                .try_subscribe(filter, qos)
                .map_err(|_| Error::ClientBusy)?;
        }
        Ok(())
    }

    /// Stops subscribing to `filter` (now, and after later CONNACKs).
    pub fn unsubscribe(&self, filter: &str) -> Result<()> {
        let mut state = self.shared.lock();
        state.subscriptions.retain(|(f, _)| f != filter);
        if state.connected {
            self.requests
                .try_unsubscribe(filter)
                .map_err(|_| Error::ClientBusy)?;
        }
        Ok(())
    }

    /// Connected: the last CONNACK came after the last lost connection.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().connected
    }

    /// Publishes queued or in flight, not yet acknowledged or lost.
    pub fn outstanding(&self) -> usize {
        self.shared.lock().tracker.outstanding()
    }

    /// Ends the connection deliberately: DISCONNECT after everything queued before it, then waits
    /// (at most `timeout`) for the broker to close the connection, so the broker does not
    /// publish the last will. Publishes queued before are written, not necessarily
    /// acknowledged: wait for their [`ClientEvent::Acked`] first where that matters. The client
    /// stops in any case (it does not reconnect); events after this may be dropped when nobody
    /// reads them.
    pub async fn goodbye(&self, timeout: Duration) -> Goodbye {
        let (connected, queued) = {
            let mut state = self.shared.lock();
            if state.stopped {
                return Goodbye::NotConnected;
            }
            state.goodbye = true;
            let connected = state.connected;
            (
                connected,
                connected && self.requests.try_disconnect().is_ok(),
            )
        };
        self.shared.bye.notify_one();
        if !queued {
            // Not connected: nothing to close; stop the reconnecting at once. Connected with a
            // full queue: no room for the DISCONNECT, so the connection just closes.
            self.stop();
            return if connected {
                Goodbye::Abrupt
            } else {
                Goodbye::NotConnected
            };
        }
        let mut done = self.done.clone();
        let ended = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
        let said = self.shared.lock().said_goodbye;
        self.stop();
        match ended {
            Ok(_) if said => Goodbye::Clean,
            _ => Goodbye::Abrupt,
        }
    }

    fn stop(&self) {
        self.shared.lock().stopped = true;
        self.abort.abort();
    }
}

/// The client's events; read them (a client whose events are not read stops moving). Dropping
/// this stops the client at once, without DISCONNECT (like a crash: the broker publishes the
/// will); call [`Client::goodbye`] first for a clean stop.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<ClientEvent>,
    abort: tokio::task::AbortHandle,
}

impl Events {
    /// The next event; `None` once the client stopped. Cancel-safe: use it in `select!`.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        self.rx.recv().await
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.abort.abort();
    }
}
