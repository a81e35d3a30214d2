//! [`AppState`]: what every request handler and WebSocket session shares. Its own module so the
//! HTTP routes (`http`) and the WebSocket sessions (`ws`) both depend on it and not on each other.

use std::{sync::Arc, time::Instant};

use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Options, dispatch::Dispatcher, error::Result, hub::Hub, metrics::Metrics,
    origins::Origins,
};

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
    /// The state, and the fan-out tasks the caller runs (see [`Hub::new`]).
    pub(crate) fn new(
        options: Options,
        shutdown: CancellationToken,
    ) -> Result<(Self, Vec<Dispatcher>)> {
        let origins = Origins::new(&options.allowed_origins)?;
        let (hub, dispatchers) = Hub::new(options.history, options.client_queue);
        let state = Self {
            hub: Arc::new(hub),
            metrics: Arc::new(Metrics::new()),
            started: Instant::now(),
            clients: Arc::new(Semaphore::new(options.max_clients)),
            origins: Arc::new(origins),
            options: Arc::new(options),
            shutdown,
            sessions: TaskTracker::new(),
        };
        Ok((state, dispatchers))
    }
}
