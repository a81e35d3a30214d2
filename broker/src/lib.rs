//! The k3sense MQTT broker: an authorising MQTT proxy (3.1.1, 5 and 3.1 on one port) in front
//! of an embedded [rumqttd], configured for a Raspberry Pi, that behaves like a service (clear
//! start-up errors, a `run` that returns on shutdown).
//!
//! The publisher sends its readings here (retained, QoS 1) and the gateway, `mosquitto_sub`,
//! Home Assistant and any other MQTT client subscribe here. In a cluster it is the `broker`
//! Deployment behind the Service `broker:1883`; in `k3sense all` it runs in the same process.
//!
//! # Why a proxy in front of rumqttd
//!
//! rumqttd routes and retains messages well, but measured here it has no authorisation, lets any
//! empty publish erase a retained reading, refuses keepalive 0 by closing the socket, disconnects
//! a `$SYS/#` subscriber, and stalls its TLS listener on one silent client. Patching rumqttd would
//! mean a fork; instead this crate owns the public listeners and speaks MQTT to every client
//! itself, and rumqttd only ever sees connections the proxy has vetted:
//!
//! ```text
//! client ─▶ listener ─▶ [TLS handshake] ─▶ CONNECT (deadline) ─▶ authenticate ─▶ authorise each
//!           (accept only)  (own task)          (own task)          users file     PUBLISH/SUBSCRIBE
//!                                                                                      │
//!                              rumqttd, through in-memory pipes, one internal account ◀┘
//! ```
//!
//! Its links to rumqttd are in-memory pipes and rumqttd's router is a task on this crate's
//! runtime (vendor/rumqttd patches 5 and 6, see `embedded::spawn`), so a message crosses the
//! broker without a loopback socket or a wake-up of another thread.
//!
//! See broker/README.md for the users file, the roles, TLS, limits, refusal codes and metrics.
//!
//! # What rumqttd does not do, and what this crate does about it
//!
//! - `Broker::start()` blocks forever and has no stop: it runs on its own thread; [`Started::serve`]
//!   stops the public listeners and ends the connections on shutdown. The thread ends with the
//!   process.
//! - A failed bind is only logged by rumqttd: the public listeners are bound by this crate (a
//!   taken port is an error), and [`start`] waits for a CONNACK through the whole chain.
//! - rumqttd's defaults size its in-memory log for servers (10 × 100 MB segments): this crate
//!   caps it for a 1 GB Pi.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `config` | [`Config`]: the command-line flags and their `K3SENSE_*` variables |
//! | `users` | [`Users`], [`Role`]: the users file |
//! | `acl` | the rules of each role, and each topic family's payload cap, as pure functions |
//! | `listener` | accept loops (TCP, TLS, the local socket): one task per connection, flood cap |
//! | `peer` | who is at the other end of a connection: an address, or the local socket |
//! | `pending` | sockets not logged in yet: per source and in total, the oldest closed first |
//! | `throttle` | failed logins slowed per source and per account |
//! | `filters` | subscriptions per connection, and the filters rumqttd keeps (per account, in total) |
//! | `clip` | client-supplied strings cut short in log lines |
//! | `tls` | the TLS acceptor from PEM files |
//! | `session` | one connection, start to end: handshake, relay, goodbye |
//! | `handshake` | CONNECT under a deadline, authentication, the will's check, the `--max-connections` permit, the registry, the link to rumqttd |
//! | `judge` | what to do with each client packet (ACL, empty-publish rule, limits), as a pure decision |
//! | `relay` | both directions of a logged-in connection: carries out the judge's actions, counts and logs them; the goodbye to rumqttd |
//! | `replays` | replay requests rate-limited per connection and per account |
//! | `backlog` | a QoS 1 subscriber too far behind rumqttd's log is disconnected, never silently skipped |
//! | `shared` | what every connection shares: users, rules, tables, metrics, rumqttd's address |
//! | `frame` | MQTT framing over a byte stream (rumqttc's parser) |
//! | `v5` | MQTT 5 and 3.1 clients on the same port: their packets translated to and from 3.1.1 |
//! | `retained` | which topics hold a retained message |
//! | `registry` | live client ids (takeover) and the slot ids rumqttd sees for clean sessions |
//! | `metrics` | [`Metrics`] (prometheus-client, as in the gateway and publisher) and `--metrics-listen`'s `GET /metrics` |
//! | `embedded` | rumqttd's config on the internal port, and its thread |
//! | `error` | [`Error`] |

mod acl;
mod backlog;
mod clip;
mod config;
mod embedded;
mod error;
mod filters;
mod frame;
mod handshake;
mod judge;
mod listener;
mod metrics;
mod peer;
mod pending;
mod registry;
mod relay;
mod replays;
mod retained;
mod session;
mod shared;
mod sys;
mod throttle;
mod tls;
mod users;
mod v5;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{Config, Options, TlsOptions};
pub use error::{Error, Result};
pub use metrics::{Metrics, Reason, Snapshot};
pub use users::{Role, Sensors, Users};

/// How long the broker may take to accept its first connection after start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connections may take to end by themselves once shutdown begins (clients shutting
/// down beside the broker, as in `k3sense all`, send their DISCONNECT in this time).
const DRAIN: Duration = Duration::from_secs(1);

/// Starts the broker and serves until `shutdown` is cancelled.
///
/// Returns an error at start-up when a listen address cannot be bound (say, another broker
/// already holds port 1883), when the users file or TLS files are unusable, or when rumqttd dies.
/// After `shutdown`, the rumqttd thread keeps its internal socket until the process exits,
/// because rumqttd offers no way to stop it; the public listeners are closed.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    start(&config).await?.serve(shutdown).await
}

/// A broker that is accepting connections; [`Started::serve`] keeps it until shutdown.
/// `k3sense all` starts the broker first and its clients only once this exists.
pub struct Started {
    listen: SocketAddr,
    tls_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    /// The local socket's address in `--broker` form (`unix:@NAME`), if there is one.
    local_address: Option<String>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    stop: CancellationToken,
    sessions: CancellationToken,
    /// Resolves with a reason if rumqttd's router task or listener thread ends (neither should).
    stopped: tokio::sync::oneshot::Receiver<String>,
}

impl Started {
    /// The plain MQTT listener's address (its real port, when `--listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_listen
    }

    /// Where clients of this process reach the broker without TCP, in the form `--broker` takes
    /// (`unix:@NAME`, an abstract Unix socket): set when [`Config::local_socket`] asked for it
    /// and the socket could be bound.
    pub fn local_address(&self) -> Option<&str> {
        self.local_address.as_deref()
    }

    /// The `--metrics-listen` address, if there is one.
    pub fn metrics_local_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen
    }

    /// The broker's counters; they keep counting while the broker serves.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Waits for `shutdown` (Ok) or for rumqttd to die (Err). On shutdown the listeners close at
    /// once, connections get a moment to end by themselves, then the rest are closed.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let result = tokio::select! {
            () = shutdown.cancelled() => {
                tracing::info!(listen = %self.listen, "MQTT broker stopping");
                Ok(())
            }
            result = self.stopped => {
                let why = result.unwrap_or_else(|_| "broker thread vanished".to_owned());
                Err(Error::Stopped(why))
            }
        };
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN, self.tracker.wait())
            .await
            .is_err()
        {
            self.sessions.cancel();
            let _ = tokio::time::timeout(DRAIN, self.tracker.wait()).await;
        }
        result
    }
}

/// Starts rumqttd on an internal port and the public listeners in front of it, and returns once
/// a client gets a CONNACK through the public listener.
pub async fn start(config: &Config) -> Result<Started> {
    let options = &config.options;
    let users = load_users(options)?;
    let topics = k3sense_protocol::Topics::new(options.topic_prefix.clone())?;
    let Bound {
        plain,
        listen,
        tls,
        exporter,
    } = bind_all(config).await?;

    let upstream = internal_upstream()?;
    let (mut stopped, door) = embedded::spawn(embedded::rumqttd_config(config, &upstream))?;
    let internal_login = Some((upstream.username.clone(), upstream.password.clone()));
    wait_until_answering(upstream.addr, config.listen, internal_login, &mut stopped).await?;

    let metrics = Arc::new(Metrics::default());
    let shared = new_shared(
        options,
        &topics,
        users.clone(),
        upstream,
        door,
        metrics.clone(),
    );
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let sessions = CancellationToken::new();
    let open = Arc::new(AtomicUsize::new(0));
    let listener = |socket| listener::Listener {
        socket,
        shared: shared.clone(),
        open: open.clone(),
        // Connected clients, pending sockets (bounded by the pool, which closes the oldest), and
        // room for those between the two: past the pool, this only guards file descriptors.
        max_open: options
            .max_connections
            .saturating_add(options.max_pending as usize)
            .saturating_add(64),
        tracker: tracker.clone(),
        stop: stop.clone(),
        sessions: sessions.clone(),
    };
    tracker.spawn(listener(listener::Socket::Tcp(plain, None)).run());
    let mut tls_listen = None;
    if let Some((tls_listener, acceptor)) = tls {
        tls_listen = tls_listener.local_addr().ok();
        tracker.spawn(listener(listener::Socket::Tcp(tls_listener, Some(acceptor))).run());
    }
    let mut local_address = None;
    if config.local_socket {
        if let Some((unix, name)) = bind_local() {
            local_address = Some(format!("unix:@{name}"));
            tracker.spawn(listener(listener::Socket::Unix(unix)).run());
        }
    }
    let mut metrics_listen = None;
    if let Some(exporter) = exporter {
        metrics_listen = exporter.local_addr().ok();
        tracker.spawn(metrics::serve(exporter, metrics.clone(), stop.clone()));
    }

    let public = Config::new(listen).connect_address();
    let login = users.as_ref().and_then(Users::any_login);
    wait_until_answering(public, config.listen, login, &mut stopped).await?;
    tracing::info!(
        listen = %listen,
        tls_listen = ?tls_listen,
        local = ?local_address,
        metrics_listen = ?metrics_listen,
        auth = users.is_some(),
        accounts = users.as_ref().map_or(0, Users::len),
        prefix = topics.prefix(),
        "MQTT broker ready"
    );
    Ok(Started {
        listen,
        tls_listen,
        metrics_listen,
        local_address,
        metrics,
        tracker,
        stop,
        sessions,
        stopped,
    })
}

/// The public sockets, bound before rumqttd starts so a taken port is an error at once.
struct Bound {
    plain: TcpListener,
    /// `plain`'s address (its real port when `--listen` asked for port 0).
    listen: SocketAddr,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    exporter: Option<TcpListener>,
}

async fn bind_all(config: &Config) -> Result<Bound> {
    let tls = match (
        &config.tls.tls_listen,
        &config.tls.tls_cert,
        &config.tls.tls_key,
    ) {
        (Some(addr), Some(cert), Some(key)) => Some((*addr, tls::acceptor(cert, key)?)),
        _ => None,
    };
    let plain = bind(config.listen, "--listen").await?;
    let listen = plain.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        flag: "--listen",
        source,
    })?;
    let tls = match tls {
        Some((addr, acceptor)) => Some((bind(addr, "--tls-listen").await?, acceptor)),
        None => None,
    };
    let exporter = match config.metrics_listen {
        Some(addr) => Some(bind(addr, "--metrics-listen").await?),
        None => None,
    };
    Ok(Bound {
        plain,
        listen,
        tls,
        exporter,
    })
}

/// The users file, if one is set, with a warning for each account that has full access.
fn load_users(options: &Options) -> Result<Option<Users>> {
    let users = match &options.users_file {
        Some(path) => Some(Users::from_file(path)?),
        None => None,
    };
    match &users {
        None => tracing::warn!(
            "no --users-file: the broker accepts anonymous clients with full access; set one in any shared network"
        ),
        Some(users) => {
            for name in users.unscoped() {
                tracing::warn!(
                    user = name,
                    "this account has no role and so full access; add :admin, :reader, :gateway or :publisher:<ids> to its line in the users file"
                );
            }
        }
    }
    Ok(users)
}

/// What every connection will share, from the options.
fn new_shared(
    options: &Options,
    topics: &k3sense_protocol::Topics,
    users: Option<Users>,
    upstream: session::Upstream,
    door: rumqttd::InProcess,
    metrics: Arc<Metrics>,
) -> Arc<session::Shared> {
    Arc::new(session::Shared {
        acl: acl::Acl::new(topics.prefix()),
        users,
        metrics: metrics.clone(),
        upstream,
        door,
        retained: retained::RetainedTopics::default(),
        registry: Arc::new(registry::Registry::default()),
        clients: Arc::new(tokio::sync::Semaphore::new(options.max_connections)),
        max_payload: options.max_payload,
        connect_timeout: options.connect_timeout,
        pending: Arc::new(pending::PendingPool::new(
            options.max_pending as usize,
            options.max_pending_per_source as usize,
            metrics,
        )),
        throttle: throttle::Throttle::default(),
        filters: filters::FilterTable::new(options.max_filters, options.max_filters_per_account),
        max_subscriptions: options.max_subscriptions,
        replays: replays::AccountBuckets::default(),
        log_bytes: backlog::LogBytes::default(),
        parked: backlog::Parked::default(),
        slow_log: backlog::SlowLog::default(),
        sys: sys::SysTree::new(std::time::Duration::from_secs(options.sys_interval)),
    })
}

/// Connections the kernel may hold for the accept loop. A flood of connects (silent sockets
/// being reopened as the pending pool closes them) must not fill the queue: a real client's SYN
/// dropped there waits a 1 s retransmission. Linux caps it at `net.core.somaxconn` (4096).
const BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    bound().map_err(|source| Error::Bind { addr, flag, source })
}

/// The local socket: a Unix socket in the abstract namespace, named for this process and a
/// random number, so brokers side by side (tests, `all` twice) never meet. Abstract: no file to
/// create on a read-only root or to leave behind; it is reachable from this network namespace
/// only, as loopback is, and every connection still logs in. `None` (with a warning) where it
/// cannot be bound, such as outside Linux: the clients then use TCP, as before.
fn bind_local() -> Option<(tokio::net::UnixListener, String)> {
    let name = format!(
        "k3sense-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    // A leading NUL names an abstract socket (Tokio maps it to `from_abstract_name`); outside
    // Linux it is refused as a path with a NUL in it.
    match tokio::net::UnixListener::bind(format!("\0{name}")) {
        Ok(listener) => Some((listener, name)),
        Err(e) => {
            tracing::warn!(error = %e, "no local socket: the clients of this process use TCP");
            None
        }
    }
}

/// A free loopback port for rumqttd (which binds by itself and cannot take port 0) and the one
/// account it will accept, with a random password that never leaves this process.
fn internal_upstream() -> Result<session::Upstream> {
    let addr = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|source| Error::Bind {
            addr: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            flag: "(the internal loopback port)",
            source,
        })?;
    Ok(session::Upstream {
        addr,
        username: "k3sense-proxy".to_owned(),
        password: format!("{:032x}", rand::random::<u128>()),
    })
}

/// Polls `target` with a real MQTT CONNECT until it answers with a successful CONNACK, or
/// rumqttd's thread dies. A CONNACK proves the listener is ours and working, not merely bound.
async fn wait_until_answering(
    target: SocketAddr,
    listen: SocketAddr,
    login: Option<(String, String)>,
    stopped: &mut tokio::sync::oneshot::Receiver<String>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(why) = stopped.try_recv() {
            return Err(Error::Stopped(why));
        }
        if probe(target, login.clone()).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotListening {
                addr: listen,
                waited: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn probe(target: SocketAddr, login: Option<(String, String)>) -> bool {
    use k3sense_protocol::mqtt::ClientEvent;
    let mut mqtt = k3sense_protocol::MqttConfig::new(target.to_string());
    mqtt.keepalive = Duration::from_secs(5);
    if let Some((user, password)) = login {
        mqtt.username = Some(user);
        mqtt.password = Some(password);
    }
    let Ok(builder) = mqtt.client("k3sense-broker-probe") else {
        return false;
    };
    let (client, mut events) = builder
        .capacity(1)
        .connect_timeout(Duration::from_secs(1))
        .start();
    let answered = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match events.recv().await {
                Some(ClientEvent::Connected { .. }) => return true,
                Some(ClientEvent::Disconnected { .. }) | None => return false,
                Some(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    if answered {
        // The goodbye waits for rumqttd to close the connection itself: it hands the
        // connection's number to the next client at once, and a close it noticed only later
        // would be taken for that client's (seen: the first publisher's last will fired while
        // it was connected, so the sensor showed offline). See `session::until_upstream_closes`.
        client.goodbye(Duration::from_secs(2)).await;
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_limit_leaves_two_thirds_of_rumqttds_log_for_a_session_to_resume() {
        let config = embedded::rumqttd_config(
            &Config::new("127.0.0.1:0".parse().unwrap()),
            &session::Upstream {
                addr: "127.0.0.1:1".parse().unwrap(),
                username: "u".to_owned(),
                password: "p".to_owned(),
            },
        );
        let router = config.router;
        // After dropping its oldest segment the log still holds count − 1 full segments.
        let held = (router.max_segment_size * (router.max_segment_count - 1)) as u64;
        assert!(3 * backlog::MAX_BACKLOG <= held, "{held}");
        // And a log never holds more than backlog::LOG_MAX.
        let largest = config.v4.unwrap()["1"].connections.max_payload_size;
        let most = (router.max_segment_count * (router.max_segment_size + largest)) as u64;
        assert!(most <= backlog::LOG_MAX, "{most}");
    }
}
