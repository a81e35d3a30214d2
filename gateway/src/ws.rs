//! `GET /ws`: one task per browser, sending a snapshot and then every update.
//!
//! A client is disconnected, with a close code that says why, when:
//!
//! | code | reason (metric label) | when |
//! |---|---|---|
//! | 1008 policy | `slow` | it fell more than `--client-queue` updates behind, or one write waited longer than `--send-timeout` |
//! | 1001 going away | `silent` | it answered no ping for three `--ping-interval`s |
//! | 1009 too big | `oversized` | it sent a message over `--max-frame` bytes |
//! | 1003 unsupported data | `binary` | it sent a binary message (the page sends none) |
//! | 1008 policy | `flood` | it sent more than [`INBOUND_BUDGET_FRAMES`] × `--max-frame` bytes within one `--ping-interval` (a stream of messages, or a fragmented message that never ends) |
//! | 1001 going away | `shutdown` | the gateway is stopping; the page reconnects, to another replica if there is one |
//!
//! Text messages from a client are read and ignored (the page sends none). A frame that never
//! completes keeps the client from answering pings, so it ends as `silent`.
//!
//! Updates are not written here but by the fan-out ([`crate::fanout`]), straight to the socket;
//! a session only finishes writes the socket had no room for, sends pings and reads.
//!
//! After its close frame the session waits (bounded) for the client's answering close frame
//! before dropping the TCP connection, so the client reads the code instead of a reset.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tungstenite::{
    Message,
    protocol::{
        CloseFrame, Role, WebSocketConfig,
        frame::{Frame, coding::CloseCode},
    },
};

use crate::{
    app_state::AppState,
    error::json_error,
    fanout::{self, Client, DrainError, Pending},
};

/// How long a close caused by the client (slow, silent, oversized, …) waits for its answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Read buffer per connection: browsers send nothing but pongs, so 512 bytes is plenty
/// (tungstenite's default would be 128 KiB per client; it still grows the buffer for a larger
/// frame, up to `--max-frame`). 4 KiB → 512 B took memory per client from ~8.0 to ~4.3 KiB
/// (then ~3.3 KiB once updates were written by the fan-out instead of through each session).
const READ_BUFFER: usize = 512;

/// Bytes a client may send per ping interval, in units of `--max-frame`: far above what a page
/// sends (a pong per interval), far below what would keep a core busy.
pub(crate) const INBOUND_BUDGET_FRAMES: usize = 16;

pub(crate) async fn upgrade(State(app): State<AppState>, request: Request) -> Response {
    if app.shutdown.is_cancelled() {
        app.metrics.rejected("shutdown");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down; reconnect",
        );
    }
    let (mut parts, _body) = request.into_parts();
    if !app.origins.allows(&parts.headers) {
        app.metrics.rejected("origin");
        let origin = origin(&parts.headers);
        tracing::warn!(
            origin,
            "refused a WebSocket from a foreign origin; add it to --allowed-origins if it is yours"
        );
        return json_error(
            StatusCode::FORBIDDEN,
            "this origin may not open /ws; see --allowed-origins",
        );
    }
    let on_upgrade = parts.extensions.remove::<OnUpgrade>();
    let head = axum::http::Request::from_parts(parts, ());
    let (Some(on_upgrade), Ok(accept)) = (
        on_upgrade,
        tungstenite::handshake::server::create_response(&head),
    ) else {
        app.metrics.rejected("handshake");
        return json_error(
            StatusCode::BAD_REQUEST,
            "not a WebSocket handshake: /ws takes GET with Upgrade: websocket, Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key",
        );
    };
    let Ok(permit) = app.clients.clone().try_acquire_owned() else {
        app.metrics.rejected("limit");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many clients; try again later",
        );
    };
    let sessions = app.sessions.clone();
    sessions.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session(TokioIo::new(upgraded), &app).await,
            Err(e) => tracing::debug!(error = %e, "a WebSocket upgrade failed"),
        }
        drop(permit);
    });
    accept.map(|()| Body::empty())
}

fn origin(headers: &HeaderMap) -> &str {
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
}

async fn session(io: TokioIo<hyper::upgrade::Upgraded>, app: &AppState) {
    app.metrics.ws_connections.inc();
    app.metrics.ws_clients.inc();
    let client = app.hub.join(io);
    app.metrics.ws_messages_sent.inc();
    let max_frame = app.options.max_frame;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let wire = Wire {
        client: Arc::clone(&client),
        read: 0,
        budget: max_frame.saturating_mul(INBOUND_BUDGET_FRAMES),
        flooded: false,
    };
    let mut ws = WebSocketStream::from_raw_socket(wire, Role::Server, Some(config)).await;
    let ending = serve(&mut ws, &client, app).await;
    app.hub.leave(&client);
    if let Ending::Close(reason, code, text) = ending {
        app.metrics.disconnected(reason);
        let wait = if reason == "shutdown" {
            app.options.drain_timeout
        } else {
            CLOSE_TIMEOUT
        };
        let linger = matches!(reason, "oversized" | "flood");
        close(&mut ws, &client, code, text, wait, linger).await;
    }
    app.metrics.ws_clients.dec();
}

/// Finishes writes and watches the client until one side ends the session.
async fn serve(ws: &mut WebSocketStream<Wire>, client: &Client, app: &AppState) -> Ending {
    let ping_every = app.options.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    let shutdown = app.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let step = tokio::select! {
            biased;
            () = &mut shutdown => Err(Ending::SHUTDOWN),
            () = client.woken() => match client.flush() {
                Pending::Nothing => Ok(()),
                Pending::Bytes => match client.drain_live(app.options.send_timeout).await {
                    Ok(()) => Ok(()),
                    Err(DrainError::Failed) => Err(Ending::Gone),
                    Err(DrainError::Stuck | DrainError::Lagged) => Err(Ending::SLOW),
                },
                Pending::Lagged => Err(Ending::SLOW),
                Pending::Failed => Err(Ending::Gone),
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(_))) | None => Err(Ending::Gone),
                Some(Ok(Message::Binary(_))) => {
                    tracing::warn!("a WebSocket client sent a binary message; /ws only sends, so it is disconnected (1003)");
                    Err(Ending::Close("binary", u16::from(CloseCode::Unsupported), "binary messages are not accepted"))
                }
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    Ok(())
                }
                Some(Err(_)) if ws.get_ref().flooded => {
                    tracing::warn!(budget = ws.get_ref().budget, "a WebSocket client sent more than its budget within one ping interval; disconnected (1008)");
                    Err(Ending::Close("flood", u16::from(CloseCode::Policy), "too much data sent"))
                }
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    tracing::warn!(error = %e, "a WebSocket client sent a message over --max-frame; disconnected (1009)");
                    Err(Ending::Close("oversized", u16::from(CloseCode::Size), "message too big"))
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "a WebSocket connection broke");
                    Err(Ending::Gone)
                }
            },
            _ = ping.tick() => {
                ws.get_mut().read = 0;
                if last_heard.elapsed() > ping_every * 3 {
                    Err(Ending::Close("silent", u16::from(CloseCode::Away), "no answer to pings"))
                } else {
                    client.push_control(fanout::format(Frame::ping(Bytes::new())));
                    Ok(())
                }
            }
        };
        if let Err(ending) = step {
            return ending;
        }
    }
}

/// Why a session ended.
enum Ending {
    /// The client left or the connection broke: nothing to say.
    Gone,
    /// The server closes: metric reason, close code, close reason.
    Close(&'static str, u16, &'static str),
}

impl Ending {
    const SHUTDOWN: Self = Self::Close("shutdown", 1001, "server shutting down; reconnect");
    const SLOW: Self = Self::Close(
        "slow",
        1008,
        "too slow: fell behind the live updates; reconnect",
    );
}

/// Sends a close frame and waits, at most `wait`, for the client's answer, so the client reads
/// the code before the connection goes (closing with unread input would reset it instead).
///
/// After an oversized message or a flood, the rest of the input is still unread and cannot be
/// read any more (the WebSocket stream has failed), so the session lingers for `wait` instead:
/// time for the client to read the close frame before the reset.
async fn close(
    ws: &mut WebSocketStream<Wire>,
    client: &Client,
    code: u16,
    text: &'static str,
    wait: Duration,
    linger: bool,
) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: text.into(),
    };
    let _ = tokio::time::timeout(wait, async {
        if linger {
            client.push_control(fanout::format(Frame::close(Some(frame))));
            let _ = client.drain(wait).await;
            std::future::pending::<()>().await;
        } else if ws.close(Some(frame)).await.is_ok() && client.drain(wait).await.is_ok() {
            // Sent through the WebSocket, so it knows the close is ours and ends on the answer.
            while let Some(Ok(message)) = ws.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}

/// The WebSocket's view of a client's connection: reads pass through (counted against the
/// budget), writes — pongs and close frames from the WebSocket — go through the client's queue,
/// so they never interleave with the fan-out's frames.
struct Wire {
    client: Arc<Client>,
    /// Bytes read in this ping interval.
    read: usize,
    budget: usize,
    flooded: bool,
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = this.client.poll_read(cx, buf);
        this.read += buf.filled().len() - before;
        if this.read > this.budget {
            this.flooded = true;
            return Poll::Ready(Err(io::Error::other("inbound budget exceeded")));
        }
        polled
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Frames are small (pongs, close); the session drains the queue.
        self.client.push_control(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
