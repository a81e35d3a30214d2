//! The sensor-id rule.
//!
//! A sensor id appears in MQTT topics, URLs and Kubernetes objects, and by default it *is* the
//! name of the node the sensor is wired to. The rule is therefore the strictest of those: an
//! RFC 1123 DNS label, `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`. Such an id never needs escaping in
//! a topic (no `/`, `+`, `#`) or in a URL path.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A validated sensor id. Construct with [`SensorId::new`] or `parse()`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SensorId(String);

impl SensorId {
    /// The longest id the rule allows.
    pub const MAX_LEN: usize = 63;

    /// Checks `id` against the rule.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if is_dns_label(&id) {
            Ok(Self(id))
        } else {
            Err(Error::BadSensorId(truncate_for_display(&id)))
        }
    }

    /// Turns a Kubernetes node name (a DNS *subdomain*, which may hold dots and capitals in
    /// some setups) into a valid id: lower-cased, every other character replaced by `-`, cut to
    /// 63 characters. Used when the sensor id defaults to the node name.
    pub fn from_node_name(name: &str) -> Result<Self> {
        let mapped: String = name
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '-'
                }
            })
            .take(Self::MAX_LEN)
            .collect();
        Self::new(mapped.trim_matches('-').to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_dns_label(id: &str) -> bool {
    let bytes = id.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= SensorId::MAX_LEN
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

/// Keeps error messages short when someone sends a megabyte as an id.
fn truncate_for_display(id: &str) -> String {
    const SHOWN: usize = 80;
    if id.chars().count() <= SHOWN {
        id.to_owned()
    } else {
        let mut shown: String = id.chars().take(SHOWN).collect();
        shown.push('…');
        shown
    }
}

impl TryFrom<String> for SensorId {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::new(value)
    }
}

impl From<SensorId> for String {
    fn from(value: SensorId) -> Self {
        value.0
    }
}

impl std::str::FromStr for SensorId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl fmt::Display for SensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SensorId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for id in ["a", "0", "pi-1", "sim-1", "k3s-node-07", &"a".repeat(63)] {
            assert!(SensorId::new(id).is_ok(), "{id} should be accepted");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let long = "a".repeat(64);
        for id in [
            "", "-a", "a-", "Pi-1", "pi_1", "pi.1", "pi/1", "pi+", "#", "pi 1", "é", &long,
        ] {
            assert!(
                matches!(SensorId::new(id), Err(Error::BadSensorId(_))),
                "{id:?} should be rejected"
            );
        }
    }

    #[test]
    fn node_names_become_ids() {
        let id = SensorId::from_node_name("Pi-4.Local").unwrap();
        assert_eq!(id.as_str(), "pi-4-local");
        let id = SensorId::from_node_name(&"x".repeat(100)).unwrap();
        assert_eq!(id.as_str().len(), 63);
        assert!(SensorId::from_node_name("...").is_err());
    }

    #[test]
    fn long_ids_are_shortened_in_errors() {
        let err = SensorId::new("X".repeat(10_000)).unwrap_err();
        assert!(err.to_string().len() < 400);
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<SensorId>("\"pi-1\"").is_ok());
        assert!(serde_json::from_str::<SensorId>("\"PI\"").is_err());
    }
}
