//! The k3sense gateway: subscribes to every sensor over MQTT and serves browsers.
//!
//! ```text
//! broker ──MQTT──▶ mqtt (validate) ──▶ Hub (Registry + broadcast) ──▶ ws sessions ──▶ browsers
//!                                             └──────────────▶ http: /api, /metrics, page
//! ```
//!
//! Several gateways can run side by side (the Deployment runs two): each holds the whole state,
//! rebuilt from the broker's retained messages and live traffic, so any one can serve any browser.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `config` | [`Config`], [`Options`]: flags and `K3SENSE_*` variables |
//! | `state` | [`Registry`], [`History`]: per-sensor status, latest reading, bounded history (pure) |
//! | `hub` | [`Hub`]: state under one lock plus the serialise-once broadcast |
//! | `mqtt` | the subscription loop |
//! | `ws` | one WebSocket session per browser |
//! | `http` | [`app`]: routes, API handlers, security headers, Origin check |
//! | `page` | the embedded `web/` files |
//! | `metrics` | [`Metrics`] |
//! | `error` | [`Error`] |

mod config;
mod error;
mod http;
mod hub;
mod metrics;
mod mqtt;
mod page;
mod state;
mod ws;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{Config, Options};
pub use error::{Error, Result};
pub use http::{AppState, app};
pub use hub::Hub;
pub use metrics::Metrics;
pub use state::{History, Inserted, Registry};

/// Binds `config.listen` and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    serve(listener, config, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0) until `shutdown`, then drains:
/// readiness turns false, the listener closes, every WebSocket gets close code 1001, and the
/// call returns once they are gone or `drain_timeout` has passed.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    let state = AppState::new(config.options.clone(), shutdown.clone())?;
    let tasks = TaskTracker::new();
    let link = mqtt::Link {
        hub: Arc::clone(&state.hub),
        metrics: Arc::clone(&state.metrics),
        subscribed: Arc::clone(&state.subscribed),
    };
    // Fail fast on a bad prefix, broker address or password file, before serving anything.
    config.mqtt.topics()?;
    config.mqtt.mqtt_options("probe")?;
    let mqtt_task = tasks.spawn(mqtt::run(config.mqtt.clone(), link, shutdown.clone()));
    tasks.close();
    let addr = listener.local_addr().map_err(Error::Serve)?;
    tracing::info!(%addr, "gateway listening: page at http://{addr}/");
    let clients = Arc::clone(&state.clients);
    let max_clients = config.options.max_clients;
    let drain = config.options.drain_timeout;
    let server = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let served = server.await.map_err(Error::Serve);
    // Wait for the WebSocket sessions to deliver their close frames.
    let drained = tokio::time::timeout(drain, async {
        while clients.available_permits() < max_clients {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?drain, "some WebSocket clients did not close in time");
    }
    tasks.wait().await;
    served?;
    match mqtt_task.await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(error = %e, "the MQTT task failed");
            Ok(())
        }
    }
}
