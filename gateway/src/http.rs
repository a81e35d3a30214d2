//! The HTTP surface: the page, `/ws`, the JSON API, health and metrics.

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::{DateTime, Utc};
use k3sense_protocol::SensorId;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Error, Options, Result, hub::Hub, link, metrics::Metrics, page, ws};

/// Everything a request handler needs.
#[derive(Clone)]
pub struct AppState {
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Arc<Metrics>,
    /// When serving began, for the readiness grace before the first subscription.
    pub(crate) started: Instant,
    pub(crate) clients: Arc<Semaphore>,
    pub(crate) origins: Arc<Origins>,
    pub(crate) options: Arc<Options>,
    pub(crate) shutdown: CancellationToken,
    /// Every WebSocket session, so shutdown can wait for them to take their close frame.
    pub(crate) sessions: TaskTracker,
}

impl AppState {
    pub(crate) fn new(options: Options, shutdown: CancellationToken) -> Result<Self> {
        let origins = Origins::new(&options.allowed_origins)?;
        Ok(Self {
            hub: Arc::new(Hub::new(options.history, options.client_queue)),
            metrics: Arc::new(Metrics::new()),
            started: Instant::now(),
            clients: Arc::new(Semaphore::new(options.max_clients)),
            origins: Arc::new(origins),
            options: Arc::new(options),
            shutdown,
            sessions: TaskTracker::new(),
        })
    }
}

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

/// A JSON error body: `{"error": "..."}`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
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

/// Which browser origins may open `/ws`.
#[derive(Debug, Default)]
pub(crate) struct Origins {
    allowed: Vec<String>,
}

impl Origins {
    fn new(allowed: &[String]) -> Result<Self> {
        let mut list = Vec::new();
        for origin in allowed.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            let valid = ["http://", "https://"].iter().any(|scheme| {
                origin
                    .strip_prefix(scheme)
                    .is_some_and(|host| !host.is_empty() && !host.contains('/'))
            });
            if !valid {
                return Err(Error::BadOrigin(origin));
            }
            list.push(origin);
        }
        Ok(Self { allowed: list })
    }

    /// No Origin header (not a browser): allowed. Same host as the request: allowed. Listed: allowed.
    pub(crate) fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.to_ascii_lowercase();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if let (Some(origin_host), Some(host)) = (origin_host, host) {
            if origin_host == host {
                return true;
            }
        }
        self.allowed.contains(&origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn same_origin_and_listed_origins_only() {
        let o = Origins::new(&["https://Sensors.example.org/".to_owned()]).unwrap();
        assert!(o.allows(&headers(None, "gw:8080")));
        assert!(o.allows(&headers(Some("http://gw:8080"), "gw:8080")));
        assert!(o.allows(&headers(Some("https://sensors.example.org"), "gw:8080")));
        assert!(!o.allows(&headers(Some("http://evil.example"), "gw:8080")));
        assert!(!o.allows(&headers(Some("http://gw:8081"), "gw:8080")));
        assert!(!o.allows(&headers(Some("null"), "gw:8080")));
    }

    #[test]
    fn rejects_non_origins_in_the_allow_list() {
        for bad in ["example.org", "https://", "https://a/b", "ftp://x"] {
            assert!(Origins::new(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
