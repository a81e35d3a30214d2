//! The public listeners: accept, and hand each connection to its own task at once.
//!
//! Nothing that one client does — a TLS handshake that never finishes, a CONNECT that never
//! comes — runs in the accept loop, so it never delays another client's connect. A connection
//! gets `--connect-timeout` for its TLS handshake and CONNECT together, and until it has logged
//! in it holds a place in the pending pool (`pending`), which closes the oldest such socket
//! when a new one needs room.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, time::Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    metrics::Reason,
    pending::{Pending, Source},
    session,
    session::Shared,
};

/// Everything one accept loop needs.
pub(crate) struct Listener {
    pub(crate) listener: TcpListener,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) shared: Arc<Shared>,
    /// Sockets open on every listener, counted from accept to close.
    pub(crate) open: Arc<AtomicUsize>,
    /// More open sockets than this and new ones are closed at accept (a flood).
    pub(crate) max_open: usize,
    pub(crate) tracker: TaskTracker,
    /// Cancelled to make the accept loop return (and so release its port).
    pub(crate) stop: CancellationToken,
    /// Cancelled to end every connection.
    pub(crate) sessions: CancellationToken,
}

impl Listener {
    /// Accepts until `stop` is cancelled.
    pub(crate) async fn run(self) {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        loop {
            let accepted = tokio::select! {
                () = self.stop.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    tracing::warn!(scheme, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let metrics = &self.shared.metrics;
            metrics.accepted();
            if self.open.load(Ordering::Relaxed) >= self.max_open {
                metrics.refused(Reason::TooManyConnections);
                tracing::warn!(%peer, scheme, "closed at accept: too many open connections");
                drop(tcp);
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let (pending, _) = self.shared.pending.admit(Source::of(peer.ip()));
            let open = OpenSocket::new(self.open.clone());
            let tls = self.tls.clone();
            let shared = self.shared.clone();
            let sessions = self.sessions.clone();
            self.tracker.spawn(async move {
                let _open = open;
                connection(tcp, peer, tls, shared, sessions, pending).await;
            });
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    sessions: CancellationToken,
    pending: Pending,
) {
    // Somewhere in the last quarter of --connect-timeout, at random: sockets opened in one burst
    // (a flood) would otherwise all time out in the same instant, and the wave of closes (and of
    // reopened sockets) queued a real client's login behind it for up to 1.4 s (measured with
    // 2,500 silent sockets, debug build); spread over the quarter, it waits 10s of ms.
    let timeout = shared.connect_timeout;
    let deadline = Instant::now() + timeout - timeout.mul_f64(rand::random::<f64>() / 4.0);
    match tls {
        None => session::run(tcp, peer, deadline, shared, sessions, pending).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                handshake = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => handshake,
                // Counted by the pool when it pushed this socket out.
                () = pending.evicted.cancelled() => {
                    tracing::debug!(%peer, "closed during its TLS handshake to make room for a newer socket");
                    return;
                }
            };
            match handshake {
                Ok(Ok(stream)) => {
                    session::run(stream, peer, deadline, shared, sessions, pending).await;
                }
                Ok(Err(e)) => {
                    shared.metrics.refused(Reason::TlsHandshake);
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    shared.metrics.refused(Reason::ConnectTimeout);
                    tracing::info!(%peer, "closed: no TLS handshake within --connect-timeout");
                }
            }
        }
    }
}

/// One open socket in the count, until dropped.
struct OpenSocket(Arc<AtomicUsize>);

impl OpenSocket {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
