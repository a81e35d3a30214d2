//! The gateway's link to its broker, as pages, the API and `/readyz` see it. Plain data, no I/O:
//! the MQTT loop reports what happened, with the time, and learns whether that was a change worth
//! telling every client.
//!
//! Losing the broker does not make the gateway unready: it still holds every reading and serves
//! them, so the page stays up and says "broker unreachable — showing the last readings" instead of
//! a load balancer's 503. Readiness waits only for the *first* subscription after start (or
//! [`FIRST_SUBSCRIPTION_GRACE`]), so a new pod in a rollout does not take browsers before it has
//! anything to show.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k3sense_protocol::ws::{BrokerLink, BrokerStatus};

/// How long after start a gateway that has never reached its broker still answers 503 on
/// `/readyz`. After that it is ready anyway: a broker that is down must not keep every gateway
/// (and so the page) down with it.
pub(crate) const FIRST_SUBSCRIPTION_GRACE: Duration = Duration::from_secs(10);

/// The broker link and whether it ever came up.
#[derive(Debug, Clone)]
pub(crate) struct LinkState {
    now: BrokerLink,
    ever_connected: bool,
}

impl LinkState {
    /// Not (yet) reached, since `started`.
    pub(crate) fn new(started: DateTime<Utc>) -> Self {
        Self {
            now: BrokerLink {
                status: BrokerStatus::Unreachable,
                since: started,
            },
            ever_connected: false,
        }
    }

    /// The link now.
    pub(crate) fn get(&self) -> BrokerLink {
        self.now
    }

    /// Whether the gateway has been subscribed at least once.
    pub(crate) fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// Records a subscription at `at`; the new link if that was a change.
    pub(crate) fn connected(&mut self, at: DateTime<Utc>) -> Option<BrokerLink> {
        self.ever_connected = true;
        self.set(BrokerStatus::Connected, at)
    }

    /// Records a lost (or failed) connection at `at`; the new link if that was a change. Every
    /// failed reconnect attempt reports again, and is no change.
    pub(crate) fn lost(&mut self, at: DateTime<Utc>) -> Option<BrokerLink> {
        self.set(BrokerStatus::Unreachable, at)
    }

    fn set(&mut self, status: BrokerStatus, at: DateTime<Utc>) -> Option<BrokerLink> {
        if self.now.status == status {
            return None;
        }
        self.now = BrokerLink { status, since: at };
        Some(self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-27T04:00:{second:02}Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn unreachable_since_start_until_the_first_subscription() {
        let mut link = LinkState::new(at(0));
        assert_eq!(link.get().status, BrokerStatus::Unreachable);
        assert_eq!(link.get().since, at(0));
        assert!(!link.ever_connected());
        // Failed attempts before the first connection change nothing, not even `since`.
        assert_eq!(link.lost(at(1)), None);
        assert_eq!(link.get().since, at(0));
        let up = link.connected(at(2)).unwrap();
        assert_eq!((up.status, up.since), (BrokerStatus::Connected, at(2)));
        assert!(link.ever_connected());
    }

    #[test]
    fn each_change_is_reported_once_with_its_time() {
        let mut link = LinkState::new(at(0));
        link.connected(at(1));
        assert_eq!(link.connected(at(2)), None, "a resubscription is no change");
        let down = link.lost(at(3)).unwrap();
        assert_eq!(
            (down.status, down.since),
            (BrokerStatus::Unreachable, at(3))
        );
        for retry in 4..9 {
            assert_eq!(link.lost(at(retry)), None);
        }
        assert_eq!(
            link.get().since,
            at(3),
            "since the loss, not the last retry"
        );
        let up = link.connected(at(13)).unwrap();
        assert_eq!((up.status, up.since), (BrokerStatus::Connected, at(13)));
        assert!(link.ever_connected());
    }
}
