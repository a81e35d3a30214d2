//! The fan-out tasks: write each update to every WebSocket client, off the MQTT task's path.
//!
//! The clients are split into [`SHARDS`] shards, each written by a task of its own
//! ([`Dispatcher::run`]). The hub applies an update under its lock and queues it for every
//! shard, with the shard's list of clients at that moment ([`Dispatch::queue`], which never
//! waits). So:
//!
//! - the MQTT task never waits for a socket: it only frames the update and queues it;
//! - no lock is held while sockets are written, except each client's own (see
//!   [`crate::fanout`]), which only that client's session also takes;
//! - every client gets the updates in order, exactly once from its snapshot on: an update
//!   carries the client list it was applied for, and one task writes a shard's updates one
//!   after another (a client's snapshot goes through its shard's queue too);
//! - the shards' tasks run in parallel on the runtime's workers: at a thousand clients and
//!   more, two cores halve the time until the last client has an update (each write is a
//!   system call of a few microseconds, most of it the kernel's TCP send), with no thread
//!   started per update.
//!
//! When a shard's task is behind (a replay arrives faster than one pass over its clients
//! takes), it writes every queued update for the same clients as one buffer, up to
//! [`BATCH_BYTES`]: one system call per client for many updates instead of one each, so it
//! catches up instead of falling further behind. Should it still fall more than
//! [`MAX_BACKLOG`] updates behind, the clients of each further update are marked as lagging,
//! as a client whose own queue overflows is: their pages reconnect and get a fresh snapshot.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fanout::Client;

/// The clients an update goes to. Copied on write by the hub, so an update keeps the list it
/// was applied for while clients come and go.
pub(crate) type Clients = Arc<Vec<Arc<Client>>>;

/// Fan-out tasks, each writing to its share of the clients: the `k3sense` binary's runtime
/// workers (two), so both cores write when there are many clients.
pub(crate) const SHARDS: usize = 2;

/// Most bytes written to a client in one buffer when updates have queued up: the kernel send
/// buffer of a connection (see `connections::SOCKET_SEND_BUFFER`), about 300 readings.
pub(crate) const BATCH_BYTES: usize = 64 * 1024;

/// Updates queued and not yet written before further ones make their clients lag: far above
/// the bursts publishers send (a replay answers at most 500 readings at once, see the
/// publisher's `replaypace`), and at ~250 bytes a frame at most ~16 MB.
pub(crate) const MAX_BACKLOG: usize = 65_536;

/// One update, framed, and who gets it.
struct Update {
    frame: Bytes,
    clients: Clients,
}

/// The hub's end: queues updates for the fan-out tasks.
pub(crate) struct Dispatch {
    shards: Vec<Shard>,
}

/// The queue of one fan-out task.
struct Shard {
    updates: mpsc::UnboundedSender<Update>,
    backlog: Arc<AtomicUsize>,
}

/// One fan-out task's end; [`Dispatcher::run`] writes what the hub queues for its shard.
pub struct Dispatcher {
    updates: mpsc::UnboundedReceiver<Update>,
    backlog: Arc<AtomicUsize>,
}

/// A [`Dispatch`] and its [`SHARDS`] dispatchers, in shard order.
pub(crate) fn channels() -> (Dispatch, Vec<Dispatcher>) {
    let (shards, dispatchers) = (0..SHARDS)
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            let backlog = Arc::new(AtomicUsize::new(0));
            let shard = Shard {
                updates: tx,
                backlog: Arc::clone(&backlog),
            };
            (
                shard,
                Dispatcher {
                    updates: rx,
                    backlog,
                },
            )
        })
        .unzip();
    (Dispatch { shards }, dispatchers)
}

impl Dispatch {
    /// Queues `frame` for each shard's clients (`lists[shard]`) without waiting; returns how
    /// many clients it was queued for.
    pub(crate) fn queue(&self, frame: &Bytes, lists: &[Clients; SHARDS]) -> usize {
        self.shards
            .iter()
            .zip(lists)
            .map(|(shard, clients)| shard.queue(frame, clients))
            .sum()
    }

    /// Queues `frame` (a snapshot) for one client of shard `shard`.
    pub(crate) fn queue_one(&self, shard: usize, frame: &Bytes, client: &Arc<Client>) {
        if let Some(shard) = self.shards.get(shard) {
            shard.queue(frame, &Arc::new(vec![Arc::clone(client)]));
        }
    }
}

impl Shard {
    /// Queues `frame` for `clients`; how many clients it was queued for (0 when there are
    /// none, the fan-out task has stopped, or it is too far behind).
    fn queue(&self, frame: &Bytes, clients: &Clients) -> usize {
        if clients.is_empty() {
            return 0;
        }
        if self.backlog.fetch_add(1, Ordering::Relaxed) >= MAX_BACKLOG {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                clients = clients.len(),
                "the WebSocket fan-out is more than {MAX_BACKLOG} updates behind; disconnecting its clients (1008), their pages reconnect"
            );
            for client in clients.iter() {
                client.lag();
            }
            return 0;
        }
        let update = Update {
            frame: frame.clone(),
            clients: Arc::clone(clients),
        };
        if self.updates.send(update).is_err() {
            // The gateway is stopping: its clients get their close frames instead.
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            return 0;
        }
        clients.len()
    }
}

impl Dispatcher {
    /// Writes the shard's queued updates to their clients until `shutdown` (or until the hub
    /// is gone).
    ///
    /// Outside tokio's cooperative budget: a task may do ~128 operations on tokio's sockets and
    /// channels per poll, after which a write returns "not ready" as if the socket were full.
    /// Under the budget a pass over 500 clients wrote to the first ~128 and handed the rest to
    /// their sessions, one task wake-up and poll each (at 10,000 clients, 97 % of them). The
    /// task still yields to the others after every pass, as the budget would have made it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tokio::task::coop::unconstrained(async move {
            let mut next = None;
            loop {
                let first = match next.take() {
                    Some(update) => update,
                    None => tokio::select! {
                        () = shutdown.cancelled() => return,
                        update = self.updates.recv() => match update {
                            Some(update) => update,
                            None => return,
                        },
                    },
                };
                let (batch, left_over) = self.batch(first);
                next = left_over;
                batch.write();
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    /// `first` and the updates queued behind it for the same clients, up to [`BATCH_BYTES`];
    /// and the first update that did not fit, if any.
    fn batch(&mut self, first: Update) -> (Batch, Option<Update>) {
        let mut taken = 1;
        let mut batch = Batch {
            bytes: first.frame,
            frames: 1,
            clients: first.clients,
        };
        let mut joined: Option<BytesMut> = None;
        let mut left_over = None;
        while let Ok(update) = self.updates.try_recv() {
            taken += 1;
            let size = joined.as_ref().map_or(batch.bytes.len(), BytesMut::len);
            if !Arc::ptr_eq(&update.clients, &batch.clients)
                || size + update.frame.len() > BATCH_BYTES
            {
                left_over = Some(update);
                break;
            }
            joined
                .get_or_insert_with(|| BytesMut::from(&batch.bytes[..]))
                .extend_from_slice(&update.frame);
            batch.frames += 1;
        }
        if let Some(joined) = joined {
            batch.bytes = joined.freeze();
        }
        // The one left over is counted when it is written, with its own batch.
        let done = taken - usize::from(left_over.is_some());
        self.backlog.fetch_sub(done, Ordering::Relaxed);
        (batch, left_over)
    }
}

/// Updates written together: one buffer, the same clients.
struct Batch {
    bytes: Bytes,
    frames: usize,
    clients: Clients,
}

impl Batch {
    /// One non-blocking write per client; a client whose socket is full has the buffer queued
    /// (by reference) and its session finishes the write.
    fn write(&self) {
        for client in self.clients.iter() {
            client.push_frames(&self.bytes, self.frames);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use tokio::{io::AsyncReadExt, net::TcpStream};

    use super::*;
    use crate::fanout::{self, text_frame};

    async fn clients(n: usize) -> (Clients, Vec<TcpStream>) {
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..n {
            let (server, peer) = fanout::tests::pair().await;
            clients.push(Arc::new(Client::new(server, 1000)));
            peers.push(peer);
        }
        (Arc::new(clients), peers)
    }

    /// One shard's queue and task.
    fn shard() -> (Shard, Dispatcher) {
        let (mut dispatch, mut dispatchers) = channels();
        (dispatch.shards.remove(0), dispatchers.remove(0))
    }

    #[tokio::test]
    async fn updates_queued_behind_each_other_are_written_as_one_buffer_in_order() {
        let (dispatch, mut dispatcher) = shard();
        let (list, mut peers) = clients(3).await;
        for n in 0..5 {
            assert_eq!(dispatch.queue(&text_frame(&format!("u{n}")), &list), 3);
        }
        let first = dispatcher.updates.recv().await.unwrap();
        let (batch, left_over) = dispatcher.batch(first);
        assert!(left_over.is_none());
        assert_eq!(batch.frames, 5);
        assert_eq!(dispatcher.backlog.load(Ordering::Relaxed), 0);
        batch.write();
        for peer in &mut peers {
            let mut got = vec![0; 5 * 4];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(
                &got[..],
                b"\x81\x02u0\x81\x02u1\x81\x02u2\x81\x02u3\x81\x02u4"
            );
        }
    }

    /// One pass writes straight to every client of its shard, however many: none is left to
    /// its session. tokio gives a task a budget of 128 operations per poll, and a socket write
    /// over budget returns "not ready" as a full socket does; a pass under the budget handed
    /// every client after the ~128th to its session, one task wake-up each.
    #[tokio::test]
    async fn one_pass_writes_to_every_client_itself_past_tokios_budget() {
        let (dispatch, dispatcher) = shard();
        let (list, mut peers) = clients(300).await;
        assert_eq!(dispatch.queue(&text_frame("u"), &list), 300);
        drop(dispatch);
        tokio::spawn(dispatcher.run(CancellationToken::new()))
            .await
            .unwrap();
        let woken = list
            .iter()
            .filter(|client| client.woken().now_or_never().is_some())
            .count();
        assert_eq!(woken, 0, "clients whose session was woken to write");
        for peer in &mut peers {
            let mut got = [0; 3];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"\x81\x01u");
        }
    }

    #[tokio::test]
    async fn a_new_client_list_or_a_full_buffer_starts_a_new_batch() {
        let (dispatch, mut dispatcher) = shard();
        let (before, _peers) = clients(1).await;
        let after: Clients = Arc::new(before.iter().cloned().collect());
        let big = text_frame(&"x".repeat(BATCH_BYTES / 2));
        dispatch.queue(&text_frame("a"), &before);
        dispatch.queue(&text_frame("b"), &after);
        dispatch.queue(&big, &after);
        dispatch.queue(&big, &after);
        let first = dispatcher.updates.recv().await.unwrap();
        let (batch, left_over) = dispatcher.batch(first);
        assert_eq!(batch.frames, 1, "the list changed after the first");
        let (batch, left_over) = dispatcher.batch(left_over.unwrap());
        assert_eq!(batch.frames, 2, "b and one big frame fit in BATCH_BYTES");
        assert!(Arc::ptr_eq(&batch.clients, &after));
        let (batch, left_over) = dispatcher.batch(left_over.unwrap());
        assert_eq!((batch.frames, batch.bytes.len()), (1, big.len()));
        assert!(left_over.is_none());
        assert_eq!(dispatcher.backlog.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn nothing_is_queued_for_no_clients_and_a_backlog_past_the_limit_makes_clients_lag() {
        let (dispatch, _dispatcher) = shard();
        assert_eq!(dispatch.queue(&text_frame("a"), &Arc::default()), 0);
        let (list, _peers) = clients(2).await;
        dispatch.backlog.store(MAX_BACKLOG, Ordering::Relaxed);
        assert_eq!(dispatch.queue(&text_frame("a"), &list), 0);
        for client in list.iter() {
            assert_eq!(client.flush(), fanout::Pending::Lagged);
        }
        assert_eq!(dispatch.backlog.load(Ordering::Relaxed), MAX_BACKLOG);
    }

    #[tokio::test]
    async fn every_shard_gets_the_update_for_its_own_clients() {
        let (dispatch, mut dispatchers) = channels();
        let (first, _p1) = clients(2).await;
        let (second, _p2) = clients(3).await;
        assert_eq!(dispatch.queue(&text_frame("a"), &[first, second]), 5);
        for (dispatcher, n) in dispatchers.iter_mut().zip([2, 3]) {
            assert_eq!(dispatcher.updates.recv().await.unwrap().clients.len(), n);
        }
    }
}
