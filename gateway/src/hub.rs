//! Fan-out: every update is serialised and framed once, and the same buffer is written to every
//! WebSocket client (see [`crate::fanout`]).
//!
//! The [`Registry`] and the list of clients sit under one short-held lock, so a client that
//! joins gets a snapshot and then exactly the updates after it: none missed, none twice. The
//! writes themselves happen after that lock is released, under a second lock that keeps updates
//! in order, so a slow fan-out never holds up the API or a joining client for long.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use chrono::{DateTime, Utc};
use k3sense_protocol::{
    Availability, Reading, ReplayRequest, SensorHealth, SensorId,
    ws::{BrokerLink, SensorSummary, ServerMessage},
};

use crate::{
    fanout::{self, Client, Socket},
    link::LinkState,
    state::Registry,
};

/// Shared state plus the clients every update goes to.
pub struct Hub {
    inner: Mutex<Inner>,
    /// Held while an update is written to the clients, so updates reach each client in order.
    order: Mutex<()>,
    /// Frames queued per client before it counts as lagging.
    queue: usize,
}

struct Inner {
    registry: Registry,
    /// The broker link, under the same lock as the clients: a joining client's snapshot and the
    /// `broker` messages after it never disagree.
    link: LinkState,
    /// Copied on write: a fan-out holds the list it started with while clients come and go.
    clients: Arc<Vec<Arc<Client>>>,
}

/// How many clients an update was written or queued to; `None` if the update was not new.
pub type Sent = Option<usize>;

impl Hub {
    /// A hub keeping `history` readings per sensor and `queue` updates per client.
    pub fn new(history: usize, queue: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                registry: Registry::new(history),
                link: LinkState::new(Utc::now()),
                clients: Arc::default(),
            }),
            order: Mutex::new(()),
            queue,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than stopping the gateway would, so keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a reading and sends it to every client.
    pub fn reading(&self, reading: Reading) -> Sent {
        let mut inner = self.lock();
        let message = inner.registry.apply_reading(reading);
        self.send(inner, message)
    }

    /// Records a live reading (from the state topic) and sends it to every client; returns
    /// whether it was new, and the replay request for readings missing before it.
    pub fn live_reading(&self, reading: Reading) -> (Sent, Option<ReplayRequest>) {
        let mut inner = self.lock();
        let gap = inner.registry.gap_before(&reading);
        let message = inner.registry.apply_reading(reading);
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
        let message = inner.registry.apply_availability(id, availability);
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
        let message = inner.registry.apply_health(health);
        self.send(inner, message)
    }

    /// Adds a client on `io`: it is sent a snapshot now and every update after it.
    pub fn join(&self, io: impl Socket + 'static) -> Arc<Client> {
        let client = Arc::new(Client::new(io, self.queue));
        let mut inner = self.lock();
        let snapshot = encode(&ServerMessage::Snapshot {
            sensors: inner.registry.summaries(),
            broker: Some(inner.link.get()),
        });
        client.push_data(&fanout::text_frame(&snapshot));
        Arc::make_mut(&mut inner.clients).push(Arc::clone(&client));
        client
    }

    /// Removes a client: it gets no more updates.
    pub fn leave(&self, client: &Arc<Client>) {
        client.retire();
        let mut inner = self.lock();
        Arc::make_mut(&mut inner.clients).retain(|c| !Arc::ptr_eq(c, client));
    }

    /// Clients connected.
    pub fn client_count(&self) -> usize {
        self.lock().clients.len()
    }

    /// Writes `message`, framed once, to every client.
    fn send(&self, inner: MutexGuard<'_, Inner>, message: Option<ServerMessage>) -> Sent {
        let frame = fanout::text_frame(&encode(&message?));
        let clients = Arc::clone(&inner.clients);
        // Taken before the state lock is let go: the next update waits for this one's writes.
        let order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        drop(inner);
        let sent = fan_out(&clients, &frame, PARALLEL_FROM);
        drop(order);
        Some(sent)
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

/// Clients above which a second thread shares the writes: each write is a system call of a few
/// microseconds (most of it the kernel's TCP send), so at a thousand clients two cores halve
/// the time until the last one has the update, while below it a thread costs more than it saves.
const PARALLEL_FROM: usize = 512;

/// Writes `frame` to every client, on two threads from `parallel_from` clients; returns how
/// many took it.
fn fan_out(clients: &[Arc<Client>], frame: &Bytes, parallel_from: usize) -> usize {
    let push = |part: &[Arc<Client>]| part.iter().filter(|c| c.push_data(frame)).count();
    if clients.len() < parallel_from {
        return push(clients);
    }
    let (first, second) = clients.split_at(clients.len() / 2);
    // Writes may start timers (a connection's write-stall deadline), which need the runtime.
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| {
            let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
            push(second)
        });
        let mine = push(first);
        // A panic in the helper cannot happen short of a bug; count its half as not sent.
        mine + helper.join().unwrap_or(0)
    })
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
    use std::time::Duration;

    use tokio::{io::AsyncReadExt, net::TcpStream};

    use super::*;

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
        let hub = Hub::new(10, 4);
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
        let hub = Hub::new(10, 4);
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
    async fn a_fan_out_on_two_threads_reaches_every_client_once() {
        let hub = Hub::new(10, 4);
        let mut peers = Vec::new();
        for _ in 0..5 {
            let (client, mut peer) = join(&hub).await;
            next_text(&mut peer).await;
            peers.push((client, peer));
        }
        let clients: Vec<_> = peers.iter().map(|(c, _)| Arc::clone(c)).collect();
        let frame = fanout::text_frame("{\"n\":1}");
        assert_eq!(fan_out(&clients, &frame, 2), 5);
        assert_eq!(fan_out(&clients, &fanout::text_frame("{\"n\":2}"), 2), 5);
        for (_, peer) in &mut peers {
            assert_eq!(next_text(peer).await, "{\"n\":1}");
            assert_eq!(next_text(peer).await, "{\"n\":2}");
        }
    }

    #[tokio::test]
    async fn a_client_that_left_gets_nothing_and_others_keep_getting_updates() {
        let hub = Hub::new(10, 4);
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
        let hub = Hub::new(10_000, 2);
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
        assert_eq!(
            hub.reading(reading(seq + 1)),
            Some(1),
            "only the reader takes it"
        );
    }
}
