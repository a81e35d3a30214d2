//! One client's connection, from its first byte to its last: CONNECT under a deadline,
//! authentication, authorisation of every PUBLISH and SUBSCRIBE, and relaying to rumqttd.
//!
//! ```text
//! client ──▶ [client_to_broker] ── allowed packets ──────────────────────────▶ rumqttd (internal)
//!    ▲               │ PUBACK/PUBREC/PUBCOMP/SUBACK/PINGRESP for what it answers itself
//!    │               ▼
//!    └────── [broker_to_client] ◀── PUBLISH, acks, SUBACK (merged with refused filters) ── rumqttd
//! ```
//!
//! Both directions run as two futures of the connection's one task; when either ends, the
//! connection ends. Each connection is its own task, so a slow or silent client delays nobody.
//!
//! Refusal semantics (MQTT 3.1.1 has no negative PUBACK):
//! - A forbidden PUBLISH, or an empty one that would erase a retained message, is dropped and
//!   acknowledged as if delivered (PUBACK for QoS 1, PUBREC/PUBCOMP for QoS 2), so a client's
//!   queue is not stuck on it; it is counted and logged once per connection.
//! - A forbidden SUBSCRIBE filter gets return code 0x80; the allowed filters of the same packet
//!   are forwarded and their codes merged into one SUBACK.
//! - Keepalive 0 is served: rumqttd gets a keepalive of its own and the proxy keeps that link
//!   alive with PINGREQs; the client's PINGREQs are answered by the proxy.
//! - A protocol violation, an oversized packet or bytes that are not MQTT close only that
//!   connection, and its will is published. The proxy publishes the will itself and then
//!   disconnects from rumqttd cleanly (see [`goodbye_with_will`]): rumqttd reuses a connection's
//!   number at once, and a socket it saw close only later would be taken for the next client's,
//!   firing *that* client's will while it is connected.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    QoS,
    v4::{
        ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, Publish,
        SubAck, Subscribe, SubscribeReasonCode,
    },
    valid_topic,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Metrics, Users,
    acl::{Acl, PublishVerdict, SubscribeVerdict},
    clip::{Clip, clip_opt},
    filters::{FilterTable, Subscriptions},
    frame::{self, First, FrameError, FrameReader},
    metrics::Reason,
    pending::{Pending, PendingPool, Source},
    retained::RetainedTopics,
    throttle::{Throttle, Turn},
    users::Role,
    v5::{self, Codec, Origin, Version},
};

/// The keepalive the proxy announces to rumqttd for every client (rumqttd refuses 0), and keeps
/// by pinging at half of it.
const UPSTREAM_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long rumqttd may take to accept a connection and answer CONNECT.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for the topic and headers above `--max-payload` in one packet.
pub(crate) const HEADER_ROOM: usize = 1024;
/// Replies the proxy makes itself, queued for the client's writer.
const LOCAL_REPLIES: usize = 32;

/// Where rumqttd listens inside the process, and the one account it accepts.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    pub(crate) username: String,
    pub(crate) password: String,
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) users: Option<Users>,
    pub(crate) acl: Acl,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) upstream: Upstream,
    pub(crate) retained: RetainedTopics,
    pub(crate) registry: Arc<crate::registry::Registry>,
    pub(crate) clients: Arc<Semaphore>,
    pub(crate) max_payload: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) pending: Arc<PendingPool>,
    pub(crate) throttle: Throttle,
    pub(crate) filters: FilterTable,
    pub(crate) max_subscriptions: usize,
}

/// Who is on the other end, for log lines, and how to speak its MQTT version.
struct Client<'a> {
    peer: SocketAddr,
    id: &'a str,
    user: Option<&'a str>,
    role: &'a Role,
    codec: &'a Codec,
}

/// A client's CONNECT, as 3.1.1, with what its own version adds.
struct Greeting {
    connect: Connect,
    /// Any stored session of this client id is discarded first (3.1.1's clean session,
    /// MQTT 5's Clean Start).
    clean_start: bool,
    codec: Codec,
}

/// How the client side of a connection ended.
enum End {
    /// The client sent DISCONNECT (forwarded: no will).
    Disconnect,
    /// The client closed, broke a rule or went silent: its will is published.
    Abrupt,
    /// The broker is stopping: rumqttd goes too.
    Shutdown,
}

/// Serves one connection (already through TLS, if any) until it ends; `deadline` bounds how long
/// the CONNECT may take to arrive.
pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    deadline: Instant,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    pending: Pending,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(shared.max_payload + HEADER_ROOM);
    let mut scratch = BytesMut::new();
    let metrics = &shared.metrics;

    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, read_connect(&mut reader, &mut client_rd)) => read,
        // Counted by the pool when it pushed this socket out.
        () = pending.evicted.cancelled() => {
            tracing::debug!(%peer, "closed before CONNECT to make room for a newer socket");
            return;
        }
    };
    let greeting = match read {
        Err(_) => {
            metrics.refused(Reason::ConnectTimeout);
            // Debug, not info: a flood of silent sockets would be a flood of lines (counted in
            // `refused_total{reason="connect_timeout"}`).
            tracing::debug!(%peer, "closed: no CONNECT within --connect-timeout");
            return;
        }
        Ok(Ok(Some(greeting))) => greeting,
        Ok(Ok(None)) => return,
        Ok(Err(Refusal::Version(level))) => {
            metrics.refused(Reason::ProtocolVersion);
            tracing::info!(%peer, level, "refused: only MQTT 3.1, 3.1.1 and 5 (protocol levels 3, 4, 5) are served");
            let _ = refuse(
                &mut client_wr,
                ConnectReturnCode::RefusedProtocolVersion,
                &Codec::new(Version::V311, None),
                &mut scratch,
            )
            .await;
            return;
        }
        Ok(Err(Refusal::V5(code))) => {
            metrics.refused(Reason::ProtocolVersion);
            tracing::info!(%peer, ?code, "refused: an MQTT 5 CONNECT asking for what is not served");
            if let Ok(bytes) = v5::bytes_of(&v5::refusal(code)) {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    use tokio::io::AsyncWriteExt;
                    client_wr.write_all(&bytes).await?;
                    client_wr.flush().await
                })
                .await;
            }
            return;
        }
        Ok(Err(Refusal::Frame(e))) => {
            let reason = frame_reason(&e);
            metrics.refused(reason);
            tracing::info!(%peer, reason = reason.as_str(), error = %e, "closed before CONNECT");
            return;
        }
    };

    let connect = &greeting.connect;
    let role = match login(&shared, peer, connect, deadline, &pending).await {
        Ok(role) => role,
        Err((code, reason)) => {
            if let Some(reason) = reason {
                metrics.refused(reason);
                let user = connect.login.as_ref().map(|l| l.username.as_str());
                tracing::info!(%peer, client_id = %Clip(&connect.client_id), user = %clip_opt(user), reason = reason.as_str(), "refused");
            }
            if let Some(code) = code {
                let _ = refuse(&mut client_wr, code, &greeting.codec, &mut scratch).await;
            }
            return;
        }
    };
    // Logged in: no longer one of the sockets the pending pool may close.
    drop(pending);
    // Boxed: a socket that is still pending (thousands of silent ones, in a flood) then holds
    // only the small login state, not the relay's (measured: a 6 KiB task each before).
    Box::pin(logged_in(
        client_rd, client_wr, reader, scratch, peer, greeting, role, shared, shutdown,
    ))
    .await;
}

/// The rest of a connection once its login is accepted: the will's check, `--max-connections`,
/// the link to rumqttd, relaying both ways, and the goodbye.
#[allow(clippy::too_many_arguments)]
async fn logged_in<R, W>(
    mut client_rd: R,
    mut client_wr: W,
    mut reader: FrameReader,
    mut scratch: BytesMut,
    peer: SocketAddr,
    greeting: Greeting,
    role: Role,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let Greeting {
        connect,
        clean_start,
        codec,
    } = greeting;
    let user = connect.login.as_ref().map(|l| l.username.clone());
    let client = Client {
        peer,
        id: &connect.client_id,
        user: user.as_deref(),
        role: &role,
        codec: &codec,
    };

    if let Some(will) = &connect.last_will {
        // Judged as not retained: no will may erase a reading, whatever its flag.
        let verdict = shared
            .acl
            .publish(&role, &will.topic, will.message.is_empty(), false);
        let too_large = shared
            .acl
            .payload_cap(&will.topic)
            .is_some_and(|cap| will.message.len() > cap);
        if !valid_topic(&will.topic)
            || will.topic.is_empty()
            || verdict != PublishVerdict::Allow
            || too_large
        {
            metrics.refused(Reason::NotAuthorised);
            metrics.publish_forbidden();
            tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = role.name(), topic = %Clip(&will.topic), "refused: last will to a topic this account may not publish (or over the topic's payload cap)");
            let _ = refuse(
                &mut client_wr,
                ConnectReturnCode::NotAuthorized,
                &codec,
                &mut scratch,
            )
            .await;
            return;
        }
    }

    let Ok(_permit) = shared.clients.clone().try_acquire_owned() else {
        metrics.refused(Reason::TooManyConnections);
        tracing::warn!(%peer, "refused: --max-connections clients are connected");
        let _ = refuse(
            &mut client_wr,
            ConnectReturnCode::ServiceUnavailable,
            &codec,
            &mut scratch,
        )
        .await;
        return;
    };

    let key = (!connect.client_id.is_empty()).then(|| {
        format!(
            "{}\0{}",
            user.as_deref().unwrap_or_default(),
            connect.client_id
        )
    });
    let session_id = internal_client_id(
        shared
            .users
            .is_some()
            .then(|| user.as_deref().unwrap_or_default()),
        &connect.client_id,
    );
    let persistent = (!connect.clean_session).then(|| session_id.clone());
    let discard = (clean_start && !session_id.is_empty()).then_some(session_id);
    let registration = shared.registry.register(key, persistent, discard);
    metrics.client_id_slots(shared.registry.slots());
    // A takeover: the old connection ends (publishing its will) before this one is answered,
    // so its will can never follow this client's own messages.
    registration.after_previous(UPSTREAM_TIMEOUT * 2).await;
    if let Some(stored) = &registration.discard {
        discard_session(&shared.upstream, stored, &shutdown).await;
    }
    let upstream =
        match connect_upstream(&shared.upstream, &connect, &registration.internal_id).await {
            Ok(upstream) => upstream,
            Err(why) => {
                metrics.refused(Reason::BrokerUnavailable);
                tracing::warn!(%peer, why, "refused: the embedded broker did not answer");
                let _ = refuse(
                    &mut client_wr,
                    ConnectReturnCode::ServiceUnavailable,
                    &codec,
                    &mut scratch,
                )
                .await;
                return;
            }
        };
    let (mut up_rd, mut up_wr, ack, mut up_reader) = upstream;
    if frame::write_to_client(
        &mut client_wr,
        &Packet::ConnAck(ack.clone()),
        &codec,
        Origin::Relay,
        &mut scratch,
    )
    .await
    .is_err()
        || ack.code != ConnectReturnCode::Success
    {
        return;
    }

    let connected = Connected::new(metrics, _permit);
    tracing::debug!(%peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = role.name(), keepalive = connect.keep_alive, "client connected");

    let pending = PendingSubacks::default();
    let (local_tx, local_rx) = mpsc::channel(LOCAL_REPLIES);
    let mut refusals = Refusals::default();
    let end = tokio::select! {
        end = client_to_broker(&shared, &client, connect.keep_alive, &mut reader, &mut client_rd, &mut up_wr, &local_tx, &pending, &mut refusals) => end,
        () = broker_to_client(metrics, &mut up_reader, &mut up_rd, &mut client_wr, local_rx, &pending, &codec) => End::Abrupt,
        () = registration.taken_over.cancelled() => {
            // As Mosquitto does (and MQTT 5 says: the network connection closed without a
            // DISCONNECT), the old connection's will is published; the new one waits for it.
            tracing::info!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), "closed: a new connection took over this client id");
            End::Abrupt
        }
        () = shutdown.cancelled() => End::Shutdown,
    };
    if refusals.total() > 1 {
        tracing::info!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), publishes = refusals.publishes, subscriptions = refusals.subscriptions, "refusals on this connection");
    }
    tracing::debug!(%peer, client_id = %Clip(client.id), "client gone");
    drop(connected);
    drop((client_rd, client_wr));
    let will = match end {
        End::Shutdown => return,
        End::Disconnect => None,
        End::Abrupt => connect.last_will.as_ref(),
    };
    goodbye_with_will(will, &mut up_wr, &mut up_rd, &mut scratch, &shutdown).await;
}

/// Ends the upstream connection cleanly: publishes the client's will first if it has one (the
/// client went away without DISCONNECT), then DISCONNECT, then waits for rumqttd to close.
///
/// The will was checked against the account's rules at CONNECT. rumqttd still holds it too, as
/// a fallback should this connection to it break first; after our DISCONNECT it drops it.
async fn goodbye_with_will<W, R>(
    will: Option<&rumqttc::mqttbytes::v4::LastWill>,
    up_wr: &mut W,
    up_rd: &mut R,
    scratch: &mut BytesMut,
    shutdown: &CancellationToken,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    if let Some(will) = will {
        let mut publish = Publish::from_bytes(
            will.topic.clone(),
            // QoS 2 would need the PUBREC/PUBREL exchange; delivery at least once is enough for
            // an availability message.
            if will.qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            will.message.clone(),
        );
        publish.retain = will.retain;
        // Any number works: rumqttd keeps no state for a QoS 1 packet id.
        publish.pkid = if publish.qos == QoS::AtMostOnce { 0 } else { 1 };
        if frame::write(up_wr, &Packet::Publish(publish), scratch)
            .await
            .is_err()
        {
            return;
        }
    }
    if frame::write(up_wr, &Packet::Disconnect, scratch)
        .await
        .is_ok()
    {
        until_upstream_closes(up_rd, shutdown).await;
    }
}

/// After a DISCONNECT, waits (at most [`UPSTREAM_TIMEOUT`]) for rumqttd to close its side first.
///
/// rumqttd hands a connection's number to the next connection as soon as it has handled the
/// DISCONNECT. Were the proxy to close the socket at once, rumqttd's reader for the old
/// connection could notice the close only after that, and report it under the number that now
/// belongs to a *new* connection, which rumqttd then drops right after its CONNACK (measured:
/// about one short session in 500 under churn, and any client connecting meanwhile could be the
/// one). Once rumqttd has dropped the connection itself, its reader reports nothing.
async fn until_upstream_closes<R: AsyncRead + Unpin>(up_rd: &mut R, shutdown: &CancellationToken) {
    let mut sink = [0u8; 512];
    let closed = async {
        loop {
            match up_rd.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(UPSTREAM_TIMEOUT, closed) => {}
        () = shutdown.cancelled() => {}
    }
}

/// Why a connection got no further than its first packet.
enum Refusal {
    Version(u8),
    V5(rumqttc::v5::mqttbytes::v5::ConnectReturnCode),
    Frame(FrameError),
}

/// Reads the CONNECT of MQTT 3.1.1, 3.1 (rewritten to 3.1.1) or 5 (translated, see `v5`).
async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut FrameReader,
    stream: &mut R,
) -> Result<Option<Greeting>, Refusal> {
    let version = match reader.first(stream).await.map_err(Refusal::Frame)? {
        First::Closed => return Ok(None),
        First::NotConnect => {
            return Err(Refusal::Frame(FrameError::Malformed(
                rumqttc::mqttbytes::Error::IncorrectPacketFormat,
            )));
        }
        First::Connect(4) => Version::V311,
        First::Connect(3) if reader.accept_v31() => Version::V31,
        First::Connect(5) => {
            use rumqttc::v5::mqttbytes::v5::Packet as P5;
            let P5::Connect(connect, will, login) =
                reader.take_v5_connect().map_err(Refusal::Frame)?
            else {
                return Err(Refusal::Frame(FrameError::Truncated));
            };
            let hello = v5::connect_from_v5(connect, will, login).map_err(Refusal::V5)?;
            return Ok(Some(Greeting {
                connect: hello.connect,
                clean_start: hello.clean_start,
                codec: Codec::new(Version::V5, hello.assigned_id),
            }));
        }
        First::Connect(level) => return Err(Refusal::Version(level)),
    };
    match reader.next(stream).await.map_err(Refusal::Frame)? {
        Some(Packet::Connect(connect)) => Ok(Some(Greeting {
            clean_start: connect.clean_session,
            connect,
            codec: Codec::new(version, None),
        })),
        Some(_) | None => Err(Refusal::Frame(FrameError::Truncated)),
    }
}

/// Why a login failed: the CONNACK to answer (none if the socket was closed to make room) and
/// the reason to count and log (none if already counted).
type LoginRefusal = (Option<ConnectReturnCode>, Option<Reason>);

/// Authenticates the CONNECT under the login throttle (see `throttle`): waits for its address's
/// turn, checks the password, and holds a wrong one's answer back by the failures' delay. The
/// waits end early if the pending pool closes the socket.
async fn login(
    shared: &Shared,
    peer: SocketAddr,
    connect: &Connect,
    deadline: Instant,
    pending: &Pending,
) -> Result<Role, LoginRefusal> {
    let source = Source::of(peer.ip());
    let metrics = &shared.metrics;
    let checked = shared.users.is_some() && connect.login.is_some();
    if checked {
        match shared.throttle.turn(source, Instant::now(), deadline) {
            Turn::TooLate => {
                metrics.login_delayed();
                return Err((
                    Some(ConnectReturnCode::ServiceUnavailable),
                    Some(Reason::LoginThrottled),
                ));
            }
            Turn::At(at) if at > Instant::now() => {
                metrics.login_delayed();
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = pending.evicted.cancelled() => return Err((None, None)),
                }
            }
            Turn::At(_) => {}
        }
    }
    let username = connect.login.as_ref().map(|l| l.username.as_str());
    // Only accounts that exist are tracked per account: unknown names would grow the table.
    let account = username.filter(|name| shared.users.as_ref().is_some_and(|u| u.has(name)));
    match authenticate(shared.users.as_ref(), connect.login.as_ref()) {
        Ok(role) => {
            if checked {
                shared.throttle.succeeded(source, account);
            }
            Ok(role)
        }
        Err(ConnectReturnCode::BadUserNamePassword) => {
            let wait = shared.throttle.failed(source, account, Instant::now());
            metrics.refused(Reason::BadCredentials);
            tracing::info!(%peer, client_id = %Clip(&connect.client_id), user = %clip_opt(username), reason = Reason::BadCredentials.as_str(), answer_in = ?wait, "refused");
            if !wait.is_zero() {
                metrics.login_delayed();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = pending.evicted.cancelled() => return Err((None, None)),
                }
            }
            Err((Some(ConnectReturnCode::BadUserNamePassword), None))
        }
        Err(code) => Err((Some(code), Some(Reason::NotAuthorised))),
    }
}

/// The role of this login, or the CONNACK code that refuses it: 5 without credentials where a
/// users file is set, 4 for a wrong username or password. Without a users file everyone is in.
fn authenticate(users: Option<&Users>, login: Option<&Login>) -> Result<Role, ConnectReturnCode> {
    let Some(users) = users else {
        return Ok(Role::Unscoped);
    };
    let login = login.ok_or(ConnectReturnCode::NotAuthorized)?;
    users
        .authenticate(&login.username, &login.password)
        .cloned()
        .ok_or(ConnectReturnCode::BadUserNamePassword)
}

async fn refuse<W: AsyncWrite + Unpin>(
    stream: &mut W,
    code: ConnectReturnCode,
    codec: &Codec,
    scratch: &mut BytesMut,
) -> std::io::Result<()> {
    let ack = Packet::ConnAck(ConnAck::new(code, false));
    tokio::time::timeout(
        Duration::from_secs(1),
        frame::write_to_client(stream, &ack, codec, Origin::Front, scratch),
    )
    .await
    .unwrap_or(Ok(()))
}

/// Makes rumqttd drop the stored session `internal_id` (a client starting clean after it had
/// a persistent session): a clean-session connection under that id, then DISCONNECT. rumqttd
/// would otherwise keep the old session for the next persistent connect, which would get
/// messages queued under subscriptions it gave up.
async fn discard_session(upstream: &Upstream, internal_id: &str, shutdown: &CancellationToken) {
    let mut connect = Connect::new(internal_id);
    connect.clean_session = true;
    let Ok((mut rd, mut wr, _, _)) = connect_upstream(upstream, &connect, internal_id).await else {
        return;
    };
    let mut scratch = BytesMut::new();
    if frame::write(&mut wr, &Packet::Disconnect, &mut scratch)
        .await
        .is_ok()
    {
        until_upstream_closes(&mut rd, shutdown).await;
    }
}

type Upstreamed = (UpstreamRead, OwnedWriteHalf, ConnAck, FrameReader);

/// The read side of a link to rumqttd, acknowledging what it reads at once (TCP_QUICKACK).
///
/// rumqttd does not set TCP_NODELAY on its sockets, so Nagle's algorithm holds a small write
/// (a reading for the gateway) while an earlier one is unacknowledged, and Linux delays ACKs by
/// up to 40 ms: the first reading after a quiet spell took 21–37 ms instead of ~1 ms
/// (measured with `loadgen measure --per-reading` right after start; with delayed ACKs off for
/// loopback, 0.8–1.3 ms). Quick ACKs are not sticky, so they are asked for after every read.
struct UpstreamRead(OwnedReadHalf);

impl AsyncRead for UpstreamRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                let _ = socket2::SockRef::from(this.0.as_ref()).set_tcp_quickack(true);
            }
        }
        polled
    }
}

/// Opens the client's link to rumqttd: its CONNECT with the internal credential, a keepalive
/// rumqttd accepts, and the client id the registry chose (see `registry`).
async fn connect_upstream(
    upstream: &Upstream,
    connect: &Connect,
    internal_id: &str,
) -> Result<Upstreamed, String> {
    let work = async {
        let stream = TcpStream::connect(upstream.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let mut rd = UpstreamRead(rd);
        let mut inner = connect.clone();
        inner.keep_alive = u16::try_from(UPSTREAM_KEEPALIVE.as_secs()).unwrap_or(u16::MAX);
        inner.login = Some(Login::new(&upstream.username, &upstream.password));
        inner.client_id = internal_id.to_owned();
        let mut scratch = BytesMut::new();
        frame::write(&mut wr, &Packet::Connect(inner), &mut scratch)
            .await
            .map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new(usize::MAX >> 4);
        match reader.next(&mut rd).await {
            Ok(Some(Packet::ConnAck(ack))) => Ok((rd, wr, ack, reader)),
            Ok(other) => Err(format!("expected CONNACK, got {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// The client id rumqttd sees for a persistent session: `<user>.<id>` when accounts exist (so one
/// account cannot take over another's session by reusing its client id), with `+ $ # / % . ~`
/// escaped as `%XX` (`~` starts the slot ids of clean sessions, see `registry`). rumqttd
/// refuses ids holding `+ $ # /` and, worse, a second connect with such an id panics its listener
/// thread (measured with rumqttd 0.20): legal MQTT ids like `home/pi-1` must never reach it as is.
/// An empty id stays empty (rumqttd assigns one).
pub(crate) fn internal_client_id(user: Option<&str>, id: &str) -> String {
    fn escape(out: &mut String, text: &str) {
        for c in text.chars() {
            if "+$#/%.~".contains(c) {
                out.push_str(&format!("%{:02X}", u32::from(c)));
            } else {
                out.push(c);
            }
        }
    }
    let mut out = String::with_capacity(id.len() + 16);
    if id.is_empty() {
        return out;
    }
    if let Some(user) = user {
        escape(&mut out, user);
        out.push('.');
    }
    escape(&mut out, id);
    out
}

/// Counts the client as connected while it lives, and holds its `--max-connections` slot.
struct Connected<'a> {
    metrics: &'a Metrics,
    _permit: OwnedSemaphorePermit,
}

impl<'a> Connected<'a> {
    fn new(metrics: &'a Metrics, permit: OwnedSemaphorePermit) -> Self {
        metrics.connected();
        Self {
            metrics,
            _permit: permit,
        }
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.metrics.disconnected();
    }
}

/// SUBSCRIBEs forwarded with some filters taken out: the codes of the refused ones, by packet id,
/// to merge into rumqttd's SUBACK (`None` marks a forwarded filter's place).
#[derive(Default)]
struct PendingSubacks(Mutex<HashMap<u16, Vec<Option<SubscribeReasonCode>>>>);

impl PendingSubacks {
    fn insert(&self, pkid: u16, codes: Vec<Option<SubscribeReasonCode>>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(pkid, codes);
        }
    }

    /// rumqttd's SUBACK (for the forwarded filters) with the refused filters put back in place.
    fn merge(&self, ack: SubAck) -> SubAck {
        let Some(codes) = self.0.lock().ok().and_then(|mut map| map.remove(&ack.pkid)) else {
            return ack;
        };
        let mut forwarded = ack.return_codes.into_iter();
        let return_codes = codes
            .into_iter()
            .map(|code| {
                code.unwrap_or_else(|| forwarded.next().unwrap_or(SubscribeReasonCode::Failure))
            })
            .collect();
        SubAck::new(ack.pkid, return_codes)
    }
}

/// Refusals on one connection: the first of each kind is logged, the rest only counted.
#[derive(Default)]
struct Refusals {
    publishes: u64,
    subscriptions: u64,
}

impl Refusals {
    fn total(&self) -> u64 {
        self.publishes + self.subscriptions
    }
}

/// Reads the client, judges each packet, forwards what is allowed, answers the rest itself.
#[allow(clippy::too_many_arguments)]
async fn client_to_broker<R, W>(
    shared: &Shared,
    client: &Client<'_>,
    keep_alive: u16,
    reader: &mut FrameReader,
    client_rd: &mut R,
    up_wr: &mut W,
    local: &mpsc::Sender<Packet>,
    pending: &PendingSubacks,
    refusals: &mut Refusals,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let mut scratch = BytesMut::new();
    // MQTT: a server closes a client silent for 1.5 × its keepalive; 0 means never.
    let silence = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let ping_every = UPSTREAM_KEEPALIVE / 2;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut dropped_qos2: HashSet<u16> = HashSet::new();
    let mut subscriptions = Subscriptions::new(shared.max_subscriptions);
    let mut last_heard = Instant::now();
    let close = |reason: Reason, why: &dyn std::fmt::Display| {
        metrics.refused(reason);
        tracing::info!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), reason = reason.as_str(), %why, "connection closed");
        End::Abrupt
    };
    loop {
        let silent_until = silence.map(|s| last_heard + s);
        let packet = tokio::select! {
            packet = reader.next(client_rd) => packet,
            _ = ping.tick() => {
                if frame::write(up_wr, &Packet::PingReq, &mut scratch).await.is_err() {
                    return End::Abrupt;
                }
                continue;
            }
            () = sleep_until(silent_until) => {
                return close(Reason::KeepaliveTimeout, &"nothing received within 1.5 × keepalive");
            }
        };
        let packet = match packet {
            Ok(Some(packet)) => packet,
            Ok(None) => return End::Abrupt,
            Err(FrameError::Io(_)) => return End::Abrupt,
            Err(e) => return close(frame_reason(&e), &e),
        };
        last_heard = Instant::now();
        let forward = match packet {
            Packet::Publish(publish) => {
                if publish.topic.is_empty() || !valid_topic(&publish.topic) {
                    return close(Reason::Malformed, &"PUBLISH to an empty or wildcard topic");
                }
                if publish.payload.len() > shared.max_payload {
                    return close(
                        Reason::Oversized,
                        &format_args!(
                            "payload of {} bytes is over --max-payload",
                            publish.payload.len()
                        ),
                    );
                }
                let cap = shared.acl.payload_cap(&publish.topic);
                let verdict = match cap {
                    Some(cap) if publish.payload.len() > cap => Err(cap),
                    _ => Ok(judge_publish(shared, client.role, &publish)),
                };
                match verdict {
                    Ok(PublishVerdict::Allow) => {
                        if publish.retain {
                            shared
                                .retained
                                .record(&publish.topic, publish.payload.is_empty());
                        }
                        metrics.publish_forwarded();
                        Some(Packet::Publish(publish))
                    }
                    verdict => {
                        refusals.publishes += 1;
                        let why = match verdict {
                            Ok(PublishVerdict::Forbidden) => {
                                metrics.publish_forbidden();
                                "this account may not publish to the topic"
                            }
                            Ok(_) => {
                                metrics.publish_would_erase();
                                "an empty non-retained payload would erase a retained message"
                            }
                            Err(_) => {
                                metrics.publish_too_large();
                                "the payload is over its topic's cap (1 KiB for readings and replays, 16 bytes for availability)"
                            }
                        };
                        if refusals.publishes == 1 {
                            tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = client.role.name(), topic = %Clip(&publish.topic), bytes = publish.payload.len(), why, "PUBLISH dropped (acknowledged; later ones on this connection are only counted)");
                        }
                        let reply = match publish.qos {
                            QoS::AtMostOnce => None,
                            QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(publish.pkid))),
                            QoS::ExactlyOnce => {
                                dropped_qos2.insert(publish.pkid);
                                Some(Packet::PubRec(PubRec::new(publish.pkid)))
                            }
                        };
                        if let Some(reply) = reply {
                            if local.send(reply).await.is_err() {
                                return End::Abrupt;
                            }
                        }
                        None
                    }
                }
            }
            Packet::PubRel(rel) if dropped_qos2.remove(&rel.pkid) => {
                if local
                    .send(Packet::PubComp(PubComp::new(rel.pkid)))
                    .await
                    .is_err()
                {
                    return End::Abrupt;
                }
                None
            }
            Packet::Subscribe(subscribe) => {
                let pkid = subscribe.pkid;
                let (forward, codes) =
                    judge_subscribe(shared, client, subscribe, &mut subscriptions, refusals);
                match forward {
                    Some(forward) => {
                        pending.insert(forward.pkid, codes);
                        Some(Packet::Subscribe(forward))
                    }
                    None => {
                        let ack = SubAck::new(pkid, codes.into_iter().flatten().collect());
                        if local.send(Packet::SubAck(ack)).await.is_err() {
                            return End::Abrupt;
                        }
                        None
                    }
                }
            }
            Packet::PingReq => {
                if local.send(Packet::PingResp).await.is_err() {
                    return End::Abrupt;
                }
                None
            }
            Packet::Disconnect => return End::Disconnect,
            Packet::Unsubscribe(unsubscribe) => {
                client
                    .codec
                    .unsubscribing(unsubscribe.pkid, unsubscribe.topics.len());
                for filter in &unsubscribe.topics {
                    subscriptions.remove(filter);
                }
                Some(Packet::Unsubscribe(unsubscribe))
            }
            packet @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)) => Some(packet),
            other => {
                return close(
                    Reason::Malformed,
                    &format_args!("a client may not send {}", packet_name(&other)),
                );
            }
        };
        if let Some(packet) = forward {
            if frame::write(up_wr, &packet, &mut scratch).await.is_err() {
                return End::Abrupt;
            }
        }
    }
}

fn judge_publish(shared: &Shared, role: &Role, publish: &Publish) -> PublishVerdict {
    let empty = publish.payload.is_empty();
    match shared
        .acl
        .publish(role, &publish.topic, empty, publish.retain)
    {
        PublishVerdict::Allow
            if empty && !publish.retain && shared.retained.holds(&publish.topic) =>
        {
            PublishVerdict::WouldErase
        }
        verdict => verdict,
    }
}

/// Splits a SUBSCRIBE into the part to forward (if any filter is allowed) and the per-filter
/// codes of the refused filters (`None` where a filter is forwarded).
fn judge_subscribe(
    shared: &Shared,
    client: &Client<'_>,
    subscribe: Subscribe,
    subscriptions: &mut Subscriptions,
    refusals: &mut Refusals,
) -> (Option<Subscribe>, Vec<Option<SubscribeReasonCode>>) {
    let metrics = &shared.metrics;
    let account = client.user.unwrap_or_default();
    let mut allowed = Vec::new();
    let mut codes = Vec::with_capacity(subscribe.filters.len());
    for filter in subscribe.filters {
        let verdict = shared.acl.subscribe(client.role, &filter.path);
        let why = match verdict {
            SubscribeVerdict::Allow => {
                match subscriptions.admit(&shared.filters, account, &filter.path) {
                    Ok(()) => {
                        metrics.subscription_forwarded();
                        metrics.filters(shared.filters.len());
                        codes.push(None);
                        allowed.push(filter);
                        continue;
                    }
                    Err(limit) => {
                        metrics.subscription_limit();
                        limit.as_str()
                    }
                }
            }
            SubscribeVerdict::Forbidden => {
                metrics.subscription_forbidden();
                "this account may not read these topics"
            }
            SubscribeVerdict::System => {
                metrics.subscription_system();
                "a $ filter"
            }
            SubscribeVerdict::Invalid => {
                metrics.subscription_invalid();
                "not a valid filter"
            }
            SubscribeVerdict::Shared => {
                metrics.subscription_shared();
                "shared subscriptions ($share/…) are not served"
            }
        };
        refusals.subscriptions += 1;
        if refusals.subscriptions == 1 {
            tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = client.role.name(), filter = %Clip(&filter.path), why, "SUBSCRIBE filter refused with 0x80 (later ones on this connection are only counted)");
        }
        codes.push(Some(SubscribeReasonCode::Failure));
    }
    let forward = (!allowed.is_empty()).then_some(Subscribe {
        pkid: subscribe.pkid,
        filters: allowed,
    });
    (forward, codes)
}

/// Relays rumqttd's packets to the client, merging SUBACKs, and writes the proxy's own replies.
async fn broker_to_client<R, W>(
    metrics: &Metrics,
    reader: &mut FrameReader,
    up_rd: &mut R,
    client_wr: &mut W,
    mut local: mpsc::Receiver<Packet>,
    pending: &PendingSubacks,
    codec: &Codec,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scratch = BytesMut::new();
    loop {
        let (packet, origin) = tokio::select! {
            packet = reader.next(up_rd) => match packet {
                Ok(Some(Packet::PingResp)) => continue,
                Ok(Some(Packet::SubAck(ack))) => (Packet::SubAck(pending.merge(ack)), Origin::Relay),
                Ok(Some(packet)) => {
                    if matches!(packet, Packet::Publish(_)) {
                        metrics.publish_delivered();
                    }
                    (packet, Origin::Relay)
                }
                Ok(None) | Err(_) => return,
            },
            reply = local.recv() => match reply {
                Some(reply) => (reply, Origin::Front),
                None => return,
            },
        };
        if frame::write_to_client(client_wr, &packet, codec, origin, &mut scratch)
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn frame_reason(e: &FrameError) -> Reason {
    match e {
        FrameError::Oversized(_) => Reason::Oversized,
        FrameError::Truncated
        | FrameError::Malformed(_)
        | FrameError::Protocol(_)
        | FrameError::Io(_) => Reason::Malformed,
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "a second CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "this packet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_client_ids_are_safe_for_rumqttd_and_distinct_per_user() {
        assert_eq!(internal_client_id(None, "pi-1"), "pi-1");
        assert_eq!(internal_client_id(Some("pub"), "pi-1"), "pub.pi-1");
        assert_eq!(internal_client_id(Some("a.b"), "c"), "a%2Eb.c");
        assert_ne!(
            internal_client_id(Some("a.b"), "c"),
            internal_client_id(Some("a"), "b.c")
        );
        assert_eq!(internal_client_id(None, "home/+#$%"), "home%2F%2B%23%24%25");
        assert_eq!(internal_client_id(Some("u"), ""), "");
        for id in ["a/b", "$x", "#", "+"] {
            assert!(!internal_client_id(Some("u/v"), id).contains(['+', '$', '#', '/']));
        }
    }

    #[test]
    fn refused_filters_keep_their_place_in_the_suback() {
        let pending = PendingSubacks::default();
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        let no = SubscribeReasonCode::Failure;
        pending.insert(9, vec![Some(no), None, Some(no), None]);
        let merged = pending.merge(SubAck::new(
            9,
            vec![ok, SubscribeReasonCode::Success(QoS::AtMostOnce)],
        ));
        assert_eq!(
            merged.return_codes,
            [no, ok, no, SubscribeReasonCode::Success(QoS::AtMostOnce)]
        );
        let untouched = pending.merge(SubAck::new(10, vec![ok]));
        assert_eq!(untouched.return_codes, [ok]);
    }

    #[test]
    fn logins_map_to_roles_or_connack_codes() {
        let users = Users::parse("r:pw:reader").unwrap();
        assert_eq!(authenticate(None, None), Ok(Role::Unscoped));
        assert_eq!(
            authenticate(Some(&users), None),
            Err(ConnectReturnCode::NotAuthorized)
        );
        let wrong = Login::new("r", "nope");
        assert_eq!(
            authenticate(Some(&users), Some(&wrong)),
            Err(ConnectReturnCode::BadUserNamePassword)
        );
        let right = Login::new("r", "pw");
        assert_eq!(authenticate(Some(&users), Some(&right)), Ok(Role::Reader));
    }
}
