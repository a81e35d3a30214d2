//! What to do with each packet a logged-in client sends: the ACL, the empty-publish rule and the
//! limits, decided without sockets, metrics or log lines, so every rule is unit-tested here. The
//! relay (see `relay`) carries out the [`Action`], counts it and logs it.
//!
//! Refusal semantics (MQTT 3.1.1 has no negative PUBACK):
//! - A forbidden PUBLISH, or an empty one that would erase a retained message, or one over its
//!   topic's payload cap, is dropped and acknowledged as if delivered (PUBACK for QoS 1,
//!   PUBREC/PUBCOMP for QoS 2), so a client's queue is not stuck on it.
//! - A forbidden SUBSCRIBE filter gets return code 0x80; the allowed filters of the same packet
//!   are forwarded and their codes merged into one SUBACK.
//! - A `$SYS/…` filter is granted and served by the front (see `sys`), never forwarded: rumqttd
//!   closes a connection that subscribes to a `$` filter. Other `$` filters get 0x80.
//! - A PUBLISH to an empty or wildcard topic, a payload over `--max-payload` and packets only a
//!   server may send close the connection.

use std::collections::HashSet;

use tokio::time::Instant;

use rumqttc::mqttbytes::{
    QoS,
    v4::{
        Packet, PubAck, PubComp, PubRec, Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
        Unsubscribe,
    },
    valid_topic,
};

use crate::{
    acl::{Acl, PublishVerdict, SubscribeVerdict},
    filters::{FilterTable, Refused, Subscriptions},
    metrics::Reason,
    replays::{AccountBuckets, Bucket, PER_CONNECTION},
    retained::RetainedTopics,
    sys::{SysTree, is_sys_filter},
    users::Role,
};

/// The installation's rules and the tables they consult (shared by every connection).
pub(crate) struct Rules<'a> {
    pub(crate) acl: &'a Acl,
    pub(crate) retained: &'a RetainedTopics,
    pub(crate) filters: &'a FilterTable,
    /// The accounts' replay-request allowances.
    pub(crate) replays: &'a AccountBuckets,
    /// `--max-payload`.
    pub(crate) max_payload: usize,
    /// Which `$SYS` filters the front serves.
    pub(crate) sys: &'a SysTree,
}

/// Why a PUBLISH was dropped (and acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// The account may not publish to the topic.
    Forbidden,
    /// An empty non-retained payload would erase a retained message.
    WouldErase,
    /// The payload is over its topic family's cap.
    TooLarge,
    /// A replay request over the connection's or the account's rate (see `replays`).
    RateLimited,
}

impl Dropped {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "this account may not publish to the topic",
            Self::WouldErase => "an empty non-retained payload would erase a retained message",
            Self::TooLarge => {
                "the payload is over its topic's cap (1 KiB for readings and replays, 16 bytes for availability)"
            }
            Self::RateLimited => {
                "replay requests over 2 a second per connection (after 10 at once) or 4 a second per account (after 20)"
            }
        }
    }
}

/// Why a SUBSCRIBE filter was refused (SUBACK 0x80).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FilterRefused {
    /// A subscription budget is spent (see `filters`).
    Limit(Refused),
    /// The account may not read these topics.
    Forbidden,
    /// A `$…` filter.
    System,
    /// Not a valid filter.
    Invalid,
    /// `$share/…`.
    Shared,
}

impl FilterRefused {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Limit(limit) => limit.as_str(),
            Self::Forbidden => "this account may not read these topics",
            Self::System => "a $ filter",
            Self::Invalid => "not a valid filter",
            Self::Shared => "shared subscriptions ($share/…) are not served",
        }
    }
}

/// A SUBSCRIBE, judged filter by filter.
#[derive(Debug, PartialEq)]
pub(crate) struct SubscribeJudged {
    /// The SUBSCRIBE's packet id.
    pub(crate) pkid: u16,
    /// The allowed filters, to forward (none: answer the SUBACK from `codes` at once).
    pub(crate) forward: Option<Subscribe>,
    /// One entry per filter in the client's order: the refusal code, or `None` where the filter
    /// is forwarded (its code comes from rumqttd's SUBACK).
    pub(crate) codes: Vec<Option<SubscribeReasonCode>>,
    /// The refused filters and why, in order.
    pub(crate) refused: Vec<(String, FilterRefused)>,
    /// The granted `$SYS` filters, served by the front, in order.
    pub(crate) sys: Vec<String>,
}

impl SubscribeJudged {
    /// The SUBACK when nothing is forwarded.
    pub(crate) fn local_suback(&self) -> SubAck {
        SubAck::new(self.pkid, self.codes.iter().flatten().copied().collect())
    }
}

/// What the relay does with one packet from the client.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Forward it to rumqttd as it is.
    Forward(Packet),
    /// An allowed PUBLISH: forward it (counted as forwarded).
    Publish(Publish),
    /// A SUBSCRIBE: forward the allowed part, answer the rest.
    Subscribe(SubscribeJudged),
    /// An UNSUBSCRIBE: forward the filters rumqttd holds (if any; else answer the UNSUBACK),
    /// and drop the `$SYS` filters the front serves.
    Unsubscribe {
        /// The UNSUBSCRIBE without its `$` filters, none of which rumqttd was ever given;
        /// `None` when that leaves nothing.
        forward: Option<Unsubscribe>,
        /// The UNSUBACK when nothing is forwarded.
        answer: Option<Packet>,
        /// Its `$SYS` filters.
        sys: Vec<String>,
    },
    /// Answer the client with this packet; nothing goes to rumqttd.
    Answer(Packet),
    /// A PUBLISH dropped, with the acknowledgement the client is owed (none for QoS 0).
    Drop {
        why: Dropped,
        topic: String,
        bytes: usize,
        ack: Option<Packet>,
    },
    /// Close the connection (its will is published).
    Close(Reason, String),
    /// The client said goodbye (DISCONNECT): no will.
    Disconnect,
}

/// One connection's judge: the rules, who the client is, and what it holds.
pub(crate) struct Judge<'a> {
    rules: Rules<'a>,
    role: &'a Role,
    /// The account for per-account budgets ("" without a users file).
    account: &'a str,
    subscriptions: Subscriptions,
    /// Packet ids of dropped QoS 2 PUBLISHes whose PUBREL the proxy answers itself.
    dropped_qos2: HashSet<u16>,
    /// This connection's replay-request allowance.
    replays: Bucket,
}

impl<'a> Judge<'a> {
    pub(crate) fn new(
        rules: Rules<'a>,
        role: &'a Role,
        account: &'a str,
        max_subscriptions: usize,
    ) -> Self {
        Self {
            rules,
            role,
            account,
            subscriptions: Subscriptions::new(max_subscriptions),
            dropped_qos2: HashSet::new(),
            replays: Bucket::new(PER_CONNECTION, Instant::now()),
        }
    }

    /// Decides what to do with `packet`, which arrived at `now`.
    pub(crate) fn judge(&mut self, packet: Packet, now: Instant) -> Action {
        match packet {
            Packet::Publish(publish) => self.publish(publish, now),
            Packet::PubRel(rel) if self.dropped_qos2.remove(&rel.pkid) => {
                Action::Answer(Packet::PubComp(PubComp::new(rel.pkid)))
            }
            Packet::Subscribe(subscribe) => Action::Subscribe(self.subscribe(subscribe)),
            Packet::PingReq => Action::Answer(Packet::PingResp),
            Packet::Disconnect => Action::Disconnect,
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe),
            packet @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)) => Action::Forward(packet),
            other => Action::Close(
                Reason::Malformed,
                format!("a client may not send {}", packet_name(&other)),
            ),
        }
    }

    fn publish(&mut self, publish: Publish, now: Instant) -> Action {
        if publish.topic.is_empty() || !valid_topic(&publish.topic) {
            return Action::Close(
                Reason::Malformed,
                "PUBLISH to an empty or wildcard topic".to_owned(),
            );
        }
        if publish.payload.len() > self.rules.max_payload {
            return Action::Close(
                Reason::Oversized,
                format!(
                    "payload of {} bytes is over --max-payload",
                    publish.payload.len()
                ),
            );
        }
        let too_large = self
            .rules
            .acl
            .payload_cap(&publish.topic)
            .is_some_and(|cap| publish.payload.len() > cap);
        let why = if too_large {
            Dropped::TooLarge
        } else {
            match self.verdict(&publish) {
                PublishVerdict::Allow if !self.replay_allowed(&publish.topic, now) => {
                    Dropped::RateLimited
                }
                PublishVerdict::Allow => {
                    if publish.retain {
                        let empty = publish.payload.is_empty();
                        self.rules.retained.record(&publish.topic, empty);
                    }
                    return Action::Publish(publish);
                }
                PublishVerdict::Forbidden => Dropped::Forbidden,
                PublishVerdict::WouldErase => Dropped::WouldErase,
            }
        };
        self.drop_publish(publish, why)
    }

    /// The ACL's verdict, with the empty-publish rule applied to every topic that holds a
    /// retained message (not only the ones the ACL knows as state topics).
    fn verdict(&self, publish: &Publish) -> PublishVerdict {
        let empty = publish.payload.is_empty();
        match self
            .rules
            .acl
            .publish(self.role, &publish.topic, empty, publish.retain)
        {
            PublishVerdict::Allow
                if empty && !publish.retain && self.rules.retained.holds(&publish.topic) =>
            {
                PublishVerdict::WouldErase
            }
            verdict => verdict,
        }
    }

    /// Whether a publish to `topic` is within the replay-request rates (any other topic is).
    fn replay_allowed(&mut self, topic: &str, now: Instant) -> bool {
        !self.rules.acl.is_replay_request(topic)
            || (self.replays.take(PER_CONNECTION, now)
                && self.rules.replays.take(self.account, now))
    }

    fn drop_publish(&mut self, publish: Publish, why: Dropped) -> Action {
        let ack = match publish.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(publish.pkid))),
            QoS::ExactlyOnce => {
                self.dropped_qos2.insert(publish.pkid);
                Some(Packet::PubRec(PubRec::new(publish.pkid)))
            }
        };
        Action::Drop {
            why,
            bytes: publish.payload.len(),
            topic: publish.topic,
            ack,
        }
    }

    /// Splits a SUBSCRIBE into the part to forward (if any filter is allowed) and the codes of
    /// the refused filters.
    fn subscribe(&mut self, subscribe: Subscribe) -> SubscribeJudged {
        let mut allowed = Vec::new();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut refused = Vec::new();
        let mut sys = Vec::new();
        for filter in subscribe.filters {
            match self.filter(&filter.path) {
                Ok(Route::Forward) => {
                    codes.push(None);
                    allowed.push(filter);
                }
                Ok(Route::Sys) => {
                    codes.push(Some(SubscribeReasonCode::Success(filter.qos)));
                    sys.push(filter.path);
                }
                Err(why) => {
                    codes.push(Some(SubscribeReasonCode::Failure));
                    refused.push((filter.path, why));
                }
            }
        }
        let forward = (!allowed.is_empty()).then_some(Subscribe {
            pkid: subscribe.pkid,
            filters: allowed,
        });
        SubscribeJudged {
            pkid: subscribe.pkid,
            forward,
            codes,
            refused,
            sys,
        }
    }

    /// Splits an UNSUBSCRIBE into what rumqttd holds and the `$` filters it was never given.
    fn unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Action {
        let pkid = unsubscribe.pkid;
        let (dollar, upstream): (Vec<String>, Vec<String>) = unsubscribe
            .topics
            .into_iter()
            .partition(|f| f.starts_with('$'));
        for filter in dollar.iter().chain(&upstream) {
            self.subscriptions.remove(filter);
        }
        let sys = dollar.into_iter().filter(|f| is_sys_filter(f)).collect();
        let (forward, answer) = if upstream.is_empty() {
            (None, Some(Packet::UnsubAck(UnsubAck::new(pkid))))
        } else {
            let forward = Unsubscribe {
                pkid,
                topics: upstream,
            };
            (Some(forward), None)
        };
        Action::Unsubscribe {
            forward,
            answer,
            sys,
        }
    }

    fn filter(&mut self, path: &str) -> Result<Route, FilterRefused> {
        let limited = FilterRefused::Limit;
        match self.rules.acl.subscribe(self.role, path) {
            SubscribeVerdict::Allow => self
                .subscriptions
                .admit(self.rules.filters, self.account, path)
                .map(|()| Route::Forward)
                .map_err(limited),
            SubscribeVerdict::Forbidden => Err(FilterRefused::Forbidden),
            SubscribeVerdict::System if self.rules.sys.serves(path) => self
                .subscriptions
                .admit_local(path)
                .map(|()| Route::Sys)
                .map_err(limited),
            SubscribeVerdict::System => Err(FilterRefused::System),
            SubscribeVerdict::Invalid => Err(FilterRefused::Invalid),
            SubscribeVerdict::Shared => Err(FilterRefused::Shared),
        }
    }
}

/// Where an allowed filter is served.
enum Route {
    /// By rumqttd.
    Forward,
    /// By the front's `$SYS` tree.
    Sys,
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
    use rumqttc::mqttbytes::v4::{PubRel, SubscribeFilter, Unsubscribe};

    use super::*;
    use crate::users::Sensors;

    struct Tables {
        acl: Acl,
        retained: RetainedTopics,
        filters: FilterTable,
        replays: AccountBuckets,
        sys: SysTree,
    }

    impl Tables {
        fn new() -> Self {
            Self {
                acl: Acl::new("k3sense"),
                retained: RetainedTopics::default(),
                filters: FilterTable::new(100, 10),
                replays: AccountBuckets::default(),
                sys: SysTree::new(std::time::Duration::ZERO),
            }
        }

        fn judge<'a>(&'a self, role: &'a Role) -> Judge<'a> {
            let rules = Rules {
                acl: &self.acl,
                retained: &self.retained,
                filters: &self.filters,
                replays: &self.replays,
                max_payload: 4096,
                sys: &self.sys,
            };
            Judge::new(rules, role, "acct", 3)
        }
    }

    impl Judge<'_> {
        fn judge_now(&mut self, packet: Packet) -> Action {
            self.judge(packet, Instant::now())
        }
    }

    fn publish(topic: &str, payload: &[u8], qos: QoS, retain: bool, pkid: u16) -> Packet {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        p.pkid = pkid;
        Packet::Publish(p)
    }

    fn pi_1() -> Role {
        Role::Publisher(Sensors::Only(vec![
            k3sense_protocol::SensorId::new("pi-1").unwrap(),
        ]))
    }

    #[test]
    fn allowed_publishes_are_forwarded_and_retained_ones_recorded() {
        let t = Tables::new();
        let role = pi_1();
        let mut judge = t.judge(&role);
        let action = judge.judge_now(publish(
            "k3sense/pi-1/state",
            b"{}",
            QoS::AtLeastOnce,
            true,
            7,
        ));
        assert!(matches!(action, Action::Publish(p) if p.pkid == 7));
        assert!(t.retained.holds("k3sense/pi-1/state"));
    }

    #[test]
    fn forbidden_publishes_are_dropped_with_the_ack_the_client_is_owed() {
        let t = Tables::new();
        let role = pi_1();
        let mut judge = t.judge(&role);
        let at = |qos, pkid| publish("k3sense/pi-2/state", b"{}", qos, false, pkid);
        assert_eq!(
            judge.judge_now(at(QoS::AtLeastOnce, 5)),
            Action::Drop {
                why: Dropped::Forbidden,
                topic: "k3sense/pi-2/state".to_owned(),
                bytes: 2,
                ack: Some(Packet::PubAck(PubAck::new(5))),
            }
        );
        assert!(matches!(
            judge.judge_now(at(QoS::AtMostOnce, 0)),
            Action::Drop { ack: None, .. }
        ));
        // QoS 2: PUBREC now, and the PUBREL is answered here, not forwarded.
        assert!(matches!(
            judge.judge_now(at(QoS::ExactlyOnce, 9)),
            Action::Drop {
                ack: Some(Packet::PubRec(_)),
                ..
            }
        ));
        assert_eq!(
            judge.judge_now(Packet::PubRel(PubRel::new(9))),
            Action::Answer(Packet::PubComp(PubComp::new(9)))
        );
        // A PUBREL for a forwarded QoS 2 message goes to rumqttd.
        assert_eq!(
            judge.judge_now(Packet::PubRel(PubRel::new(9))),
            Action::Forward(Packet::PubRel(PubRel::new(9)))
        );
    }

    #[test]
    fn an_empty_publish_erases_only_when_retained() {
        let t = Tables::new();
        let role = Role::Admin;
        let mut judge = t.judge(&role);
        judge.judge_now(publish("other/topic", b"x", QoS::AtMostOnce, true, 0));
        // rumqttd would erase the retained message on this: dropped.
        assert!(matches!(
            judge.judge_now(publish("other/topic", b"", QoS::AtMostOnce, false, 0)),
            Action::Drop {
                why: Dropped::WouldErase,
                ..
            }
        ));
        assert!(matches!(
            judge.judge_now(publish(
                "k3sense/pi-1/state",
                b"",
                QoS::AtMostOnce,
                false,
                0
            )),
            Action::Drop {
                why: Dropped::WouldErase,
                ..
            }
        ));
        // A retained empty publish clears it, as MQTT says.
        assert!(matches!(
            judge.judge_now(publish("other/topic", b"", QoS::AtMostOnce, true, 0)),
            Action::Publish(_)
        ));
        assert!(!t.retained.holds("other/topic"));
    }

    #[test]
    fn payload_limits_drop_per_topic_and_close_over_max_payload() {
        let t = Tables::new();
        let role = Role::Admin;
        let mut judge = t.judge(&role);
        let big = vec![b'x'; 1025];
        assert!(matches!(
            judge.judge_now(publish(
                "k3sense/pi-1/state",
                &big,
                QoS::AtLeastOnce,
                false,
                1
            )),
            Action::Drop {
                why: Dropped::TooLarge,
                bytes: 1025,
                ..
            }
        ));
        assert!(matches!(
            judge.judge_now(publish(
                "k3sense/pi-1/availability",
                &[b'x'; 17],
                QoS::AtLeastOnce,
                false,
                2
            )),
            Action::Drop {
                why: Dropped::TooLarge,
                ..
            }
        ));
        assert!(matches!(
            judge.judge_now(publish("free/topic", &big, QoS::AtLeastOnce, false, 3)),
            Action::Publish(_)
        ));
        assert!(matches!(
            judge.judge_now(publish(
                "free/topic",
                &[0; 4097],
                QoS::AtLeastOnce,
                false,
                4
            )),
            Action::Close(Reason::Oversized, _)
        ));
        assert!(matches!(
            judge.judge_now(publish("a/+/b", b"x", QoS::AtMostOnce, false, 0)),
            Action::Close(Reason::Malformed, _)
        ));
    }

    #[test]
    fn subscribe_forwards_the_allowed_filters_and_keeps_the_refused_places() {
        let t = Tables::new();
        let role = Role::Reader;
        let mut judge = t.judge(&role);
        let filters = [
            "k3sense/+/state",
            "$SYS/#",
            "other/#",
            "$share/g/k3sense/#",
            "a/#/b",
            "k3sense/#",
            "homeassistant/#",
            "k3sense/pi-1/#",
        ];
        let subscribe = Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce)),
        );
        let Action::Subscribe(judged) = judge.judge_now(Packet::Subscribe(subscribe)) else {
            panic!("not a subscribe");
        };
        let forwarded: Vec<_> = judged
            .forward
            .unwrap()
            .filters
            .into_iter()
            .map(|f| f.path)
            .collect();
        // Three subscriptions per connection in these tables: the fourth allowed one is over.
        assert_eq!(
            forwarded,
            ["k3sense/+/state", "k3sense/#", "homeassistant/#"]
        );
        let why: Vec<_> = judged.refused.iter().map(|(_, why)| *why).collect();
        assert_eq!(
            why,
            [
                FilterRefused::System,
                FilterRefused::Forbidden,
                FilterRefused::Shared,
                FilterRefused::Invalid,
                FilterRefused::Limit(Refused::Connection),
            ]
        );
        assert_eq!(judged.codes.iter().filter(|c| c.is_none()).count(), 3);
        assert_eq!(judged.codes.len(), filters.len());

        // After an UNSUBSCRIBE there is room again.
        let unsubscribe = Unsubscribe::new("k3sense/#");
        assert!(matches!(
            judge.judge_now(Packet::Unsubscribe(unsubscribe)),
            Action::Unsubscribe {
                forward: Some(_),
                answer: None,
                ..
            }
        ));
        let again = Subscribe::new("k3sense/pi-1/#", QoS::AtLeastOnce);
        let Action::Subscribe(judged) = judge.judge_now(Packet::Subscribe(again)) else {
            panic!("not a subscribe");
        };
        assert!(judged.refused.is_empty());
    }

    #[test]
    fn sys_filters_are_granted_by_the_front_and_never_reach_rumqttd() {
        let mut t = Tables::new();
        t.sys = SysTree::new(std::time::Duration::from_secs(10));
        let role = Role::Reader;
        let mut judge = t.judge(&role);
        let subscribe = Subscribe::new_many([
            SubscribeFilter::new("$SYS/broker/#".to_owned(), QoS::AtLeastOnce),
            SubscribeFilter::new("$other/x".to_owned(), QoS::AtMostOnce),
            SubscribeFilter::new("k3sense/#".to_owned(), QoS::AtLeastOnce),
        ]);
        let Action::Subscribe(judged) = judge.judge_now(Packet::Subscribe(subscribe)) else {
            panic!("not a subscribe");
        };
        assert_eq!(judged.sys, ["$SYS/broker/#"]);
        let forwarded: Vec<_> = judged.forward.unwrap().filters;
        assert_eq!(forwarded.len(), 1);
        assert_eq!(forwarded[0].path, "k3sense/#");
        assert_eq!(
            judged.codes,
            [
                Some(SubscribeReasonCode::Success(QoS::AtLeastOnce)),
                Some(SubscribeReasonCode::Failure),
                None
            ]
        );
        assert_eq!(
            judged.refused,
            [("$other/x".to_owned(), FilterRefused::System)]
        );

        // An UNSUBSCRIBE of `$` filters only is answered by the front.
        let only_sys = Unsubscribe {
            pkid: 4,
            topics: vec!["$SYS/broker/#".to_owned(), "$other/x".to_owned()],
        };
        assert_eq!(
            judge.judge_now(Packet::Unsubscribe(only_sys)),
            Action::Unsubscribe {
                forward: None,
                answer: Some(Packet::UnsubAck(UnsubAck::new(4))),
                sys: vec!["$SYS/broker/#".to_owned()],
            }
        );
        // A mixed one forwards only what rumqttd holds.
        let mixed = Unsubscribe {
            pkid: 5,
            topics: vec!["$SYS/#".to_owned(), "k3sense/#".to_owned()],
        };
        let Action::Unsubscribe {
            forward,
            answer,
            sys,
        } = judge.judge_now(Packet::Unsubscribe(mixed))
        else {
            panic!("not an unsubscribe");
        };
        assert_eq!(forward.unwrap().topics, ["k3sense/#"]);
        assert_eq!((answer, sys), (None, vec!["$SYS/#".to_owned()]));
    }

    #[test]
    fn a_fully_refused_subscribe_is_answered_locally() {
        let t = Tables::new();
        let role = Role::Reader;
        let mut judge = t.judge(&role);
        let subscribe = Subscribe::new("$SYS/#", QoS::AtLeastOnce);
        let Action::Subscribe(judged) = judge.judge_now(Packet::Subscribe(subscribe)) else {
            panic!("not a subscribe");
        };
        assert!(judged.forward.is_none());
        assert_eq!(
            judged.local_suback().return_codes,
            [SubscribeReasonCode::Failure]
        );
    }

    #[test]
    fn replay_requests_are_limited_per_connection_and_per_account() {
        let t = Tables::new();
        let role = Role::Gateway;
        let request = |pkid| {
            publish(
                "k3sense/pi-1/replay/request",
                b"{}",
                QoS::AtLeastOnce,
                false,
                pkid,
            )
        };
        let now = Instant::now();
        let count = |judge: &mut Judge, n: u16, at: Instant| {
            (0..n)
                .filter(|i| matches!(judge.judge(request(i + 1), at), Action::Publish(_)))
                .count()
        };
        let mut first = t.judge(&role);
        assert_eq!(count(&mut first, 30, now), 10, "the connection's burst");
        assert!(matches!(
            first.judge(request(99), now),
            Action::Drop {
                why: Dropped::RateLimited,
                ack: Some(Packet::PubAck(_)),
                ..
            }
        ));
        // Other topics are not limited.
        assert!(matches!(
            first.judge(
                publish(
                    "k3sense/pi-1/replay/other",
                    b"{}",
                    QoS::AtLeastOnce,
                    false,
                    1
                ),
                now
            ),
            Action::Drop {
                why: Dropped::Forbidden,
                ..
            }
        ));
        let mut second = t.judge(&role);
        assert_eq!(count(&mut second, 30, now), 10, "the account's burst is 20");
        let mut third = t.judge(&role);
        assert_eq!(count(&mut third, 30, now), 0, "the account has none left");
        let later = now + std::time::Duration::from_secs(1);
        assert_eq!(count(&mut third, 30, later), 2, "the connection's rate");
    }

    #[test]
    fn server_packets_close_and_pings_and_disconnects_are_answered() {
        let t = Tables::new();
        let role = Role::Admin;
        let mut judge = t.judge(&role);
        assert_eq!(
            judge.judge_now(Packet::PingReq),
            Action::Answer(Packet::PingResp)
        );
        assert_eq!(judge.judge_now(Packet::Disconnect), Action::Disconnect);
        assert!(matches!(
            judge.judge_now(Packet::PingResp),
            Action::Close(Reason::Malformed, why) if why.contains("PINGRESP")
        ));
    }
}
