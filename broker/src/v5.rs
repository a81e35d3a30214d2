//! MQTT 5 and MQTT 3.1 clients on the same port as MQTT 3.1.1, as pure translations.
//!
//! The front judges and relays MQTT 3.1.1 (rumqttd sees only 3.1.1 from it). A client's CONNECT
//! says its version; from then on its packets are translated to 3.1.1 as they are read
//! (`frame::FrameReader`) and the 3.1.1 packets for it are translated back as they are written
//! ([`Codec::encode`]), so authorisation, limits and the empty-publish rule are the same code
//! for every version.
//!
//! | version | CONNECT | after CONNECT |
//! |---|---|---|
//! | 3.1 (`MQIsdp`, level 3) | rewritten to 3.1.1 ([`v31_connect_to_v311`]) | the same bytes as 3.1.1 |
//! | 3.1.1 (level 4) | as is | as is |
//! | 5 (level 5) | [`connect_from_v5`] | [`incoming`] (client → broker), [`Codec::encode`] (broker → client) |
//!
//! What MQTT 5 gets beyond 3.1.1: reason codes. CONNACK carries the 5 codes (0x84 unsupported
//! version, 0x86 bad user name or password, 0x87 not authorised, 0x88 server unavailable); a
//! refused SUBSCRIBE filter gets its reason in the SUBACK (0x87 not authorised, `$` filters
//! included; 0x8F invalid; 0x9E `$share`; 0x97 over a subscription budget); a PUBLISH the front
//! drops gets PUBACK / PUBREC with its reason instead of a silent success (0x87 forbidden, 0x97
//! over its topic's cap or the replay rate, 0x83 an empty one that would erase a retained
//! reading); DISCONNECT 0x04 ("with will") publishes the will. A client
//! with an empty client id gets one assigned (CONNACK property). What it does not get: the
//! properties of PUBLISH (message expiry, user properties, content type, response topic) and
//! the subscription options (no local, retain as published, retain handling) are not carried
//! through the 3.1.1 relay; topic aliases are not offered (CONNACK announces none, so a client
//! may not use them); shared subscriptions are refused (as for 3.1.1); enhanced authentication
//! (AUTH) is refused with 0x8C.

use std::{collections::HashMap, sync::Mutex};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

/// The MQTT version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1 (`MQIsdp`, protocol level 3): 3.1.1's packets, after the CONNECT.
    V31,
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// Rewrites the complete MQTT 3.1 CONNECT at the start of `buffer` (protocol name `MQIsdp`,
/// level 3) into the MQTT 3.1.1 one (`MQTT`, level 4), leaving what follows it untouched.
/// Returns false (and leaves `buffer` alone) if it is not such a CONNECT.
pub(crate) fn v31_connect_to_v311(buffer: &mut BytesMut) -> bool {
    let Some((remaining, length_bytes)) = remaining_length(buffer) else {
        return false;
    };
    let header = 1 + length_bytes;
    let name = b"\x00\x06MQIsdp\x03";
    if buffer.first() != Some(&0x10)
        || buffer.len() < header + remaining
        || remaining < name.len()
        || buffer.get(header..header + name.len()) != Some(&name[..])
    {
        return false;
    }
    let rest = buffer.split_off(header + remaining);
    let body = buffer.split_off(header + name.len());
    let mut out = BytesMut::with_capacity(buffer.len() + rest.len());
    out.extend_from_slice(&[0x10]);
    let new_remaining = remaining - 2;
    let mut left = new_remaining;
    loop {
        let mut byte = (left % 128) as u8;
        left /= 128;
        if left > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if left == 0 {
            break;
        }
    }
    out.extend_from_slice(b"\x00\x04MQTT\x04");
    out.extend_from_slice(&body);
    out.extend_from_slice(&rest);
    *buffer = out;
    true
}

/// The remaining length of the packet at the start of `frame` and how many bytes encode it.
fn remaining_length(frame: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in frame.iter().skip(1).take(4).enumerate() {
        value += usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// An MQTT 5 CONNECT as the 3.1.1 front sees it.
#[derive(Debug)]
pub(crate) struct Hello {
    /// The 3.1.1 CONNECT: `clean_session` off when the session outlives the connection
    /// (Session Expiry Interval over 0).
    pub(crate) connect: v4::Connect,
    /// Clean Start: any stored session is discarded first (even for a session kept after).
    pub(crate) clean_start: bool,
    /// The client id the broker chose for an empty one (sent back in CONNACK).
    pub(crate) assigned_id: Option<String>,
}

/// Translates an MQTT 5 CONNECT, or tells the v5 CONNACK code that refuses it.
pub(crate) fn connect_from_v5(
    connect: v5::Connect,
    will: Option<v5::LastWill>,
    login: Option<v5::Login>,
) -> Result<Hello, v5::ConnectReturnCode> {
    let properties = connect.properties.unwrap_or_default();
    if properties.authentication_method.is_some() {
        return Err(v5::ConnectReturnCode::BadAuthenticationMethod);
    }
    let session_kept = properties.session_expiry_interval.unwrap_or(0) > 0;
    let assigned_id = connect
        .client_id
        .is_empty()
        .then(|| format!("k3sense-{:016x}", rand::random::<u64>()));
    let client_id = assigned_id.clone().unwrap_or(connect.client_id);
    let last_will = match will {
        Some(will) => {
            let topic = String::from_utf8(will.topic.to_vec())
                .map_err(|_| v5::ConnectReturnCode::MalformedPacket)?;
            Some(v4::LastWill {
                topic,
                message: will.message,
                qos: qos_to_v4(will.qos),
                retain: will.retain,
            })
        }
        None => None,
    };
    Ok(Hello {
        connect: v4::Connect {
            protocol: rumqttc::mqttbytes::Protocol::V4,
            keep_alive: connect.keep_alive,
            client_id,
            clean_session: !session_kept,
            last_will,
            login: login.map(|l| v4::Login::new(l.username, l.password)),
        },
        clean_start: connect.clean_start,
        assigned_id,
    })
}

/// What one MQTT 5 packet from a client means to the 3.1.1 front.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    /// This 3.1.1 packet.
    Packet(v4::Packet),
    /// DISCONNECT with reason 0x04: end the connection and publish the will.
    DisconnectWithWill,
    /// A protocol violation (the connection is closed).
    Violation(&'static str),
}

/// Translates a client's MQTT 5 packet (after its CONNECT).
pub(crate) fn incoming(packet: v5::Packet) -> Incoming {
    use v4::Packet as P;
    Incoming::Packet(match packet {
        v5::Packet::Publish(publish) => {
            let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
                return Incoming::Violation("a PUBLISH topic that is not UTF-8");
            };
            if topic.is_empty() {
                // Only a topic alias may stand for an empty topic, and none is offered.
                return Incoming::Violation("a topic alias (the broker offers none)");
            }
            let mut out = v4::Publish::from_bytes(topic, qos_to_v4(publish.qos), publish.payload);
            out.dup = publish.dup;
            out.retain = publish.retain;
            out.pkid = publish.pkid;
            P::Publish(out)
        }
        v5::Packet::PubAck(ack) => P::PubAck(v4::PubAck::new(ack.pkid)),
        v5::Packet::PubRec(rec) => P::PubRec(v4::PubRec::new(rec.pkid)),
        v5::Packet::PubRel(rel) => P::PubRel(v4::PubRel::new(rel.pkid)),
        v5::Packet::PubComp(comp) => P::PubComp(v4::PubComp::new(comp.pkid)),
        v5::Packet::Subscribe(subscribe) => P::Subscribe(v4::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe
                .filters
                .into_iter()
                .map(|f| v4::SubscribeFilter::new(f.path, qos_to_v4(f.qos)))
                .collect(),
        }),
        v5::Packet::Unsubscribe(unsubscribe) => P::Unsubscribe(v4::Unsubscribe {
            pkid: unsubscribe.pkid,
            topics: unsubscribe.filters,
        }),
        v5::Packet::PingReq(_) => P::PingReq,
        v5::Packet::Disconnect(disconnect) => {
            if disconnect.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage {
                return Incoming::DisconnectWithWill;
            }
            P::Disconnect
        }
        v5::Packet::Auth(_) => return Incoming::Violation("AUTH (enhanced authentication)"),
        v5::Packet::Connect(..) => P::Connect(v4::Connect::new("")),
        v5::Packet::ConnAck(_) => {
            P::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, false))
        }
        v5::Packet::SubAck(_) => P::SubAck(v4::SubAck::new(0, Vec::new())),
        v5::Packet::UnsubAck(_) => P::UnsubAck(v4::UnsubAck::new(0)),
        v5::Packet::PingResp(_) => P::PingResp,
    })
}

/// Where a packet for the client comes from: rumqttd's relay, or the front itself (which
/// answers only what it refused: a dropped PUBLISH's PUBACK / PUBREC / PUBCOMP, a SUBACK of
/// refused filters, and PINGRESP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Relay,
    Front,
}

/// Why the front refused a PUBLISH or a SUBSCRIBE filter, as MQTT 5 can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// 0x87: the account may not (publish to / read) these topics, `$` filters included.
    NotAuthorized,
    /// 0x83: valid, but not accepted (an empty publish that would erase a retained reading).
    NotAccepted,
    /// 0x97: a limit (payload cap of the topic, replay rate, subscription budgets).
    QuotaExceeded,
    /// 0x8F: not a valid topic filter.
    FilterInvalid,
    /// 0x9E: `$share/…`.
    SharedNotSupported,
}

/// One connection's translation state, shared by its two directions: how many filters each
/// UNSUBSCRIBE held (an MQTT 5 UNSUBACK has a reason per filter, 3.1.1's has none), and why the
/// front refused what it answers itself (3.1.1's answers cannot say; MQTT 5's reason codes can).
#[derive(Debug)]
pub(crate) struct Codec {
    version: Version,
    assigned_id: Option<String>,
    /// MQTT 5's Clean Start (3.1.1 has only clean session, which is both).
    clean_start: Option<bool>,
    unsubscribes: Mutex<HashMap<u16, usize>>,
    refusals: Mutex<Refusals>,
}

/// Dropped PUBLISHes by packet id, and refused filters (in order) by SUBSCRIBE packet id.
#[derive(Debug, Default)]
struct Refusals {
    publishes: HashMap<u16, Refused>,
    filters: HashMap<u16, Vec<Refused>>,
}

impl Codec {
    /// A codec for a client of `version`; `assigned_id` is the client id the broker chose for
    /// an MQTT 5 client that sent none (told in the CONNACK).
    pub(crate) fn new(version: Version, assigned_id: Option<String>) -> Self {
        Self {
            version,
            assigned_id,
            clean_start: None,
            unsubscribes: Mutex::new(HashMap::new()),
            refusals: Mutex::new(Refusals::default()),
        }
    }

    /// Notes why the front dropped the PUBLISH `pkid` (its PUBACK / PUBREC tells an MQTT 5
    /// client; 0x87 if not noted).
    pub(crate) fn publish_refused(&self, pkid: u16, why: Refused) {
        if self.version == Version::V5 {
            if let Ok(mut refusals) = self.refusals.lock() {
                refusals.publishes.insert(pkid, why);
            }
        }
    }

    /// Notes why the front refused the filters of SUBACK `pkid`, in the SUBSCRIBE's order.
    pub(crate) fn filters_refused(&self, pkid: u16, whys: Vec<Refused>) {
        if self.version == Version::V5 && !whys.is_empty() {
            if let Ok(mut refusals) = self.refusals.lock() {
                refusals.filters.insert(pkid, whys);
            }
        }
    }

    fn publish_reason(&self, pkid: u16) -> Refused {
        self.refusals
            .lock()
            .ok()
            .and_then(|mut refusals| refusals.publishes.remove(&pkid))
            .unwrap_or(Refused::NotAuthorized)
    }

    fn filter_reasons(&self, pkid: u16) -> Vec<Refused> {
        self.refusals
            .lock()
            .ok()
            .and_then(|mut refusals| refusals.filters.remove(&pkid))
            .unwrap_or_default()
    }

    /// For an MQTT 5 client: its Clean Start flag.
    pub(crate) fn with_clean_start(mut self, clean_start: bool) -> Self {
        self.clean_start = Some(clean_start);
        self
    }

    /// Whether any stored session of this client is discarded first: MQTT 5's Clean Start,
    /// 3.1.1's clean session.
    pub(crate) fn clean_start(&self, connect: &v4::Connect) -> bool {
        self.clean_start.unwrap_or(connect.clean_session)
    }

    /// Notes a client's UNSUBSCRIBE (for the UNSUBACK's reasons).
    pub(crate) fn unsubscribing(&self, pkid: u16, filters: usize) {
        if self.version == Version::V5 {
            if let Ok(mut map) = self.unsubscribes.lock() {
                map.insert(pkid, filters);
            }
        }
    }

    /// Writes `packet` for this client into `buffer`, in its version.
    pub(crate) fn encode(
        &self,
        packet: &v4::Packet,
        origin: Origin,
        buffer: &mut BytesMut,
    ) -> Result<(), String> {
        if self.version != Version::V5 {
            return packet
                .write(buffer, usize::MAX)
                .map(drop)
                .map_err(|e| e.to_string());
        }
        self.to_v5(packet, origin)
            .write(buffer, None)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn to_v5(&self, packet: &v4::Packet, origin: Origin) -> v5::Packet {
        use v4::Packet as P;
        let refused = origin == Origin::Front;
        match packet {
            P::Publish(p) => {
                let mut out =
                    v5::Publish::new(p.topic.clone(), qos_to_v5(p.qos), p.payload.clone(), None);
                out.dup = p.dup;
                out.retain = p.retain;
                out.pkid = p.pkid;
                v5::Packet::Publish(out)
            }
            P::PubAck(ack) => {
                let mut out = v5::PubAck::new(ack.pkid, None);
                if refused {
                    out.reason = puback_reason(self.publish_reason(ack.pkid));
                }
                v5::Packet::PubAck(out)
            }
            P::PubRec(rec) => {
                let mut out = v5::PubRec::new(rec.pkid, None);
                if refused {
                    out.reason = pubrec_reason(self.publish_reason(rec.pkid));
                }
                v5::Packet::PubRec(out)
            }
            P::PubRel(rel) => v5::Packet::PubRel(v5::PubRel::new(rel.pkid, None)),
            P::PubComp(comp) => v5::Packet::PubComp(v5::PubComp::new(comp.pkid, None)),
            P::SubAck(ack) => {
                let mut whys = self.filter_reasons(ack.pkid).into_iter();
                v5::Packet::SubAck(v5::SubAck {
                    pkid: ack.pkid,
                    return_codes: ack
                        .return_codes
                        .iter()
                        .map(|code| match code {
                            v4::SubscribeReasonCode::Success(qos) => {
                                v5::SubscribeReasonCode::Success(qos_to_v5(*qos))
                            }
                            v4::SubscribeReasonCode::Failure => {
                                suback_reason(whys.next().unwrap_or(Refused::NotAuthorized))
                            }
                        })
                        .collect(),
                    properties: None,
                })
            }
            P::UnsubAck(ack) => {
                let count = self
                    .unsubscribes
                    .lock()
                    .ok()
                    .and_then(|mut map| map.remove(&ack.pkid))
                    .unwrap_or(1);
                v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: ack.pkid,
                    reasons: vec![v5::UnsubAckReason::Success; count],
                    properties: None,
                })
            }
            P::ConnAck(ack) => connack(ack.code, ack.session_present, self.assigned_id.clone()),
            P::PingResp => v5::Packet::PingResp(v5::PingResp),
            P::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            )),
            // The front never sends the client packets only a client sends.
            P::Connect(_) | P::PingReq | P::Subscribe(_) | P::Unsubscribe(_) => {
                v5::Packet::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::ImplementationSpecificError,
                ))
            }
        }
    }
}

fn puback_reason(why: Refused) -> v5::PubAckReason {
    match why {
        Refused::NotAuthorized | Refused::FilterInvalid | Refused::SharedNotSupported => {
            v5::PubAckReason::NotAuthorized
        }
        Refused::NotAccepted => v5::PubAckReason::ImplementationSpecificError,
        Refused::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
    }
}

fn pubrec_reason(why: Refused) -> v5::PubRecReason {
    match why {
        Refused::NotAuthorized | Refused::FilterInvalid | Refused::SharedNotSupported => {
            v5::PubRecReason::NotAuthorized
        }
        Refused::NotAccepted => v5::PubRecReason::ImplementationSpecificError,
        Refused::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
    }
}

fn suback_reason(why: Refused) -> v5::SubscribeReasonCode {
    match why {
        Refused::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
        Refused::NotAccepted => v5::SubscribeReasonCode::ImplementationSpecific,
        Refused::QuotaExceeded => v5::SubscribeReasonCode::QuotaExceeded,
        Refused::FilterInvalid => v5::SubscribeReasonCode::TopicFilterInvalid,
        Refused::SharedNotSupported => v5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
    }
}

/// An MQTT 5 CONNACK for a 3.1.1 answer, with what this broker offers: no topic aliases, no
/// shared subscriptions, retained messages, and the client id it assigned, if any.
pub(crate) fn connack(
    code: v4::ConnectReturnCode,
    session_present: bool,
    assigned_id: Option<String>,
) -> v5::Packet {
    use v4::ConnectReturnCode as C4;
    use v5::ConnectReturnCode as C5;
    let code = match code {
        C4::Success => C5::Success,
        C4::RefusedProtocolVersion => C5::UnsupportedProtocolVersion,
        C4::BadClientId => C5::ClientIdentifierNotValid,
        C4::ServiceUnavailable => C5::ServerUnavailable,
        C4::BadUserNamePassword => C5::BadUserNamePassword,
        C4::NotAuthorized => C5::NotAuthorized,
    };
    let properties = (code == C5::Success).then(|| v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: assigned_id,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    });
    v5::Packet::ConnAck(v5::ConnAck {
        session_present: session_present && code == C5::Success,
        code,
        properties,
    })
}

/// An MQTT 5 CONNACK refusing a CONNECT whose packet could not be used.
pub(crate) fn refusal(code: v5::ConnectReturnCode) -> v5::Packet {
    v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: None,
    })
}

/// Reads one MQTT 5 packet of at most `max` bytes of remaining length from `buffer`.
pub(crate) fn read(buffer: &mut BytesMut, max: usize) -> Result<v5::Packet, ReadError> {
    let limit = u32::try_from(max).unwrap_or(u32::MAX);
    v5::Packet::read(buffer, Some(limit)).map_err(|e| match e {
        m5::Error::InsufficientBytes(_) => ReadError::Incomplete,
        m5::Error::PayloadSizeLimitExceeded { pkt_size, .. } => ReadError::Oversized(pkt_size),
        other => ReadError::Malformed(other.to_string()),
    })
}

/// Why [`read`] yielded no packet.
#[derive(Debug)]
pub(crate) enum ReadError {
    Incomplete,
    Oversized(usize),
    Malformed(String),
}

fn qos_to_v4(qos: m5::QoS) -> QoS {
    match qos {
        m5::QoS::AtMostOnce => QoS::AtMostOnce,
        m5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v5(qos: QoS) -> m5::QoS {
    match qos {
        QoS::AtMostOnce => m5::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5::QoS::ExactlyOnce,
    }
}

/// The bytes of an MQTT 5 packet (tests and CONNACKs written before a codec exists).
pub(crate) fn bytes_of(packet: &v5::Packet) -> Result<Bytes, String> {
    let mut buffer = BytesMut::new();
    packet.write(&mut buffer, None).map_err(|e| e.to_string())?;
    Ok(buffer.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_bytes(packet: &v4::Packet) -> BytesMut {
        let mut buffer = BytesMut::new();
        packet.write(&mut buffer, usize::MAX).unwrap();
        buffer
    }

    #[test]
    fn an_mqtt31_connect_becomes_the_same_311_connect() {
        let mut connect = v4::Connect::new("sensor-31");
        connect.keep_alive = 30;
        connect.login = Some(v4::Login::new("u", "p"));
        connect.last_will = Some(v4::LastWill::new("a/will", "gone", QoS::AtLeastOnce, true));
        let v311 = v4_bytes(&v4::Packet::Connect(connect.clone()));
        // The same CONNECT as 3.1 would send it: `MQIsdp`, level 3, two bytes longer.
        let mut v31 = BytesMut::new();
        v31.extend_from_slice(&[0x10, v311[1] + 2, 0x00, 0x06]);
        v31.extend_from_slice(b"MQIsdp\x03");
        v31.extend_from_slice(&v311[2 + 7..]);
        let ping = v4_bytes(&v4::Packet::PingReq);
        v31.extend_from_slice(&ping);
        assert!(v31_connect_to_v311(&mut v31));
        let mut expected = v311.clone();
        expected.extend_from_slice(&ping);
        assert_eq!(v31, expected, "the following packet stays in place");
        assert_eq!(
            v4::Packet::read(&mut v31, 1024).unwrap(),
            v4::Packet::Connect(connect)
        );
        let mut not_31 = v311.clone();
        assert!(!v31_connect_to_v311(&mut not_31));
        assert_eq!(not_31, v311);
        let mut partial = BytesMut::from(&b"\x10\x20\x00\x06MQIsdp"[..]);
        assert!(!v31_connect_to_v311(&mut partial));
    }

    #[test]
    fn a_long_31_connect_shortens_its_length_field() {
        // 128 + 2 bytes of remaining length (two length bytes) become 128 (still two).
        let mut connect = v4::Connect::new("c".repeat(130 - 12 - 2));
        connect.keep_alive = 5;
        let v311 = v4_bytes(&v4::Packet::Connect(connect.clone()));
        let (remaining, length_bytes) = remaining_length(&v311).unwrap();
        let mut v31 = BytesMut::new();
        v31.extend_from_slice(&[0x10]);
        let mut left = remaining + 2;
        while left > 0 || v31.len() == 1 {
            let mut byte = (left % 128) as u8;
            left /= 128;
            if left > 0 {
                byte |= 0x80;
            }
            v31.extend_from_slice(&[byte]);
        }
        v31.extend_from_slice(b"\x00\x06MQIsdp\x03");
        v31.extend_from_slice(&v311[1 + length_bytes + 7..]);
        assert!(v31_connect_to_v311(&mut v31));
        assert_eq!(
            v4::Packet::read(&mut v31, 1024).unwrap(),
            v4::Packet::Connect(connect)
        );
    }

    #[test]
    fn a_v5_connect_maps_session_expiry_will_login_and_empty_ids() {
        let mut connect = v5::Connect {
            keep_alive: 20,
            client_id: "pi-1".into(),
            clean_start: true,
            properties: None,
        };
        let will = v5::LastWill::new(
            "k3sense/pi-1/availability",
            "offline",
            m5::QoS::AtLeastOnce,
            true,
            None,
        );
        let hello =
            connect_from_v5(connect.clone(), Some(will), Some(v5::Login::new("u", "p"))).unwrap();
        assert!(
            hello.connect.clean_session,
            "no Session Expiry: the session ends with the connection"
        );
        assert!(hello.clean_start);
        assert_eq!(hello.connect.client_id, "pi-1");
        assert_eq!(hello.connect.keep_alive, 20);
        assert_eq!(hello.assigned_id, None);
        let will = hello.connect.last_will.unwrap();
        assert_eq!(
            (
                will.topic.as_str(),
                &will.message[..],
                will.qos,
                will.retain
            ),
            (
                "k3sense/pi-1/availability",
                &b"offline"[..],
                QoS::AtLeastOnce,
                true
            )
        );
        assert_eq!(hello.connect.login, Some(v4::Login::new("u", "p")));

        let mut properties = v5::ConnectProperties::new();
        properties.session_expiry_interval = Some(3600);
        connect.properties = Some(properties.clone());
        connect.clean_start = false;
        connect.client_id = String::new();
        let hello = connect_from_v5(connect.clone(), None, None).unwrap();
        assert!(
            !hello.connect.clean_session,
            "a session that outlives the connection"
        );
        let assigned = hello.assigned_id.unwrap();
        assert_eq!(hello.connect.client_id, assigned);
        assert!(assigned.starts_with("k3sense-"));

        properties.authentication_method = Some("SCRAM-SHA-1".into());
        connect.properties = Some(properties);
        assert_eq!(
            connect_from_v5(connect, None, None).unwrap_err(),
            v5::ConnectReturnCode::BadAuthenticationMethod
        );
    }

    #[test]
    fn v5_client_packets_become_311() {
        let mut publish = v5::Publish::new("a/b", m5::QoS::ExactlyOnce, "x", None);
        publish.pkid = 9;
        publish.retain = true;
        publish.dup = true;
        let mut expected = v4::Publish::new("a/b", QoS::ExactlyOnce, "x");
        expected.pkid = 9;
        expected.retain = true;
        expected.dup = true;
        assert_eq!(
            incoming(v5::Packet::Publish(publish)),
            Incoming::Packet(v4::Packet::Publish(expected))
        );
        let mut aliased = v5::Publish::new("", m5::QoS::AtMostOnce, "x", None);
        aliased.properties = Some(v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        });
        assert!(matches!(
            incoming(v5::Packet::Publish(aliased)),
            Incoming::Violation(_)
        ));
        let subscribe = v5::Subscribe::new_many(
            [
                v5::Filter::new("k3sense/#", m5::QoS::AtLeastOnce),
                v5::Filter::new("x", m5::QoS::AtMostOnce),
            ],
            None,
        );
        let Incoming::Packet(v4::Packet::Subscribe(s)) = incoming(v5::Packet::Subscribe(subscribe))
        else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(
            s.filters,
            [
                v4::SubscribeFilter::new("k3sense/#".into(), QoS::AtLeastOnce),
                v4::SubscribeFilter::new("x".into(), QoS::AtMostOnce)
            ]
        );
        assert_eq!(
            incoming(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection
            ))),
            Incoming::Packet(v4::Packet::Disconnect)
        );
        assert_eq!(
            incoming(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::DisconnectWithWillMessage
            ))),
            Incoming::DisconnectWithWill
        );
        assert_eq!(
            incoming(v5::Packet::PingReq(v5::PingReq)),
            Incoming::Packet(v4::Packet::PingReq)
        );
    }

    fn encoded(codec: &Codec, packet: v4::Packet, origin: Origin) -> v5::Packet {
        let mut buffer = BytesMut::new();
        codec.encode(&packet, origin, &mut buffer).unwrap();
        v5::Packet::read(&mut buffer, None).unwrap()
    }

    #[test]
    fn refusals_get_reason_code_0x87_and_unsubacks_a_reason_per_filter() {
        let codec = Codec::new(Version::V5, None);
        let v5::Packet::PubAck(relayed) = encoded(
            &codec,
            v4::Packet::PubAck(v4::PubAck::new(3)),
            Origin::Relay,
        ) else {
            panic!()
        };
        assert_eq!(
            (relayed.pkid, relayed.reason),
            (3, v5::PubAckReason::Success)
        );
        let v5::Packet::PubAck(refused) = encoded(
            &codec,
            v4::Packet::PubAck(v4::PubAck::new(4)),
            Origin::Front,
        ) else {
            panic!()
        };
        assert_eq!(
            (refused.pkid, refused.reason),
            (4, v5::PubAckReason::NotAuthorized)
        );
        let v5::Packet::PubRec(refused) = encoded(
            &codec,
            v4::Packet::PubRec(v4::PubRec::new(5)),
            Origin::Front,
        ) else {
            panic!()
        };
        assert_eq!(refused.reason, v5::PubRecReason::NotAuthorized);
        let suback = v4::SubAck::new(
            6,
            vec![
                v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
            ],
        );
        let v5::Packet::SubAck(suback) = encoded(&codec, v4::Packet::SubAck(suback), Origin::Relay)
        else {
            panic!()
        };
        assert_eq!(
            suback.return_codes,
            [
                v5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce),
                v5::SubscribeReasonCode::NotAuthorized
            ]
        );
        codec.unsubscribing(7, 3);
        let v5::Packet::UnsubAck(unsuback) = encoded(
            &codec,
            v4::Packet::UnsubAck(v4::UnsubAck::new(7)),
            Origin::Relay,
        ) else {
            panic!()
        };
        assert_eq!(unsuback.reasons.len(), 3);
        // The front says why, where MQTT 5 can.
        codec.publish_refused(11, Refused::QuotaExceeded);
        let v5::Packet::PubAck(limited) = encoded(
            &codec,
            v4::Packet::PubAck(v4::PubAck::new(11)),
            Origin::Front,
        ) else {
            panic!()
        };
        assert_eq!(limited.reason, v5::PubAckReason::QuotaExceeded);
        codec.filters_refused(
            12,
            vec![Refused::SharedNotSupported, Refused::FilterInvalid],
        );
        let mixed = v4::SubAck::new(
            12,
            vec![
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                v4::SubscribeReasonCode::Failure,
            ],
        );
        let v5::Packet::SubAck(mixed) = encoded(&codec, v4::Packet::SubAck(mixed), Origin::Relay)
        else {
            panic!()
        };
        assert_eq!(
            mixed.return_codes,
            [
                v5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
                v5::SubscribeReasonCode::Success(m5::QoS::AtMostOnce),
                v5::SubscribeReasonCode::TopicFilterInvalid
            ]
        );
        let mut publish = v4::Publish::new("k3sense/pi-1/state", QoS::AtLeastOnce, "{}");
        publish.pkid = 8;
        publish.dup = true;
        let v5::Packet::Publish(out) = encoded(&codec, v4::Packet::Publish(publish), Origin::Relay)
        else {
            panic!()
        };
        assert_eq!(
            (&out.topic[..], out.pkid, out.dup, out.qos),
            (&b"k3sense/pi-1/state"[..], 8, true, m5::QoS::AtLeastOnce)
        );
    }

    #[test]
    fn connack_codes_map_to_their_v5_reasons() {
        use v4::ConnectReturnCode as C4;
        for (v4_code, v5_code) in [
            (C4::Success, v5::ConnectReturnCode::Success),
            (
                C4::BadUserNamePassword,
                v5::ConnectReturnCode::BadUserNamePassword,
            ),
            (C4::NotAuthorized, v5::ConnectReturnCode::NotAuthorized),
            (
                C4::ServiceUnavailable,
                v5::ConnectReturnCode::ServerUnavailable,
            ),
            (
                C4::RefusedProtocolVersion,
                v5::ConnectReturnCode::UnsupportedProtocolVersion,
            ),
        ] {
            let bytes = bytes_of(&connack(v4_code, true, Some("k3sense-1".into()))).unwrap();
            let v5::Packet::ConnAck(ack) =
                v5::Packet::read(&mut BytesMut::from(&bytes[..]), None).unwrap()
            else {
                panic!()
            };
            assert_eq!(ack.code, v5_code);
            assert_eq!(ack.session_present, v4_code == C4::Success);
            if v4_code == C4::Success {
                let properties = ack.properties.unwrap();
                assert_eq!(
                    properties.assigned_client_identifier.as_deref(),
                    Some("k3sense-1")
                );
                assert_eq!(properties.shared_subscription_available, Some(0));
            }
        }
        let codec311 = Codec::new(Version::V311, None);
        let mut buffer = BytesMut::new();
        codec311
            .encode(
                &v4::Packet::PubAck(v4::PubAck::new(1)),
                Origin::Front,
                &mut buffer,
            )
            .unwrap();
        assert_eq!(
            &buffer[..],
            &[0x40, 0x02, 0x00, 0x01],
            "3.1.1 is written as it always was"
        );
    }
}
