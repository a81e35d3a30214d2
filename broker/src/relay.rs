//! A logged-in connection's traffic, both ways, and its goodbye to rumqttd.
//!
//! ```text
//! client ──▶ [client_to_broker] ── judge ── allowed packets ─────────────────▶ rumqttd (internal)
//!    ▲               │ PUBACK/PUBREC/PUBCOMP/SUBACK/PINGRESP for what it answers itself
//!    │               ▼
//!    └────── [broker_to_client] ◀── PUBLISH, acks, SUBACK (merged with refused filters) ── rumqttd
//! ```
//!
//! Both directions run as two futures of the connection's one task; when either ends, the
//! connection ends. What each client packet means is decided by `judge`; this module carries it
//! out, counts it and logs it (the first refusal of each kind per connection, then only counts).
//!
//! - Keepalive 0 is served: rumqttd gets a keepalive of its own and the proxy keeps that link
//!   alive with PINGREQs; the client's PINGREQs are answered by the proxy.
//! - A protocol violation, an oversized packet or bytes that are not MQTT close only that
//!   connection, and its will is published. The proxy publishes the will itself and then
//!   disconnects from rumqttd cleanly (see [`goodbye`]): rumqttd reuses a connection's number at
//!   once, and a socket it saw close only later would be taken for the next client's, firing
//!   *that* client's will while it is connected.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    QoS,
    v4::{LastWill, Packet, Publish, SubAck, SubscribeReasonCode},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Metrics,
    backlog::{Backlog, CHECK_EVERY, LogBytes, MAX_BACKLOG, log_size},
    clip::{Clip, clip_opt},
    filters::FilterTable,
    frame::{self, FrameError, FrameReader, Framed},
    handshake::{UPSTREAM_KEEPALIVE, Upstreamed, until_upstream_closes},
    judge::{Action, Dropped, FilterRefused, Judge, Rules, SubscribeJudged},
    metrics::Reason,
    shared::{Client, Shared},
    sys::{SysSubscriptions, SysTree},
    v5::{self, Codec, Origin},
};

/// Replies the proxy makes itself, queued for the client's writer.
const LOCAL_REPLIES: usize = 32;

/// How the client side of a connection ended.
pub(crate) enum End {
    /// The client sent DISCONNECT (forwarded: no will).
    Disconnect,
    /// The client closed, broke a rule or went silent: its will is published.
    Abrupt,
    /// The broker is stopping: rumqttd goes too.
    Shutdown,
}

/// One logged-in connection's relay.
pub(crate) struct Relay<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) client: &'a Client<'a>,
    /// The keepalive the client asked for (0: never silent too long).
    pub(crate) keep_alive: u16,
    /// Cancelled when a newer connection takes over the client id.
    pub(crate) taken_over: &'a CancellationToken,
    pub(crate) shutdown: &'a CancellationToken,
    /// The id rumqttd knows a persistent session by (`None` for a clean session).
    pub(crate) session: Option<&'a str>,
}

impl Relay<'_> {
    /// Relays until either side ends, a newer connection takes over, or the broker stops.
    pub(crate) async fn run<R, W>(&self, io: &mut Framed<R, W>, upstream: &mut Upstreamed) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let client = self.client;
        let pending = PendingSubacks::default();
        let (local_tx, local_rx) = mpsc::channel(LOCAL_REPLIES);
        let backlog = Mutex::new(self.backlog());
        let mut side = ClientSide::new(self.shared, client, (local_tx, &pending), &backlog);
        side.codec = Some(&io.codec);
        let broker_side = BrokerSide {
            shared: self.shared,
            client,
            backlog: &backlog,
            pending: &pending,
        };
        let up = &mut upstream.link;
        let end = tokio::select! {
            end = side.run(self.keep_alive, &mut io.reader, &mut io.rd, &mut up.wr, &mut up.scratch) => end,
            end = broker_side.run(
                (&mut up.reader, &mut up.rd),
                (&mut io.wr, &mut io.scratch, &io.codec),
                local_rx,
            ) => end,
            () = self.taken_over.cancelled() => {
                // As Mosquitto does (and MQTT 5 says: the network connection closed without a
                // DISCONNECT), the old connection's will is published; the new one waits for it.
                tracing::info!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), "closed: a new connection took over this client id");
                End::Abrupt
            }
            () = self.shutdown.cancelled() => End::Shutdown,
        };
        let refusals = &side.refusals;
        if refusals.total() > 1 {
            tracing::info!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), publishes = refusals.publishes, subscriptions = refusals.subscriptions, "refusals on this connection");
        }
        if let (Some(session), Ok(backlog)) = (self.session, backlog.into_inner()) {
            let written = self.shared.log_bytes.now();
            self.shared.parked.park(session, backlog.end(written));
        }
        end
    }

    /// The connection's backlog: a resumed persistent session's from where it left.
    fn backlog(&self) -> Backlog {
        let written = self.shared.log_bytes.now();
        match self.session.and_then(|id| self.shared.parked.take(id)) {
            Some(saved) => Backlog::resumed(saved, written, MAX_BACKLOG),
            None => Backlog::new(written, MAX_BACKLOG),
        }
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

/// The client-to-broker direction: reads the client, has each packet judged, and carries out
/// the judgement.
struct ClientSide<'a> {
    metrics: &'a Metrics,
    client: &'a Client<'a>,
    judge: Judge<'a>,
    filters: &'a FilterTable,
    log_bytes: &'a LogBytes,
    backlog: &'a Mutex<Backlog>,
    local: mpsc::Sender<Packet>,
    pending: &'a PendingSubacks,
    refusals: Refusals,
    /// The client's codec, told of each UNSUBSCRIBE (an MQTT 5 UNSUBACK has a reason per filter).
    codec: Option<&'a Codec>,
    sys_tree: &'a SysTree,
    /// The `$SYS` filters this connection holds (see `sys`).
    sys: SysSubscriptions,
}

/// What happens next on the client-to-broker side.
enum Step {
    Packet(Packet),
    Ping,
    /// Time to send the `$SYS` values that changed.
    Sys,
    End(End),
}

impl<'a> ClientSide<'a> {
    fn new(
        shared: &'a Shared,
        client: &'a Client<'a>,
        (local, pending): (mpsc::Sender<Packet>, &'a PendingSubacks),
        backlog: &'a Mutex<Backlog>,
    ) -> Self {
        let rules = Rules {
            acl: &shared.acl,
            retained: &shared.retained,
            filters: &shared.filters,
            replays: &shared.replays,
            max_payload: shared.max_payload,
            sys: &shared.sys,
        };
        let account = client.user.unwrap_or_default();
        Self {
            metrics: &shared.metrics,
            client,
            judge: Judge::new(rules, client.role, account, shared.max_subscriptions),
            filters: &shared.filters,
            log_bytes: &shared.log_bytes,
            backlog,
            local,
            pending,
            refusals: Refusals::default(),
            codec: None,
            sys_tree: &shared.sys,
            sys: SysSubscriptions::default(),
        }
    }

    async fn run<R, W>(
        &mut self,
        keep_alive: u16,
        reader: &mut FrameReader,
        client_rd: &mut R,
        up_wr: &mut W,
        scratch: &mut BytesMut,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // MQTT: a server closes a client silent for 1.5 × its keepalive; 0 means never.
        let silence = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let ping_every = UPSTREAM_KEEPALIVE / 2;
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let mut last_heard = Instant::now();
        let mut sys_tick = self.sys_tree.interval().map(|every| {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            let silent_until = silence.map(|s| last_heard + s);
            let sys_due = !self.sys.is_empty();
            let step = tokio::select! {
                packet = reader.next(client_rd) => self.step(packet),
                _ = ping.tick() => Step::Ping,
                () = next_tick(&mut sys_tick), if sys_due => Step::Sys,
                () = sleep_until(silent_until) => {
                    Step::End(self.close(Reason::KeepaliveTimeout, &"nothing received within 1.5 × keepalive"))
                }
            };
            let forward = match step {
                Step::End(end) => return end,
                Step::Ping => Some(Packet::PingReq),
                Step::Sys => {
                    let changed = self.sys.changed(self.sys_tree, self.metrics);
                    if let Err(end) = self.send_sys(changed).await {
                        return end;
                    }
                    None
                }
                Step::Packet(packet) => {
                    last_heard = Instant::now();
                    match self.act(packet).await {
                        Ok(forward) => forward,
                        Err(end) => return end,
                    }
                }
            };
            if let Some(packet) = forward {
                if frame::write(up_wr, &packet, scratch).await.is_err() {
                    return End::Abrupt;
                }
            }
        }
    }

    fn step(&self, read: Result<Option<Packet>, FrameError>) -> Step {
        match read {
            Ok(Some(packet)) => {
                self.metrics.packet_received();
                Step::Packet(packet)
            }
            Ok(None) | Err(FrameError::Io(_)) => Step::End(End::Abrupt),
            Err(e) => Step::End(self.close(e.reason(), &e)),
        }
    }

    fn close(&self, reason: Reason, why: &dyn std::fmt::Display) -> End {
        let client = self.client;
        self.metrics.refused(reason);
        tracing::info!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), reason = reason.as_str(), %why, "connection closed");
        End::Abrupt
    }

    /// Judges `packet` and carries the judgement out: what to forward to rumqttd, or how the
    /// connection ends.
    async fn act(&mut self, packet: Packet) -> Result<Option<Packet>, End> {
        if let (Packet::Unsubscribe(unsubscribe), Some(codec)) = (&packet, self.codec) {
            codec.unsubscribing(unsubscribe.pkid, unsubscribe.topics.len());
        }
        match self.judge.judge(packet, Instant::now()) {
            Action::Forward(packet) => {
                if matches!(packet, Packet::PubAck(_) | Packet::PubRec(_)) {
                    if let Ok(mut backlog) = self.backlog.lock() {
                        backlog.acknowledged(self.log_bytes.now());
                    }
                }
                Ok(Some(packet))
            }
            Action::Publish(publish) => {
                self.metrics.publish_forwarded();
                self.log_bytes
                    .add(log_size(&publish.topic, publish.payload.len()));
                Ok(Some(Packet::Publish(publish)))
            }
            Action::Subscribe(judged) => self.subscribe(judged).await,
            Action::Unsubscribe {
                forward,
                answer,
                sys,
            } => {
                for filter in &sys {
                    self.sys.unsubscribe(filter);
                }
                match answer {
                    Some(answer) => self.answer(answer).await.map(|()| None),
                    None => Ok(forward.map(Packet::Unsubscribe)),
                }
            }
            Action::Answer(reply) => self.answer(reply).await.map(|()| None),
            Action::Drop {
                why,
                topic,
                bytes,
                ack,
            } => {
                self.refusals.publishes += 1;
                match why {
                    Dropped::Forbidden => self.metrics.publish_forbidden(),
                    Dropped::WouldErase => self.metrics.publish_would_erase(),
                    Dropped::TooLarge => self.metrics.publish_too_large(),
                    Dropped::RateLimited => self.metrics.publish_rate_limited(),
                }
                if self.refusals.publishes == 1 {
                    let client = self.client;
                    tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = client.role.name(), topic = %Clip(&topic), bytes, why = why.as_str(), "PUBLISH dropped (acknowledged; later ones on this connection are only counted)");
                }
                match ack {
                    Some(ack) => {
                        if let (Packet::PubAck(a), Some(codec)) = (&ack, self.codec) {
                            codec.publish_refused(a.pkid, dropped_reason(why));
                        }
                        if let (Packet::PubRec(r), Some(codec)) = (&ack, self.codec) {
                            codec.publish_refused(r.pkid, dropped_reason(why));
                        }
                        self.answer(ack).await.map(|()| None)
                    }
                    None => Ok(None),
                }
            }
            Action::Close(reason, why) => Err(self.close(reason, &why)),
            Action::Disconnect => Err(End::Disconnect),
        }
    }

    /// Counts and logs a judged SUBSCRIBE; forwards its allowed part, or answers it whole.
    async fn subscribe(&mut self, judged: SubscribeJudged) -> Result<Option<Packet>, End> {
        let forwarded = judged.codes.iter().filter(|c| c.is_none()).count();
        for _ in 0..forwarded {
            self.metrics.subscription_forwarded();
        }
        if forwarded > 0 {
            self.metrics.filters(self.filters.len());
        }
        for (filter, why) in &judged.refused {
            self.refused_filter(filter, *why);
        }
        if let Some(codec) = self.codec {
            let whys = judged.refused.iter().map(|(_, why)| filter_reason(*why));
            codec.filters_refused(judged.pkid, whys.collect());
        }
        let forward = match judged.forward {
            Some(forward) => {
                self.pending.insert(forward.pkid, judged.codes);
                Some(Packet::Subscribe(forward))
            }
            None => {
                let ack = judged.local_suback();
                self.answer(Packet::SubAck(ack)).await?;
                None
            }
        };
        // The `$SYS` values now, retained. With a forwarded part they may come before the
        // SUBACK, as a server may send matching PUBLISHes before it [MQTT-3.8.4].
        for filter in judged.sys {
            self.metrics.subscription_sys();
            let now = self.sys.subscribe(filter, self.sys_tree, self.metrics);
            self.send_sys(now).await?;
        }
        Ok(forward)
    }

    /// Queues `$SYS` messages for the client (QoS 0: no acknowledgement to track).
    async fn send_sys(&self, messages: Vec<Publish>) -> Result<(), End> {
        for message in messages {
            self.metrics.publish_delivered();
            self.answer(Packet::Publish(message)).await?;
        }
        Ok(())
    }

    fn refused_filter(&mut self, filter: &str, why: FilterRefused) {
        let metrics = self.metrics;
        match why {
            FilterRefused::Limit(_) => metrics.subscription_limit(),
            FilterRefused::Forbidden => metrics.subscription_forbidden(),
            FilterRefused::System => metrics.subscription_system(),
            FilterRefused::Invalid => metrics.subscription_invalid(),
            FilterRefused::Shared => metrics.subscription_shared(),
        }
        self.refusals.subscriptions += 1;
        if self.refusals.subscriptions == 1 {
            let client = self.client;
            tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), role = client.role.name(), filter = %Clip(filter), why = why.as_str(), "SUBSCRIBE filter refused with 0x80 (later ones on this connection are only counted)");
        }
    }

    async fn answer(&self, reply: Packet) -> Result<(), End> {
        self.local.send(reply).await.map_err(|_| End::Abrupt)
    }
}

/// What an MQTT 5 client is told about a dropped PUBLISH.
fn dropped_reason(why: Dropped) -> v5::Refused {
    match why {
        Dropped::Forbidden => v5::Refused::NotAuthorized,
        Dropped::WouldErase => v5::Refused::NotAccepted,
        Dropped::TooLarge | Dropped::RateLimited => v5::Refused::QuotaExceeded,
    }
}

/// What an MQTT 5 client is told about a refused filter.
fn filter_reason(why: FilterRefused) -> v5::Refused {
    match why {
        FilterRefused::Forbidden | FilterRefused::System => v5::Refused::NotAuthorized,
        FilterRefused::Limit(_) => v5::Refused::QuotaExceeded,
        FilterRefused::Invalid => v5::Refused::FilterInvalid,
        FilterRefused::Shared => v5::Refused::SharedNotSupported,
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

/// The broker-to-client direction: rumqttd's packets (SUBACKs merged with the refused
/// filters' codes) and the proxy's own replies, written to the client; and the watch on how
/// far the client has fallen behind (see `backlog`).
struct BrokerSide<'a> {
    shared: &'a Shared,
    client: &'a Client<'a>,
    backlog: &'a Mutex<Backlog>,
    pending: &'a PendingSubacks,
}

impl BrokerSide<'_> {
    async fn run<UR, W>(
        &self,
        (up_reader, up_rd): (&mut FrameReader, &mut UR),
        (client_wr, scratch, codec): (&mut W, &mut BytesMut, &Codec),
        mut local: mpsc::Receiver<Packet>,
    ) -> End
    where
        UR: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let window_full = self.backlog.lock().is_ok_and(|b| b.window_full());
            let (packet, origin) = tokio::select! {
                packet = up_reader.next(up_rd) => match packet {
                    Ok(Some(Packet::PingResp)) => continue,
                    Ok(Some(Packet::SubAck(ack))) => (Packet::SubAck(self.pending.merge(ack)), Origin::Relay),
                    Ok(Some(Packet::Publish(publish))) => match self.sent(publish) {
                        Ok(packet) => (packet, Origin::Relay),
                        Err(end) => return end,
                    },
                    Ok(Some(packet)) => (packet, Origin::Relay),
                    Ok(None) | Err(_) => return End::Abrupt,
                },
                reply = local.recv() => match reply {
                    Some(reply) => (reply, Origin::Front),
                    None => return End::Abrupt,
                },
                _ = check.tick(), if window_full => match self.keeping_up() {
                    Ok(()) => continue,
                    Err(end) => return end,
                },
            };
            if frame::write_to_client(client_wr, &packet, codec, origin, scratch)
                .await
                .is_err()
            {
                return End::Abrupt;
            }
            self.shared.metrics.packet_sent();
        }
    }

    /// Counts a PUBLISH rumqttd sends the client, unless the client is too far behind.
    fn sent(&self, publish: Publish) -> Result<Packet, End> {
        self.shared.metrics.publish_delivered();
        let written = self.shared.log_bytes.now();
        if let Ok(mut backlog) = self.backlog.lock() {
            let size = log_size(&publish.topic, publish.payload.len());
            backlog.sent(size, publish.qos != QoS::AtMostOnce, written);
        }
        self.keeping_up()?;
        Ok(Packet::Publish(publish))
    }

    /// Closes the connection (its will is published) if rumqttd may be about to skip messages
    /// for it; the message in hand is not sent, so rumqttd sends it again on resumption.
    fn keeping_up(&self) -> Result<(), End> {
        let written = self.shared.log_bytes.now();
        let behind = self
            .backlog
            .lock()
            .ok()
            .and_then(|mut backlog| backlog.too_far_behind(written));
        let Some(behind) = behind else {
            return Ok(());
        };
        self.shared.metrics.refused(Reason::SlowSubscriber);
        let Some(closed) = self.shared.slow_log.closed(Instant::now()) else {
            return Err(End::Abrupt);
        };
        let client = self.client;
        tracing::warn!(peer = %client.peer, client_id = %Clip(client.id), user = %clip_opt(client.user), reason = Reason::SlowSubscriber.as_str(), behind_bytes = behind, closed_since_last_line = closed, "connection closed (later ones logged at most every 10 s, all counted): this subscriber fell so far behind that the broker would have had to skip messages for it; reconnect with the same client id and clean session off to get every message from where it stopped, and read faster or subscribe to less (e.g. <prefix>/+/state rather than <prefix>/#)");
        Err(End::Abrupt)
    }
}
/// Ends the upstream connection cleanly: publishes the client's will first if it has one (the
/// client went away without DISCONNECT), then DISCONNECT, then waits for rumqttd to close.
///
/// The will was checked against the account's rules at CONNECT. rumqttd still holds it too, as
/// a fallback should this connection to it break first; after our DISCONNECT it drops it.
pub(crate) async fn goodbye(
    will: Option<&LastWill>,
    upstream: &mut Upstreamed,
    shutdown: &CancellationToken,
) {
    let up = &mut upstream.link;
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
        if frame::write(&mut up.wr, &Packet::Publish(publish), &mut up.scratch)
            .await
            .is_err()
        {
            return;
        }
    }
    if frame::write(&mut up.wr, &Packet::Disconnect, &mut up.scratch)
        .await
        .is_ok()
    {
        until_upstream_closes(&mut up.rd, shutdown).await;
    }
}

/// The next tick of `interval`, or never without one.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::mqttbytes::QoS;

    use super::*;

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
}
