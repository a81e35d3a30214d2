//! What every connection shares: the users, the rules and their tables, the metrics, and where
//! rumqttd listens. Built once by [`crate::start`]; each connection holds an `Arc` of it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::Semaphore;

use crate::{
    Metrics, Users,
    acl::Acl,
    backlog::{LogBytes, Parked, SlowLog},
    filters::FilterTable,
    peer::Peer,
    pending::PendingPool,
    registry::Registry,
    replays::AccountBuckets,
    retained::RetainedTopics,
    sys::SysTree,
    throttle::Throttle,
    users::Role,
};

/// Room for the topic and headers above `--max-payload` in one packet.
pub(crate) const HEADER_ROOM: usize = 1024;

/// Where rumqttd listens inside the process (for the readiness probe), and the one account it
/// accepts.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    pub(crate) username: String,
    pub(crate) password: String,
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) users: Option<Users>,
    pub(crate) acl: Acl,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) upstream: Upstream,
    /// Opens a link to rumqttd as an in-memory pipe (see `embedded::spawn`).
    pub(crate) door: rumqttd::InProcess,
    pub(crate) retained: RetainedTopics,
    pub(crate) registry: Arc<Registry>,
    pub(crate) clients: Arc<Semaphore>,
    pub(crate) max_payload: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) pending: Arc<PendingPool>,
    pub(crate) throttle: Throttle,
    pub(crate) filters: FilterTable,
    pub(crate) max_subscriptions: usize,
    /// Every accounts' replay-request allowance (see `replays`).
    pub(crate) replays: AccountBuckets,
    /// What has been written into rumqttd's logs (see `backlog`).
    pub(crate) log_bytes: LogBytes,
    /// How far behind each persistent session without a connection is (see `backlog`).
    pub(crate) parked: Parked,
    /// The slow subscribers' log line, rate-limited.
    pub(crate) slow_log: SlowLog,
    /// The `$SYS/broker/…` statistics (see `sys`).
    pub(crate) sys: SysTree,
}

/// Who is on the other end of a logged-in connection, for log lines and per-account rules.
pub(crate) struct Client<'a> {
    pub(crate) peer: Peer,
    pub(crate) id: &'a str,
    pub(crate) user: Option<&'a str>,
    pub(crate) role: &'a Role,
}
