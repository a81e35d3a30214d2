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
    start(&config).await?.serve(shutdown).await
}

/// A broker that is accepting connections; [`Started::serve`] keeps it until shutdown.
/// `k3sense all` starts the broker first and its clients only once this exists.
pub struct Started {
    listen: std::net::SocketAddr,
    /// Resolves with a reason if rumqttd's threads end (they never should).
    stopped: tokio::sync::oneshot::Receiver<String>,
}

impl Started {
    /// Waits for `shutdown` (Ok) or for rumqttd to die (Err).
    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        tokio::select! {
            () = shutdown.cancelled() => {
                tracing::info!(listen = %self.listen, "MQTT broker stopping");
                Ok(())
            }
            result = self.stopped => {
                let why = result.unwrap_or_else(|_| "broker thread vanished".to_owned());
                Err(Error::Stopped(why))
            }
        }
    }
}

/// Starts rumqttd and returns once its listener accepts connections.
pub async fn start(config: &Config) -> Result<Started> {
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

    let auth = users.is_some();
    let probe_login = users.as_ref().and_then(Users::any_login);
    let rumqttd_config = embedded::rumqttd_config(config, users);
    let mut stopped = embedded::spawn(rumqttd_config)?;
    wait_until_listening(config, probe_login, &mut stopped).await?;
    tracing::info!(listen = %config.listen, auth, "MQTT broker ready");
    Ok(Started {
        listen: config.listen,
        stopped,
    })
}

/// Polls the listen address with a real MQTT CONNECT until the broker answers with a CONNACK,
/// or its thread dies. A CONNACK proves the listener is ours and working, not merely bound.
async fn wait_until_listening(
    config: &Config,
    probe_login: Option<(String, String)>,
    stopped: &mut tokio::sync::oneshot::Receiver<String>,
) -> Result<()> {
    let target = config.connect_address();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(why) = stopped.try_recv() {
            return Err(Error::Stopped(why));
        }
        if probe(target, probe_login.clone()).await {
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

async fn probe(target: std::net::SocketAddr, login: Option<(String, String)>) -> bool {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet};
    let mut options = MqttOptions::new(
        "k3sense-broker-probe",
        target.ip().to_string(),
        target.port(),
    );
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(options, 1);
    let answered = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if answered {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Ok(event) = events.poll().await {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    answered
}
