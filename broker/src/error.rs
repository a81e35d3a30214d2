//! The one error type of the broker crate.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Why the broker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address is taken or not ours to bind.
    #[error(
        "cannot listen on {addr}: {source}. Is another MQTT broker (mosquitto, another k3sense) running? Stop it or pick another address with {flag}"
    )]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The flag that sets it (`--listen`, `--tls-listen`, `--metrics-listen`).
        flag: &'static str,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// rumqttd started but never accepted a connection.
    #[error(
        "the broker did not start listening on {addr} within {waited:?}; see the log lines above"
    )]
    NotListening {
        /// The address from `--listen`.
        addr: SocketAddr,
        /// How long we waited.
        waited: Duration,
    },
    /// rumqttd's thread ended.
    #[error("the broker stopped: {0}")]
    Stopped(String),
    /// The users file could not be read.
    #[error("cannot read the users file {path}: {source}")]
    UsersFile {
        /// The path from `--users-file`.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A line of the users file is not `username:password[:role]`.
    #[error(
        "users file {path}, line {line}: {reason}. Each line must be `username:password` or `username:password:ROLE` with ROLE one of admin, reader, gateway, publisher:<sensor-ids>|* (blank lines and lines starting with # are ignored; see broker/README.md)"
    )]
    UsersSyntax {
        /// The path from `--users-file`.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TLS certificate or key could not be used.
    #[error(
        "TLS: {path}: {reason}. --tls-cert takes a PEM certificate chain, --tls-key its PEM private key"
    )]
    Tls {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `--topic-prefix` cannot form topics.
    #[error(transparent)]
    Prefix(#[from] k3sense_protocol::Error),
    /// The OS refused to start a thread.
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
