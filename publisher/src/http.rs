//! The publisher's small HTTP server: `/metrics` for Prometheus and `/healthz` for a liveness
//! probe. Off in `k3sense all` unless `--metrics-listen` is given there.

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The routes; tests call it without a socket.
pub fn app(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.encode())
}

/// Serves [`app`] on `listener` until `shutdown`. A failing server is logged, never fatal: the
/// publisher's job is the readings.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    let address = listener.local_addr().ok();
    tracing::info!(address = ?address, "serving /metrics and /healthz");
    let served = axum::serve(listener, app(metrics))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the metrics server stopped");
    }
}
