//! Which of the caller's publishes rumqttc sent, which the broker acknowledged, and which a
//! lost connection took with it: plain bookkeeping, no I/O, fed by the pump.
//!
//! rumqttc takes requests off its queue strictly in order and reports each publish it writes as
//! `Outgoing::Publish(pkid)` (pkid 0 for QoS 0). So the tickets of queued publishes form a FIFO
//! that those events pop, and a packet id maps to a ticket until its PUBACK (or PUBCOMP). When a
//! connection dies, rumqttc moves what it had written but not seen acknowledged, and every
//! request still queued, into its `pending` list; the pump empties that list (a clean session
//! would drop it at the next CONNACK anyway), so exactly those tickets are lost: every mapped
//! one, and as many queued ones, from the front, as publishes were drained from the queue.

use std::collections::{HashMap, VecDeque};

use rumqttc::QoS;

/// Names one publish handed to [`super::Client::publish`], so its acknowledgement (or loss)
/// can be matched to it in [`super::ClientEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishId(pub(crate) u64);

/// What happened to a publish, as the tracker learned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The broker acknowledged it (QoS 1/2), or it was written to the socket (QoS 0).
    Acked(PublishId),
}

/// The bookkeeping itself.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    next: u64,
    /// Queued publishes, oldest first, not yet written by rumqttc.
    queued: VecDeque<(PublishId, QoS)>,
    /// Written, waiting for the broker's acknowledgement.
    by_pkid: HashMap<u16, PublishId>,
    /// A publish rumqttc held back because its packet id was still in use (a broker acking out
    /// of order): it is written, with this packet id, once that id is acknowledged.
    collided: Option<(u16, PublishId)>,
}

impl Tracker {
    /// A ticket for a publish about to be queued; call [`Self::queued`] once it is.
    pub(crate) fn issue(&mut self) -> PublishId {
        self.next += 1;
        PublishId(self.next)
    }

    /// The publish `id` is now in rumqttc's queue, behind every earlier one.
    pub(crate) fn queued(&mut self, id: PublishId, qos: QoS) {
        self.queued.push_back((id, qos));
    }

    /// rumqttc wrote a publish with packet id `pkid`.
    pub(crate) fn written(&mut self, pkid: u16) -> Option<Outcome> {
        if let Some((held, id)) = self.collided {
            if held == pkid {
                self.collided = None;
                self.by_pkid.insert(pkid, id);
                return None;
            }
        }
        let (id, qos) = self.queued.pop_front()?;
        if qos == QoS::AtMostOnce {
            return Some(Outcome::Acked(id));
        }
        self.by_pkid.insert(pkid, id);
        None
    }

    /// rumqttc held a publish back until `pkid` is free again.
    pub(crate) fn collided(&mut self, pkid: u16) {
        if let Some((id, _)) = self.queued.pop_front() {
            self.collided = Some((pkid, id));
        }
    }

    /// The broker acknowledged packet id `pkid` (PUBACK, or PUBCOMP for QoS 2).
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<Outcome> {
        self.by_pkid.remove(&pkid).map(Outcome::Acked)
    }

    /// The connection died and `drained` queued publishes went with it (see the module doc):
    /// the tickets lost, oldest first.
    pub(crate) fn connection_lost(&mut self, drained: usize) -> Vec<PublishId> {
        let mut lost: Vec<PublishId> = self.by_pkid.drain().map(|(_, id)| id).collect();
        lost.extend(self.collided.take().map(|(_, id)| id));
        let drained = drained.min(self.queued.len());
        lost.extend(self.queued.drain(..drained).map(|(id, _)| id));
        lost.sort();
        lost
    }

    /// Publishes queued or written and not yet acknowledged or lost.
    pub(crate) fn outstanding(&self) -> usize {
        self.queued.len() + self.by_pkid.len() + usize::from(self.collided.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(t: &mut Tracker, qos: QoS) -> PublishId {
        let id = t.issue();
        t.queued(id, qos);
        id
    }

    #[test]
    fn acknowledgements_are_matched_by_packet_id_in_queue_order() {
        let mut t = Tracker::default();
        let a = queue(&mut t, QoS::AtLeastOnce);
        let b = queue(&mut t, QoS::AtLeastOnce);
        assert_eq!(t.written(1), None);
        assert_eq!(t.written(2), None);
        assert_eq!(t.acked(2), Some(Outcome::Acked(b)));
        assert_eq!(t.acked(2), None, "a second PUBACK is not a second ack");
        assert_eq!(t.acked(1), Some(Outcome::Acked(a)));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn qos0_is_done_once_written() {
        let mut t = Tracker::default();
        let a = queue(&mut t, QoS::AtMostOnce);
        let b = queue(&mut t, QoS::AtLeastOnce);
        assert_eq!(t.written(0), Some(Outcome::Acked(a)));
        assert_eq!(t.written(7), None);
        assert_eq!(t.acked(7), Some(Outcome::Acked(b)));
    }

    #[test]
    fn a_collided_publish_keeps_its_ticket() {
        let mut t = Tracker::default();
        let a = queue(&mut t, QoS::AtLeastOnce);
        let b = queue(&mut t, QoS::AtLeastOnce);
        let c = queue(&mut t, QoS::AtLeastOnce);
        t.written(1);
        t.collided(1); // b waits for packet id 1
        assert_eq!(t.acked(1), Some(Outcome::Acked(a)));
        assert_eq!(t.written(1), None, "b goes out with packet id 1");
        t.written(2);
        assert_eq!(t.acked(2), Some(Outcome::Acked(c)));
        assert_eq!(t.acked(1), Some(Outcome::Acked(b)));
    }

    #[test]
    fn a_lost_connection_loses_the_written_and_the_drained() {
        let mut t = Tracker::default();
        let a = queue(&mut t, QoS::AtLeastOnce);
        let b = queue(&mut t, QoS::AtLeastOnce);
        let c = queue(&mut t, QoS::AtLeastOnce);
        let d = queue(&mut t, QoS::AtLeastOnce);
        t.written(1); // a in flight
        // b and c were drained from the queue; d was queued after the drain and survives.
        assert_eq!(t.connection_lost(2), vec![a, b, c]);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.written(1), None);
        assert_eq!(t.acked(1), Some(Outcome::Acked(d)));
        assert_eq!(t.connection_lost(5), Vec::<PublishId>::new());
    }
}
