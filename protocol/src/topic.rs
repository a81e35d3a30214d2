//! The topic layout.
//!
//! ```text
//! <prefix>/<sensor_id>/state          Reading JSON, QoS 1, retained
//! <prefix>/<sensor_id>/availability   "online" / "offline", QoS 1, retained (offline = last will)
//! <prefix>/<sensor_id>/sensor         SensorHealth JSON: the sensor's own health, QoS 1, retained
//! ```
//!
//! The prefix defaults to [`DEFAULT_PREFIX`] and may hold several levels (`home/k3sense`), so two
//! installations can share one broker.

use crate::{Error, Result, SensorId};

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "k3sense";

/// What a topic under the prefix carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `<prefix>/<id>/state`: a [`crate::Reading`].
    State,
    /// `<prefix>/<id>/availability`: an [`crate::Availability`].
    Availability,
    /// `<prefix>/<id>/sensor`: a [`crate::SensorHealth`].
    Sensor,
}

impl TopicKind {
    fn suffix(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Availability => "availability",
            Self::Sensor => "sensor",
        }
    }
}

/// Builds and parses the topics of one installation (one prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Topics {
    /// Validates the prefix: non-empty, no wildcard or NUL, not a `$` system topic, no trailing `/`.
    pub fn new(prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        let usable = !prefix.is_empty()
            && !prefix.starts_with('$')
            && !prefix.ends_with('/')
            && !prefix.contains(['+', '#', '\0'])
            && !prefix.split('/').any(str::is_empty);
        if usable {
            Ok(Self { prefix })
        } else {
            Err(Error::BadPrefix(prefix))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/<id>/state`.
    pub fn state(&self, id: &SensorId) -> String {
        self.topic(id, TopicKind::State)
    }

    /// `<prefix>/<id>/availability`.
    pub fn availability(&self, id: &SensorId) -> String {
        self.topic(id, TopicKind::Availability)
    }

    /// `<prefix>/<id>/sensor`.
    pub fn sensor(&self, id: &SensorId) -> String {
        self.topic(id, TopicKind::Sensor)
    }

    /// The topic of `kind` for sensor `id`.
    pub fn topic(&self, id: &SensorId, kind: TopicKind) -> String {
        format!("{}/{}/{}", self.prefix, id, kind.suffix())
    }

    /// `<prefix>/+/<kind>`: every sensor's topic of that kind.
    pub fn filter(&self, kind: TopicKind) -> String {
        format!("{}/+/{}", self.prefix, kind.suffix())
    }

    /// Splits a topic into sensor id and kind; `None` for anything that is not one of ours
    /// (another prefix, an unknown suffix, an invalid id, extra levels).
    pub fn parse(&self, topic: &str) -> Option<(SensorId, TopicKind)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (id, suffix) = rest.split_once('/')?;
        let kind = match suffix {
            "state" => TopicKind::State,
            "availability" => TopicKind::Availability,
            "sensor" => TopicKind::Sensor,
            _ => return None,
        };
        SensorId::new(id).ok().map(|id| (id, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SensorId {
        SensorId::new(s).unwrap()
    }

    #[test]
    fn builds_the_documented_topics() {
        let t = Topics::default();
        assert_eq!(t.state(&id("pi-1")), "k3sense/pi-1/state");
        assert_eq!(t.availability(&id("pi-1")), "k3sense/pi-1/availability");
        assert_eq!(t.filter(TopicKind::State), "k3sense/+/state");
        assert_eq!(t.sensor(&id("pi-1")), "k3sense/pi-1/sensor");
        assert_eq!(
            t.parse("k3sense/pi-1/sensor"),
            Some((id("pi-1"), TopicKind::Sensor))
        );
        let t = Topics::new("home/k3sense").unwrap();
        assert_eq!(t.state(&id("a")), "home/k3sense/a/state");
    }

    #[test]
    fn parses_own_topics_only() {
        let t = Topics::default();
        assert_eq!(
            t.parse("k3sense/pi-1/state"),
            Some((id("pi-1"), TopicKind::State))
        );
        assert_eq!(
            t.parse("k3sense/pi-1/availability"),
            Some((id("pi-1"), TopicKind::Availability))
        );
        for other in [
            "k3sense/pi-1/other",
            "k3sense/PI/state",
            "k3sense/pi-1/state/x",
            "k3sensex/pi-1/state",
            "other/pi-1/state",
            "k3sense/state",
            "k3sense//state",
        ] {
            assert_eq!(t.parse(other), None, "{other}");
        }
    }

    #[test]
    fn rejects_unusable_prefixes() {
        for p in ["", "$SYS", "a/", "a/+/b", "#", "a//b", "a\0"] {
            assert!(Topics::new(p).is_err(), "{p:?}");
        }
    }
}
