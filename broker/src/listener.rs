//! The listeners: accept, and hand each connection to its own task at once.
//!
//! Besides the TCP listeners (plain and TLS) there may be a local one: a Unix socket in the
//! abstract namespace, for the clients of this same process (`k3sense all`'s gateway and
//! publisher). A reading then crosses no TCP/IP stack on its way to the gateway: measured at 10
//! WebSocket clients, a loopback TCP send from the broker cost ~4 times a send to a browser's
//! socket (BENCHMARKS.md, issue 17, cut 5). The local socket runs the same handshake: the same
//! authentication, limits and logs, with the peer named "local socket".
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

use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    metrics::Reason,
    peer::Peer,
    pending::{Pending, Source},
    session,
    session::Shared,
};

/// A bound socket that connections come in on.
pub(crate) enum Socket {
    /// Plain MQTT, or MQTT over TLS with the acceptor.
    Tcp(TcpListener, Option<TlsAcceptor>),
    /// The local socket (plain MQTT).
    Unix(UnixListener),
}

/// A connection just accepted.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Socket {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Self::Tcp(listener, _) => listener
                .accept()
                .await
                .map(|(tcp, peer)| Accepted::Tcp(tcp, peer)),
            Self::Unix(listener) => listener
                .accept()
                .await
                .map(|(unix, _)| Accepted::Unix(unix)),
        }
    }

    fn tls(&self) -> Option<TlsAcceptor> {
        match self {
            Self::Tcp(_, tls) => tls.clone(),
            Self::Unix(_) => None,
        }
    }

    fn scheme(&self) -> &'static str {
        match self {
            Self::Tcp(_, None) => "mqtt",
            Self::Tcp(_, Some(_)) => "mqtts",
            Self::Unix(_) => "mqtt+unix",
        }
    }
}

/// Everything one accept loop needs.
pub(crate) struct Listener {
    pub(crate) socket: Socket,
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
        let scheme = self.socket.scheme();
        loop {
            let accepted = tokio::select! {
                () = self.stop.cancelled() => return,
                accepted = self.socket.accept() => accepted,
            };
            let accepted = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    tracing::warn!(scheme, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let peer = match &accepted {
                Accepted::Tcp(_, peer) => Peer::Net(*peer),
                Accepted::Unix(_) => Peer::Local,
            };
            let metrics = &self.shared.metrics;
            metrics.accepted();
            if self.open.load(Ordering::Relaxed) >= self.max_open {
                metrics.refused(Reason::TooManyConnections);
                tracing::warn!(%peer, scheme, "closed at accept: too many open connections");
                drop(accepted);
                continue;
            }
            let (pending, _) = self.shared.pending.admit(Source::of(peer.ip()));
            let open = OpenSocket::new(self.open.clone());
            let shared = self.shared.clone();
            let sessions = self.sessions.clone();
            let deadline = deadline(shared.connect_timeout);
            match accepted {
                Accepted::Tcp(tcp, _) => {
                    let _ = tcp.set_nodelay(true);
                    let tls = self.socket.tls();
                    self.tracker.spawn(async move {
                        let _open = open;
                        tcp_connection(tcp, peer, deadline, tls, shared, sessions, pending).await;
                    });
                }
                Accepted::Unix(unix) => {
                    self.tracker.spawn(async move {
                        let _open = open;
                        session::run(unix, peer, deadline, shared, sessions, pending).await;
                    });
                }
            }
        }
    }
}

/// When a new connection's TLS handshake and CONNECT must be done by.
///
/// Somewhere in the last quarter of --connect-timeout, at random: sockets opened in one burst
/// (a flood) would otherwise all time out in the same instant, and the wave of closes (and of
/// reopened sockets) queued a real client's login behind it for up to 1.4 s (measured with
/// 2,500 silent sockets, debug build); spread over the quarter, it waits 10s of ms.
fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout - timeout.mul_f64(rand::random::<f64>() / 4.0)
}

async fn tcp_connection(
    tcp: TcpStream,
    peer: Peer,
    deadline: Instant,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    sessions: CancellationToken,
    pending: Pending,
) {
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
