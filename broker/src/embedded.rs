//! rumqttd, embedded: its configuration, its router task and its listener thread.
//!
//! The proxy (see `session`) reaches rumqttd through in-memory pipes; rumqttd also listens on a
//! loopback port, for the readiness probe. It accepts one account, whose random password exists
//! only in this process's memory, so nothing on the host can reach it around the proxy's rules.

use std::collections::HashMap;

use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{Config, Error, Result, session::HEADER_ROOM, session::Upstream};

/// Per-filter in-memory log segment: rumqttd keeps recent messages of each subscription filter in
/// segments; its defaults (10 × 100 MB) suit servers, not a 1 GB Pi. Readings are ~130 bytes, so
/// 4 × 256 KiB still holds thousands of them per filter.
const SEGMENT_BYTES: usize = 256 * 1024;
const SEGMENT_COUNT: usize = 4;
/// rumqttd's one server, the one the door opens into.
const SERVER_NAME: &str = "internal";
/// QoS 1 messages a client may have unacknowledged before the broker waits.
const MAX_INFLIGHT: usize = 100;

/// Builds rumqttd's configuration: one internal MQTT 3.1.1 listener, no console, no metrics server.
pub(crate) fn rumqttd_config(config: &Config, upstream: &Upstream) -> rumqttd::Config {
    let connections = ConnectionSettings {
        // rumqttd keeps this in a u16 of milliseconds; the flag's parser enforces the bound.
        connection_timeout_ms: u16::try_from(config.options.connect_timeout.as_millis())
            .unwrap_or(u16::MAX),
        // The proxy enforces --max-payload; rumqttd must never be the one to refuse a packet.
        max_payload_size: config.options.max_payload + 2 * HEADER_ROOM,
        max_inflight_count: MAX_INFLIGHT,
        auth: Some(HashMap::from([(
            upstream.username.clone(),
            upstream.password.clone(),
        )])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: SERVER_NAME.to_owned(),
        listen: upstream.addr,
        tls: None,
        // rumqttd sleeps this long after each accept (1 ms rounds up to ~2 ms), which capped the
        // session rate at ~460 a second; every connection here comes from the proxy, which has
        // already admitted it under --max-connections.
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: RouterConfig {
            // The proxy enforces --max-connections; the probe needs a slot beside them.
            max_connections: config.options.max_connections + 8,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    }
}

/// How much one in-process pipe to rumqttd buffers each way: 300 readings, or about one packet of
/// `--max-payload`'s default. A full pipe makes the writer wait, as a full socket buffer did.
const PIPE_BYTES: usize = 64 * 1024;

/// Starts rumqttd: its router as a task on the caller's runtime (vendor/rumqttd patch 6), its
/// loopback listener (for the readiness probe) on a thread of its own (`start()` blocks
/// forever). The receiver resolves if that thread ever returns, which means every listener died.
///
/// The router as a task: rumqttd's router thread slept on its channel and was woken twice per
/// reading (the publish, then the subscriber's PUBACK), and woke the runtime back each time;
/// on one core each of those wake-ups is a context switch (BENCHMARKS.md, "What was cut",
/// cut 4).
///
/// The returned door opens the proxy's links to rumqttd as in-memory pipes, served by tasks on
/// the caller's runtime (vendor/rumqttd patch 5), instead of loopback sockets served by
/// rumqttd's listener thread. A reading crosses between the proxy and rumqttd four times (the
/// publish in, its PUBACK out, the forward to each subscriber and that PUBACK back); over
/// loopback TCP each crossing was a send that runs both ends' TCP stacks in the kernel, a
/// receive, a quick-ACK request, and a wake-up of rumqttd's thread (BENCHMARKS.md, "Where the
/// time goes").
pub(crate) fn spawn(
    config: rumqttd::Config,
) -> Result<(oneshot::Receiver<String>, rumqttd::InProcess)> {
    let (tx, rx) = oneshot::channel();
    let (mut broker, router) = Broker::new_async(config);
    let router = tokio::spawn(router);
    let door = broker
        .in_process(SERVER_NAME, PIPE_BYTES)
        .ok_or_else(|| Error::Stopped(format!("rumqttd has no server {SERVER_NAME:?}")))?;
    let (thread_tx, thread_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("rumqttd".to_owned())
        .spawn(move || {
            let why = match broker.start() {
                Ok(()) => "rumqttd's listeners ended (see the log lines above)".to_owned(),
                Err(e) => format!("rumqttd failed: {e}"),
            };
            let _ = thread_tx.send(why);
        })
        .map_err(Error::Thread)?;
    tokio::spawn(first_end(router, thread_rx, tx));
    Ok((rx, door))
}

/// Tells `Started::serve` why rumqttd stopped, when its router task or its listener thread ends,
/// whichever first. Without the router every link fails while the listeners still accept, so a
/// router that ends (an error it cannot go on from, or a panic inside rumqttd) must stop the
/// broker with an error: the process exits non-zero and Kubernetes restarts it.
async fn first_end(
    router: JoinHandle<()>,
    thread: oneshot::Receiver<String>,
    tx: oneshot::Sender<String>,
) {
    let why = tokio::select! {
        ended = router => match ended {
            Ok(()) => "rumqttd's router ended (see its \"Router done!\" log line above)".to_owned(),
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                format!("rumqttd's router panicked: {message}")
            }
            Err(e) => format!("rumqttd's router was stopped: {e}"),
        },
        why = thread => why.unwrap_or_else(|_| "rumqttd's thread vanished".to_owned()),
    };
    let _ = tx.send(why);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    /// A router task that panics stops the broker with the panic's message, even while the
    /// listener thread runs on (its channel stays open here, as rumqttd's thread would).
    #[tokio::test]
    async fn a_router_that_panics_stops_the_broker() {
        let router = tokio::spawn(async { panic!("index out of bounds") });
        let (_thread, thread_rx) = oneshot::channel::<String>();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(first_end(router, thread_rx, tx));
        assert_eq!(
            rx.await.unwrap(),
            "rumqttd's router panicked: index out of bounds"
        );
    }

    /// A router that returns (rumqttd logs "Router done!" with its error) stops it too.
    #[tokio::test]
    async fn a_router_that_ends_stops_the_broker() {
        let (_thread, thread_rx) = oneshot::channel::<String>();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(first_end(tokio::spawn(async {}), thread_rx, tx));
        assert!(rx.await.unwrap().starts_with("rumqttd's router ended"));
    }

    /// The listener thread's reason still comes through while the router runs on.
    #[tokio::test]
    async fn the_listener_threads_end_stops_the_broker() {
        let router = tokio::spawn(std::future::pending::<()>());
        let (thread, thread_rx) = oneshot::channel();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(first_end(router, thread_rx, tx));
        thread.send("rumqttd failed: bind".to_owned()).unwrap();
        assert_eq!(rx.await.unwrap(), "rumqttd failed: bind");
    }
}
