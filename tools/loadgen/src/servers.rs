//! Starting and stopping the servers under test, each a fresh child process on free loopback
//! ports, with its output in a log file.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

use crate::{clients::Protocol, measure::Target, placement::Placement};

/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the binaries are and where logs go.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `k3sense` release binary.
    pub k3sense: PathBuf,
    /// Mosquitto.
    pub mosquitto: PathBuf,
    /// Logs and Mosquitto's config file go here.
    pub work_dir: PathBuf,
}

impl Binaries {
    /// The same binaries with logs in a (new) subdirectory of the work directory.
    pub fn in_subdir(&self, name: &str) -> Result<Self> {
        let work_dir = self.work_dir.join(name);
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("create {}", work_dir.display()))?;
        Ok(Self {
            work_dir,
            ..self.clone()
        })
    }
}

/// Running child processes, killed on [`Servers::stop`] or when dropped.
pub struct Servers {
    children: Vec<(String, Child)>,
    placement: Placement,
}

impl Servers {
    /// No children yet; those started later are not pinned.
    pub fn none() -> Self {
        Self::placed(Placement::Spread)
    }

    /// No children yet; those started later are placed as `placement` says.
    pub fn placed(placement: Placement) -> Self {
        Self {
            children: Vec::new(),
            placement,
        }
    }

    /// Starts `bin args…` with its output in `<work_dir>/<name>.log`.
    fn spawn(&mut self, bin: &Path, args: &[String], name: &str, work_dir: &Path) -> Result<u32> {
        let log = std::fs::File::create(work_dir.join(format!("{name}.log")))
            .with_context(|| format!("create a log file in {}", work_dir.display()))?;
        let (program, args) = self.placement.command(&bin.to_string_lossy(), args);
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id().context("the child has no pid")?;
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// The pid of the child called `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.id())
    }

    /// Kills every child and waits for them.
    pub async fn stop(mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill().await;
        }
    }

    /// k3sense, ready (`/readyz` 200): the target for `Protocol::K3sense`. Spread, it is the
    /// deployment's shape, `k3sense broker` and `k3sense gateway`; on equal CPU it is one
    /// process, `k3sense all`, pinned like Mosquitto.
    pub async fn k3sense(
        bins: &Binaries,
        max_clients: usize,
        placement: Placement,
    ) -> Result<(Self, Target)> {
        if placement == Placement::EqualCpu {
            return Self::k3sense_all_target(bins).await;
        }
        let mut servers = Self::none();
        let (mqtt, http) = free_ports()?;
        let broker = servers.spawn(
            &bins.k3sense,
            &args(&["broker", "--listen", &mqtt.to_string()]),
            "broker",
            &bins.work_dir,
        )?;
        wait_for_port(mqtt).await?;
        let limit = (max_clients + 100).to_string();
        let gateway = servers.spawn(
            &bins.k3sense,
            &args(&[
                "gateway",
                "--broker",
                &mqtt.to_string(),
                "--listen",
                &http.to_string(),
                "--max-clients",
                &limit,
            ]),
            "gateway",
            &bins.work_dir,
        )?;
        wait_ready(http).await?;
        let target = Target::k3sense(http, mqtt, vec![gateway, broker]);
        Ok((servers, target))
    }

    /// Mosquitto with an MQTT listener (for the publisher) and a WebSocket listener (for the
    /// clients): the target for `Protocol::Mqtt`.
    pub async fn mosquitto(bins: &Binaries, placement: Placement) -> Result<(Self, Target)> {
        let mut servers = Self::placed(placement);
        let (mqtt, ws) = free_ports()?;
        let conf = bins.work_dir.join("mosquitto.conf");
        let text = format!(
            "# written by loadgen: one MQTT and one WebSocket listener on loopback\n\
             per_listener_settings false\nallow_anonymous true\npersistence false\n\
             listener {} 127.0.0.1\nlistener {} 127.0.0.1\nprotocol websockets\n",
            mqtt.port(),
            ws.port()
        );
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        let pid = servers.spawn(
            &bins.mosquitto,
            &args(&["-c", &conf.to_string_lossy()]),
            "mosquitto",
            &bins.work_dir,
        )?;
        wait_for_port(mqtt).await?;
        wait_for_port(ws).await?;
        let target = Target {
            protocol: Protocol::Mqtt,
            ws,
            path: "/".to_owned(),
            mqtt: mqtt.to_string(),
            pids: vec![pid],
        };
        Ok((servers, target))
    }

    /// `k3sense all` pinned to the servers' core, ready: its broker's public MQTT listener takes
    /// the readings, its gateway serves the clients. Its own simulated sensor reads once an hour
    /// (once during a run), so the clients get the load tool's readings alone; the clients
    /// count only the load tool's sensor anyway.
    async fn k3sense_all_target(bins: &Binaries) -> Result<(Self, Target)> {
        let mut servers = Self::placed(Placement::EqualCpu);
        let (mqtt, http) = free_ports()?;
        let pid = servers.spawn(
            &bins.k3sense,
            &args(&[
                "all",
                "--mqtt-listen",
                &mqtt.to_string(),
                "--http-listen",
                &http.to_string(),
                "--interval",
                "1h",
            ]),
            "all",
            &bins.work_dir,
        )?;
        wait_ready(http).await?;
        let target = Target::k3sense(http, mqtt, vec![pid]);
        Ok((servers, target))
    }

    /// `k3sense all`: returns the time from spawning it until `/readyz` answered 200.
    pub async fn k3sense_all(&mut self, bins: &Binaries) -> Result<Duration> {
        let (mqtt, http) = free_ports()?;
        let started = Instant::now();
        self.spawn(
            &bins.k3sense,
            &args(&[
                "all",
                "--mqtt-listen",
                &mqtt.to_string(),
                "--http-listen",
                &http.to_string(),
            ]),
            "all",
            &bins.work_dir,
        )?;
        wait_ready(http).await?;
        Ok(started.elapsed())
    }

    /// `k3sense broker`, `publisher` (simulated, every 2 s like `all`) and `gateway` as three
    /// processes: returns the time from spawning the gateway until it was ready.
    pub async fn k3sense_trio(&mut self, bins: &Binaries) -> Result<Duration> {
        let (mqtt, http) = free_ports()?;
        let broker = mqtt.to_string();
        self.spawn(
            &bins.k3sense,
            &args(&["broker", "--listen", &broker]),
            "broker",
            &bins.work_dir,
        )?;
        wait_for_port(mqtt).await?;
        self.spawn(
            &bins.k3sense,
            &args(&[
                "publisher",
                "--broker",
                &broker,
                "--sensor",
                "sim",
                "--sensor-id",
                "idle-1",
                "--interval",
                "2s",
            ]),
            "publisher",
            &bins.work_dir,
        )?;
        let started = Instant::now();
        self.spawn(
            &bins.k3sense,
            &args(&[
                "gateway",
                "--broker",
                &broker,
                "--listen",
                &http.to_string(),
            ]),
            "gateway",
            &bins.work_dir,
        )?;
        wait_ready(http).await?;
        Ok(started.elapsed())
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Next port to try. Listen ports come from below Linux's ephemeral range (32768–60999), so no
/// outgoing connection, and none of its TIME_WAIT leftovers, holds them: Mosquitto's WebSocket
/// listener (libwebsockets) binds without SO_REUSEADDR and fails on such a port.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Two distinct loopback ports nobody listens on right now.
fn free_ports() -> Result<(SocketAddr, SocketAddr)> {
    let _ = NEXT_PORT.compare_exchange(
        0,
        PORTS.start + (std::process::id() % 5_000) as u16,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut found = Vec::new();
    for _ in 0..1_000 {
        let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = PORTS.start + (port - PORTS.start) % (PORTS.end - PORTS.start);
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            found.push(listener.local_addr()?);
            if let [a, b] = found[..] {
                return Ok((a, b));
            }
        }
    }
    bail!("no free loopback port in {PORTS:?}")
}

/// Waits until something accepts connections on `addr`.
async fn wait_for_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("nothing listens on {addr} after {READY_TIMEOUT:?}; see the logs")
}

/// Waits until `GET /readyz` on `addr` answers 200.
async fn wait_ready(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if readyz(addr).await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("{addr}/readyz did not answer 200 within {READY_TIMEOUT:?}; see the logs")
}

async fn readyz(addr: SocketAddr) -> Result<bool> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    Ok(&head == b"HTTP/1.1 200")
}
