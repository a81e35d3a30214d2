//! The TCP side of the HTTP server: accepting connections, capping how many are open, and
//! closing those that send no request in time.
//!
//! `axum::serve` runs hyper without a timer, so hyper's header read timeout never fires there:
//! a client could hold a connection forever by sending nothing, or one header byte a minute
//! (slowloris). The gateway therefore accepts connections itself and serves each with hyper's
//! HTTP/1 server and a Tokio timer:
//!
//! | input | what happens | metric |
//! |---|---|---|
//! | more than `--max-connections` open | the new one gets a best-effort 503 and is closed at once | `connections_refused_total{reason="limit"}` |
//! | no complete request head within `--header-timeout` (nothing sent, or trickled) | closed | `connection_timeouts_total{reason="header"}` |
//! | keep-alive connection idle for `--header-timeout` after a request | closed | `connection_timeouts_total{reason="idle"}` |
//! | request head over 16 KiB | 431, closed | — |
//! | `accept` fails: out of file descriptors (EMFILE/ENFILE) or other | logged, retried after 100 ms (no busy loop) | `accept_errors_total{reason="fd_limit"\|"other"}` |
//!
//! Logs about such clients are rate-limited (one line per kind per 10 s, with how many were
//! left out), so a flood cannot flood the log too. A WebSocket keeps its connection's slot until
//! it ends, so `--max-connections` bounds every socket the gateway holds.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use k3sense_protocol::LogThrottle;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::metrics::Metrics;

/// Kernel send buffer of each connection. Linux would grow it to megabytes for a client that
/// stopped reading; this bounds that memory, and makes such a client's writes wait (and the
/// client be dropped, see `--send-timeout`) after tens of kilobytes instead of megabytes.
const SOCKET_SEND_BUFFER: usize = 64 * 1024;

/// Largest request head (request line and headers) read into memory; hyper's default is about
/// 400 KiB, which a flood of connections could make gigabytes. Browsers send 1–2 KiB.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Pause after a failed `accept` that is not about one connection (e.g. out of file
/// descriptors): the error would repeat at once, and retrying in a loop would burn a core.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// File descriptors the process needs besides its connections: listener, MQTT, epoll, stdio.
const FD_RESERVE: u64 = 64;

/// Sent, best effort, to a connection over `--max-connections` before it is closed.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 56\r\n\r\n{\"error\":\"too many connections; try again in a moment\"}\n";

/// Limits from `Options`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `--max-connections`.
    pub(crate) max_connections: usize,
    /// `--header-timeout`.
    pub(crate) header_timeout: Duration,
    /// `--send-timeout`: how long a write may wait for a client that reads nothing.
    pub(crate) send_timeout: Duration,
}

/// Accepts and serves connections until `until` completes, then stops accepting (the listener
/// closes), lets requests in flight finish and closes idle connections, and returns once every
/// HTTP connection has ended. Upgraded connections (WebSockets) are not waited for here.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    metrics: Arc<Metrics>,
    limits: Limits,
    until: impl Future<Output = ()>,
) {
    raise_fd_limit(limits.max_connections);
    let shared = Arc::new(Shared {
        router,
        metrics,
        limits,
        logs: LogThrottle::default(),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::pin!(until);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut until => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if shared.accept_failed(&e) {
                    tokio::select! {
                        biased;
                        () = &mut until => break,
                        () = tokio::time::sleep(ACCEPT_PAUSE) => {}
                    }
                }
                continue;
            }
        };
        shared.metrics.connections_accepted.inc();
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            shared.refuse(&stream);
            continue;
        };
        configure(&stream);
        connections.spawn(connection(stream, slot, Arc::clone(&shared), stop.clone()));
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// Socket options of every accepted connection.
fn configure(stream: &TcpStream) {
    // Updates are small and must go out at once, not wait for Nagle's algorithm.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(SOCKET_SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot set SO_SNDBUF");
    }
}

/// What every connection task shares.
struct Shared {
    router: Router,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// One log line per kind of trouble per 10 s (`refused`, `header_timeout`, `write_stall`,
    /// `fd_limit`, `accept_other`).
    logs: LogThrottle,
}

impl Shared {
    /// Counts and logs a failed accept; returns whether to pause before the next one.
    fn accept_failed(&self, e: &io::Error) -> bool {
        let reason = accept_error_reason(e);
        match reason {
            None => {
                // One connection gave up before we took it (e.g. reset in the backlog).
                tracing::debug!(error = %e, "a connection ended before it was accepted");
                return false;
            }
            Some(reason) => self.metrics.accept_failed(reason),
        }
        if reason == Some("fd_limit") {
            if let Some(left_out) = self.logs.allow("fd_limit") {
                let limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
                    .map(|(soft, _)| soft.to_string())
                    .unwrap_or_else(|_| "unknown".to_owned());
                tracing::error!(
                    error = %e,
                    open_file_limit = %limit,
                    max_connections = self.limits.max_connections,
                    left_out,
                    "cannot accept connections: out of file descriptors. New clients wait until \
                     some connections close; raise the open-file limit (ulimit -n, LimitNOFILE= in \
                     systemd) or lower --max-connections below it. Retrying every 100 ms"
                );
            }
        } else if let Some(left_out) = self.logs.allow("accept_other") {
            tracing::error!(
                error = %e,
                left_out,
                "cannot accept connections; retrying every 100 ms"
            );
        }
        true
    }

    /// Answers 503 if the socket takes it at once, then closes it.
    fn refuse(&self, stream: &TcpStream) {
        self.metrics.refused("limit");
        let _ = stream.try_write(TOO_MANY);
        if let Some(left_out) = self.logs.allow("refused") {
            tracing::warn!(
                max_connections = self.limits.max_connections,
                left_out,
                "refused a connection: --max-connections connections are open. If these are \
                 real clients, raise --max-connections (and the open-file limit); if not, a \
                 client is flooding the gateway (see k3sense_gateway_connections)"
            );
        }
    }

    /// Counts and logs a connection closed for sending no request head in time.
    fn timed_out(&self, served_before: bool) {
        let timeout = self.limits.header_timeout;
        if served_before {
            // Normal: browsers keep connections open in case they need them.
            self.metrics.timed_out("idle");
            tracing::debug!(?timeout, "closed an idle keep-alive connection");
            return;
        }
        self.metrics.timed_out("header");
        tracing::debug!(?timeout, "closed a connection that sent no request in time");
        if let Some(left_out) = self.logs.allow("header_timeout") {
            tracing::info!(
                ?timeout,
                left_out,
                "closed a connection that sent no complete request within --header-timeout: a \
                 slow or stalled client, a port scan, or a slowloris flood. Nothing to do unless \
                 k3sense_gateway_connection_timeouts_total{{reason=\"header\"}} keeps rising"
            );
        }
    }

    /// Counts and logs a response the client did not read within `--send-timeout`.
    fn write_stalled(&self) {
        self.metrics.timed_out("write");
        let timeout = self.limits.send_timeout;
        tracing::debug!(
            ?timeout,
            "closed a connection that read nothing of its answer"
        );
        if let Some(left_out) = self.logs.allow("write_stall") {
            tracing::info!(
                ?timeout,
                left_out,
                "closed a connection whose client read nothing of its answer within \
                 --send-timeout: a stalled client or a slow-read attack. Nothing to do unless \
                 k3sense_gateway_connection_timeouts_total{{reason=\"write\"}} keeps rising"
            );
        }
    }
}

/// The metric reason of a failed accept, or `None` when only that one connection failed.
fn accept_error_reason(e: &io::Error) -> Option<&'static str> {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) {
        return None;
    }
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => Some("fd_limit"),
        Some(libc::EPROTO | libc::ENONET | libc::EHOSTUNREACH | libc::ENETUNREACH) => None,
        _ => Some("other"),
    }
}

/// Serves one connection until it ends, or, after `stop`, until its request in flight is done.
async fn connection(
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    shared.metrics.connections.inc();
    let io = TokioIo::new(Tracked {
        stream,
        _slot: slot,
        shared: Arc::clone(&shared),
        stall: None,
    });
    let served = Arc::new(AtomicBool::new(false));
    let service = Served {
        inner: TowerToHyperService::new(shared.router.clone()),
        served: Arc::clone(&served),
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => shared.timed_out(served.load(Ordering::Relaxed)),
        Err(e) => tracing::debug!(error = %e, "HTTP connection ended with an error"),
    }
}

/// The router, noting that the connection has carried a request (so a later header timeout is
/// an idle keep-alive, not a client that never sent one).
#[derive(Clone)]
struct Served<S> {
    inner: S,
    served: Arc<AtomicBool>,
}

impl<S, R> hyper::service::Service<R> for Served<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.served.store(true, Ordering::Relaxed);
        self.inner.call(request)
    }
}

/// A connection holding its slot under `--max-connections` and its place in the
/// `connections` gauge for as long as it lives, also after a WebSocket upgrade (hyper hands
/// this same stream to the WebSocket).
struct Tracked {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    /// Running while a write waits for room: a client that reads nothing of an answer (a
    /// slow-read attack, or a large history never read) would otherwise hold the connection and
    /// the answer's memory for good. Twice `--send-timeout`, so a WebSocket session's own,
    /// politer check (close code 1008 after one `--send-timeout`) always comes first.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Tracked {
    /// The outcome of a write: waiting for room is bounded, anything else ends the wait.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall = None;
            return polled;
        }
        let limit = self.shared.limits.send_timeout * 2;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stall.as_mut().poll(cx).is_ready() {
            self.stall = None;
            self.shared.write_stalled();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of its answer for twice --send-timeout",
            )));
        }
        Poll::Pending
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.shared.metrics.connections.dec();
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.bounded(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Raises the soft open-file limit to the hard one (as Go programs and many servers do: the
/// soft default of 1024 is a leftover of `select()`), and warns when even the hard limit is too
/// low for `--max-connections`.
fn raise_fd_limit(max_connections: usize) {
    let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return;
    };
    let mut limit = soft;
    if soft < hard {
        match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
                limit = hard;
            }
            Err(e) => tracing::debug!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let wanted = max_connections as u64 + FD_RESERVE;
    if limit < wanted {
        tracing::warn!(
            open_file_limit = limit,
            max_connections,
            "the open-file limit is below --max-connections plus {FD_RESERVE}: under load, \
             accepting will fail with EMFILE before the cap refuses connections cleanly. Raise \
             the limit (ulimit -n, LimitNOFILE= in systemd) or lower --max-connections to {}",
            limit.saturating_sub(FD_RESERVE)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_file_descriptors_is_its_own_reason_and_one_lost_connection_is_none() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let enfile = io::Error::from_raw_os_error(libc::ENFILE);
        assert_eq!(accept_error_reason(&emfile), Some("fd_limit"));
        assert_eq!(accept_error_reason(&enfile), Some("fd_limit"));
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(accept_error_reason(&aborted), None);
        let nomem = io::Error::from_raw_os_error(libc::ENOBUFS);
        assert_eq!(accept_error_reason(&nomem), Some("other"));
    }

    #[test]
    fn the_refusal_is_a_complete_http_response() {
        let text = std::str::from_utf8(TOO_MANY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
