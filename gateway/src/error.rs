//! The one error type of the gateway crate, and the JSON body every HTTP error answers with.

use std::net::SocketAddr;

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// Why the gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP address is taken or not ours to bind.
    #[error(
        "cannot listen on {addr}: {source}. Is another gateway running? Pick another address with --listen"
    )]
    Bind {
        /// The address from `--listen`.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    /// A setting breaks the contract (bad prefix, bad broker address, unreadable password file).
    #[error(transparent)]
    Config(#[from] k3sense_protocol::Error),
    /// An `--allowed-origins` entry is not an origin.
    #[error(
        "allowed origin `{0}` is not an origin such as https://sensors.example.org (scheme://host[:port], no path)"
    )]
    BadOrigin(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A JSON error body: `{"error": "..."}`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
