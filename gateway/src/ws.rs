//! `GET /ws`: one task per browser, sending a snapshot and then every update.
//!
//! A client is disconnected, with a close code that says why, when it falls behind by more than
//! its queue (1008), stops answering pings (1001), sends a message over the size limit (1009),
//! or when the gateway shuts down (1001, so the page reconnects to another replica).

use std::time::{Duration, Instant};

use axum::{
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::sync::broadcast::error::RecvError;

use crate::http::{AppState, json_error};

/// A send that takes longer than this means the client stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

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
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| async move {
            session(socket, &app).await;
            drop(permit);
        })
        .into_response()
}

async fn session(mut socket: WebSocket, app: &AppState) {
    app.metrics.ws_connections.inc();
    app.metrics.ws_clients.inc();
    let (snapshot, mut updates) = app.hub.subscribe();
    let outcome: Result<(), Ending> = async {
        send(&mut socket, app, snapshot).await?;
        let ping_every = app.options.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = app.shutdown.cancelled() => {
                    return Err(Ending::Close("shutdown", close_code::AWAY, "server shutting down; reconnect"));
                }
                update = updates.recv() => match update {
                    Ok(text) => send(&mut socket, app, text).await?,
                    Err(RecvError::Lagged(_)) => {
                        return Err(Ending::Close("slow", close_code::POLICY, "too slow: fell behind the live updates; reconnect"));
                    }
                    Err(RecvError::Closed) => {
                        return Err(Ending::Close("shutdown", close_code::AWAY, "server shutting down; reconnect"));
                    }
                },
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Close(_))) | None => return Err(Ending::Gone),
                    Some(Ok(_)) => last_heard = Instant::now(),
                    Some(Err(e)) => {
                        if is_capacity(&e) {
                            return Err(Ending::Close("oversized", close_code::SIZE, "message too big"));
                        }
                        return Err(Ending::Gone);
                    }
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > ping_every * 3 {
                        return Err(Ending::Close("silent", close_code::AWAY, "no answer to pings"));
                    }
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return Err(Ending::Gone);
                    }
                }
            }
        }
    }
    .await;
    if let Err(Ending::Close(reason, code, text)) = outcome {
        app.metrics.disconnected(reason);
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(text),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
    app.metrics.ws_clients.dec();
}

enum Ending {
    /// The client left or the connection broke: nothing to say.
    Gone,
    /// The server closes: metric reason, close code, close reason.
    Close(&'static str, u16, &'static str),
}

async fn send(socket: &mut WebSocket, app: &AppState, text: Utf8Bytes) -> Result<(), Ending> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text))).await {
        Ok(Ok(())) => {
            app.metrics.ws_messages_sent.inc();
            Ok(())
        }
        Ok(Err(_)) => Err(Ending::Gone),
        Err(_) => {
            app.metrics.disconnected("slow");
            Err(Ending::Gone)
        }
    }
}

fn is_capacity(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
