//! The `k3sense` binary as a person runs it: `watch` and `check` against a real broker,
//! publisher and gateway; exit codes; every `--help` with examples; docs/cli.md against `--help`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::{net::SocketAddr, process::Output, time::Duration};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::*;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_k3sense");
const SECOND: Duration = Duration::from_secs(1);
const SUBCOMMANDS: [&str; 6] = ["all", "broker", "publisher", "gateway", "check", "watch"];

/// The binary with a clean environment (no K3SENSE_* from the developer's shell).
fn k3sense(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("K3SENSE_") {
            command.env_remove(key);
        }
    }
    command
}

async fn run(mut command: tokio::process::Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::time::timeout(30 * SECOND, command.output())
        .await
        .expect("k3sense did not exit in time")
        .unwrap();
    (
        status.code().expect("exited by a signal"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Waits until the broker holds a retained state for `id` (the publisher has published).
async fn wait_for_reading(broker: SocketAddr, id: &str) {
    let mut options = MqttOptions::new(format!("cli-{}", free_port()), "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    let topic = format!("k3sense/{id}/state");
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(10 * SECOND, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                if p.topic == topic {
                    return;
                }
            }
        }
    })
    .await
    .expect("no reading reached the broker");
}

/// A broker that only accepts `user:password` lines from `users`.
async fn start_broker_with_users(users: &str) -> SocketAddr {
    let addr = free_addr();
    let dir = std::env::temp_dir().join(format!("k3sense-cli-users-{}", addr.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("users");
    std::fs::write(&file, users).unwrap();
    let mut config = k3sense_broker::Config::new(addr);
    config.options.users_file = Some(file);
    let started = k3sense_broker::start(&config).await.unwrap();
    tokio::spawn(started.serve(CancellationToken::new()));
    std::fs::remove_dir_all(dir).unwrap();
    addr
}

// ---------------------------------------------------------------------------------------------
// watch
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_count_2_prints_two_decoded_lines_and_exits_0() {
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let _publisher = start_publisher(broker, "pi-1", Duration::from_millis(200), stop.clone());
    let (code, stdout, stderr) = run(k3sense(&[
        "watch",
        "--broker",
        &broker.to_string(),
        "--count",
        "2",
    ]))
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let mut lines = stdout.lines();
    let header = lines.next().unwrap();
    for column in ["SENSOR", "TEMP", "HUMIDITY", "READ_AT", "SEQ", "AGE"] {
        assert!(header.contains(column), "{header}");
    }
    let readings: Vec<&str> = lines.filter(|l| l.contains(" °C ")).collect();
    assert_eq!(readings.len(), 2, "{stdout}");
    for line in &readings {
        assert!(line.starts_with("pi-1 "), "{line}");
        assert!(line.contains(" % ") && line.contains("Z "), "{line}");
        // READ_AT starts in the same column as its header.
        let column = |text: &str, at: &str| text.find(at).map(|i| text[..i].chars().count());
        assert_eq!(
            column(header, "READ_AT"),
            column(line, "20"),
            "{header}\n{line}"
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_availability_and_invalid_payloads_as_such() {
    let broker = start_broker().await;
    let mut watch = k3sense(&["watch", "--broker", &broker.to_string(), "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The header comes once subscribed: what is published after it is shown, in order.
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let header = tokio::time::timeout(10 * SECOND, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(header.starts_with("SENSOR"), "{header}");

    let mut options = MqttOptions::new("cli-bad", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    let valid = r#"{"sensor_id":"bad-1","model":"dht11","temperature_c":20.0,"humidity_pct":50.0,"read_at":"2026-11-27T04:00:00.123Z","seq":1}"#;
    for (topic, payload) in [
        ("k3sense/bad-1/state", "not json"),
        ("k3sense/bad-1/availability", "offline"),
        ("k3sense/bad-1/availability", "maybe"),
        ("k3sense/bad-1/state", valid),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    tokio::spawn(async move {
        let _client = client;
        while events.poll().await.is_ok() {}
    });
    let status = tokio::time::timeout(10 * SECOND, watch.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut stdout = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        stdout.push(line);
    }
    assert_eq!(stdout.len(), 4, "{stdout:#?}");
    assert!(
        stdout[0].starts_with("bad-1 ") && stdout[0].contains("invalid reading"),
        "{stdout:#?}"
    );
    assert!(
        stdout[0].ends_with("not json"),
        "the payload is shown: {stdout:#?}"
    );
    assert!(
        stdout[1].starts_with("bad-1 ") && stdout[1].ends_with("availability: offline"),
        "{stdout:#?}"
    );
    assert!(
        stdout[2].contains("invalid availability: maybe"),
        "{stdout:#?}"
    );
    assert!(
        stdout[3].starts_with("bad-1 ") && stdout[3].contains(" 20.0 °C "),
        "{stdout:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stops_cleanly_on_ctrl_c() {
    let broker = start_broker().await;
    let mut child = k3sense(&["watch", "--broker", &broker.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The header is printed once connected.
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let header = tokio::time::timeout(10 * SECOND, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(header.starts_with("SENSOR"), "{header}");
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(5 * SECOND, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exits_1_with_a_fix_when_no_broker_listens() {
    let nobody = free_addr();
    let (code, stdout, stderr) = run(k3sense(&["watch", "--broker", &nobody.to_string()])).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("nothing listens on {nobody}")),
        "{stderr}"
    );
    assert!(stderr.contains("fix:"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_0_against_a_healthy_setup() {
    let broker = start_broker().await;
    let stop = CancellationToken::new();
    let _publisher = start_publisher(broker, "pi-3", Duration::from_millis(200), stop.clone());
    let (gateway, _) = start_gateway(broker, stop.clone()).await;
    wait_for_reading(broker, "pi-3").await;
    let url = format!("http://{gateway}");
    let (code, stdout, stderr) = run(k3sense(&[
        "check",
        "--broker",
        &broker.to_string(),
        "--sensor",
        "sim",
        "--gateway",
        &url,
    ]))
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in {stdout}"))
            .to_owned()
    };
    assert!(
        line("broker").contains(" ok ") && line("broker").contains("CONNACK 0"),
        "{stdout}"
    );
    assert!(
        line("sensors").contains("pi-3 online, last reading"),
        "{stdout}"
    );
    assert!(
        line("sensor").contains(" ok ") && line("sensor").contains(" °C "),
        "{stdout}"
    );
    assert!(
        line("gateway").contains(" ok ") && line("gateway").contains("/readyz 200"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_when_no_broker_listens() {
    let nobody = free_addr();
    let (code, stdout, _) = run(k3sense(&[
        "check",
        "--broker",
        &nobody.to_string(),
        "--skip",
        "sensor",
    ]))
    .await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "broker   FAIL  nothing listens on {nobody} (connection refused)"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("fix:") && stdout.contains("--broker"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_for_a_wrong_password_and_0_for_the_right_one() {
    let broker = start_broker_with_users("publisher:right-password\n").await;
    let check = |password: &'static str| {
        let mut command = k3sense(&[
            "check",
            "--broker",
            &broker.to_string(),
            "--username",
            "publisher",
            "--skip",
            "sensor",
        ]);
        command.env("K3SENSE_PASSWORD", password);
        run(command)
    };
    let (code, stdout, _) = check("wrong").await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("broker   FAIL"), "{stdout}");
    assert!(
        stdout.contains("CONNACK 4"),
        "the broker's refusal code: {stdout}"
    );
    assert!(stdout.contains("\"publisher\""), "names the user: {stdout}");
    assert!(
        stdout.contains("fix:") && stdout.contains("password"),
        "{stdout}"
    );
    let (code, stdout, _) = check("right-password").await;
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("as user \"publisher\" (CONNACK 0"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_for_an_unhealthy_gateway() {
    // A gateway whose broker is gone: alive (/healthz 200) but not ready (/readyz 503).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = listener.local_addr().unwrap();
    let config = k3sense_gateway::Config::new(gateway, free_addr().to_string());
    let stop = CancellationToken::new();
    tokio::spawn(k3sense_gateway::serve(listener, config, stop.clone()));
    let url = format!("http://{gateway}");
    let (code, stdout, _) = run(k3sense(&[
        "check",
        "--skip",
        "broker,sensor",
        "--gateway",
        &url,
    ]))
    .await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("gateway  FAIL  {url}/readyz answered 503")),
        "{stdout}"
    );
    assert!(stdout.contains("cannot reach the broker"), "{stdout}");
    stop.cancel();

    // Nothing listening at all.
    let nobody = format!("http://{}", free_addr());
    let (code, stdout, _) = run(k3sense(&[
        "check",
        "--skip",
        "broker,sensor",
        "--gateway",
        &nobody,
    ]))
    .await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("gateway  FAIL  cannot reach {nobody}/healthz")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_a_ready_gateway_that_lost_its_broker() {
    // A gateway stays ready when its broker goes (it serves the last readings): `check` must
    // still say the broker is missing, from /api/status.
    let mqtt = free_addr();
    let broker = Proc::start(BIN, &["broker", "--listen", &mqtt.to_string()]);
    let stop = CancellationToken::new();
    let (gateway, _) = start_gateway(mqtt, stop.clone()).await;
    let mut ws = ws_connect(gateway).await;
    assert_eq!(
        ws_next(&mut ws, Duration::from_secs(5)).await["type"],
        "snapshot"
    );
    broker.signal("KILL");
    drop(broker);
    // The gateway tells its WebSocket clients when it loses the broker.
    ws_until(&mut ws, Duration::from_secs(20), |m| {
        m["type"] == "broker" && m["status"] == "unreachable"
    })
    .await;
    assert!(
        http_get(gateway, "/api/status")
            .await
            .1
            .contains("unreachable")
    );
    let url = format!("http://{gateway}");
    let (code, stdout, _) = run(k3sense(&[
        "check",
        "--skip",
        "broker,sensor",
        "--gateway",
        &url,
    ]))
    .await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "gateway  FAIL  {url}/api/status: broker unreachable since 20"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("cannot reach the broker"), "{stdout}");
    assert_eq!(http_get(gateway, "/readyz").await.0, 200);
    stop.cancel();
}

#[tokio::test]
async fn usage_errors_exit_2() {
    for args in [
        &["check", "--gateway", "https://gateway"][..],
        &["check", "--skip", "everything"],
        &["watch", "--count", "many"],
        &["watch", "--password", "x"],
    ] {
        let (code, _, stderr) = run(k3sense(args)).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// help and docs/cli.md
// ---------------------------------------------------------------------------------------------

async fn help(subcommand: Option<&str>) -> String {
    let args: Vec<&str> = subcommand.into_iter().chain(["--help"]).collect();
    let (code, stdout, stderr) = run(k3sense(&args)).await;
    assert_eq!(code, 0, "{stderr}");
    stdout
}

#[tokio::test]
async fn every_help_has_an_examples_section() {
    let top = help(None).await;
    assert!(top.contains("\nExamples:\n"), "{top}");
    assert!(top.contains("Exit codes:"), "{top}");
    for sub in SUBCOMMANDS {
        let text = help(Some(sub)).await;
        let examples = text
            .split_once("\nExamples:\n")
            .unwrap_or_else(|| panic!("k3sense {sub} --help has no Examples section:\n{text}"))
            .1;
        assert!(examples.contains("k3sense"), "{sub}: {examples}");
        assert!(
            top.contains(&format!("  {sub} ")),
            "top-level help lists {sub}"
        );
    }
    for sub in ["check", "watch"] {
        assert!(help(Some(sub)).await.contains("Exit codes:"), "{sub}");
    }
}

/// The long flags a `--help` text defines (lines starting with `-x, --flag` or `--flag`).
fn flags(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix('-')
                .filter(|rest| !rest.starts_with('-'))
                .and_then(|rest| rest.split_once(", ").map(|(_, r)| r))
                .unwrap_or(line);
            let flag = line.strip_prefix("--")?;
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect()
}

#[tokio::test]
async fn docs_cli_md_documents_every_flag_of_every_subcommand() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    let mut missing = Vec::new();
    for sub in SUBCOMMANDS {
        let section = doc
            .split_once(&format!("\n## `k3sense {sub}`"))
            .unwrap_or_else(|| panic!("docs/cli.md has no section ## `k3sense {sub}`"))
            .1;
        let section = section.split("\n## ").next().unwrap();
        let defined = flags(&help(Some(sub)).await);
        assert!(defined.contains(&"--help".to_owned()), "{sub}: {defined:?}");
        for flag in defined {
            if !section.contains(&format!("`{flag}")) {
                missing.push(format!("{sub} {flag}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/cli.md does not document these flags (as `--flag` in the subcommand's section): {missing:?}"
    );
}
