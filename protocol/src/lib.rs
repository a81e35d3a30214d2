//! The k3sense contract: what travels between the publisher, the broker, the gateway and any other
//! MQTT or WebSocket client.
//!
//! Everything a tool needs to speak k3sense lives here and nowhere else, so the publisher that
//! writes a reading and the gateway that reads it cannot drift apart:
//!
//! - [`Reading`]: one measurement, with its strict JSON encoding ([`Reading::to_json`]) and
//!   decoding ([`Reading::from_json`]) that rejects anything a real sensor could not have sent.
//! - [`SensorId`]: the sensor-id rule, a DNS label like a Kubernetes node name.
//! - [`Topics`]: the topic layout `<prefix>/<sensor_id>/state`, `…/availability` and `…/sensor`.
//! - [`Availability`]: the `online` / `offline` payloads.
//! - [`SensorHealth`]: whether the sensor itself answers (`ok` / `not_answering`), and why not.
//! - [`MqttConfig`]: the broker address, credentials and prefix every client shares, and
//!   [`mqtt::Client`], the one MQTT client they all use.
//! - [`ws`]: the JSON messages the gateway sends to browsers over WebSocket, and its HTTP API shapes.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | `reading` | `Reading`, `Model`, JSON encoding and validation |
//! | `sensor_id` | `SensorId` and its rule |
//! | `topic` | `Topics`, `TopicKind`, topic parsing |
//! | `availability` | `Availability` |
//! | `health` | [`SensorHealth`]: the sensor's own health (`<prefix>/<id>/sensor`) |
//! | `replay` | [`ReplayRequest`] and the replay topics: how a gateway gets back readings it missed |
//! | `ws` | WebSocket and HTTP API messages |
//! | `log_throttle` | [`LogThrottle`]: one log line per kind of trouble per interval, for every component |
//! | `client` | [`MqttConfig`]: the flags every MQTT client shares (broker, credentials, prefix); [`Backoff`] |
//! | [`mqtt`] | the one MQTT client of every component and tool: connect, pump, reconnect, resubscribe, acknowledged publish, goodbye |
//! | `error` | `Error`, the one error type of this crate |

mod availability;
mod client;
mod error;
mod health;
mod log_throttle;
pub mod mqtt;
mod reading;
mod replay;
mod sensor_id;
mod topic;
pub mod ws;

pub use availability::Availability;
pub use client::{Backoff, MAX_INCOMING_PACKET, MqttConfig};
pub use error::{Error, Result};
pub use health::{FailureKind, HealthStatus, SensorHealth};
pub use log_throttle::LogThrottle;
pub use reading::{MAX_PAYLOAD_BYTES, MAX_SEQ, Model, Reading, format_read_at, parse_read_at};
pub use replay::ReplayRequest;
pub use sensor_id::SensorId;
pub use topic::{DEFAULT_PREFIX, TopicKind, Topics};
