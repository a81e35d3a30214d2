//! Who is connected under which client id, and the client id rumqttd sees for each connection.
//!
//! rumqttd keeps a record of every client id it has ever seen (measured: 20,000 short sessions
//! with fresh ids grew it by 12.8 MB, for good). A clean session needs no state after it ends, so
//! the proxy gives each clean session a *slot* id from a pool (`~<n>`) and reuses slots: rumqttd's
//! records stay bounded by the most connections alive at once plus those in quarantine (checked in
//! every CI run by `tests/broker_churn.rs`: after 4,000 sessions with fresh ids, 26,000 more grow
//! the broker process by ~4 MB, glibc's malloc settling, and the pool stays at ~3,000 slots;
//! without reuse, +20 MB and 30,003 slots). A
//! slot is reused only after [`QUARANTINE`], so rumqttd has long finished with its previous holder
//! (rumqttd mistakes a quick reconnect with the same id for a takeover and publishes the *new*
//! client's will). Persistent sessions (clean session off) keep a fixed id, `<user>.<client id>`.
//!
//! Because rumqttd no longer sees the client's own id for clean sessions, the proxy does the
//! MQTT takeover itself: a second connection with the same username and client id ends the first.
//! The first ends as a lost connection, so its will *is* published, as Mosquitto does (and MQTT 5
//! says: the network connection closed without a DISCONNECT). The second waits for that
//! ([`Registration::after_previous`]) before it is answered, so an `offline` will can never
//! arrive after the new connection's own `online`.
//!
//! A clean session discards any stored session of its client id [MQTT-3.1.2-6]. rumqttd keeps
//! the persistent session under `<user>.<client id>`, which a clean session (on a slot id) never
//! touches; the registry remembers which persistent ids rumqttd holds and tells the connection
//! to discard one ([`Registration::discard`]).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a released slot rests before another connection gets it.
pub(crate) const QUARANTINE: Duration = Duration::from_secs(2);

/// The live connections by (username, client id), and the pool of slot ids.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per key: the connection's number, its takeover token, and its `finished` token.
    live: HashMap<String, (u64, CancellationToken, CancellationToken)>,
    /// rumqttd ids of persistent sessions it may still hold.
    persistent: HashSet<String>,
    free: VecDeque<(u32, Instant)>,
    slots: u32,
    next_connection: u64,
}

/// One connection's entry; dropping it frees the client id and returns the slot to the pool.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    key: Option<String>,
    connection: u64,
    slot: Option<u32>,
    /// The client id rumqttd sees.
    pub(crate) internal_id: String,
    /// Cancelled when another connection takes this client id over.
    pub(crate) taken_over: CancellationToken,
    /// The rumqttd id of a stored session this connection must discard before it connects.
    pub(crate) discard: Option<String>,
    /// Cancelled when this registration ends (the connection is completely gone).
    finished: CancellationToken,
    /// The `finished` token of the connection this one took over.
    previous: Option<CancellationToken>,
}

impl Registration {
    /// Waits (at most `limit`) until the connection this one took over is completely gone,
    /// its will published.
    pub(crate) async fn after_previous(&self, limit: Duration) {
        if let Some(previous) = &self.previous {
            let _ = tokio::time::timeout(limit, previous.cancelled()).await;
        }
    }
}

impl Registry {
    /// Registers a connection. `key` is the username and client id (`None` for an empty client
    /// id, which no one can take over); `persistent_id` is the fixed rumqttd id of a persistent
    /// session, `None` for a clean one (which gets a slot); `clean_start_id` is the rumqttd id
    /// of this client's persistent session when the connection starts clean (its stored session
    /// is discarded). An earlier connection with the same key is told to end.
    pub(crate) fn register(
        self: &Arc<Self>,
        key: Option<String>,
        persistent_id: Option<String>,
        clean_start_id: Option<String>,
    ) -> Registration {
        let taken_over = CancellationToken::new();
        let finished = CancellationToken::new();
        let Ok(mut inner) = self.inner.lock() else {
            // A poisoned lock only follows a panic elsewhere; serve without the pool.
            return Registration {
                registry: self.clone(),
                key: None,
                connection: 0,
                slot: None,
                internal_id: persistent_id.unwrap_or_default(),
                taken_over,
                discard: None,
                finished,
                previous: None,
            };
        };
        inner.next_connection += 1;
        let connection = inner.next_connection;
        let mut previous = None;
        if let Some(key) = &key {
            if let Some((_, taken, gone)) = inner.live.insert(
                key.clone(),
                (connection, taken_over.clone(), finished.clone()),
            ) {
                taken.cancel();
                previous = Some(gone);
            }
        }
        let discard = clean_start_id.filter(|id| {
            let stored = inner.persistent.contains(id);
            if persistent_id.as_ref() != Some(id) {
                inner.persistent.remove(id);
            }
            stored
        });
        if let Some(id) = &persistent_id {
            inner.persistent.insert(id.clone());
        }
        let (slot, internal_id) = match persistent_id {
            Some(id) => (None, id),
            None => {
                let now = Instant::now();
                let slot = match inner.free.front() {
                    Some((slot, released)) if now.duration_since(*released) >= QUARANTINE => {
                        let slot = *slot;
                        inner.free.pop_front();
                        slot
                    }
                    _ => {
                        inner.slots += 1;
                        inner.slots
                    }
                };
                (Some(slot), format!("~{slot}"))
            }
        };
        Registration {
            registry: self.clone(),
            key,
            connection,
            slot,
            internal_id,
            taken_over,
            discard,
            finished,
            previous,
        }
    }

    /// Slot ids handed out so far: what rumqttd's per-client records are bounded by.
    pub(crate) fn slots(&self) -> u32 {
        self.inner.lock().map_or(0, |inner| inner.slots)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.finished.cancel();
        let Ok(mut inner) = self.registry.inner.lock() else {
            return;
        };
        if let Some(key) = &self.key {
            if inner
                .live
                .get(key)
                .is_some_and(|(c, _, _)| *c == self.connection)
            {
                inner.live.remove(key);
            }
        }
        if let Some(slot) = self.slot {
            inner.free.push_back((slot, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn clean_sessions_reuse_slots_after_the_quarantine() {
        let registry = Arc::new(Registry::default());
        let a = registry.register(Some("u\0a".into()), None, None);
        let b = registry.register(Some("u\0b".into()), None, None);
        assert_eq!(
            (a.internal_id.as_str(), b.internal_id.as_str()),
            ("~1", "~2")
        );
        drop(a);
        let c = registry.register(None, None, None);
        assert_eq!(c.internal_id, "~3", "a just-released slot rests");
        tokio::time::advance(QUARANTINE).await;
        let d = registry.register(None, None, None);
        assert_eq!(d.internal_id, "~1");
        drop((b, c, d));
        tokio::time::advance(QUARANTINE).await;
        for _ in 0..100 {
            let _churn = registry.register(Some("u\0x".into()), None, None);
            tokio::time::advance(QUARANTINE).await;
        }
        assert_eq!(
            registry.slots(),
            3,
            "churn reuses slots instead of minting ids"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_sessions_keep_their_id() {
        let registry = Arc::new(Registry::default());
        let p = registry.register(Some("u\0p".into()), Some("u.p".into()), None);
        assert_eq!(p.internal_id, "u.p");
        drop(p);
        assert_eq!(registry.slots(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_user_and_client_id_takes_over() {
        let registry = Arc::new(Registry::default());
        let first = registry.register(Some("u\0pi".into()), None, None);
        let other_user = registry.register(Some("v\0pi".into()), None, None);
        assert!(!first.taken_over.is_cancelled());
        let second = registry.register(Some("u\0pi".into()), None, None);
        assert!(first.taken_over.is_cancelled());
        assert!(!other_user.taken_over.is_cancelled());
        // The first one leaving does not unregister the second.
        drop(first);
        let third = registry.register(Some("u\0pi".into()), None, None);
        assert!(second.taken_over.is_cancelled());
        assert!(!third.taken_over.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_takeover_waits_for_the_old_connection_to_be_gone() {
        let registry = Arc::new(Registry::default());
        let old = registry.register(Some("u\0pi".into()), None, None);
        let new = registry.register(Some("u\0pi".into()), None, None);
        assert!(old.taken_over.is_cancelled());
        let waited = tokio::time::timeout(
            Duration::from_secs(1),
            new.after_previous(Duration::from_secs(5)),
        )
        .await;
        assert!(waited.is_err(), "the old connection is still there");
        drop(old);
        tokio::time::timeout(
            Duration::from_secs(1),
            new.after_previous(Duration::from_secs(5)),
        )
        .await
        .unwrap();
        let alone = registry.register(Some("u\0other".into()), None, None);
        tokio::time::timeout(
            Duration::from_millis(1),
            alone.after_previous(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_clean_start_discards_a_stored_persistent_session_once() {
        let registry = Arc::new(Registry::default());
        let clean = registry.register(Some("u\0c".into()), None, Some("u.c".into()));
        assert_eq!(clean.discard, None, "nothing stored yet");
        drop(clean);
        drop(registry.register(Some("u\0c".into()), Some("u.c".into()), None));
        let clean = registry.register(Some("u\0c".into()), None, Some("u.c".into()));
        assert_eq!(clean.discard.as_deref(), Some("u.c"));
        drop(clean);
        let again = registry.register(Some("u\0c".into()), None, Some("u.c".into()));
        assert_eq!(again.discard, None, "already discarded");
        drop(again);
        // MQTT 5: Clean Start with a session kept after: discard, and remember the new one.
        drop(registry.register(Some("u\0c".into()), Some("u.c".into()), None));
        let both = registry.register(Some("u\0c".into()), Some("u.c".into()), Some("u.c".into()));
        assert_eq!(both.discard.as_deref(), Some("u.c"));
        drop(both);
        let clean = registry.register(Some("u\0c".into()), None, Some("u.c".into()));
        assert_eq!(clean.discard.as_deref(), Some("u.c"));
    }
}
