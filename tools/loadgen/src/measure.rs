//! One measurement against one running server: connect N clients, publish M readings at a set
//! rate, and gather latencies and the server's CPU and memory before and after.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use k3sense_protocol::{
    DEFAULT_PREFIX, Model, MqttConfig, Reading, SensorId, TopicKind, Topics,
    mqtt::{Client, ClientEvent, QoS},
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    clients::{self, Plan, Protocol, Status},
    process_stats::Sample,
    stats::{Latencies, latencies},
};

/// The sensor the load tool publishes as.
pub(crate) const SENSOR_ID: &str = "bench-1";
/// How long clients may take, after the last publish, to receive it.
const GRACE: Duration = Duration::from_secs(5);

/// Where the server under test is.
#[derive(Debug, Clone)]
pub struct Target {
    /// The dialect of its WebSocket.
    pub protocol: Protocol,
    /// Its WebSocket address.
    pub ws: SocketAddr,
    /// The WebSocket path (`/ws` for k3sense, `/` for Mosquitto).
    pub path: String,
    /// The MQTT broker (host:port) readings are published to.
    pub mqtt: String,
    /// The processes whose CPU and memory are sampled (summed), e.g. gateway and broker.
    pub pids: Vec<u32>,
}

impl Target {
    /// k3sense's gateway at `http` (WebSocket `/ws`), its broker at `mqtt`.
    pub fn k3sense(http: SocketAddr, mqtt: SocketAddr, pids: Vec<u32>) -> Self {
        Self {
            protocol: Protocol::K3sense,
            ws: http,
            path: "/ws".to_owned(),
            mqtt: mqtt.to_string(),
            pids,
        }
    }
}

/// How much load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// WebSocket clients.
    pub clients: usize,
    /// Readings published once every client is subscribed.
    pub readings: u64,
    /// Readings per second.
    pub rate: f64,
    /// Clients connecting at once.
    pub concurrency: usize,
}

/// What one measurement found.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The load applied.
    pub load: Load,
    /// Clients that connected and subscribed.
    pub connected: usize,
    /// Time from the first connect until every client was subscribed.
    pub connect_time: Duration,
    /// Server sample before the clients connected.
    pub idle: Sample,
    /// Server sample once they all were subscribed.
    pub loaded: Sample,
    /// Server sample after the readings.
    pub done: Sample,
    /// Latencies of the readings.
    pub latencies: Latencies,
    /// The first few distinct client errors.
    pub errors: Vec<String>,
}

impl Measurement {
    /// Server memory per connected client, in KiB.
    pub fn kib_per_client(&self) -> f64 {
        (self.loaded - self.idle).rss_kib as f64 / self.connected.max(1) as f64
    }

    /// Server CPU time spent delivering the readings, per reading.
    pub fn cpu_per_reading(&self) -> Duration {
        let readings = u32::try_from(self.load.readings.max(1)).unwrap_or(u32::MAX);
        (self.done - self.loaded).cpu / readings
    }
}

/// Runs one measurement against `target`.
pub async fn measure(target: &Target, load: Load) -> Result<Measurement> {
    if load.clients == 0 || load.readings == 0 || !load.rate.is_finite() || load.rate <= 0.0 {
        bail!("clients, readings and rate must all be above zero");
    }
    let topics = Topics::new(DEFAULT_PREFIX)?;
    let sensor = SensorId::new(SENSOR_ID)?;
    let publisher = Publisher::connect(&target.mqtt, topics.state(&sensor)).await?;
    // A first reading, as a running sensor would have left: retained, in every snapshot.
    publisher.publish(payload(&sensor, 0)?).await?;

    let start = Instant::now();
    let plan = Arc::new(Plan {
        server: target.ws,
        uri: format!("ws://{}{}", target.ws, target.path)
            .parse()
            .context("WebSocket URL")?,
        protocol: target.protocol,
        filter: topics.filter(TopicKind::State),
        last_seq: load.readings,
        start,
    });
    let idle = Sample::of(&target.pids)?;
    let stop = CancellationToken::new();
    let (status_tx, mut status_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let (mut connected, mut failed) = (0, 0);
    let mut errors = Vec::new();
    // Start `concurrency` clients, then one more each time one of them has finished connecting.
    for index in 0..load.clients {
        if index >= load.concurrency.max(1) {
            match status_rx.recv().await {
                Some(Status::Ready) => connected += 1,
                Some(Status::Failed(e)) => {
                    failed += 1;
                    note(&mut errors, e);
                }
                None => break,
            }
        }
        tasks.spawn(clients::run(
            index,
            plan.clone(),
            status_tx.clone(),
            stop.clone(),
        ));
    }
    drop(status_tx);
    while let Some(status) = status_rx.recv().await {
        match status {
            Status::Ready => connected += 1,
            Status::Failed(e) => {
                failed += 1;
                note(&mut errors, e);
            }
        }
        if connected + failed >= load.clients {
            break;
        }
    }
    let connect_time = start.elapsed();
    let loaded = Sample::of(&target.pids)?;
    eprintln!(
        "  {connected}/{} clients subscribed in {:.2?}; publishing {} readings at {}/s",
        load.clients, connect_time, load.readings, load.rate
    );

    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / load.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 1..=load.readings {
        let payload = payload(&sensor, seq)?;
        tick.tick().await;
        sent.push(Some(start.elapsed()));
        publisher.publish(payload).await?;
    }

    let mut arrivals = Vec::with_capacity(load.clients);
    let deadline = tokio::time::sleep(GRACE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline, if !stop.is_cancelled() => stop.cancel(),
            joined = tasks.join_next() => match joined {
                Some(Ok(outcome)) => {
                    if let Some(e) = outcome.error {
                        note(&mut errors, e);
                    }
                    // Clients that never connected are counted in `connected`, not as losses.
                    if outcome.connected {
                        arrivals.push(outcome.arrivals);
                    }
                }
                Some(Err(e)) => note(&mut errors, e.to_string()),
                None => break,
            },
        }
    }
    let done = Sample::of(&target.pids)?;
    publisher.stop().await;
    Ok(Measurement {
        load,
        connected,
        connect_time,
        idle,
        loaded,
        done,
        latencies: latencies(&sent, &arrivals),
        errors,
    })
}

/// Reading `seq` of `sensor`, encoded by the protocol crate so it is valid by construction.
fn payload(sensor: &SensorId, seq: u64) -> Result<String> {
    let temperature = 20.0 + (seq % 50) as f64 / 10.0;
    let reading = Reading::new(
        sensor.clone(),
        Model::Dht22,
        temperature,
        40.0,
        Utc::now(),
        seq,
    )?;
    Ok(reading.to_json()?)
}

fn note(errors: &mut Vec<String>, e: String) {
    if errors.len() < 5 && !errors.contains(&e) {
        errors.push(e);
    }
}

/// The MQTT side: the one k3sense MQTT client; a task reads its events.
struct Publisher {
    client: Client,
    topic: String,
}

impl Publisher {
    async fn connect(broker: &str, topic: String) -> Result<Self> {
        let id = format!("loadgen-publisher-{}", std::process::id());
        let (client, mut events) = MqttConfig::new(broker).client(&id)?.start();
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            // Ends when the client stops (after `stop`'s goodbye).
            while let Some(event) = events.recv().await {
                match event {
                    ClientEvent::Connected { .. } => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    ClientEvent::Disconnected {
                        reason,
                        retry_in: Some(_),
                    } => {
                        if let Some(e) = reason.error() {
                            eprintln!("  publisher: {e}; retrying");
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected_rx)
            .await
            .with_context(|| format!("no CONNACK from the MQTT broker at {broker} within 10 s"))?
            .context("the publisher's client stopped")?;
        Ok(Self { client, topic })
    }

    /// Publishes a reading as the contract says: QoS 1, retained.
    async fn publish(&self, payload: String) -> Result<()> {
        self.client
            .publish_when_room(&self.topic, QoS::AtLeastOnce, true, payload)
            .await
            .context("publish")?;
        Ok(())
    }

    /// Disconnects deliberately (at most a second).
    async fn stop(self) {
        self.client.goodbye(Duration::from_secs(1)).await;
    }
}
