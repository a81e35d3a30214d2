//! The HTTP surface: the page, `/ws`, the JSON API, health and metrics.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::{DateTime, Utc};
use k3sense_protocol::SensorId;
use serde::Deserialize;

use crate::{app_state::AppState, error::json_error, link, page, ws};

/// The gateway's routes. Tests serve this on a port-0 listener.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::app_js))
        .route("/style.css", get(page::style_css))
        .route("/ws", get(ws::upgrade))
        .route("/api/sensors", get(sensors))
        .route("/api/sensors/{id}/history", get(history))
        .route("/api/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Headers every response carries: no sniffing, no framing, no referrer leaks, and a content
/// policy that lets the page load only its own script and style and talk only to its own host.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    response
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "no such path; see / for the page and /api/sensors for the API",
    )
}

async fn sensors(State(app): State<AppState>) -> Response {
    Json(app.hub.summaries()).into_response()
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<String>,
    since: Option<String>,
}

async fn history(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    // The documented rule (README, contract): a whole number of at least 1; above --history it
    // is clamped, since no more is held (the page asks for an hour whatever --history is).
    let capacity = app.options.history;
    let limit = match query.limit.as_deref() {
        None => capacity,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(capacity),
            _ => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "limit must be a whole number of at least 1 (above {capacity}, the readings kept per sensor, it returns all of them)"
                    ),
                );
            }
        },
    };
    let since = match query.since.as_deref() {
        None => None,
        Some(text) => match DateTime::parse_from_rfc3339(text) {
            Ok(at) => Some(at.with_timezone(&Utc)),
            Err(_) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "since must be an RFC 3339 time such as 2026-11-27T04:00:00.000Z",
                );
            }
        },
    };
    let readings = SensorId::new(id.clone())
        .ok()
        .and_then(|id| app.hub.history(&id, limit, since));
    match readings {
        Some(readings) => Json(readings).into_response(),
        None => json_error(
            StatusCode::NOT_FOUND,
            &format!(
                "no sensor {:?} is known; GET /api/sensors lists them",
                id.chars().take(63).collect::<String>()
            ),
        ),
    }
}

/// `GET /api/status`: `{"broker":{"status":"connected"|"unreachable","since":"…"}}`, the same
/// link the WebSocket snapshot and `broker` messages carry.
async fn status(State(app): State<AppState>) -> Response {
    Json(serde_json::json!({ "broker": app.hub.broker() })).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready means serving: listening and not draining. The broker link does not count once it was
/// up (the gateway serves what it holds, and says so on the page and in `/api/status`); before
/// the first subscription it does, for at most [`link::FIRST_SUBSCRIPTION_GRACE`], so a new pod
/// does not take browsers away from one that has the readings.
async fn readyz(State(app): State<AppState>) -> Response {
    if app.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if app.hub.broker_ever_connected()
        || app.started.elapsed() >= link::FIRST_SUBSCRIPTION_GRACE
    {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not yet subscribed to the MQTT broker (ready anyway 10 s after start)\n",
        )
            .into_response()
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}
