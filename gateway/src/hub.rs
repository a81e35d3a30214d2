//! Fan-out: every update is serialised once and shared, as a reference-counted buffer, by all
//! WebSocket clients.
//!
//! The [`Registry`] and the broadcast channel sit under one short-held lock, so a client that
//! joins gets a snapshot and then exactly the updates after it: none missed, none twice. Each
//! client reads the shared ring at its own pace; one that falls more than the ring's length
//! behind is told so (`Lagged`) and disconnected, and never slows anyone else.

use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use k3sense_protocol::{
    Availability, Reading, ReplayRequest, SensorId,
    ws::{SensorSummary, ServerMessage},
};
use tokio::sync::broadcast;

use crate::state::Registry;

/// Shared state plus the broadcast of updates.
pub struct Hub {
    inner: Mutex<Inner>,
}

struct Inner {
    registry: Registry,
    updates: broadcast::Sender<Utf8Bytes>,
}

impl Hub {
    /// A hub keeping `history` readings per sensor and `queue` updates per client.
    pub fn new(history: usize, queue: usize) -> Self {
        let (updates, _) = broadcast::channel(queue.max(1));
        Self {
            inner: Mutex::new(Inner {
                registry: Registry::new(history),
                updates,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than stopping the gateway would, so keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a reading and sends it to every client; `false` if it was a duplicate.
    pub fn reading(&self, reading: Reading) -> bool {
        let mut inner = self.lock();
        let message = inner.registry.apply_reading(reading);
        inner.send(message)
    }

    /// Records a live reading (from the state topic) and sends it to every client; returns
    /// whether it was new, and the replay request for readings missing before it.
    pub fn live_reading(&self, reading: Reading) -> (bool, Option<ReplayRequest>) {
        let mut inner = self.lock();
        let gap = inner.registry.gap_before(&reading);
        let message = inner.registry.apply_reading(reading);
        (inner.send(message), gap)
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

    /// Records an availability and sends it to every client; `false` if nothing changed.
    pub fn availability(&self, id: &SensorId, availability: Availability) -> bool {
        let mut inner = self.lock();
        let message = inner.registry.apply_availability(id, availability);
        inner.send(message)
    }

    /// A snapshot message and a receiver of every update after it.
    pub fn subscribe(&self) -> (Utf8Bytes, broadcast::Receiver<Utf8Bytes>) {
        let inner = self.lock();
        let snapshot = encode(&ServerMessage::Snapshot {
            sensors: inner.registry.summaries(),
        });
        (snapshot, inner.updates.subscribe())
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

impl Inner {
    fn send(&mut self, message: Option<ServerMessage>) -> bool {
        let Some(message) = message else {
            return false;
        };
        // No receivers is fine: nobody is watching.
        let _ = self.updates.send(encode(&message));
        true
    }
}

fn encode(message: &ServerMessage) -> Utf8Bytes {
    match serde_json::to_string(message) {
        Ok(text) => Utf8Bytes::from(text),
        Err(e) => {
            // Readings are validated before they get here, so this means a bug, not bad input.
            tracing::error!(error = %e, "cannot encode a WebSocket message");
            Utf8Bytes::from_static("{\"type\":\"error\"}")
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use k3sense_protocol::Model;

    use super::*;

    #[tokio::test]
    async fn snapshot_then_exactly_the_later_updates() {
        let hub = Hub::new(10, 4);
        let id = SensorId::new("pi-1").unwrap();
        let r = |seq| Reading::new(id.clone(), Model::Dht11, 20.0, 40.0, Utc::now(), seq).unwrap();
        assert!(hub.reading(r(1)));
        let (snapshot, mut rx) = hub.subscribe();
        assert!(snapshot.as_str().contains("\"seq\":1"));
        assert!(hub.availability(&id, Availability::Online));
        let next = rx.recv().await.unwrap();
        assert!(next.as_str().starts_with("{\"type\":\"availability\""));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_slow_receiver_lags_without_blocking_the_sender() {
        let hub = Hub::new(100, 2);
        let id = SensorId::new("pi-1").unwrap();
        let (_, mut rx) = hub.subscribe();
        for seq in 0..10 {
            let r = Reading::new(id.clone(), Model::Dht11, 20.0, 40.0, Utc::now(), seq).unwrap();
            hub.reading(r);
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(8))
        ));
    }
}
