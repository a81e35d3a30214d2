//! Whether the retained reading found on the broker at start-up may say where `seq` goes on
//! (issue 14, row 3).
//!
//! The publisher keeps no state of its own across restarts: it continues `seq` from its retained
//! reading. Anyone allowed to publish the sensor's state topic can put a reading there, so the
//! retained one is believed only if a real publisher could have written it:
//!
//! - its `read_at` is not in the future (beyond [`MAX_CLOCK_SKEW`]): a forged 2099 reading is
//!   refused;
//! - its `seq` is not above the number of seconds between [`seq_epoch`] (before k3sense
//!   existed) and its `read_at`: every publisher reads at most once a second (the DHT11's
//!   minimum spacing; `--interval` is never shorter), and `seq` only rises by one per reading,
//!   so no real publisher can be further along. A seq of 10^15 or 2^64 − 1 is refused.
//!
//! A refused reading is logged and counted (`anomalies{reason="retained_seq_refused"}`) and
//! numbering starts from 1, which gateways sort after the older readings by time, as after any
//! restart without a retained reading. `seq` itself never wraps: [`k3sense_protocol::MAX_SEQ`]
//! caps what validates, and the offset is added saturating.

use chrono::{DateTime, TimeZone, Utc};
use k3sense_protocol::Reading;

/// How far in the future a retained reading's `read_at` may lie (clocks disagree a little).
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(2);

/// A moment before any k3sense publisher ran: 2026-01-01T00:00:00Z.
pub fn seq_epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Why a retained reading's `seq` is not continued from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// `read_at` lies further in the future than [`MAX_CLOCK_SKEW`].
    Future,
    /// `seq` is above what one reading a second since [`seq_epoch`] can reach.
    SeqTooHigh {
        /// The largest `seq` a real publisher could have reached by `read_at`.
        bound: u64,
    },
}

/// The `seq` to continue from, or why not.
pub fn continue_from(retained: &Reading, now: DateTime<Utc>) -> Result<u64, Refused> {
    if retained.read_at > now + MAX_CLOCK_SKEW {
        return Err(Refused::Future);
    }
    let bound = u64::try_from((retained.read_at - seq_epoch()).num_seconds()).unwrap_or(0);
    if retained.seq > bound {
        return Err(Refused::SeqTooHigh { bound });
    }
    Ok(retained.seq)
}

#[cfg(test)]
mod tests {
    use k3sense_protocol::{Model, SensorId};

    use super::*;

    fn retained(seq: u64, read_at: DateTime<Utc>) -> Reading {
        Reading::new(
            SensorId::new("pi-1").unwrap(),
            Model::Dht22,
            20.0,
            50.0,
            read_at,
            seq,
        )
        .unwrap()
    }

    #[test]
    fn continues_from_a_plausible_reading_only() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
        assert_eq!(continue_from(&retained(42, now), now), Ok(42));
        assert_eq!(
            continue_from(&retained(42, now + chrono::Duration::minutes(1)), now),
            Ok(42)
        );
        let forged = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            continue_from(&retained(43, forged), now),
            Err(Refused::Future)
        );
        assert!(matches!(
            continue_from(&retained(1_000_000_000_000_000, now), now),
            Err(Refused::SeqTooHigh { .. })
        ));
        assert!(matches!(
            continue_from(&retained(k3sense_protocol::MAX_SEQ, now), now),
            Err(Refused::SeqTooHigh { .. })
        ));
        // One reading a second since the epoch is the most a real publisher reaches.
        let bound = (now - seq_epoch()).num_seconds() as u64;
        assert_eq!(continue_from(&retained(bound, now), now), Ok(bound));
        assert!(continue_from(&retained(bound + 1, now), now).is_err());
        assert_eq!(
            seq_epoch().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "2026-01-01T00:00:00Z"
        );
        // Before the epoch nothing is plausible but a fresh start.
        let old = Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap();
        assert!(continue_from(&retained(1, old), now).is_err());
    }
}
