//! What the publisher says about its sensor besides readings: availability (`online` /
//! `offline` on `<prefix>/<id>/availability`) and the sensor's health (`<prefix>/<id>/sensor`).
//! Both are retained and said again on every connect (a restarted broker lost them).
//!
//! The availability topic is also watched: another client saying `offline` for this sensor
//! while it is readable (a second publisher with the same id, a misconfigured tool) would leave
//! it shown offline until the next reconnect, so the publisher says `online` again at once.
//! After each connect the broker first sends its retained copy, which is older than our own
//! `online`; only an `offline` after our own `online` came back counts.
//!
//! Pure: the link publishes what it says.

use k3sense_protocol::{Availability, SensorHealth};

/// The sensor's availability and health, as last told by the reader.
#[derive(Debug)]
pub struct Presence {
    sensor: Availability,
    health: Option<SensorHealth>,
    /// Our own `online` came back on the availability topic since the last connect.
    own_online_seen: bool,
}

impl Presence {
    /// The sensor is `sensor` until told otherwise; its health is unknown.
    pub fn new(sensor: Availability) -> Self {
        Self {
            sensor,
            health: None,
            own_online_seen: false,
        }
    }

    /// Whether the sensor is readable.
    pub fn sensor(&self) -> Availability {
        self.sensor
    }

    /// The sensor's health, once known.
    pub fn health(&self) -> Option<&SensorHealth> {
        self.health.as_ref()
    }

    /// The sensor became readable or unreadable.
    pub fn set_sensor(&mut self, sensor: Availability) {
        self.sensor = sensor;
    }

    /// The sensor's health changed.
    pub fn set_health(&mut self, health: SensorHealth) {
        self.health = Some(health);
    }

    /// A new connection: what arrives on the availability topic first is the broker's old
    /// retained copy.
    pub fn reconnected(&mut self) {
        self.own_online_seen = false;
    }

    /// Our availability topic carried `payload`; true when it is someone else's `offline` to
    /// answer with `online`.
    pub fn seen(&mut self, payload: &[u8]) -> bool {
        match Availability::from_payload(payload) {
            Ok(Availability::Online) => {
                self.own_online_seen = true;
                false
            }
            Ok(Availability::Offline) => {
                self.own_online_seen && self.sensor == Availability::Online
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_offline_is_answered_only_after_our_own_online() {
        let mut p = Presence::new(Availability::Online);
        p.reconnected();
        // The broker's retained copy from before: ignored.
        assert!(!p.seen(b"offline"));
        assert!(!p.seen(b"online"));
        assert!(p.seen(b"offline"));
        assert!(!p.seen(b"banana"));
        // The sensor itself is unreadable: `offline` is true, nothing to answer.
        p.set_sensor(Availability::Offline);
        assert!(!p.seen(b"offline"));
        p.set_sensor(Availability::Online);
        // A new connection starts over.
        p.reconnected();
        assert!(!p.seen(b"offline"));
        assert_eq!(p.sensor(), Availability::Online);
        assert!(p.health().is_none());
    }
}
