//! `k3sense publisher --sensor dht11` (and `--sensor iio`) on a machine without the sensor
//! (this one: not a Raspberry Pi) stays up, says once what is wrong and how to fix it, and
//! reports the sensor `offline` (retained) — no panic, no exit, no crash loop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

fn free_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn start_broker() -> SocketAddr {
    let addr = free_addr();
    let started = k3sense_broker::start(&k3sense_broker::Config::new(addr))
        .await
        .unwrap();
    tokio::spawn(started.serve(CancellationToken::new()));
    addr
}

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The retained payload of `topic`, as a new subscriber receives it.
async fn retained(broker: SocketAddr, topic: &str) -> String {
    let mut options = MqttOptions::new("test-availability", broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                assert!(p.retain, "expected the retained availability");
                return String::from_utf8(p.payload.to_vec()).unwrap();
            }
        }
    })
    .await
    .expect("no retained availability")
}

async fn stays_up_and_reports_offline(sensor: &str, id: &str, clear_message: &[&str]) {
    let broker = start_broker().await;
    let log = std::env::temp_dir().join(format!("k3sense-{id}-{}.log", std::process::id()));
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_k3sense"))
            .args(["publisher", "--sensor", sensor, "--sensor-id", id])
            .args(["--broker", &broker.to_string()])
            .env_remove("RUST_LOG")
            .env_remove("K3SENSE_IIO_DEVICE")
            .env_remove("K3SENSE_GPIO")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the publisher exited without its sensor: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let availability = retained(broker, &format!("k3sense/{id}/availability")).await;
    assert_eq!(availability, "offline");
    // Still running: the offline was the publisher's report, not its last will.
    assert!(child.0.try_wait().unwrap().is_none());

    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one clear message, once:\n{text}");
    for needle in clear_message {
        assert!(
            errors[0].contains(needle),
            "the message lacks {needle:?}:\n{}",
            errors[0]
        );
    }
    assert!(!text.contains("panicked"), "{text}");
    eprintln!("{}", errors[0]);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht11_off_a_pi_stays_up_says_why_and_reports_offline() {
    stays_up_and_reports_offline(
        "dht11",
        "no-pi-gpio",
        &[
            "not a Raspberry Pi",
            "k3sense.io/sensor=dht11",
            "retrying every 30s",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iio_without_the_kernel_driver_stays_up_says_why_and_reports_offline() {
    stays_up_and_reports_offline(
        "iio",
        "no-pi-iio",
        &[
            "dtoverlay=dht11,gpiopin=",
            "k3sense.io/sensor=dht11",
            "retrying every 30s",
        ],
    )
    .await;
}
