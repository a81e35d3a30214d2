//! Connecting to the broker as a tool (`check`, `watch`): one attempt, and when it fails, what
//! happened and what to fix, in words a person acts on.
//!
//! MQTT 3.1.1 answers a CONNECT with a CONNACK and a return code (0 accepted, 1–5 refused for a
//! named reason); some brokers also close the socket without answering (rumqttd alone does for
//! a wrong password or keepalive 0; k3sense's broker answers with a CONNACK code), or nothing may
//! listen at all. Each case gets its own explanation.

use std::{io, time::Duration};

use k3sense_protocol::{
    MqttConfig,
    mqtt::{Client, ClientEvent, Events},
};
use rumqttc::{ConnectReturnCode, ConnectionError, StateError};

/// Why the broker cannot be used, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What went wrong, e.g. "nothing listens on 127.0.0.1:1883 (connection refused)".
    pub problem: String,
    /// What to change.
    pub fix: String,
}

/// A connected client (the broker's CONNACK was 0) and its events, which the caller reads.
pub struct Connected {
    pub client: Client,
    pub events: Events,
}

/// Connects once as `client_id` and waits for the CONNACK, at most `timeout`. The client
/// reconnects by itself afterwards; a first attempt that fails is explained, not retried.
pub async fn connect(
    mqtt: &MqttConfig,
    client_id: &str,
    timeout: Duration,
) -> Result<Connected, Refusal> {
    let builder = mqtt.client(client_id).map_err(|e| Refusal {
        problem: e.to_string(),
        fix: "fix --broker (host:port), --username and --password-file / K3SENSE_PASSWORD".into(),
    })?;
    let (client, mut events) = builder.capacity(16).connect_timeout(timeout).start();
    let first = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Some(ClientEvent::Connected { .. }) => return Ok(()),
                Some(ClientEvent::Disconnected { reason, .. }) => return Err(reason),
                Some(_) => {}
                None => return Err(k3sense_protocol::mqtt::Disconnect::Goodbye),
            }
        }
    })
    .await;
    match first {
        Ok(Ok(())) => Ok(Connected { client, events }),
        Ok(Err(reason)) => Err(match reason.error() {
            Some(e) => explain(e, mqtt),
            None => Refusal {
                problem: format!("the connection to {} ended at once", mqtt.broker),
                fix: "check --broker and the broker's log".into(),
            },
        }),
        Err(_) => Err(Refusal {
            problem: format!(
                "no CONNACK from {} within {}",
                mqtt.broker,
                humantime::format_duration(timeout)
            ),
            fix: "is a firewall or a NetworkPolicy dropping MQTT (port 1883)? Is this an MQTT \
                  broker (not, say, a TLS-only or WebSocket port)?"
                .into(),
        }),
    }
}

/// The meaning of a CONNACK return code, as MQTT 3.1.1 (section 3.2.2.3) defines it.
pub fn connack_meaning(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Success => "0: connection accepted",
        ConnectReturnCode::RefusedProtocolVersion => "1: unacceptable protocol version",
        ConnectReturnCode::BadClientId => "2: identifier rejected",
        ConnectReturnCode::ServiceUnavailable => "3: server unavailable",
        ConnectReturnCode::BadUserNamePassword => "4: bad user name or password",
        ConnectReturnCode::NotAuthorized => "5: not authorized",
    }
}

/// Turns a failed connection into a problem and a fix.
pub fn explain(error: &ConnectionError, mqtt: &MqttConfig) -> Refusal {
    let broker = &mqtt.broker;
    let credentials = match &mqtt.username {
        Some(user) => format!("user {user:?}"),
        None => "no username".to_owned(),
    };
    let (problem, fix) = match error {
        ConnectionError::ConnectionRefused(code) => {
            let problem = format!(
                "{broker} refused the connection (CONNACK {})",
                connack_meaning(*code)
            );
            let fix = match code {
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    format!(
                        "check the credentials ({credentials}): --username / K3SENSE_USERNAME and the \
                     password in --password-file or K3SENSE_PASSWORD must match a line of the \
                     broker's users file (k3sense broker --users-file)"
                    )
                }
                ConnectReturnCode::RefusedProtocolVersion => {
                    "the broker does not speak MQTT 3.1.1; enable it (Mosquitto does by default)"
                        .into()
                }
                ConnectReturnCode::BadClientId => {
                    "the broker rejected the client id; it may restrict client ids".into()
                }
                ConnectReturnCode::ServiceUnavailable => {
                    "the broker is up but not serving (overloaded or starting); look at its log"
                        .into()
                }
                ConnectReturnCode::Success => "none needed".into(),
            };
            (problem, fix)
        }
        ConnectionError::Io(e) | ConnectionError::MqttState(StateError::Io(e)) => {
            explain_io(e, broker, &credentials)
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => explain_io(
            &io::Error::from(io::ErrorKind::UnexpectedEof),
            broker,
            &credentials,
        ),
        ConnectionError::NetworkTimeout => (
            format!("no answer from {broker} (timed out)"),
            "is the host up, and is a firewall or NetworkPolicy dropping port 1883?".into(),
        ),
        ConnectionError::NotConnAck(packet) => (
            format!("{broker} answered the CONNECT with {packet:?} instead of a CONNACK"),
            "this is not a conforming MQTT 3.1.1 broker; check --broker".into(),
        ),
        other => (
            format!("cannot connect to {broker}: {other}"),
            "check --broker and the broker's log".into(),
        ),
    };
    Refusal { problem, fix }
}

fn explain_io(e: &io::Error, broker: &str, credentials: &str) -> (String, String) {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => (
            format!("nothing listens on {broker} (connection refused)"),
            "start the broker (k3sense broker, or your own), or point --broker / K3SENSE_BROKER \
             at it (in the cluster: broker:1883)"
                .into(),
        ),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => (
            format!("{broker} closed the connection without a CONNACK"),
            format!(
                "is this an MQTT broker, and is it the one you meant? Some brokers (a bare rumqttd) \
                 answer a wrong username or password this way: check the credentials \
                 ({credentials}) — --username / K3SENSE_USERNAME and the password in \
                 --password-file or K3SENSE_PASSWORD. The broker's log says which"
            ),
        ),
        io::ErrorKind::TimedOut => (
            format!("no answer from {broker} (timed out)"),
            "is the host up, and is a firewall or NetworkPolicy dropping port 1883?".into(),
        ),
        _ if e.to_string().contains("lookup") || e.to_string().contains("resolve") => (
            format!("cannot resolve the host of {broker}: {e}"),
            "check the host name in --broker (in the cluster: broker:1883, from another \
             namespace broker.k3sense:1883)"
                .into(),
        ),
        _ => (
            format!("cannot connect to {broker}: {e}"),
            "check --broker and the network between here and the broker".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_return_code_and_a_fix() {
        let mut mqtt = MqttConfig::new("b:1883");
        mqtt.username = Some("gw".into());
        let r = explain(
            &ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
            &mqtt,
        );
        assert!(
            r.problem.contains("CONNACK 4: bad user name or password"),
            "{r:?}"
        );
        assert!(
            r.fix.contains("\"gw\"") && r.fix.contains("users file"),
            "{r:?}"
        );
        let r = explain(
            &ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused)),
            &mqtt,
        );
        assert!(r.problem.contains("nothing listens on b:1883"), "{r:?}");
        let r = explain(
            &ConnectionError::MqttState(StateError::ConnectionAborted),
            &mqtt,
        );
        assert!(r.problem.contains("without a CONNACK"), "{r:?}");
        assert!(
            r.fix.contains("\"gw\"") && r.fix.contains("password"),
            "{r:?}"
        );
    }

    #[test]
    fn every_return_code_has_a_meaning() {
        for (code, n) in [
            (ConnectReturnCode::Success, "0"),
            (ConnectReturnCode::RefusedProtocolVersion, "1"),
            (ConnectReturnCode::BadClientId, "2"),
            (ConnectReturnCode::ServiceUnavailable, "3"),
            (ConnectReturnCode::BadUserNamePassword, "4"),
            (ConnectReturnCode::NotAuthorized, "5"),
        ] {
            assert!(connack_meaning(code).starts_with(n));
        }
    }
}
