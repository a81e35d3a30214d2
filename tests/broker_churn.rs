//! Churn (issue 6): 30,000 short MQTT sessions with fresh client ids against the real
//! `k3sense broker` process, whose resident memory (`VmRSS` in `/proc/<pid>/status`) must stay
//! bounded while another client, connected throughout, keeps receiving live messages.
//!
//! Bare rumqttd keeps a record of every client id it has seen, for good; the proxy hands clean
//! sessions pooled slot ids instead (broker/src/registry.rs). This is the check that the pool
//! works end to end — through the real binary, its allocator and rumqttd — in every CI run.
//! A hand-run measurement of the memory per connected client sits beside it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, QoS,
    mqttbytes::{
        self,
        v4::{Connect, Packet as Raw, Publish, Subscribe},
    },
};
use support::*;
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_k3sense");
const SECOND: Duration = Duration::from_secs(1);

/// Sessions before the first memory sample: about twice the slot pool's 2 s quarantine, so the
/// pool (and rumqttd's records of its slots) has reached its working size.
const WARM_UP: u64 = 4_000;
/// The second sample, from which RSS must stay about flat. Not earlier: the live heap is flat
/// from the warm-up on, but glibc's malloc keeps freed pieces and RSS climbs for a while before
/// it levels (measured at ~1,500 sessions a second, issue 17: heaptrack's peak heap 11.0 MB after
/// 10,000 sessions and 11.6 MB after 40,000, 170 KB left at exit either way; RSS +2.2 MB from
/// 10,000 to 20,000, then +0.1 to +0.7 MB per 10,000 and flat up to 80,000).
const MIDDLE: u64 = 20_000;
const SESSIONS: u64 = 30_000;
/// Sessions in flight at once.
const PARALLEL: u64 = 16;
const LIVE_TOPIC: &str = "k3sense/live/state";

/// RSS growth allowed from the warm-up to the end (26,000 sessions), and from the middle to the
/// end (10,000 sessions). Measured in a debug build on 2 cores, 5 runs (see broker/README.md):
/// +3.3 to +4.6 MB and +0.5 to +0.9 MB. Without the pool (every session a fresh id at rumqttd,
/// as bare rumqttd sees them) rumqttd keeps a record per id and the same run grows by +20.2 MB
/// and +9.4 MB, and fails both. (The first bound is ~315 bytes a session, as when this test ran
/// 20,000 sessions with 5 MiB over 16,000.)
const GROWTH_AFTER_WARM_UP_KIB: u64 = 8 * 1024;
const GROWTH_AFTER_MIDDLE_KIB: u64 = 2 * 1024;

/// The broker's counters from `--metrics-listen`: (name with labels, value) per sample line.
async fn metrics(addr: SocketAddr) -> Vec<(String, u64)> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn metric(samples: &[(String, u64)], name: &str) -> u64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {samples:?}"))
}

/// Polls the metrics until `clients_connected` is `count` (sessions end asynchronously).
async fn wait_connected(addr: SocketAddr, count: u64) -> Vec<(String, u64)> {
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let samples = metrics(addr).await;
        if metric(&samples, "k3sense_broker_clients_connected") == count {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "clients_connected never went back to {count}: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- raw MQTT ----

/// CONNECT with a fresh client id; returns the stream once CONNACK 0 came back.
async fn connect(addr: SocketAddr, id: String, buf: &mut BytesMut) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut connect = Connect::new(id);
    connect.keep_alive = 30;
    tcp.write_all(&bytes_of(&Raw::Connect(connect)))
        .await
        .unwrap();
    match read_raw(&mut tcp, buf).await {
        Some(Raw::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    tcp
}

/// One short session with a fresh client id. Three in four subscribe to the readings (getting
/// the retained live one), publish one QoS 1 message, say DISCONNECT and wait for the broker to
/// close; the fourth closes its socket right after CONNACK, as a client that dies does.
///
/// The message goes to a topic no one subscribes to. One that a subscription matches is kept in
/// rumqttd's log for that filter, and each kept message pins the 10 KiB read buffer of the
/// connection it came on: a cost of publishing into a read topic (bounded by the log's size,
/// see broker/README.md), not of fresh client ids, which is what this test is about.
async fn short_session(addr: SocketAddr, n: u64) {
    let mut buf = BytesMut::new();
    let mut tcp = connect(addr, format!("churn-{n}"), &mut buf).await;
    if n % 4 == 0 {
        return;
    }
    let mut subscribe = Subscribe::new("k3sense/+/state", mqttbytes::QoS::AtLeastOnce);
    subscribe.pkid = 1;
    let mut publish = Publish::new(
        "k3sense/churn/availability",
        mqttbytes::QoS::AtLeastOnce,
        format!("{{\"n\":{n}}}"),
    );
    publish.pkid = 2;
    let mut out = bytes_of(&Raw::Subscribe(subscribe));
    out.extend(bytes_of(&Raw::Publish(publish)));
    tcp.write_all(&out).await.unwrap();
    let (mut suback, mut puback) = (false, false);
    while !(suback && puback) {
        match read_raw(&mut tcp, &mut buf).await {
            Some(Raw::SubAck(ack)) => {
                assert_eq!(
                    ack.return_codes,
                    [mqttbytes::v4::SubscribeReasonCode::Success(
                        mqttbytes::QoS::AtLeastOnce
                    )]
                );
                suback = true;
            }
            Some(Raw::PubAck(ack)) => {
                assert_eq!(ack.pkid, 2);
                puback = true;
            }
            Some(Raw::Publish(_)) => {}
            other => panic!("session {n}: unexpected {other:?}"),
        }
    }
    tcp.write_all(&bytes_of(&Raw::Disconnect)).await.unwrap();
    // The broker closes the connection after DISCONNECT; anything still in flight is dropped.
    while read_raw(&mut tcp, &mut buf).await.is_some() {}
}

/// Runs sessions `from..to`, `PARALLEL` at a time.
async fn churn(addr: SocketAddr, from: u64, to: u64, ends: Arc<std::sync::Mutex<Vec<Instant>>>) {
    let next = Arc::new(AtomicU64::new(from));
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let (next, ends) = (next.clone(), ends.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= to {
                        return;
                    }
                    short_session(addr, n).await;
                    ends.lock().unwrap().push(Instant::now());
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

/// The client that stays: publishes a retained reading every 100 ms and waits until the
/// watcher (another connection) has it, throughout the churn. Counts the round trips; panics if
/// one does not arrive, or if either client ever had to reconnect.
async fn live_traffic(
    broker: SocketAddr,
    round_trips: tokio::sync::watch::Sender<u64>,
    stop: CancellationToken,
) -> Duration {
    let mut watcher = mqtt_subscriber(broker, LIVE_TOPIC).await;
    let mut options = MqttOptions::new("churn-live-publisher", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (publisher, mut events) = AsyncClient::new(options, 10);
    let connacks = tokio::spawn(async move {
        let mut connacks = 0;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(rumqttc::Packet::ConnAck(_))) => connacks += 1,
                Ok(_) => {}
                Err(_) => return connacks,
            }
        }
    });
    let mut slowest = Duration::ZERO;
    let mut tick = tokio::time::interval(SECOND / 10);
    for seq in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let sent = Instant::now();
        publisher
            .publish(LIVE_TOPIC, QoS::AtLeastOnce, true, seq.to_string())
            .await
            .unwrap();
        // The retained copy may bring an older reading first, when the watcher has just
        // subscribed.
        loop {
            let (payload, _) = next_on(&mut watcher, LIVE_TOPIC, 10 * SECOND).await;
            if payload == seq.to_string().as_bytes() {
                break;
            }
        }
        slowest = slowest.max(sent.elapsed());
        round_trips.send_modify(|n| *n += 1);
    }
    publisher.disconnect().await.unwrap();
    assert_eq!(
        connacks.await.unwrap(),
        1,
        "the live publisher had to reconnect"
    );
    slowest
}

/// `k3sense broker` as its own process (so its memory can be read), logging at `filter`, with
/// metrics; returns it once its listeners run, with the MQTT and metrics addresses.
async fn start_broker_process(filter: &str) -> (Proc, SocketAddr, SocketAddr) {
    let (listen, metrics_at) = (free_addr(), free_addr());
    let broker = Proc::start_logging(
        BIN,
        &[
            "broker",
            "--listen",
            &listen.to_string(),
            "--metrics-listen",
            &metrics_at.to_string(),
        ],
        filter,
    );
    // The metrics page answers once the listeners run (it is bound before, so a connect waits).
    let deadline = Instant::now() + 20 * SECOND;
    while TcpStream::connect(metrics_at).await.is_err() {
        assert!(Instant::now() < deadline, "the broker never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (broker, listen, metrics_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_fresh_client_ids_leave_memory_bounded_and_others_served() {
    let (broker, listen, metrics_at) = start_broker_process("info,rumqttd=warn").await;
    let pid = broker.0.id();

    let (round_trips_tx, mut round_trips) = tokio::sync::watch::channel(0_u64);
    let stop = CancellationToken::new();
    let live = tokio::spawn(live_traffic(listen, round_trips_tx, stop.clone()));
    tokio::time::timeout(20 * SECOND, round_trips.wait_for(|n| *n > 0))
        .await
        .expect("no live round trip within 20 s")
        .expect("the live clients failed");
    let before = wait_connected(metrics_at, 2).await;
    let started = std::time::Instant::now();

    let mut samples = Vec::new();
    let ends = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut done = 0;
    for mark in [WARM_UP, MIDDLE, SESSIONS] {
        let (from, trips) = (done, *round_trips.borrow());
        churn(listen, from, mark, ends.clone()).await;
        done = mark;
        let now = wait_connected(metrics_at, 2).await;
        let rss = rss_kib(pid);
        let slots = metric(&now, "k3sense_broker_client_id_slots");
        eprintln!(
            "{mark} sessions after {:.1?}: RSS {rss} KiB, {slots} slot ids, {} live round trips",
            started.elapsed(),
            *round_trips.borrow()
        );
        assert!(
            *round_trips.borrow() > trips,
            "the live clients got nothing through while sessions {from}..{mark} ran"
        );
        samples.push((rss, slots));
    }
    stop.cancel();
    let slowest = live.await.unwrap();
    let trips = *round_trips.borrow();
    eprintln!(
        "{SESSIONS} sessions in {:.1?}; {trips} live round trips, the slowest {slowest:?}",
        started.elapsed()
    );

    let [(warm, warm_slots), (middle, middle_slots), (end, end_slots)] = samples[..] else {
        unreachable!()
    };
    eprintln!(
        "RSS growth: {} KiB after the warm-up, {} KiB after the middle",
        end as i64 - warm as i64,
        end as i64 - middle as i64
    );
    assert!(
        end <= warm + GROWTH_AFTER_WARM_UP_KIB,
        "RSS grew from {warm} KiB after {WARM_UP} sessions to {end} KiB after {SESSIONS}: \
         short sessions leave memory behind"
    );
    assert!(
        end <= middle + GROWTH_AFTER_MIDDLE_KIB,
        "RSS grew from {middle} KiB after {MIDDLE} sessions to {end} KiB after {SESSIONS}: \
         still growing"
    );
    // rumqttd's per-client records are bounded by the slot ids the pool ever handed out: the
    // sessions alive at once plus those released within the 2 s quarantine (measured: ~1,950
    // at ~900 sessions a second, 2,900–3,400 at ~1,300) — far fewer than the client ids (without
    // reuse: 4,003, 20,003, 30,003).
    assert!(
        end_slots < SESSIONS / 2,
        "{end_slots} slot ids for {SESSIONS} sessions: the pool does not reuse them"
    );
    // And by the most that were alive or in quarantine at once: the sessions that ended within
    // any one quarantine (2 s, plus 0.5 s for the broker to notice a close), plus the workers'
    // and the live clients'. The rate sets it, and it rises as the broker warms up (measured:
    // 755 sessions a second in the warm-up, 1,515 at the end; a bound on the warm-up's count
    // failed at 1,573 → 3,505 slots), so the bound is taken from this run's own rate.
    let peak = {
        let ends = ends.lock().unwrap();
        let (mut peak, mut first) = (0, 0);
        for (last, at) in ends.iter().enumerate() {
            while at.duration_since(ends[first]) > Duration::from_millis(2_500) {
                first += 1;
            }
            peak = peak.max(last + 1 - first);
        }
        peak
    };
    let bound = peak as u64 + PARALLEL + 16;
    eprintln!(
        "slot ids {warm_slots}, {middle_slots}, {end_slots}; most sessions ended within 2.5 s: {peak}"
    );
    assert!(
        end_slots <= bound,
        "the slot pool kept growing past what the quarantine explains: {warm_slots}, \
         {middle_slots}, {end_slots} slot ids, at most {peak} sessions ended within 2.5 s"
    );

    // The counters saw every session and refused none; the watcher is still connected.
    let after = wait_connected(metrics_at, 1).await;
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(delta("k3sense_broker_connections_accepted_total"), SESSIONS);
    let talking = SESSIONS - SESSIONS / 4;
    assert_eq!(
        delta("k3sense_broker_subscriptions_total{outcome=\"forwarded\"}"),
        talking
    );
    // Plus the live readings published after the first sample (at least one: they never stopped).
    let published = delta("k3sense_broker_publishes_total{outcome=\"forwarded\"}");
    assert!(
        published > talking && published <= talking + trips,
        "{published} publishes forwarded"
    );
    for (name, value) in &after {
        if name.starts_with("k3sense_broker_connections_refused_total") {
            assert_eq!(*value, 0, "{name}");
        }
    }
    // rumqttd logs an ERROR for every DISCONNECT ("router-drop"); the proxy's own lines count.
    let log = broker.log();
    let trouble: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("panicked")
                || l.contains("ERROR k3sense")
                || l.contains("WARN k3sense_broker::")
        })
        .collect();
    assert!(
        trouble.is_empty(),
        "the broker logged errors:\n{trouble:#?}"
    );
}

/// Figures for broker/README.md (run with `--ignored --nocapture`; a release build for real
/// numbers): the broker process's memory per connected client, proxy and rumqttd together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run by hand"]
async fn measure_memory_per_connected_client() {
    let (broker, listen, metrics_at) = start_broker_process("info").await;
    let pid = broker.0.id();
    wait_connected(metrics_at, 0).await;
    let base = rss_kib(pid);
    let mut held = Vec::new();
    let mut buf = BytesMut::new();
    for i in 0..500 {
        held.push(connect(listen, format!("hold-{i}"), &mut buf).await);
    }
    wait_connected(metrics_at, 500).await;
    let with = rss_kib(pid);
    eprintln!(
        "500 connected clients: broker RSS {base} -> {with} KiB, {:.1} KiB per client",
        (with - base) as f64 / 500.0
    );
}

/// [`read_raw`], but a broker that neither answers nor closes within 5 s is an error naming the
/// session and what it waited for.
async fn read_within(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    n: u64,
    waiting_for: &str,
) -> Result<Option<Raw>, String> {
    tokio::time::timeout(5 * SECOND, read_raw(tcp, buf))
        .await
        .map_err(|_| format!("session {n}: no {waiting_for} and no close in 5 s"))
}

/// One echo session for [`a_goodbye_never_ends_the_connection_that_took_its_id`]: subscribes to
/// its worker's topic (one per worker, whose sessions run one after another: the broker's
/// `--max-filters-per-account` would refuse a new filter per session), publishes one QoS 1 message there, and waits for the PUBACK and the message
/// itself; then sends DISCONNECT and closes its socket at once, as many clients do (paho,
/// rumqttc after `disconnect()`, `mosquitto_pub`). Returns what went wrong, if anything.
async fn echo_session(addr: SocketAddr, worker: u64, n: u64) -> Result<(), String> {
    let mut buf = BytesMut::new();
    let mut tcp = connect(addr, format!("echo-{n}"), &mut buf).await;
    let topic = format!("churn/echo/{worker}");
    let mut subscribe = Subscribe::new(&topic, mqttbytes::QoS::AtLeastOnce);
    subscribe.pkid = 1;
    tcp.write_all(&bytes_of(&Raw::Subscribe(subscribe)))
        .await
        .map_err(|e| format!("session {n}: SUBSCRIBE: {e}"))?;
    match read_within(&mut tcp, &mut buf, n, "SUBACK").await? {
        Some(Raw::SubAck(_)) => {}
        other => return Err(format!("session {n}: expected SUBACK, got {other:?}")),
    }
    let mut publish = Publish::new(&topic, mqttbytes::QoS::AtLeastOnce, n.to_string());
    publish.pkid = 2;
    tcp.write_all(&bytes_of(&Raw::Publish(publish)))
        .await
        .map_err(|e| format!("session {n}: PUBLISH: {e}"))?;
    let (mut puback, mut echo) = (false, false);
    while !(puback && echo) {
        match read_within(&mut tcp, &mut buf, n, "PUBACK and echo").await? {
            Some(Raw::PubAck(_)) => puback = true,
            Some(Raw::Publish(p)) => {
                echo |= p.payload == n.to_string().as_bytes();
                let ack = mqttbytes::v4::PubAck::new(p.pkid);
                tcp.write_all(&bytes_of(&Raw::PubAck(ack))).await.ok();
            }
            other => {
                return Err(format!(
                    "session {n}: closed before its echo (PUBACK {puback}, echo {echo}): {other:?}"
                ));
            }
        }
    }
    tcp.write_all(&bytes_of(&Raw::Disconnect)).await.ok();
    drop(tcp);
    Ok(())
}

/// Clients that say goodbye and leave at once, 16 at a time, are every one served, and the
/// broker logs nothing alarming about them (CI caught `ERROR no-connection id 3 is already gone`
/// in `quiet_start_stop`).
///
/// rumqttd 0.20 hears of such a client's end more than once: from the DISCONNECT packet, from
/// the other packets buffered with it (one event each), and from the socket. It handled the
/// first and logged the later ones at ERROR; in debug builds it also warned when a connection id
/// ended and given to a new connection was queued twice. And the socket's notice named only the
/// id, which the router may already have given to a new connection (its own comments say so),
/// so that notice could end the new one. k3sense patch 4 (vendor/rumqttd/PATCHES.md) names the
/// connection in the socket's notice and logs the normal echoes at debug.
///
/// Without the patch this run logged 964 and 1,084 ERROR/WARN lines in two runs (no session
/// was cut short in either: the id race is narrower than this test); with it, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goodbye_never_ends_the_connection_that_took_its_id() {
    const ECHO_SESSIONS: u64 = 3_000;
    let (broker, listen, metrics_at) = start_broker_process("info,rumqttd=info").await;
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..PARALLEL)
        .map(|worker| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= ECHO_SESSIONS {
                        return failures;
                    }
                    if let Err(e) = echo_session(listen, worker, n).await {
                        failures.push(e);
                        return failures;
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    // Every session has ended at the front, and rumqttd's router has handled every end
    // (one `Disconnecting connection` line each), before the log is read.
    wait_connected(metrics_at, 0).await;
    let deadline = Instant::now() + 10 * SECOND;
    while broker.log().matches("Disconnecting connection").count() < ECHO_SESSIONS as usize {
        assert!(
            Instant::now() < deadline,
            "rumqttd did not end every session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, log) = broker.stop("TERM");
    let alarms: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .filter(|l| !l.contains("anonymous"))
        .collect();
    eprintln!(
        "{ECHO_SESSIONS} echo sessions: {} cut short, {} ERROR/WARN lines",
        failures.len(),
        alarms.len()
    );
    if !failures.is_empty() {
        std::fs::write("/tmp/echo-broker.log", &log).unwrap();
    }
    assert_eq!(failures, Vec::<String>::new());
    assert_eq!(alarms, Vec::<&str>::new());
}
