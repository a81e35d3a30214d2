//! The task that polls rumqttc's event loop, always to the end of each poll, and turns what it
//! yields into [`ClientEvent`]s: the only place a k3sense `EventLoop` is polled.

use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, Outgoing, Request, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};

use super::{ClientEvent, Disconnect, Message, Shared, tracker::Outcome};
use crate::Backoff;

/// How long after writing DISCONNECT the pump waits for the broker to close the connection.
/// [`super::Client::goodbye`] bounds it too; this keeps a pump nobody waits for from lingering.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

pub(super) struct Pump {
    pub(super) events: EventLoop,
    pub(super) requests: AsyncClient,
    pub(super) shared: std::sync::Arc<Shared>,
    pub(super) tx: mpsc::Sender<ClientEvent>,
    pub(super) backoff: Backoff,
    pub(super) done: watch::Sender<bool>,
}

/// What to do after one event.
enum Next {
    Poll,
    Wait(Duration),
    CloseAfterGoodbye,
    Stop,
}

impl Pump {
    pub(super) async fn run(mut self) {
        loop {
            let polled = self.events.poll().await;
            let next = match polled {
                Ok(event) => self.handle(event).await,
                Err(e) => self.failed(e).await,
            };
            match next {
                Next::Poll => {}
                Next::Wait(delay) => tokio::time::sleep(delay).await,
                Next::CloseAfterGoodbye => {
                    // The broker closes the connection on DISCONNECT: wait for that, so the
                    // connection is known to be gone before the caller moves on.
                    let _ = tokio::time::timeout(CLOSE_WAIT, async {
                        while self.events.poll().await.is_ok() {}
                    })
                    .await;
                    self.shared.lock().connected = false;
                    self.emit(ClientEvent::Disconnected {
                        reason: Disconnect::Goodbye,
                        retry_in: None,
                    })
                    .await;
                    break;
                }
                Next::Stop => break,
            }
        }
        self.shared.lock().stopped = true;
        let _ = self.done.send(true);
    }

    async fn handle(&mut self, event: Event) -> Next {
        let outcome = match event {
            Event::Incoming(Incoming::ConnAck(ack)) => {
                self.connected();
                let session_present = ack.session_present;
                return self
                    .forward(ClientEvent::Connected { session_present })
                    .await;
            }
            Event::Incoming(Incoming::Publish(p)) => {
                let message = Message {
                    topic: p.topic,
                    payload: p.payload,
                    retain: p.retain,
                    qos: p.qos,
                };
                return self.forward(ClientEvent::Message(message)).await;
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                let granted = !ack.return_codes.contains(&SubscribeReasonCode::Failure);
                return self.forward(ClientEvent::Subscribed { granted }).await;
            }
            Event::Incoming(Incoming::PubAck(ack)) => self.shared.lock().tracker.acked(ack.pkid),
            Event::Incoming(Incoming::PubComp(ack)) => self.shared.lock().tracker.acked(ack.pkid),
            Event::Outgoing(outgoing) => {
                self.shared.room.notify_waiters();
                match outgoing {
                    Outgoing::Publish(pkid) => self.shared.lock().tracker.written(pkid),
                    Outgoing::AwaitAck(pkid) => {
                        self.shared.lock().tracker.collided(pkid);
                        None
                    }
                    Outgoing::Disconnect => {
                        let mut state = self.shared.lock();
                        if state.goodbye {
                            state.said_goodbye = true;
                            return Next::CloseAfterGoodbye;
                        }
                        None
                    }
                    _ => None,
                }
            }
            Event::Incoming(_) => None,
        };
        match outcome {
            Some(Outcome::Acked(id)) => self.forward(ClientEvent::Acked(id)).await,
            None => Next::Poll,
        }
    }

    /// A CONNACK 0: subscribe to everything again (a restarted broker forgot it), under the
    /// lock, so a [`super::Client::subscribe`] racing with it is sent once.
    fn connected(&mut self) {
        self.backoff.reset();
        let mut state = self.shared.lock();
        state.connected = true;
        let filters: Vec<SubscribeFilter> = state
            .subscriptions
            .iter()
            .map(|(filter, qos)| SubscribeFilter::new(filter.clone(), *qos))
            .collect();
        if !filters.is_empty() {
            // The queue was emptied when the connection was lost, so this fits unless the
            // caller filled it since; then the caller's own requests go first, and the
            // subscription follows on the next CONNACK at the latest.
            let _ = self.requests.try_subscribe_many(filters);
        }
    }

    /// A poll failed: a connection broke (its unacknowledged publishes are lost) or an attempt
    /// failed. Either way, wait a backoff delay before the next.
    async fn failed(&mut self, error: rumqttc::ConnectionError) -> Next {
        let (was_connected, goodbye, lost) = {
            let mut state = self.shared.lock();
            let was_connected = std::mem::take(&mut state.connected);
            let mut lost = Vec::new();
            if was_connected {
                // rumqttc moved the unacknowledged publishes and the queued requests to
                // `pending`; with a clean session they would be dropped at the next CONNACK.
                // Drop them now, so the tickets lost are known exactly (see `tracker`).
                let drained = self
                    .events
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0))
                    .count();
                self.events.pending.clear();
                lost = state.tracker.connection_lost(drained);
            }
            (was_connected, state.goodbye, lost)
        };
        for id in lost {
            if let Next::Stop = self.forward(ClientEvent::Lost(id)).await {
                return Next::Stop;
            }
        }
        if goodbye {
            let reason = Disconnect::Lost(error);
            self.emit(ClientEvent::Disconnected {
                reason,
                retry_in: None,
            })
            .await;
            return Next::Stop;
        }
        let delay = self.backoff.next_delay();
        let reason = if was_connected {
            Disconnect::Lost(error)
        } else {
            Disconnect::ConnectFailed(error)
        };
        let event = ClientEvent::Disconnected {
            reason,
            retry_in: Some(delay),
        };
        match self.forward(event).await {
            Next::Poll => Next::Wait(delay),
            other => other,
        }
    }

    async fn forward(&mut self, event: ClientEvent) -> Next {
        if self.emit(event).await {
            Next::Poll
        } else {
            Next::Stop
        }
    }

    /// Hands `event` to the caller; false when nobody listens any more. After a goodbye was
    /// asked for, an event nobody makes room for is dropped instead of waited for.
    async fn emit(&mut self, event: ClientEvent) -> bool {
        if self.shared.lock().goodbye {
            return !matches!(
                self.tx.try_send(event),
                Err(mpsc::error::TrySendError::Closed(_))
            );
        }
        tokio::select! {
            sent = self.tx.send(event) => sent.is_ok(),
            () = self.shared.bye.notified() => true,
        }
    }
}
