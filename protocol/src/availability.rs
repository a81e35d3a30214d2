//! The availability payloads: `online` and `offline`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Whether a publisher is connected. `offline` is also the publisher's MQTT last will, so the
/// broker announces it when the publisher vanishes without saying goodbye.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// The publisher is connected and reading.
    Online,
    /// The publisher stopped, lost its sensor, or its connection died.
    Offline,
}

impl Availability {
    /// The exact MQTT payload.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }

    /// Parses an MQTT payload; only the exact words are accepted.
    pub fn from_payload(payload: &[u8]) -> Result<Self> {
        match payload {
            b"online" => Ok(Self::Online),
            b"offline" => Ok(Self::Offline),
            _ => Err(Error::BadAvailability),
        }
    }
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exact_words_only() {
        for a in [Availability::Online, Availability::Offline] {
            assert_eq!(Availability::from_payload(a.as_str().as_bytes()), Ok(a));
        }
        for bad in [&b"Online"[..], b"", b"online\n", b"1", b"offline "] {
            assert_eq!(Availability::from_payload(bad), Err(Error::BadAvailability));
        }
    }
}
