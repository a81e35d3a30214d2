//! The real binary, as a user runs it: `k3sense broker`, `k3sense publisher --sensor sim` and
//! `k3sense gateway` as three processes, and `k3sense all` as one, each stopped by a signal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_k3sense");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_behave_like_all() {
    let mqtt = free_addr();
    let http = free_addr();
    let broker = Proc::start(BIN, &["broker", "--listen", &mqtt.to_string()]);
    let publisher = Proc::start(
        BIN,
        &[
            "publisher",
            "--broker",
            &mqtt.to_string(),
            "--sensor",
            "sim",
            "--sensor-id",
            "pi-1",
            "--interval",
            "300ms",
        ],
    );
    let gateway = Proc::start(
        BIN,
        &[
            "gateway",
            "--broker",
            &mqtt.to_string(),
            "--listen",
            &http.to_string(),
        ],
    );
    wait_ready(http).await;

    let mut ws = ws_connect(http).await;
    assert_eq!(
        ws_next(&mut ws, Duration::from_secs(2)).await["type"],
        "snapshot"
    );
    let reading = ws_until(&mut ws, Duration::from_secs(5), |m| m["type"] == "reading").await;
    assert_eq!(reading["sensor_id"], "pi-1");

    // SIGTERM to the publisher: it says offline itself and exits cleanly.
    let (_, status, log) = publisher.stop("TERM");
    assert!(status.success(), "publisher exit: {status:?}\n{log}");
    assert!(log.contains("published offline"), "{log}");
    ws_until(&mut ws, Duration::from_secs(5), |m| {
        m["type"] == "availability" && m["status"] == "offline"
    })
    .await;

    // SIGTERM to the gateway: the browser gets close code 1001 and the process exits.
    let started = Instant::now();
    gateway.signal("TERM");
    let closed = tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    .unwrap();
    match closed {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
        }
        other => panic!("expected a close frame with 1001, got {other:?}"),
    }
    // Answer the close like a browser does.
    let _ = futures_util::StreamExt::next(&mut ws).await;
    drop(ws);
    let (took, status, log) = gateway.wait(started);
    assert!(status.success(), "gateway exit: {status:?}\n{log}");
    assert!(
        took < Duration::from_secs(5),
        "gateway took {took:?} to stop\n{log}"
    );
    let (_, status, _) = broker.stop("TERM");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_serves_the_page_and_stops_on_ctrl_c_within_two_seconds() {
    let mqtt = free_addr();
    let http = free_addr();
    let all = Proc::start(
        BIN,
        &[
            "all",
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &http.to_string(),
        ],
    );
    wait_ready(http).await;
    let (status, page) = http_get(http, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>k3sense"), "{page}");
    let (status, script) = http_get(http, "/app.js").await;
    assert_eq!(status, 200);
    assert!(script.contains("new WebSocket"));

    // The default simulated sensor, sim-1, reads every 2 s.
    let mut ws = ws_connect(http).await;
    let first = ws_until(&mut ws, Duration::from_secs(5), |m| {
        m["type"] == "reading" || (m["type"] == "snapshot" && m["sensors"][0]["latest"].is_object())
    })
    .await;
    let _ = first;
    let reading = ws_until(&mut ws, Duration::from_secs(4), |m| m["type"] == "reading").await;
    assert_eq!(reading["sensor_id"], "sim-1");

    let (took, status, log) = all.stop("INT");
    assert!(status.success(), "all exit: {status:?}\n{log}");
    assert!(took < Duration::from_secs(2), "Ctrl-C took {took:?}");
    assert!(log.contains("k3sense is running: open http://"), "{log}");
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    for (sub, flags) in [
        (
            "all",
            &[
                "--mqtt-listen",
                "--http-listen",
                "--sensor",
                "--gpio",
                "--iio-device",
                "--sensor-id",
                "--interval",
            ][..],
        ),
        ("broker", &["--listen", "--users-file"]),
        (
            "publisher",
            &[
                "--broker",
                "--sensor",
                "--gpio",
                "--iio-device",
                "--sensor-id",
                "--interval",
                "--username",
                "--password-file",
            ],
        ),
        (
            "gateway",
            &["--broker", "--listen", "--username", "--password-file"],
        ),
    ] {
        let text = help(&[sub, "--help"]);
        for flag in flags {
            assert!(text.contains(flag), "{sub} --help lacks {flag}");
            let env = format!(
                "K3SENSE_{}",
                flag.trim_start_matches("--")
                    .replace('-', "_")
                    .to_uppercase()
            );
            assert!(text.contains(&env), "{sub} --help lacks {env}");
        }
        assert!(
            text.contains("K3SENSE_PASSWORD") || sub == "broker" || sub == "all",
            "{sub}"
        );
    }
}
