//! The gateway's state and its WebSocket clients: every update is applied to the [`Registry`]
//! and queued, serialised and framed once, for every client (see [`crate::dispatch`]).
//!
//! The [`Registry`], the broker link and the lists of clients sit under one short-held lock,
//! and an update is queued for the fan-out under it too, so a client that joins gets a snapshot
//! and then exactly the updates after it: none missed, none twice. The lock is never held while
//! a socket is written, and whoever applies an update (the MQTT task) never waits for one.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use k3sense_protocol::{
    Availability, Reading, ReplayRequest, SensorHealth, SensorId,
    ws::{BrokerLink, SensorSummary, ServerMessage},
};

use crate::{
    dispatch::{self, Clients, Dispatch, Dispatcher, SHARDS},
    fanout::{self, Client, Socket},
    link::LinkState,
    state::Registry,
};

/// Shared state plus the clients every update goes to.
pub struct Hub {
    inner: Mutex<Inner>,
    /// The fan-out tasks' queues.
    dispatch: Dispatch,
    /// Frames queued per client before it counts as lagging.
    queue: usize,
}

struct Inner {
    registry: Registry,
    /// The broker link, under the same lock as the clients: a joining client's snapshot and the
    /// `broker` messages after it never disagree.
    link: LinkState,
    /// Each fan-out shard's clients, copied on write: a queued update holds the list it was
    /// applied for while clients come and go.
    clients: [Clients; SHARDS],
}

/// How many clients an update was queued for; `None` if the update was not new.
pub type Sent = Option<usize>;

impl Hub {
    /// A hub keeping `history` readings per sensor and `queue` updates per client, and the
    /// fan-out tasks that write its updates: run each of them ([`Dispatcher::run`]).
    pub fn new(history: usize, queue: usize) -> (Self, Vec<Dispatcher>) {
        let (dispatch, dispatchers) = dispatch::channels();
        let hub = Self {
            inner: Mutex::new(Inner {
                registry: Registry::new(history),
                link: LinkState::new(Utc::now()),
                clients: Default::default(),
            }),
            dispatch,
            queue,
        };
        (hub, dispatchers)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than stopping the gateway would, so keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a reading and sends it to every client.
    pub fn reading(&self, reading: Reading) -> Sent {
        let mut inner = self.lock();
        let message = inner.registry.apply_reading(reading, Utc::now());
        self.send(inner, message)
    }

    /// Records a live reading (from the state topic) and sends it to every client; returns
    /// whether it was new, and the replay request for readings missing before it.
    pub fn live_reading(&self, reading: Reading) -> (Sent, Option<ReplayRequest>) {
        let mut inner = self.lock();
        if inner.registry.stale(&reading) {
            // A forgotten sensor's retained reading, sent again: nothing to ask for either.
            return (None, None);
        }
        let gap = inner.registry.gap_before(&reading);
        let message = inner.registry.apply_reading(reading, Utc::now());
        (self.send(inner, message), gap)
    }

    /// The `(seq, read_at)` of a sensor's newest reading.
    pub fn newest(&self, id: &SensorId) -> Option<(u64, DateTime<Utc>)> {
        self.lock().registry.latest(id).map(|r| (r.seq, r.read_at))
    }

    /// The held reading a `reading` conflicts with (same `seq` and `read_at`, other values).
    pub fn conflicting(&self, reading: &Reading) -> Option<Reading> {
        self.lock().registry.conflicting(reading)
    }

    /// Replaces a conflicting duplicate with `reading` and sends it to every client.
    pub fn replace_reading(&self, reading: Reading) -> Sent {
        let mut inner = self.lock();
        let message = inner.registry.replace_reading(reading);
        self.send(inner, message)
    }

    /// Every sensor's gaps in `seq` (at most `limit` each).
    pub fn holes(&self, limit: usize) -> Vec<(SensorId, ReplayRequest)> {
        self.lock().registry.holes(limit)
    }

    /// The newest `seq` of one sensor, if it has readings.
    pub fn newest_seq(&self, id: &SensorId) -> Option<u64> {
        self.lock()
            .registry
            .newest_seqs()
            .into_iter()
            .find_map(|(i, seq)| (&i == id).then_some(seq))
    }

    /// The newest `seq` held per sensor.
    pub fn newest_seqs(&self) -> Vec<(SensorId, u64)> {
        self.lock().registry.newest_seqs()
    }

    /// Records an availability and sends it to every client.
    pub fn availability(&self, id: &SensorId, availability: Availability) -> Sent {
        let mut inner = self.lock();
        let message = inner
            .registry
            .apply_availability(id, availability, Utc::now());
        self.send(inner, message)
    }

    /// Records that the gateway is subscribed to its broker (at `at`) and, if that is news, tells
    /// every client.
    pub fn broker_connected(&self, at: DateTime<Utc>) -> Sent {
        let mut inner = self.lock();
        let message = inner.link.connected(at).map(ServerMessage::Broker);
        self.send(inner, message)
    }

    /// Records that the broker connection is lost or could not be made (at `at`) and, if that is
    /// news, tells every client. Clients stay connected: they keep the readings they have.
    pub fn broker_lost(&self, at: DateTime<Utc>) -> Sent {
        let mut inner = self.lock();
        let message = inner.link.lost(at).map(ServerMessage::Broker);
        self.send(inner, message)
    }

    /// The broker link now, for `GET /api/status`.
    pub fn broker(&self) -> BrokerLink {
        self.lock().link.get()
    }

    /// Whether the gateway has been subscribed to its broker at least once since it started.
    pub fn broker_ever_connected(&self) -> bool {
        self.lock().link.ever_connected()
    }

    /// Records a sensor's own health and sends it to every client.
    pub fn health(&self, health: SensorHealth) -> Sent {
        let mut inner = self.lock();
        let message = inner.registry.apply_health(health, Utc::now());
        self.send(inner, message)
    }

    /// Forgets the sensors gone for `after` (see `crate::state`) and tells every client;
    /// returns how many were forgotten and how many messages that sent.
    pub fn forget(&self, after: Duration) -> (usize, usize) {
        let mut inner = self.lock();
        let messages = inner.registry.forget(Utc::now(), after);
        let forgotten = messages.len();
        let mut sent = 0;
        for message in messages {
            // One lock for all: no update slips in between them.
            let frame = fanout::text_frame(&encode(&message));
            sent += self.dispatch.queue(&frame, &inner.clients);
        }
        (forgotten, sent)
    }

    /// Adds a client on `io`: it is sent a snapshot now and every update after it.
    pub fn join(&self, io: impl Socket + 'static) -> Arc<Client> {
        let client = Arc::new(Client::new(io, self.queue));
        let mut inner = self.lock();
        let snapshot = encode(&ServerMessage::Snapshot {
            sensors: inner.registry.summaries(),
            broker: Some(inner.link.get()),
        });
        // The shard with fewer clients; its task sends the snapshot before any later update.
        let shard = (0..SHARDS)
            .min_by_key(|&i| inner.clients[i].len())
            .unwrap_or(0);
        self.dispatch
            .queue_one(shard, &fanout::text_frame(&snapshot), &client);
        if let Some(list) = inner.clients.get_mut(shard) {
            Arc::make_mut(list).push(Arc::clone(&client));
        }
        client
    }

    /// Removes a client: it gets no more updates.
    pub fn leave(&self, client: &Arc<Client>) {
        client.retire();
        let mut inner = self.lock();
        for list in &mut inner.clients {
            if list.iter().any(|c| Arc::ptr_eq(c, client)) {
                Arc::make_mut(list).retain(|c| !Arc::ptr_eq(c, client));
            }
        }
    }

    /// Clients connected.
    pub fn client_count(&self) -> usize {
        self.lock().clients.iter().map(|list| list.len()).sum()
    }

    /// Queues `message`, framed once, for every client; the lock is let go after queueing, so
    /// updates are queued in the order they were applied.
    fn send(&self, inner: MutexGuard<'_, Inner>, message: Option<ServerMessage>) -> Sent {
        let message = message?;
        if inner.clients.iter().all(|list| list.is_empty()) {
            return Some(0);
        }
        let frame = fanout::text_frame(&encode(&message));
        Some(self.dispatch.queue(&frame, &inner.clients))
    }

    /// Every sensor, for `GET /api/sensors`.
    pub fn summaries(&self) -> Vec<SensorSummary> {
        self.lock().registry.summaries()
    }

    /// A sensor's newest readings (only those after `since`, if given), for
    /// `GET /api/sensors/{id}/history`.
    pub fn history(
        &self,
        id: &SensorId,
        limit: usize,
        since: Option<DateTime<Utc>>,
    ) -> Option<Vec<Reading>> {
        self.lock().registry.history(id, limit, since)
    }

    /// Number of known sensors.
    pub fn sensor_count(&self) -> usize {
        self.lock().registry.len()
    }
}

fn encode(message: &ServerMessage) -> String {
    serde_json::to_string(message).unwrap_or_else(|e| {
        // Readings are validated before they get here, so this means a bug, not bad input.
        tracing::error!(error = %e, "cannot encode a WebSocket message");
        String::from("{\"type\":\"error\"}")
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use k3sense_protocol::Model;

    use tokio::{io::AsyncReadExt, net::TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A hub with its fan-out tasks running.
    fn hub(history: usize, queue: usize) -> Hub {
        let (hub, dispatchers) = Hub::new(history, queue);
        for dispatcher in dispatchers {
            tokio::spawn(dispatcher.run(CancellationToken::new()));
        }
        hub
    }

    /// A client of `hub` on a real loopback socket, and the far end of it.
    async fn join(hub: &Hub) -> (Arc<Client>, TcpStream) {
        let (server, peer) = fanout::tests::pair().await;
        (hub.join(server), peer)
    }

    /// The next unmasked text frame from the server (payloads here are under 64 KiB).
    async fn next_text(peer: &mut TcpStream) -> String {
        let mut head = [0; 2];
        peer.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x81, "a final text frame");
        let len = match head[1] {
            126 => usize::from(peer.read_u16().await.unwrap()),
            n => usize::from(n),
        };
        let mut payload = vec![0; len];
        peer.read_exact(&mut payload).await.unwrap();
        String::from_utf8(payload).unwrap()
    }

    fn reading(seq: u64) -> Reading {
        let id = SensorId::new("pi-1").unwrap();
        Reading::new(id, Model::Dht11, 20.0, 40.0, Utc::now(), seq).unwrap()
    }

    #[tokio::test]
    async fn snapshot_then_exactly_the_later_updates() {
        let hub = hub(10, 4);
        let id = SensorId::new("pi-1").unwrap();
        let first = reading(1);
        assert_eq!(hub.reading(first.clone()), Some(0));
        let (_client, mut peer) = join(&hub).await;
        assert!(next_text(&mut peer).await.contains("\"seq\":1"));
        assert_eq!(hub.availability(&id, Availability::Online), Some(1));
        assert_eq!(hub.reading(first), None, "a duplicate is not sent");
        assert_eq!(hub.reading(reading(2)), Some(1));
        assert!(
            next_text(&mut peer)
                .await
                .starts_with("{\"type\":\"availability\"")
        );
        assert!(next_text(&mut peer).await.contains("\"seq\":2"));
    }

    #[tokio::test]
    async fn the_broker_link_is_in_the_snapshot_and_each_change_goes_to_every_client() {
        let hub = hub(10, 4);
        let (_early, mut early) = join(&hub).await;
        let snapshot: serde_json::Value =
            serde_json::from_str(&next_text(&mut early).await).unwrap();
        assert_eq!(
            snapshot["broker"]["status"], "unreachable",
            "not yet subscribed"
        );
        assert!(!hub.broker_ever_connected());

        assert_eq!(hub.broker_connected(Utc::now()), Some(1));
        assert_eq!(
            hub.broker_connected(Utc::now()),
            None,
            "no change, no message"
        );
        assert!(hub.broker_ever_connected());
        let up: serde_json::Value = serde_json::from_str(&next_text(&mut early).await).unwrap();
        assert_eq!(
            (up["type"].as_str(), up["status"].as_str()),
            (Some("broker"), Some("connected"))
        );

        let (_late, mut late) = join(&hub).await;
        let snapshot: serde_json::Value =
            serde_json::from_str(&next_text(&mut late).await).unwrap();
        assert_eq!(
            snapshot["broker"],
            up.as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.remove("type");
                    serde_json::Value::Object(o)
                })
                .unwrap()
        );

        let lost_at = Utc::now();
        assert_eq!(hub.broker_lost(lost_at), Some(2));
        assert_eq!(
            hub.broker_lost(Utc::now()),
            None,
            "a failed retry is no change"
        );
        for peer in [&mut early, &mut late] {
            let down: serde_json::Value = serde_json::from_str(&next_text(peer).await).unwrap();
            assert_eq!(down["type"], "broker");
            assert_eq!(down["status"], "unreachable");
            assert_eq!(down["since"], k3sense_protocol::format_read_at(&lost_at));
        }
        assert_eq!(
            k3sense_protocol::format_read_at(&hub.broker().since),
            k3sense_protocol::format_read_at(&lost_at)
        );
        // Readings still reach the clients (replays arrive while the link is being restored).
        assert_eq!(hub.reading(reading(1)), Some(2));
    }

    #[tokio::test]
    async fn every_client_of_every_shard_gets_each_update_once_and_in_order() {
        let hub = hub(10, 4);
        let mut peers = Vec::new();
        for _ in 0..5 {
            let (client, mut peer) = join(&hub).await;
            next_text(&mut peer).await;
            peers.push((client, peer));
        }
        for seq in 1..=3 {
            assert_eq!(hub.reading(reading(seq)), Some(5));
        }
        for (_, peer) in &mut peers {
            for seq in 1..=3 {
                assert!(next_text(peer).await.contains(&format!("\"seq\":{seq}")));
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_left_gets_nothing_and_others_keep_getting_updates() {
        let hub = hub(10, 4);
        let (gone, _gone_peer) = join(&hub).await;
        let (_stays, mut peer) = join(&hub).await;
        assert_eq!(hub.client_count(), 2);
        hub.leave(&gone);
        assert_eq!(hub.client_count(), 1);
        assert_eq!(hub.reading(reading(1)), Some(1));
        next_text(&mut peer).await;
        assert!(next_text(&mut peer).await.contains("\"seq\":1"));
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_lags_without_blocking_the_others() {
        let hub = hub(10_000, 2);
        let (stuck, _stuck_peer) = join(&hub).await;
        let (reader, mut peer) = join(&hub).await;
        // What a session does: finish the writes the socket had no room for.
        tokio::spawn(async move {
            loop {
                reader.woken().await;
                reader.drain(Duration::from_secs(5)).await.unwrap();
            }
        });
        next_text(&mut peer).await;
        let mut seq = 0;
        while stuck.flush() != fanout::Pending::Lagged {
            seq += 1;
            assert!(seq < 100_000, "the stuck client never lagged");
            hub.reading(reading(seq));
            let text = next_text(&mut peer).await;
            let got: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(got["seq"], seq);
        }
        // The stuck client takes nothing more; the reader still gets every update.
        assert!(!stuck.push_data(&fanout::text_frame("{}")));
        hub.reading(reading(seq + 1));
        let got: serde_json::Value = serde_json::from_str(&next_text(&mut peer).await).unwrap();
        assert_eq!(got["seq"], seq + 1);
    }

    #[tokio::test]
    async fn a_forgotten_sensor_leaves_every_client_and_the_snapshot() {
        let hub = hub(10, 4);
        let id = SensorId::new("pi-1").unwrap();
        let first = reading(1);
        hub.reading(first.clone());
        hub.availability(&id, Availability::Offline);
        let (_client, mut peer) = join(&hub).await;
        assert!(next_text(&mut peer).await.contains("\"pi-1\""));
        assert_eq!(
            hub.forget(Duration::from_secs(3600)),
            (0, 0),
            "not gone long enough"
        );
        assert_eq!(hub.forget(Duration::ZERO), (1, 1));
        assert_eq!(
            next_text(&mut peer).await,
            r#"{"type":"forgotten","sensor_id":"pi-1"}"#
        );
        assert_eq!(hub.sensor_count(), 0);
        let (_late, mut late) = join(&hub).await;
        assert_eq!(
            next_text(&mut late).await,
            r#"{"type":"snapshot","sensors":[],"broker":{"status":"unreachable","since":"#
                .to_owned()
                + &format!(
                    "{:?}",
                    k3sense_protocol::format_read_at(&hub.broker().since)
                )
                + "}}"
        );
        assert_eq!(
            hub.live_reading(first),
            (None, None),
            "the same reading again"
        );
        assert_eq!(
            hub.live_reading(reading(2)).0,
            Some(2),
            "a new one brings it back"
        );
    }
}
