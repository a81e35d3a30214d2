//! Replays: how a gateway gets back readings it missed.
//!
//! The publisher is the source of truth: it keeps its recent readings (bounded) and sends a range
//! again when asked. The exchange runs over the same broker, so it needs no extra port and works
//! with any number of gateways:
//!
//! ```text
//! gateway  ──▶ <prefix>/<sensor_id>/replay/request   {"after_seq":41,"until_seq":45}   QoS 1, not retained
//! publisher ─▶ <prefix>/<sensor_id>/replay           Reading JSON, one message per reading,
//!                                                    oldest first, QoS 1, not retained
//! ```
//!
//! Every gateway subscribes to `<prefix>/+/replay`, so one gateway's request fills the gaps of
//! all of them; duplicates are harmless because history is keyed by `(read_at, seq)`. A gateway
//! asks when it starts (it has no history: `after_seq` 0 means "everything you keep"), when it
//! reconnects to the broker (after the newest `seq` it holds), and when a reading's `seq` jumps.

use serde::{Deserialize, Serialize};

use crate::{Error, Result, SensorId, Topics};

/// Largest replay request payload accepted.
pub const MAX_REQUEST_BYTES: usize = 256;

/// "Send me your readings with `after_seq < seq < until_seq`."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// Send readings with a `seq` greater than this (0: from the oldest kept).
    pub after_seq: u64,
    /// Send readings with a `seq` less than this; absent: up to the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_seq: Option<u64>,
}

impl ReplayRequest {
    /// Whether `seq` is in the requested range.
    pub fn wants(&self, seq: u64) -> bool {
        seq > self.after_seq && self.until_seq.is_none_or(|until| seq < until)
    }

    /// The JSON payload.
    pub fn to_json(&self) -> String {
        match self.until_seq {
            Some(until) => format!(r#"{{"after_seq":{},"until_seq":{until}}}"#, self.after_seq),
            None => format!(r#"{{"after_seq":{}}}"#, self.after_seq),
        }
    }

    /// Parses and checks a request payload.
    pub fn from_json(payload: &[u8]) -> Result<Self> {
        if payload.len() > MAX_REQUEST_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                max: MAX_REQUEST_BYTES,
            });
        }
        serde_json::from_slice(payload).map_err(|e| Error::Malformed(e.to_string()))
    }
}

impl Topics {
    /// `<prefix>/<id>/replay/request`: where gateways ask.
    pub fn replay_request(&self, id: &SensorId) -> String {
        format!("{}/{}/replay/request", self.prefix(), id)
    }

    /// `<prefix>/<id>/replay`: where the publisher answers.
    pub fn replay(&self, id: &SensorId) -> String {
        format!("{}/{}/replay", self.prefix(), id)
    }

    /// `<prefix>/+/replay`: every sensor's answers, for gateways.
    pub fn replay_filter(&self) -> String {
        format!("{}/+/replay", self.prefix())
    }

    /// The sensor of a `<prefix>/<id>/replay` topic.
    pub fn parse_replay(&self, topic: &str) -> Option<SensorId> {
        let rest = topic.strip_prefix(self.prefix())?.strip_prefix('/')?;
        let id = rest.strip_suffix("/replay")?;
        SensorId::new(id).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_selects_the_range() {
        let r = ReplayRequest {
            after_seq: 41,
            until_seq: Some(45),
        };
        assert_eq!(r.to_json(), r#"{"after_seq":41,"until_seq":45}"#);
        assert_eq!(ReplayRequest::from_json(r.to_json().as_bytes()).unwrap(), r);
        assert_eq!(
            (40..=46).filter(|s| r.wants(*s)).collect::<Vec<_>>(),
            [42, 43, 44]
        );
        let open = ReplayRequest::from_json(br#"{"after_seq":0}"#).unwrap();
        assert!(open.wants(1) && open.wants(u64::MAX) && !open.wants(0));
        assert_eq!(open.to_json(), r#"{"after_seq":0}"#);
    }

    #[test]
    fn rejects_bad_requests() {
        for bad in [
            &b""[..],
            b"{}",
            b"{\"after_seq\":-1}",
            b"[]",
            b"{\"after_seq\":\"1\"}",
        ] {
            assert!(ReplayRequest::from_json(bad).is_err(), "{bad:?}");
        }
        let huge = format!(r#"{{"after_seq":1,"x":"{}"}}"#, "a".repeat(300));
        assert!(matches!(
            ReplayRequest::from_json(huge.as_bytes()),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn replay_topics() {
        let t = Topics::default();
        let id = SensorId::new("pi-1").unwrap();
        assert_eq!(t.replay_request(&id), "k3sense/pi-1/replay/request");
        assert_eq!(t.replay(&id), "k3sense/pi-1/replay");
        assert_eq!(t.replay_filter(), "k3sense/+/replay");
        assert_eq!(t.parse_replay("k3sense/pi-1/replay"), Some(id));
        assert_eq!(t.parse_replay("k3sense/pi-1/replay/request"), None);
        assert_eq!(t.parse_replay("k3sense/PI/replay"), None);
        assert_eq!(t.parse_replay("k3sense/pi-1/state"), None);
    }
}
