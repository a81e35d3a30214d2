//! The one error type of the broker crate.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Why the broker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address is taken or not ours to bind.
    #[error(
        "cannot listen on {addr}: {source}. Is another MQTT broker (mosquitto, another k3sense) running? Stop it or pick another address with --listen"
    )]
    Bind {
        /// The address from `--listen`.
        addr: SocketAddr,
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
    /// A line of the users file is not `username:password`.
    #[error(
        "users file {path}, line {line}: {reason}. Each line must be `username:password` (blank lines and lines starting with # are ignored)"
    )]
    UsersSyntax {
        /// The path from `--users-file`.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The OS refused to start a thread.
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
