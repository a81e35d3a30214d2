//! A connection's way in: its CONNECT under a deadline, authentication under the login throttle,
//! then (once logged in) the will's check against the account's rules, a `--max-connections`
//! permit, the client id rumqttd will see (see `registry`), and the link to rumqttd, ending with
//! rumqttd's CONNACK passed on to the client.
//!
//! Every refusal is counted (`refused_total{reason}`) and answered with a CONNACK code where
//! MQTT has one; a socket the pending pool pushed out, or that sent nothing, is just closed.

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    v4::{ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet},
    valid_topic,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream, ReadHalf, WriteHalf},
    sync::OwnedSemaphorePermit,
    time::Instant,
};

use crate::{
    Metrics, Users,
    acl::PublishVerdict,
    clip::{Clip, clip_opt},
    frame::{self, First, FrameError, FrameReader, Framed},
    metrics::Reason,
    peer::Peer,
    pending::{Pending, Source},
    registry::Registration,
    shared::{Client, Shared},
    throttle::Turn,
    users::Role,
    v5::{self, Codec, Origin, Version},
};
use tokio_util::sync::CancellationToken;

/// The keepalive the proxy announces to rumqttd for every client (rumqttd refuses 0), and keeps
/// by pinging at half of it.
pub(crate) const UPSTREAM_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long rumqttd may take to accept a connection and answer CONNECT.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the CONNECT (by `deadline`) and authenticates it: the client's CONNECT and role, or
/// `None` once the connection has been refused (counted, logged, answered where MQTT can).
pub(crate) async fn log_in<R, W>(
    io: &mut Framed<R, W>,
    peer: Peer,
    deadline: Instant,
    shared: &Shared,
    pending: &Pending,
) -> Option<(Connect, Role)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, read_connect(io)) => read,
        // Counted by the pool when it pushed this socket out.
        () = pending.evicted.cancelled() => {
            tracing::debug!(%peer, "closed before CONNECT to make room for a newer socket");
            return None;
        }
    };
    let connect = match read {
        Err(_) => {
            metrics.refused(Reason::ConnectTimeout);
            // Debug, not info: a flood of silent sockets would be a flood of lines (counted in
            // `refused_total{reason="connect_timeout"}`).
            tracing::debug!(%peer, "closed: no CONNECT within --connect-timeout");
            return None;
        }
        Ok(Ok(Some(connect))) => connect,
        Ok(Ok(None)) => return None,
        Ok(Err(Refusal::Version(level))) => {
            metrics.refused(Reason::ProtocolVersion);
            tracing::info!(%peer, level, "refused: only MQTT 3.1, 3.1.1 and 5 (protocol levels 3, 4, 5) are served");
            refuse(io, ConnectReturnCode::RefusedProtocolVersion).await;
            return None;
        }
        Ok(Err(Refusal::V5(code))) => {
            metrics.refused(Reason::ProtocolVersion);
            tracing::info!(%peer, ?code, "refused: an MQTT 5 CONNECT asking for what is not served");
            refuse_v5(io, code).await;
            return None;
        }
        Ok(Err(Refusal::Frame(e))) => {
            let reason = e.reason();
            metrics.refused(reason);
            tracing::info!(%peer, reason = reason.as_str(), error = %e, "closed before CONNECT");
            return None;
        }
    };
    match login(shared, peer, &connect, deadline, pending).await {
        Ok(role) => Some((connect, role)),
        Err((code, reason)) => {
            if let Some(reason) = reason {
                metrics.refused(reason);
                let user = connect.login.as_ref().map(|l| l.username.as_str());
                tracing::info!(%peer, client_id = %Clip(&connect.client_id), user = %clip_opt(user), reason = reason.as_str(), "refused");
            }
            if let Some(code) = code {
                refuse(io, code).await;
            }
            None
        }
    }
}

/// A logged-in client let through to rumqttd.
pub(crate) struct Admitted {
    pub(crate) upstream: Upstreamed,
    pub(crate) registration: Registration,
    pub(crate) connected: Connected,
}

/// Admits a logged-in client: checks its will, takes a `--max-connections` permit, registers its
/// client id, opens its link to rumqttd and passes rumqttd's CONNACK on. `None` once refused.
pub(crate) async fn admit<R, W>(
    io: &mut Framed<R, W>,
    shared: &Shared,
    client: &Client<'_>,
    connect: &Connect,
) -> Option<Admitted>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    if let Some(will) = &connect.last_will {
        if !will_allowed(shared, client.role, will) {
            metrics.refused(Reason::NotAuthorised);
            metrics.publish_forbidden();
            tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = client.role.name(), topic = %Clip(&will.topic), "refused: last will to a topic this account may not publish (or over the topic's payload cap)");
            refuse(io, ConnectReturnCode::NotAuthorized).await;
            return None;
        }
    }
    let Ok(permit) = shared.clients.clone().try_acquire_owned() else {
        metrics.refused(Reason::TooManyConnections);
        tracing::warn!(peer = %client.peer, "refused: --max-connections clients are connected");
        refuse(io, ConnectReturnCode::ServiceUnavailable).await;
        return None;
    };
    let registration = register(shared, client, connect, io.codec.clean_start(connect));
    // A takeover: the old connection ends (publishing its will) before this one is answered,
    // so its will can never follow this client's own messages.
    registration.after_previous(UPSTREAM_TIMEOUT * 2).await;
    if let Some(stored) = &registration.discard {
        discard_session(shared, stored).await;
    }
    let upstream = match connect_upstream(shared, connect, &registration.internal_id).await {
        Ok(upstream) => upstream,
        Err(why) => {
            metrics.refused(Reason::BrokerUnavailable);
            tracing::warn!(peer = %client.peer, why, "refused: the embedded broker did not answer");
            refuse(io, ConnectReturnCode::ServiceUnavailable).await;
            return None;
        }
    };
    let ack = Packet::ConnAck(upstream.ack.clone());
    if io.send(&ack, Origin::Relay).await.is_err()
        || upstream.ack.code != ConnectReturnCode::Success
    {
        return None;
    }
    Some(Admitted {
        upstream,
        registration,
        connected: Connected::new(shared.metrics.clone(), permit),
    })
}

/// Whether `role` may leave this will: judged as not retained (no will may erase a reading,
/// whatever its flag), to a valid topic, within the topic's payload cap.
fn will_allowed(shared: &Shared, role: &Role, will: &LastWill) -> bool {
    let verdict = shared
        .acl
        .publish(role, &will.topic, will.message.is_empty(), false);
    let too_large = shared
        .acl
        .payload_cap(&will.topic)
        .is_some_and(|cap| will.message.len() > cap);
    valid_topic(&will.topic)
        && !will.topic.is_empty()
        && verdict == PublishVerdict::Allow
        && !too_large
}

/// Registers the client id (a takeover ends the older connection) and picks the id rumqttd sees;
/// with `clean_start`, a stored persistent session of this client is to be discarded.
fn register(
    shared: &Shared,
    client: &Client<'_>,
    connect: &Connect,
    clean_start: bool,
) -> Registration {
    let user = client.user.unwrap_or_default();
    let key = (!connect.client_id.is_empty()).then(|| format!("{user}\0{}", connect.client_id));
    let session_id = internal_client_id(shared.users.is_some().then_some(user), &connect.client_id);
    let persistent = (!connect.clean_session).then(|| session_id.clone());
    let discard = (clean_start && !session_id.is_empty()).then_some(session_id);
    let registration = shared.registry.register(key, persistent, discard);
    shared.metrics.client_id_slots(shared.registry.slots());
    registration
}

/// Why a connection got no further than its first packet.
enum Refusal {
    Version(u8),
    V5(rumqttc::v5::mqttbytes::v5::ConnectReturnCode),
    Frame(FrameError),
}

/// Reads the CONNECT of MQTT 3.1.1, 3.1 (rewritten to 3.1.1) or 5 (translated, see `v5`), and
/// sets the connection's codec for the client's version.
async fn read_connect<R, W>(io: &mut Framed<R, W>) -> Result<Option<Connect>, Refusal>
where
    R: AsyncRead + Unpin,
{
    let reader: &mut FrameReader = &mut io.reader;
    let version = match reader.first(&mut io.rd).await.map_err(Refusal::Frame)? {
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
            io.codec = Codec::new(Version::V5, None);
            let hello = v5::connect_from_v5(connect, will, login).map_err(Refusal::V5)?;
            io.codec =
                Codec::new(Version::V5, hello.assigned_id).with_clean_start(hello.clean_start);
            return Ok(Some(hello.connect));
        }
        First::Connect(level) => return Err(Refusal::Version(level)),
    };
    io.codec = Codec::new(version, None);
    match reader.next(&mut io.rd).await.map_err(Refusal::Frame)? {
        Some(Packet::Connect(connect)) => Ok(Some(connect)),
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
    peer: Peer,
    connect: &Connect,
    deadline: Instant,
    pending: &Pending,
) -> Result<Role, LoginRefusal> {
    let source = Source::of(peer.ip());
    let metrics = &shared.metrics;
    let checked = shared.users.is_some() && connect.login.is_some();
    if checked {
        wait_for_turn(shared, source, deadline, pending).await?;
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

/// Waits for this address's turn to have a password checked (see `throttle`).
async fn wait_for_turn(
    shared: &Shared,
    source: Source,
    deadline: Instant,
    pending: &Pending,
) -> Result<(), LoginRefusal> {
    match shared.throttle.turn(source, Instant::now(), deadline) {
        Turn::TooLate => {
            shared.metrics.login_delayed();
            Err((
                Some(ConnectReturnCode::ServiceUnavailable),
                Some(Reason::LoginThrottled),
            ))
        }
        Turn::At(at) if at > Instant::now() => {
            shared.metrics.login_delayed();
            tokio::select! {
                () = tokio::time::sleep_until(at) => Ok(()),
                () = pending.evicted.cancelled() => Err((None, None)),
            }
        }
        Turn::At(_) => Ok(()),
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

/// Answers a refused CONNECT (within a second: a client that does not read is not waited for),
/// in the client's MQTT version.
async fn refuse<R, W: AsyncWrite + Unpin>(io: &mut Framed<R, W>, code: ConnectReturnCode) {
    let ack = Packet::ConnAck(ConnAck::new(code, false));
    let _ = tokio::time::timeout(Duration::from_secs(1), io.send(&ack, Origin::Front)).await;
}

/// Answers an MQTT 5 CONNECT refused for what only MQTT 5 can ask (enhanced authentication).
async fn refuse_v5<R, W: AsyncWrite + Unpin>(
    io: &mut Framed<R, W>,
    code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode,
) {
    use tokio::io::AsyncWriteExt;
    let Ok(bytes) = v5::bytes_of(&v5::refusal(code)) else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.wr.write_all(&bytes).await?;
        io.wr.flush().await
    })
    .await;
}

/// Makes rumqttd drop the stored session `internal_id` (a client starting clean after it had
/// a persistent session): a clean-session connection under that id, then DISCONNECT. rumqttd
/// would otherwise keep the old session for the next persistent connect, which would get
/// messages queued under subscriptions it gave up.
async fn discard_session(shared: &Shared, internal_id: &str) {
    let mut connect = Connect::new(internal_id);
    connect.clean_session = true;
    let Ok(mut link) = connect_upstream(shared, &connect, internal_id).await else {
        return;
    };
    let up = &mut link.link;
    if frame::write(&mut up.wr, &Packet::Disconnect, &mut up.scratch)
        .await
        .is_ok()
    {
        until_upstream_closes(&mut up.rd, &CancellationToken::new()).await;
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
pub(crate) async fn until_upstream_closes<R: AsyncRead + Unpin>(
    up_rd: &mut R,
    shutdown: &CancellationToken,
) {
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

/// A client's link to rumqttd, once rumqttd has answered its CONNECT.
pub(crate) struct Upstreamed {
    /// rumqttd's side: read PUBLISHes and acks, write what the client may send.
    pub(crate) link: Framed<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>,
    /// rumqttd's CONNACK, passed on to the client.
    pub(crate) ack: ConnAck,
}

/// Opens the client's link to rumqttd (an in-memory pipe, see `embedded::spawn`): its CONNECT
/// with the internal credential, a keepalive rumqttd accepts, and the client id the registry
/// chose (see `registry`).
async fn connect_upstream(
    shared: &Shared,
    connect: &Connect,
    internal_id: &str,
) -> Result<Upstreamed, String> {
    let upstream = &shared.upstream;
    let work = async {
        let (rd, wr) = tokio::io::split(shared.door.connect());
        let mut link = Framed::new(rd, wr, usize::MAX >> 4);
        let mut inner = connect.clone();
        inner.keep_alive = u16::try_from(UPSTREAM_KEEPALIVE.as_secs()).unwrap_or(u16::MAX);
        inner.login = Some(Login::new(&upstream.username, &upstream.password));
        inner.client_id = internal_id.to_owned();
        let mut scratch = BytesMut::new();
        frame::write(&mut link.wr, &Packet::Connect(inner), &mut scratch)
            .await
            .map_err(|e| e.to_string())?;
        match link.reader.next(&mut link.rd).await {
            Ok(Some(Packet::ConnAck(ack))) => Ok(Upstreamed { link, ack }),
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
pub(crate) struct Connected {
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl Connected {
    fn new(metrics: Arc<Metrics>, permit: OwnedSemaphorePermit) -> Self {
        metrics.connected();
        Self {
            metrics,
            _permit: permit,
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.metrics.disconnected();
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
