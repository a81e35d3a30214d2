//! One client's connection, from its first byte to its last: the handshake (see `handshake`),
//! then the relay (see `relay`, which has each packet judged by `judge`), then the goodbye to
//! rumqttd.
//!
//! ```text
//! socket ─▶ handshake::log_in ─▶ handshake::admit ─▶ Relay::run ─▶ relay::goodbye
//!           CONNECT (deadline),    will, permit,       judge each     will (if abrupt),
//!           authentication         registry, rumqttd   packet         DISCONNECT
//! ```
//!
//! Each connection is its own task, so a slow or silent client delays nobody.

use std::sync::Arc;

use rumqttc::mqttbytes::v4::Connect;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

pub(crate) use crate::shared::{HEADER_ROOM, Shared, Upstream};
use crate::{
    clip::{Clip, clip_opt},
    frame::Framed,
    handshake::{self, Admitted},
    peer::Peer,
    pending::Pending,
    relay::{self, End, Relay},
    shared::Client,
    users::Role,
};

/// Serves one connection (already through TLS, if any) until it ends; `deadline` bounds how long
/// the CONNECT may take to arrive.
pub(crate) async fn run<S>(
    stream: S,
    peer: Peer,
    deadline: Instant,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    pending: Pending,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut io = Framed::new(rd, wr, shared.max_payload + HEADER_ROOM);
    let Some((connect, role)) = handshake::log_in(&mut io, peer, deadline, &shared, &pending).await
    else {
        return;
    };
    // Logged in: no longer one of the sockets the pending pool may close.
    drop(pending);
    // Boxed: a socket that is still pending (thousands of silent ones, in a flood) then holds
    // only the small login state, not the relay's (measured: a 6 KiB task each before).
    Box::pin(logged_in(io, peer, connect, role, shared, shutdown)).await;
}

/// The rest of a connection once its login is accepted: admission, relaying both ways, and the
/// goodbye.
async fn logged_in<R, W>(
    mut io: Framed<R, W>,
    peer: Peer,
    connect: Connect,
    role: Role,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let user = connect.login.as_ref().map(|l| l.username.clone());
    let client = Client {
        peer,
        id: &connect.client_id,
        user: user.as_deref(),
        role: &role,
    };
    let Some(Admitted {
        mut upstream,
        registration,
        connected,
    }) = handshake::admit(&mut io, &shared, &client, &connect).await
    else {
        return;
    };
    tracing::debug!(%peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = role.name(), keepalive = connect.keep_alive, "client connected");

    let relay = Relay {
        shared: &shared,
        client: &client,
        keep_alive: connect.keep_alive,
        taken_over: &registration.taken_over,
        shutdown: &shutdown,
        session: (!connect.clean_session && !registration.internal_id.is_empty())
            .then_some(registration.internal_id.as_str()),
    };
    let end = relay.run(&mut io, &mut upstream).await;
    tracing::debug!(%peer, client_id = %Clip(client.id), "client gone");
    drop(connected);
    drop(io);
    let will = match end {
        End::Shutdown => return,
        End::Disconnect => None,
        End::Abrupt => connect.last_will.as_ref(),
    };
    relay::goodbye(will, &mut upstream, &shutdown).await;
}
