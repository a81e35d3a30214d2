//! How a k3sense client (publisher, gateway, tools) reaches the broker.
//!
//! Every client takes the same flags, so one Secret and one set of environment variables serve
//! them all. The password is never a bare command-line flag (it would show in `ps`): it comes from
//! `--password-file` or from the `K3SENSE_PASSWORD` variable, which the binary reads and puts
//! into [`MqttConfig::password`].

use std::{fmt, path::PathBuf, time::Duration};

use rumqttc::{MqttOptions, Transport};

use crate::{Error, Result, Topics};

/// The largest MQTT packet (remaining length) a k3sense client reads: 1 MiB, far above the
/// k3sense broker's default `--max-payload` (64 KiB) plus its 1 KiB of topic and header room,
/// so no message the broker forwards can make rumqttc drop the connection. Memory cost: at most
/// one such packet per client at a time. A broker allowing larger payloads than this (mosquitto's
/// default is 256 MB) must be given `max_packet_size` ≤ this, or clients will reconnect over it.
pub const MAX_INCOMING_PACKET: usize = 1024 * 1024;

/// Connection settings shared by every MQTT client of k3sense.
#[derive(Clone, clap::Args)]
pub struct MqttConfig {
    /// MQTT broker to connect to, as host:port; or a Unix socket, as unix:PATH (a file) or
    /// unix:@NAME (Linux's abstract namespace).
    #[arg(long, env = "K3SENSE_BROKER", default_value = "127.0.0.1:1883")]
    pub broker: String,

    /// Username for the broker (with --password-file or K3SENSE_PASSWORD).
    #[arg(long, env = "K3SENSE_USERNAME")]
    pub username: Option<String>,

    /// File holding the broker password (first line). The password can also come from the
    /// environment variable K3SENSE_PASSWORD; it is never a command-line flag.
    #[arg(long, env = "K3SENSE_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: Option<PathBuf>,

    /// Password from the environment (`K3SENSE_PASSWORD`), filled in by the binary.
    #[arg(skip)]
    pub password: Option<String>,

    /// First level(s) of every topic: <prefix>/<sensor_id>/state.
    #[arg(long, env = "K3SENSE_TOPIC_PREFIX", default_value = crate::DEFAULT_PREFIX)]
    pub topic_prefix: String,

    /// MQTT keepalive: how soon a dead connection is noticed (by both sides).
    #[arg(long, env = "K3SENSE_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("broker", &self.broker)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_prefix", &self.topic_prefix)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

impl MqttConfig {
    /// Settings for a broker at `broker` with everything else at its default.
    pub fn new(broker: impl Into<String>) -> Self {
        Self {
            broker: broker.into(),
            username: None,
            password_file: None,
            password: None,
            topic_prefix: crate::DEFAULT_PREFIX.to_owned(),
            keepalive: Duration::from_secs(15),
        }
    }

    /// The topics under the configured prefix.
    pub fn topics(&self) -> Result<Topics> {
        Topics::new(self.topic_prefix.clone())
    }

    /// The broker's Unix socket, when `broker` is `unix:PATH` or `unix:@NAME`: the path as
    /// rumqttc and Tokio take it (an abstract NAME gets its leading NUL). `None` for host:port.
    pub fn unix_socket(&self) -> Result<Option<String>> {
        let Some(rest) = self.broker.strip_prefix("unix:") else {
            return Ok(None);
        };
        match rest.strip_prefix('@') {
            _ if rest.is_empty() || rest == "@" => {
                Err(Error::BadBrokerAddress(self.broker.clone()))
            }
            Some(name) => Ok(Some(format!("\0{name}"))),
            None => Ok(Some(rest.to_owned())),
        }
    }

    /// Host and port of the broker.
    pub fn host_port(&self) -> Result<(String, u16)> {
        let bad = || Error::BadBrokerAddress(self.broker.clone());
        let (host, port) = self.broker.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        let port = port.parse::<u16>().map_err(|_| bad())?;
        Ok((host.to_owned(), port))
    }

    /// rumqttc options for a client called `client_id`: keepalive (never 0, which rumqttd
    /// refuses), credentials, and a packet limit that fits readings and discovery messages.
    /// Reads the password file, so a missing file is reported at start-up.
    pub fn mqtt_options(&self, client_id: &str) -> Result<MqttOptions> {
        let mut options = match self.unix_socket()? {
            Some(path) => {
                let mut options = MqttOptions::new(client_id, path, 0);
                options.set_transport(Transport::Unix);
                options
            }
            None => {
                let (host, port) = self.host_port()?;
                MqttOptions::new(client_id, host, port)
            }
        };
        options.set_keep_alive(self.keepalive.max(Duration::from_secs(1)));
        // Incoming: whatever the broker may forward must be read and dropped by our own
        // validation, never refused by rumqttc, which drops the whole connection over one
        // oversized packet (a 64 KiB payload on a topic we subscribe to did exactly that).
        options.set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024);
        match (&self.username, self.password()?) {
            (Some(user), Some(password)) => {
                options.set_credentials(user.clone(), password);
            }
            (Some(user), None) => {
                options.set_credentials(user.clone(), String::new());
            }
            (None, Some(_)) => {
                return Err(Error::Credentials(
                    "a password is set but no --username / K3SENSE_USERNAME: set both or neither",
                ));
            }
            (None, None) => {}
        }
        Ok(options)
    }

    fn password(&self) -> Result<Option<String>> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::PasswordFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let first = text.lines().next().unwrap_or_default().to_owned();
            return Ok(Some(first));
        }
        Ok(self.password.clone())
    }
}

/// Exponential backoff with jitter, for reconnecting: many clients that lost the same broker
/// must not all come back in the same millisecond. Each delay is drawn from the upper half of
/// the current step ("equal jitter"), so it never falls below half the step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles per failure up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next delay, uniform in [step/2, step], where the step starts at `min` and doubles
    /// after each call up to `max`: so always at most `max`, and at least `min/2`.
    pub fn next_delay(&mut self) -> Duration {
        let upper = self.current;
        let lower = upper / 2;
        self.current = (self.current * 2).min(self.max);
        let spread = upper.saturating_sub(lower).as_millis() as u64;
        lower + Duration::from_millis(rand::random_range(0..=spread))
    }

    /// Call after a success, so the next failure starts small again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_addresses() {
        let c = |s: &str| MqttConfig::new(s).host_port();
        assert_eq!(c("broker:1883").unwrap(), ("broker".to_owned(), 1883));
        assert_eq!(c("[::1]:1883").unwrap(), ("::1".to_owned(), 1883));
        for bad in ["broker", ":1883", "broker:x", "broker:70000"] {
            assert!(matches!(c(bad), Err(Error::BadBrokerAddress(_))), "{bad}");
        }
    }

    #[test]
    fn parses_unix_socket_addresses() {
        let u = |s: &str| MqttConfig::new(s).unix_socket();
        assert_eq!(u("broker:1883").unwrap(), None);
        assert_eq!(
            u("unix:/run/k3sense/mqtt.sock").unwrap().as_deref(),
            Some("/run/k3sense/mqtt.sock")
        );
        assert_eq!(
            u("unix:@k3sense-1").unwrap().as_deref(),
            Some("\0k3sense-1")
        );
        for bad in ["unix:", "unix:@"] {
            assert!(matches!(u(bad), Err(Error::BadBrokerAddress(_))), "{bad}");
            assert!(MqttConfig::new(bad).mqtt_options("x").is_err(), "{bad}");
        }
        assert!(MqttConfig::new("unix:@k3sense-1").mqtt_options("x").is_ok());
    }

    #[test]
    fn password_file_first_line_and_errors() {
        let dir = std::env::temp_dir().join(format!("k3sense-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let mut c = MqttConfig::new("b:1");
        c.username = Some("u".into());
        c.password_file = Some(file.clone());
        assert_eq!(c.password().unwrap().as_deref(), Some("s3cret"));
        assert!(c.mqtt_options("x").is_ok());
        c.password_file = Some(dir.join("missing"));
        assert!(matches!(
            c.mqtt_options("x"),
            Err(Error::PasswordFile { .. })
        ));
        c.password_file = None;
        c.username = None;
        c.password = Some("p".into());
        assert!(matches!(c.mqtt_options("x"), Err(Error::Credentials(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn debug_redacts_the_password() {
        let mut c = MqttConfig::new("b:1");
        c.password = Some("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
