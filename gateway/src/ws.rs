//! `GET /ws`: one task per browser, sending a snapshot and then every update.
//!
//! A client is disconnected, with a close code that says why, when:
//!
//! | code | reason (metric label) | when |
//! |---|---|---|
//! | 1008 policy | `slow` | it fell more than `--client-queue` updates behind, or one write waited longer than `--send-timeout` |
//! | 1001 going away | `silent` | it answered no ping for three `--ping-interval`s |
//! | 1009 too big | `oversized` | it sent a message over `--max-frame` bytes |
//! | 1001 going away | `shutdown` | the gateway is stopping; the page reconnects, to another replica if there is one |
//!
//! After its close frame the session waits (bounded) for the client's answering close frame
//! before dropping the TCP connection, so the client reads the code instead of a reset.

use std::time::{Duration, Instant};

use axum::{
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::http::{AppState, json_error};

/// How long a close caused by the client (slow, silent, oversized) waits for its answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Read buffer per connection: browsers send nothing but pongs, so 512 bytes is plenty
/// (tungstenite's default would be 128 KiB per client; it still grows the buffer for a larger
/// frame, up to `--max-frame`). 4 KiB → 512 B took memory per client from ~8.0 to ~4.3 KiB.
const READ_BUFFER: usize = 512;

/// Most bytes held in user space for one client's pending write. A write is flushed at once
/// (write buffer 0), so this only bounds the largest message: a snapshot of thousands of sensors.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

pub(crate) async fn upgrade(
    State(app): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if app.shutdown.is_cancelled() {
        app.metrics.rejected("shutdown");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down; reconnect",
        );
    }
    if !app.origins.allows(&headers) {
        app.metrics.rejected("origin");
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        tracing::warn!(
            origin,
            "refused a WebSocket from a foreign origin; add it to --allowed-origins if it is yours"
        );
        return json_error(
            StatusCode::FORBIDDEN,
            "this origin may not open /ws; see --allowed-origins",
        );
    }
    let Ok(permit) = app.clients.clone().try_acquire_owned() else {
        app.metrics.rejected("limit");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many clients; try again later",
        );
    };
    let max_frame = app.options.max_frame;
    let sessions = app.sessions.clone();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| {
            sessions.track_future(async move {
                session(socket, &app).await;
                drop(permit);
            })
        })
        .into_response()
}

async fn session(mut socket: WebSocket, app: &AppState) {
    app.metrics.ws_connections.inc();
    app.metrics.ws_clients.inc();
    let (snapshot, mut updates) = app.hub.subscribe();
    let ending = match send(&mut socket, app, snapshot).await {
        Ok(()) => serve(&mut socket, app, &mut updates).await,
        Err(ending) => ending,
    };
    if let Ending::Close(reason, code, text) = ending {
        app.metrics.disconnected(reason);
        let wait = if reason == "shutdown" {
            app.options.drain_timeout
        } else {
            CLOSE_TIMEOUT
        };
        close(&mut socket, code, text, wait, reason == "oversized").await;
    }
    app.metrics.ws_clients.dec();
}

/// Forwards updates and watches the client until one side ends the session.
async fn serve(
    socket: &mut WebSocket,
    app: &AppState,
    updates: &mut broadcast::Receiver<Utf8Bytes>,
) -> Ending {
    let ping_every = app.options.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    loop {
        let step = tokio::select! {
            biased;
            () = app.shutdown.cancelled() => Err(Ending::SHUTDOWN),
            update = updates.recv() => match update {
                Ok(text) => send(socket, app, text).await,
                Err(RecvError::Lagged(_)) => Err(Ending::SLOW),
                Err(RecvError::Closed) => Err(Ending::SHUTDOWN),
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None => Err(Ending::Gone),
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    Ok(())
                }
                Some(Err(e)) if is_capacity(&e) => Err(Ending::Close(
                    "oversized",
                    close_code::SIZE,
                    "message too big",
                )),
                Some(Err(_)) => Err(Ending::Gone),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    Err(Ending::Close("silent", close_code::AWAY, "no answer to pings"))
                } else {
                    write(socket, app, Message::Ping(Default::default())).await
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
    const SHUTDOWN: Self = Self::Close(
        "shutdown",
        close_code::AWAY,
        "server shutting down; reconnect",
    );
    const SLOW: Self = Self::Close(
        "slow",
        close_code::POLICY,
        "too slow: fell behind the live updates; reconnect",
    );
}

async fn send(socket: &mut WebSocket, app: &AppState, text: Utf8Bytes) -> Result<(), Ending> {
    write(socket, app, Message::Text(text)).await?;
    app.metrics.ws_messages_sent.inc();
    Ok(())
}

/// One write, bounded by `--send-timeout`: a client that stopped reading fills the kernel's
/// buffers, and its write then waits; it must not hold its task (and memory) forever.
async fn write(socket: &mut WebSocket, app: &AppState, message: Message) -> Result<(), Ending> {
    match tokio::time::timeout(app.options.send_timeout, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ending::Gone),
        Err(_) => Err(Ending::SLOW),
    }
}

/// Sends a close frame and waits, at most `wait`, for the client's answer, so the client reads
/// the code before the connection goes (closing with unread input would reset it instead).
///
/// After an oversized message the rest of it is still unread and cannot be read any more (the
/// WebSocket stream has ended), so the session lingers for `wait` instead: time for the client
/// to read the close frame before the reset.
async fn close(
    socket: &mut WebSocket,
    code: u16,
    text: &'static str,
    wait: Duration,
    linger: bool,
) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(text),
    };
    let _ = tokio::time::timeout(wait, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        if linger {
            std::future::pending::<()>().await;
        }
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn is_capacity(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
