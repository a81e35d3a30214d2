//! `k3sense publisher --sensor dht11` (and `--sensor iio`) on a machine without the sensor
//! (this one: not a Raspberry Pi) stays up, says once what is wrong and how to fix it, and
//! reports the sensor `offline` (retained) — no panic, no exit, no crash loop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;

async fn stays_up_and_reports_offline(sensor: &str, id: &str, clear_message: &[&str]) {
    let broker = start_broker().await;
    let mut publisher = Proc::start(
        env!("CARGO_BIN_EXE_k3sense"),
        &[
            "publisher",
            "--sensor",
            sensor,
            "--sensor-id",
            id,
            "--broker",
            &broker.to_string(),
            "--metrics-listen",
            "off",
        ],
    );

    // The publisher reports its sensor offline ...
    let topic = format!("k3sense/{id}/availability");
    let mut availability = mqtt_subscriber(broker, &topic).await;
    let (payload, _) = next_on(&mut availability, &topic, Duration::from_secs(10)).await;
    assert_eq!(payload, b"offline");
    // ... retained, so a subscriber that comes later learns it at once ...
    let mut late = mqtt_subscriber(broker, &topic).await;
    let (payload, retained) = next_on(&mut late, &topic, Duration::from_secs(2)).await;
    assert!(retained, "expected the retained availability");
    assert_eq!(payload, b"offline");
    // ... while it keeps running: the offline is its report, not its last will.
    assert!(
        publisher.running(),
        "the publisher exited without its sensor: {}",
        publisher.log()
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !publisher.log().contains("ERROR") {
        assert!(
            std::time::Instant::now() < deadline,
            "no error logged:\n{}",
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // "Stays up" is a property over time, not an event: watch it for a second after the error.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        publisher.running(),
        "the publisher exited after its error: {}",
        publisher.log()
    );
    let text = publisher.log();
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
