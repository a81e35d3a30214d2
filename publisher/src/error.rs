//! The one error type of the publisher crate.

/// Why the publisher could not start. Sensor and broker trouble at run time is not an error
/// here: it is logged, counted, reported as `offline`, and retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting breaks the contract (bad sensor id, prefix, broker address, password file).
    #[error(transparent)]
    Config(#[from] k3sense_protocol::Error),
    /// A flag value that makes no sense.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
