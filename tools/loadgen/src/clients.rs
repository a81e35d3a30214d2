//! One simulated browser: a WebSocket client that speaks k3sense's `/ws` (JSON text messages)
//! or MQTT over WebSocket (what a page would speak to Mosquitto), and notes when each reading
//! arrives.
//!
//! Clients connect from 127.0.0.2 … 127.0.0.9 in turn, so 10,000 of them (and the sockets the
//! previous runs left in TIME_WAIT) never run out of ephemeral ports towards one server port.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet, QoS, Subscribe};
use tokio::{net::TcpSocket, sync::mpsc};
use tokio_tungstenite::{
    WebSocketStream, client_async_with_config,
    tungstenite::{ClientRequestBuilder, Message, http::Uri, protocol::WebSocketConfig},
};
use tokio_util::sync::CancellationToken;

/// The load tool's sensor as it appears in a reading's JSON (`measure::SENSOR_ID`).
const OUR_SENSOR: &str = r#""sensor_id":"bench-1""#;
/// How many loopback source addresses the clients spread over.
const SOURCES: usize = 8;
/// A client's read buffer: messages are ~150 bytes.
const READ_BUFFER: usize = 4096;
/// Largest MQTT packet accepted from the broker.
const MAX_PACKET: usize = 64 * 1024;
/// Attempts to connect one client (a burst of connects can overflow a server's accept backlog).
const ATTEMPTS: u32 = 5;
/// Time one attempt may take until the client is subscribed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Which WebSocket dialect the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// k3sense's `/ws`: a `snapshot` text message, then `reading` messages carrying `seq`.
    K3sense,
    /// MQTT 3.1.1 over WebSocket (subprotocol `mqtt`), subscribed to `<prefix>/+/state` at QoS 0.
    Mqtt,
}

/// What every client of a run shares.
#[derive(Debug)]
pub struct Plan {
    /// The server's WebSocket address.
    pub server: SocketAddr,
    /// `ws://…` URL requested.
    pub uri: Uri,
    /// The dialect.
    pub protocol: Protocol,
    /// The MQTT subscription filter (MQTT only).
    pub filter: String,
    /// A client stops once it has this seq.
    pub last_seq: u64,
    /// Arrival times are offsets from this instant.
    pub start: Instant,
}

/// What a client tells the runner while connecting.
#[derive(Debug)]
pub enum Status {
    /// Connected and subscribed: every later reading will reach it.
    Ready,
    /// Gave up connecting.
    Failed(String),
}

/// What a client saw: each reading's seq and when it arrived, and why it ended early, if it did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Whether it ever connected and subscribed.
    pub connected: bool,
    /// `(seq, arrival)` for every reading received.
    pub arrivals: Vec<(u64, Duration)>,
    /// Set when the connection broke before the last reading.
    pub error: Option<String>,
}

/// Runs client number `index`: connects (with retries), reports [`Status`], then records
/// readings until it has `plan.last_seq` or `stop` is cancelled.
pub async fn run(
    index: usize,
    plan: Arc<Plan>,
    status: mpsc::UnboundedSender<Status>,
    stop: CancellationToken,
) -> Outcome {
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        let connected = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(index, &plan)).await;
        match connected {
            Ok(Ok((ws, buffer))) => {
                let _ = status.send(Status::Ready);
                return receive(ws, buffer, &plan, &stop).await;
            }
            Ok(Err(e)) => last_error = format!("{e:#}"),
            Err(_) => last_error = format!("not subscribed within {HANDSHAKE_TIMEOUT:?}"),
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))) => {}
        }
    }
    let _ = status.send(Status::Failed(last_error.clone()));
    Outcome {
        error: Some(last_error),
        ..Outcome::default()
    }
}

type Ws = WebSocketStream<tokio::net::TcpStream>;

/// Opens the WebSocket and waits until the client is subscribed: k3sense's snapshot has
/// arrived, or the broker has acknowledged the SUBSCRIBE. Returns MQTT bytes read past it.
async fn connect(index: usize, plan: &Plan) -> Result<(Ws, BytesMut)> {
    let octet = 2 + u8::try_from(index % SOURCES).context("source address")?;
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, octet), 0)))
        .context("bind a loopback source address")?;
    let stream = socket
        .connect(plan.server)
        .await
        .with_context(|| format!("connect to {}", plan.server))?;
    stream.set_nodelay(true)?;
    let mut request = ClientRequestBuilder::new(plan.uri.clone());
    if plan.protocol == Protocol::Mqtt {
        request = request.with_sub_protocol("mqtt");
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let (mut ws, _) = client_async_with_config(request, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    let mut buffer = BytesMut::new();
    match plan.protocol {
        Protocol::K3sense => match ws.next().await {
            Some(Ok(Message::Text(text))) if text.as_str().starts_with(r#"{"type":"snapshot""#) => {
            }
            other => bail!("expected a snapshot first, got {other:?}"),
        },
        Protocol::Mqtt => {
            let mut connect = Connect::new(format!("loadgen-{index}"));
            connect.keep_alive = 0; // no pings needed for a run; Mosquitto allows 0
            let mut subscribe = Subscribe::new(plan.filter.clone(), QoS::AtMostOnce);
            subscribe.pkid = 1;
            let mut out = BytesMut::new();
            Packet::Connect(connect).write(&mut out, MAX_PACKET)?;
            Packet::Subscribe(subscribe).write(&mut out, MAX_PACKET)?;
            ws.send(Message::Binary(out.freeze())).await?;
            loop {
                match next_packet(&mut ws, &mut buffer).await? {
                    Packet::ConnAck(ConnAck { code, .. }) if code != ConnectReturnCode::Success => {
                        bail!("the broker refused the connection: {code:?}")
                    }
                    Packet::SubAck(_) => break,
                    _ => {}
                }
            }
        }
    }
    Ok((ws, buffer))
}

/// Records readings until the last one, `stop`, or a broken connection.
async fn receive(
    mut ws: Ws,
    mut buffer: BytesMut,
    plan: &Plan,
    stop: &CancellationToken,
) -> Outcome {
    let mut outcome = Outcome {
        connected: true,
        ..Outcome::default()
    };
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            next = ws.next() => next,
        };
        let at = plan.start.elapsed();
        match next {
            Some(Ok(Message::Text(text))) if plan.protocol == Protocol::K3sense => {
                if let Some(seq) = reading_seq(text.as_str()) {
                    outcome.arrivals.push((seq, at));
                }
            }
            Some(Ok(Message::Binary(bytes))) if plan.protocol == Protocol::Mqtt => {
                buffer.extend_from_slice(&bytes);
                match mqtt_seqs(&mut buffer) {
                    Ok(seqs) => outcome.arrivals.extend(seqs.into_iter().map(|s| (s, at))),
                    Err(e) => {
                        outcome.error = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                outcome.error = Some(format!("closed by the server: {frame:?}"));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                outcome.error = Some(e.to_string());
                break;
            }
            None => {
                outcome.error = Some("connection ended".to_owned());
                break;
            }
        }
        if outcome
            .arrivals
            .last()
            .is_some_and(|(s, _)| *s >= plan.last_seq)
        {
            break;
        }
    }
    outcome
}

/// The next whole MQTT packet, reading WebSocket messages as needed.
async fn next_packet(ws: &mut Ws, buffer: &mut BytesMut) -> Result<Packet> {
    loop {
        match Packet::read(buffer, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("bad MQTT data from the broker: {e:?}"),
        }
        match ws.next().await {
            Some(Ok(Message::Binary(bytes))) => buffer.extend_from_slice(&bytes),
            Some(Ok(Message::Close(frame))) => bail!("closed by the broker: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the broker closed the connection"),
        }
    }
}

/// Seqs of the live (not retained) PUBLISH packets complete in `buffer`; leaves a partial packet.
fn mqtt_seqs(buffer: &mut BytesMut) -> Result<Vec<u64>> {
    let mut seqs = Vec::new();
    loop {
        match Packet::read(buffer, MAX_PACKET) {
            Ok(Packet::Publish(p)) if !p.retain => {
                if let Some(seq) = std::str::from_utf8(&p.payload).ok().and_then(seq_field) {
                    seqs.push(seq);
                }
            }
            Ok(_) => {}
            Err(rumqttc::Error::InsufficientBytes(_)) => return Ok(seqs),
            Err(e) => bail!("bad MQTT data from the broker: {e:?}"),
        }
    }
}

/// The seq of a k3sense `reading` message of the load tool's sensor; `None` for other types and
/// other sensors (`k3sense all` has a simulated one of its own, whose seqs are not ours).
fn reading_seq(text: &str) -> Option<u64> {
    if text.starts_with(r#"{"type":"reading""#) && text.contains(OUR_SENSOR) {
        seq_field(text)
    } else {
        None
    }
}

/// The value of the last `"seq":` in a JSON object, without parsing the rest.
fn seq_field(json: &str) -> Option<u64> {
    let (_, rest) = json.rsplit_once(r#""seq":"#)?;
    let digits = rest.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use rumqttc::Publish;

    use super::*;

    #[test]
    fn finds_the_seq_of_readings_only() {
        let reading = r#"{"type":"reading","sensor_id":"bench-1","model":"dht22","temperature_c":21.5,"humidity_pct":40.0,"read_at":"2026-01-01T00:00:00.000Z","seq":1234}"#;
        assert_eq!(reading_seq(reading), Some(1234));
        assert!(OUR_SENSOR.contains(crate::measure::SENSOR_ID));
        let other = reading.replace("bench-1", "sim-1");
        assert_eq!(reading_seq(&other), None);
        assert_eq!(
            reading_seq(r#"{"type":"snapshot","sensors":[{"seq":3}]}"#),
            None
        );
        assert_eq!(seq_field(r#"{"seq": 7 }"#), Some(7));
        assert_eq!(seq_field(r#"{"seq":"x"}"#), None);
    }

    #[test]
    fn splits_mqtt_packets_and_skips_retained() {
        let publish = |seq: u64, retain: bool| {
            let mut p = Publish::new(
                "k3sense/a/state",
                QoS::AtMostOnce,
                format!(r#"{{"seq":{seq}}}"#),
            );
            p.retain = retain;
            let mut b = BytesMut::new();
            Packet::Publish(p).write(&mut b, MAX_PACKET).unwrap();
            b
        };
        let mut buffer = BytesMut::new();
        buffer.put(publish(1, true));
        buffer.put(publish(2, false));
        let third = publish(3, false);
        buffer.put(&third[..4]);
        assert_eq!(mqtt_seqs(&mut buffer).unwrap(), vec![2]);
        buffer.put(&third[4..]);
        assert_eq!(mqtt_seqs(&mut buffer).unwrap(), vec![3]);
        assert!(buffer.is_empty());
    }
}
