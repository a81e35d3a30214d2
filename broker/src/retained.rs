//! Which topics hold a retained message, so an empty *non-retained* publish cannot erase one.
//!
//! MQTT 3.1.1 says only a retained empty publish clears a retained message; rumqttd clears it on
//! any empty publish. Every publish passes through the proxy and rumqttd keeps retained messages
//! in memory only (they die with it, as this set does), so the proxy can know exactly which topics
//! hold one and drop the empty non-retained publishes that rumqttd would mistreat.

use std::{collections::HashSet, sync::Mutex};

/// More topics than this and the set stops growing: from then on every empty non-retained
/// publish is dropped, which errs on the side of keeping data.
const MAX_TOPICS: usize = 65_536;

/// The topics that hold a retained message.
#[derive(Debug, Default)]
pub(crate) struct RetainedTopics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    topics: HashSet<String>,
    full: bool,
}

impl RetainedTopics {
    /// Records a retained publish that is being forwarded: non-empty sets, empty clears.
    pub(crate) fn record(&self, topic: &str, empty: bool) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if empty {
            inner.topics.remove(topic);
        } else if inner.topics.len() < MAX_TOPICS {
            inner.topics.insert(topic.to_owned());
        } else if !inner.topics.contains(topic) {
            inner.full = true;
        }
    }

    /// Whether an empty non-retained publish to `topic` would erase a retained message.
    pub(crate) fn holds(&self, topic: &str) -> bool {
        match self.inner.lock() {
            Ok(inner) => inner.full || inner.topics.contains(topic),
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_set_and_cleared_topics() {
        let r = RetainedTopics::default();
        assert!(!r.holds("a"));
        r.record("a", false);
        assert!(r.holds("a") && !r.holds("b"));
        r.record("a", true);
        assert!(!r.holds("a"));
    }

    #[test]
    fn a_full_set_protects_every_topic() {
        let r = RetainedTopics::default();
        for i in 0..MAX_TOPICS {
            r.record(&i.to_string(), false);
        }
        assert!(!r.holds("new"));
        r.record("new", false);
        assert!(r.holds("never-set"));
    }
}
