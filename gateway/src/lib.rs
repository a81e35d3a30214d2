//! The k3sense gateway: subscribes to every sensor over MQTT and serves browsers.
//!
//! ```text
//! broker ──MQTT──▶ mqtt (validate) ──▶ Hub (Registry + client lists) ──queue──▶ dispatch: 2 fan-out tasks ──frame written once──▶ browsers
//!                                        │   ▲                                                        ws sessions: pings, reads, slow writes
//!                                        │   └── forget: sweep for sensors gone for --forget-after
//!                                        └──────────────▶ http: /api, /metrics, page
//! ```
//!
//! Several gateways can run side by side (the Deployment runs two): each holds the whole state,
//! rebuilt from the broker's retained messages and live traffic, so any one can serve any browser.
//!
//! # Layout
//!
//! Modules only import from modules below them in this list (and none imports from one that
//! imports it): `http` and `ws` share [`AppState`] and the JSON error body, not each other.
//!
//! | module | concern |
//! |---|---|
//! | `http` | [`app`]: routes, API handlers, security headers |
//! | `ws` | one WebSocket session per browser: upgrade, Origin check, pings, reads, close codes |
//! | `connections` | accepting TCP connections: `--max-connections`, `--header-timeout`, accept errors |
//! | `page` | the embedded `web/` files |
//! | `app_state` | [`AppState`]: what every handler and session shares |
//! | `mqtt` | the subscription loop: validates each message and feeds the hub |
//! | `forget` | the sweep that forgets sensors gone for `--forget-after` |
//! | `hub` | [`Hub`]: state and the client lists under one short lock; queues each update, framed once, for the fan-out |
//! | `dispatch` | the fan-out tasks: each writes its share of the clients, off the MQTT task, no lock held; queued updates written as one buffer |
//! | `fanout` | each client's write side: one non-blocking write per update, queued only for a full socket |
//! | `state` | [`Registry`], [`History`]: per-sensor status, latest reading, bounded history, forgetting (pure) |
//! | `guard` | what a reading's fields may do: future stamps, `seq` jumps (pure) |
//! | `link` | the broker link (connected or unreachable, since when) and what readiness makes of it (pure) |
//! | `origins` | which browser origins may open `/ws` (`--allowed-origins`) |
//! | `metrics` | [`Metrics`] |
//! | `config` | [`Config`], [`Options`]: flags and `K3SENSE_*` variables |
//! | `error` | [`Error`] and the JSON error body |

mod app_state;
mod config;
mod connections;
mod dispatch;
mod error;
mod fanout;
mod forget;
mod guard;
mod http;
mod hub;
mod link;
mod metrics;
mod mqtt;
mod origins;
mod page;
mod state;
mod ws;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use app_state::AppState;
pub use config::{Config, Options};
pub use error::{Error, Result};
pub use http::app;
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

/// Waits for `shutdown`, then closes every WebSocket session (1001) and waits up to `drain`
/// for them to end.
async fn drain_sessions(sessions: TaskTracker, drain: Duration, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    tracing::info!(clients = sessions.len(), "draining WebSocket clients");
    sessions.close();
    if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
        tracing::warn!(
            ?drain,
            clients = sessions.len(),
            "some WebSocket clients did not close in time"
        );
    }
}

/// The connection limits from `options`; warns when they refuse WebSocket clients before
/// `--max-clients` does.
fn limits(options: &Options) -> connections::Limits {
    if options.max_connections <= options.max_clients {
        tracing::warn!(
            max_connections = options.max_connections,
            max_clients = options.max_clients,
            "--max-connections is not above --max-clients: connections will be refused before \
             --max-clients WebSocket clients are reached; raise --max-connections"
        );
    }
    connections::Limits {
        max_connections: options.max_connections,
        header_timeout: options.header_timeout,
        send_timeout: options.send_timeout,
    }
}

/// Time the HTTP server gets, after the WebSocket drain, to finish requests in flight.
const HTTP_GRACE: Duration = Duration::from_secs(2);

/// Serves on an already bound listener (tests bind port 0) until `shutdown`, then drains:
///
/// 1. `/readyz` answers 503 and `/ws` refuses new clients (503), so load balancers and pages
///    move to another replica; the listener stays open for them meanwhile;
/// 2. every WebSocket client gets close code 1001, and the gateway waits up to `drain_timeout`
///    for their answers;
/// 3. the listener closes (new connections are refused), requests in flight finish, and the
///    call returns: within `2 × drain_timeout` plus two seconds in the worst case.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    // Fail fast on a bad prefix, broker address or password file, before serving anything.
    config.mqtt.topics()?;
    config.mqtt.mqtt_options("probe")?;
    let (state, dispatchers) = AppState::new(config.options.clone(), shutdown.clone())?;
    let tasks = TaskTracker::new();
    for dispatcher in dispatchers {
        tasks.spawn(dispatcher.run(shutdown.clone()));
    }
    let link = mqtt::Link {
        hub: Arc::clone(&state.hub),
        metrics: Arc::clone(&state.metrics),
        max_clock_skew: config.options.max_clock_skew,
    };
    let mqtt_task = tasks.spawn(mqtt::run(config.mqtt.clone(), link, shutdown.clone()));
    tasks.spawn(forget::run(
        Arc::clone(&state.hub),
        Arc::clone(&state.metrics),
        config.options.forget_after,
        shutdown.clone(),
    ));
    tasks.close();
    let addr = listener.local_addr().map_err(Error::Serve)?;
    tracing::info!(%addr, "gateway listening: page at http://{addr}/");

    let drain = config.options.drain_timeout;
    let drained = drain_sessions(state.sessions.clone(), drain, shutdown.clone());
    let limits = limits(&config.options);
    let metrics = Arc::clone(&state.metrics);
    let server = connections::serve(listener, app(state), metrics, limits, drained);
    tokio::select! {
        () = server => {}
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain * 2 + HTTP_GRACE).await;
        } => {
            tracing::warn!("HTTP connections still open after the drain; closing them");
        }
    }
    tasks.wait().await;
    tracing::info!("gateway stopped");
    match mqtt_task.await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(error = %e, "the MQTT task failed");
            Ok(())
        }
    }
}
