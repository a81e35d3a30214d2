//! The k3sense MQTT broker: [rumqttd] embedded, configured for a Raspberry Pi, and made to behave
//! like a service (clear start-up errors, a `run` that returns on shutdown).
//!
//! The publisher sends its readings here (retained, QoS 1) and the gateway, `mosquitto_sub`,
//! Home Assistant and any other MQTT client subscribe here. In a cluster it is the `broker`
//! Deployment behind the Service `broker:1883`; in `k3sense all` it runs in the same process.
//!
//! # What rumqttd does not do, and what this crate does about it
//!
//! - `Broker::start()` blocks forever and has no stop: it runs on its own thread and [`run`]
//!   returns when the shutdown token fires. The thread ends with the process.
//! - A failed bind is only logged by rumqttd: [`run`] checks the address can be bound first and
//!   then waits until the listener accepts connections, so "port taken" is an error, not a silent
//!   broker that never answers.
//! - rumqttd's defaults size its in-memory log for servers (10 × 100 MB segments): this crate
//!   caps it for a 1 GB Pi (see [`Config`]).
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `config` | [`Config`]: the command-line flags and their `K3SENSE_*` variables |
//! | `users` | [`Users`]: the username/password file |
//! | `embedded` | turning a [`Config`] into rumqttd's config, and the broker thread |
//! | `error` | [`Error`] |

mod config;
mod embedded;
mod error;
mod users;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::{Config, Options};
pub use error::{Error, Result};
pub use users::Users;

/// How long the broker may take to accept its first connection after start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the broker and serves until `shutdown` is cancelled.
///
/// Returns an error at start-up when the listen address cannot be bound (say, another broker
/// already holds port 1883), when the users file is unreadable, or when rumqttd's listener dies.
/// After `shutdown`, the rumqttd threads keep their socket until the process exits, because
/// rumqttd offers no way to stop them.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let running = start(&config).await?;
    tracing::info!(listen = %config.listen, auth = running.auth_enabled, "MQTT broker ready");
    tokio::select! {
        () = shutdown.cancelled() => {
            tracing::info!("MQTT broker stopping");
            Ok(())
        }
        result = running.stopped => {
            let why = result.unwrap_or_else(|_| "broker thread vanished".to_owned());
            Err(Error::Stopped(why))
        }
    }
}

/// A broker that is accepting connections.
struct Running {
    auth_enabled: bool,
    /// Resolves with a reason if rumqttd's threads end (they never should).
    stopped: tokio::sync::oneshot::Receiver<String>,
}

async fn start(config: &Config) -> Result<Running> {
    let users = match &config.options.users_file {
        Some(path) => Some(Users::from_file(path)?),
        None => None,
    };
    if users.is_none() {
        tracing::warn!(
            "no --users-file: the broker accepts anonymous clients; set one in any shared network"
        );
    }
    // rumqttd only logs a failed bind, so prove the address is free ourselves.
    let probe = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    drop(probe);

    let auth_enabled = users.is_some();
    let rumqttd_config = embedded::rumqttd_config(config, users);
    let mut stopped = embedded::spawn(rumqttd_config)?;
    wait_until_listening(config, &mut stopped).await?;
    Ok(Running {
        auth_enabled,
        stopped,
    })
}

/// Polls the listen address until it accepts a TCP connection, or the broker thread dies.
async fn wait_until_listening(
    config: &Config,
    stopped: &mut tokio::sync::oneshot::Receiver<String>,
) -> Result<()> {
    let target = config.connect_address();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(why) = stopped.try_recv() {
            return Err(Error::Stopped(why));
        }
        if tokio::net::TcpStream::connect(target).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotListening {
                addr: config.listen,
                waited: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
