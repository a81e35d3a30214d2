//! The publisher's `/metrics` and `/healthz`, scraped over HTTP from a real publisher (simulated
//! sensor) publishing to a real broker: the counters move, the values are the sensor's, and the
//! names follow Prometheus conventions (docs/metrics.md lists them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{net::SocketAddr, time::Duration};

use k3sense_publisher::MetricsListen;
use support::{free_addr, http_get, start_broker};
use tokio_util::sync::CancellationToken;

/// The value of the one series whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn start(
    broker: SocketAddr,
    id: &str,
    metrics: SocketAddr,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<k3sense_publisher::Result<()>> {
    let mut sensor = k3sense_publisher::SensorConfig::sim(id, Duration::from_millis(200));
    sensor.metrics.listen = Some(MetricsListen::At(metrics));
    let config = k3sense_publisher::Config {
        mqtt: k3sense_protocol::MqttConfig::new(broker.to_string()),
        sensor,
    };
    tokio::spawn(k3sense_publisher::run(config, stop.clone()))
}

/// Scrapes until `ready` holds for the exposition, or fails after 15 s.
async fn scrape_until(addr: SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            drop(stream);
            let (status, body) = http_get(addr, "/metrics").await;
            assert_eq!(status, 200);
            if ready(&body) {
                return body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics at {addr} never got there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_reads_and_show_the_latest_values() {
    let broker = start_broker().await;
    let addr = free_addr();
    let stop = CancellationToken::new();
    let publisher = start(broker, "metrics-1", addr, &stop);

    let ok = "k3sense_publisher_reads_total{sensor_id=\"metrics-1\",outcome=\"ok\"}";
    let acked = "k3sense_publisher_acknowledged_readings_total{sensor_id=\"metrics-1\"}";
    let first = scrape_until(addr, |t| value(t, acked).is_some_and(|v| v >= 2.0)).await;
    let later = scrape_until(addr, |t| value(t, ok).unwrap() > value(&first, ok).unwrap()).await;

    let get = |series: &str| {
        value(
            &later,
            &format!("k3sense_publisher_{series}{{sensor_id=\"metrics-1\"}}"),
        )
        .unwrap_or_else(|| panic!("no {series} in\n{later}"))
    };
    assert!(value(&later, ok).unwrap() >= 2.0);
    assert!(get("readings_total") >= 2.0);
    assert!(get("acknowledged_readings_total") >= 2.0);
    let t = get("temperature_celsius");
    assert!((-20.0..=60.0).contains(&t), "temperature {t}");
    let h = get("humidity_ratio");
    assert!((0.0..=1.0).contains(&h), "humidity ratio {h}");
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let last = get("last_reading_timestamp_seconds");
    assert!(
        now - last < 10.0 && last <= now + 1.0,
        "last reading at {last}, now {now}"
    );
    assert_eq!(get("broker_connected"), 1.0);
    assert_eq!(get("sensor_available"), 1.0);
    assert!(get("broker_connects_total") >= 1.0);
    assert!(get("ha_announcements_total") >= 1.0);
    assert_eq!(get("buffer_capacity_readings"), 8640.0);
    assert!(
        get("buffered_readings") <= 2.0,
        "readings pile up while connected"
    );
    assert_eq!(get("dropped_readings_total"), 0.0);
    assert_eq!(get("missed_intervals_total"), 0.0);

    // Every outcome is exposed (a failure kind is 0 until it happens, so rate() works from
    // the start), every counter ends in _total, every series names the sensor.
    for outcome in [
        "ok",
        "no_response",
        "timeout",
        "short_frame",
        "bad_pulse",
        "checksum",
        "implausible",
        "driver_error",
        "unavailable",
    ] {
        let series = format!(
            "k3sense_publisher_reads_total{{sensor_id=\"metrics-1\",outcome=\"{outcome}\"}}"
        );
        assert!(value(&later, &series).is_some(), "no {series}");
    }
    let mut counter = None;
    for line in later.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("k3sense_publisher_"), "{name}");
            counter = (kind == "counter").then(|| name.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            assert!(line.contains("sensor_id=\"metrics-1\""), "{line}");
            if let Some(name) = &counter {
                assert!(line.starts_with(&format!("{name}_total")), "{line}");
            }
        }
    }
    assert!(later.ends_with("# EOF\n"), "not OpenMetrics");

    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));

    stop.cancel();
    publisher.await.unwrap().unwrap();
    // The server stops with the publisher.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_and_connected_follow_the_broker() {
    // No broker at all: readings pile up in the buffer, broker_connected stays 0.
    let nobody = free_addr();
    let addr = free_addr();
    let stop = CancellationToken::new();
    let publisher = start(nobody, "metrics-2", addr, &stop);
    let buffered = "k3sense_publisher_buffered_readings{sensor_id=\"metrics-2\"}";
    let text = scrape_until(addr, |t| value(t, buffered).is_some_and(|v| v >= 2.0)).await;
    assert_eq!(
        value(
            &text,
            "k3sense_publisher_broker_connected{sensor_id=\"metrics-2\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "k3sense_publisher_acknowledged_readings_total{sensor_id=\"metrics-2\"}"
        ),
        Some(0.0)
    );
    stop.cancel();
    publisher.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_a_clear_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let stop = CancellationToken::new();
    let result = start(free_addr(), "metrics-3", addr, &stop).await.unwrap();
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("--metrics-listen") && message.contains(&addr.to_string()),
        "{message}"
    );
}

/// The metric names in an exposition: counters with `_total`, as Prometheus stores them.
fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect()
}

/// The `k3sense_…` names written as code in `text` (docs) or used in its queries (dashboard).
fn mentioned_names(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // A bare prefix (`k3sense_publisher_`) names no metric.
        if !tail[..end].ends_with('_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_list_exactly_the_exposed_metrics_and_the_dashboard_uses_only_those() {
    let broker = start_broker().await;
    let addr = free_addr();
    let stop = CancellationToken::new();
    let publisher = start(broker, "metrics-4", addr, &stop);
    let ok = "k3sense_publisher_acknowledged_readings_total{sensor_id=\"metrics-4\"}";
    let publisher_text = scrape_until(addr, |t| value(t, ok).is_some_and(|v| v >= 1.0)).await;
    let (gateway, _) = support::start_gateway(broker, stop.clone()).await;
    let (status, gateway_text) = http_get(gateway, "/metrics").await;
    assert_eq!(status, 200);

    let docs = repo_file("docs/metrics.md");
    assert_eq!(
        exposed_names(&publisher_text),
        mentioned_names(&docs, "k3sense_publisher_"),
        "docs/metrics.md must list exactly the k3sense_publisher_* metrics served"
    );
    // The gateway shows a labelled family only once it has a child (e.g. the first invalid
    // payload), so here: everything it serves is documented.
    let documented = mentioned_names(&docs, "k3sense_gateway_");
    let exposed = exposed_names(&gateway_text);
    assert!(exposed.len() >= 5, "{gateway_text}");
    for name in &exposed {
        assert!(
            documented.contains(name),
            "docs/metrics.md does not list {name}"
        );
    }

    // The broker creates every labelled series at start, so the lists must match exactly.
    let broker_text = k3sense_broker::Metrics::default().encode();
    assert_eq!(
        exposed_names(&broker_text),
        mentioned_names(&docs, "k3sense_broker_"),
        "docs/metrics.md must list exactly the k3sense_broker_* metrics"
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/k3sense-dashboard.json"))
            .expect("the dashboard is JSON");
    assert_eq!(dashboard["title"], "k3sense");
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut used = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].as_u64().is_some(), "{panel}");
        }
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            assert!(target["refId"].as_str().is_some());
            used.extend(mentioned_names(
                target["expr"].as_str().unwrap(),
                "k3sense_",
            ));
        }
    }
    let documented = mentioned_names(&docs, "k3sense_");
    for name in &used {
        assert!(
            documented.contains(name),
            "the dashboard queries {name}, which docs/metrics.md does not list"
        );
    }
    for needed in [
        "k3sense_publisher_temperature_celsius",
        "k3sense_publisher_humidity_ratio",
        "k3sense_publisher_reads_total",
        "k3sense_gateway_ws_clients",
        "k3sense_gateway_mqtt_messages_total",
        "k3sense_gateway_invalid_messages_total",
        "k3sense_gateway_broker_connected",
        "k3sense_publisher_broker_connected",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }

    stop.cancel();
    publisher.await.unwrap().unwrap();
}
