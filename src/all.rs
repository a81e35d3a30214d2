//! `k3sense all`: broker, publisher and gateway in one process, each with a child token of one
//! root token, so one Ctrl-C stops all three and a failure of one stops the others.

use std::time::Duration;

use anyhow::Context;
use k3sense_protocol::MqttConfig;
use tokio_util::sync::CancellationToken;

use crate::cli::AllArgs;

/// `all` reads faster than a real deployment, so the page visibly moves.
const ALL_INTERVAL: Duration = Duration::from_secs(2);
const ALL_SENSOR_ID: &str = "sim-1";

pub async fn run(args: AllArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut broker_config = k3sense_broker::Config::new(args.mqtt_listen);
    // The broker protects readings under the same prefix the clients use.
    broker_config.options.topic_prefix = args.topic_prefix.clone();
    // The gateway and publisher below reach the broker on its local (Unix) socket: a reading to
    // the page then crosses no TCP/IP stack inside this process. Where there is none, over TCP.
    broker_config.local_socket = true;
    let broker = k3sense_broker::start(&broker_config)
        .await
        .context("cannot start the MQTT broker (use --mqtt-listen to pick another address)")?;
    let mqtt_address = broker.local_address().map_or_else(
        || broker_config.connect_address().to_string(),
        str::to_owned,
    );

    let mut mqtt = MqttConfig::new(mqtt_address.clone());
    mqtt.topic_prefix = args.topic_prefix.clone();

    let mut sensor = args.sensor.clone();
    sensor
        .sensor_id
        .get_or_insert_with(|| ALL_SENSOR_ID.to_owned());
    sensor.interval.get_or_insert(ALL_INTERVAL);
    // No metrics server unless asked for (--metrics-listen): 9101 may be taken on a laptop.
    sensor
        .metrics
        .listen
        .get_or_insert(k3sense_publisher::MetricsListen::Off);
    let publisher = k3sense_publisher::Config {
        mqtt: mqtt.clone(),
        sensor,
    };

    let mut gateway = k3sense_gateway::Config::new(args.http_listen, mqtt_address);
    gateway.mqtt = mqtt;
    gateway.options.drain_timeout = Duration::from_secs(1);
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (use --http-listen to pick another address)",
                args.http_listen
            )
        })?;

    let root = shutdown.child_token();
    let stop_all = root.clone();
    let broker_task = tokio::spawn(broker.serve(root.child_token()));
    let publisher_task = tokio::spawn(k3sense_publisher::run(publisher, root.child_token()));
    let gateway_task = tokio::spawn(k3sense_gateway::serve(
        listener,
        gateway,
        root.child_token(),
    ));
    eprintln!(
        "\n  k3sense is running: open http://{}/  (MQTT on {}; Ctrl-C stops)\n",
        args.http_listen, args.mqtt_listen
    );

    // Whatever ends first (Ctrl-C or a failure) stops the other two.
    let (p, g) = tokio::join!(
        async {
            let r = publisher_task.await;
            stop_all.cancel();
            r
        },
        async {
            let r = gateway_task.await;
            stop_all.cancel();
            r
        },
    );
    let b = broker_task.await;
    p.context("publisher task")?.context("publisher")?;
    g.context("gateway task")?.context("gateway")?;
    b.context("broker task")?.context("broker")?;
    Ok(())
}
