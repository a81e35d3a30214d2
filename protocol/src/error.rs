//! The one error type of the protocol crate.

/// Why a payload, topic or identifier does not satisfy the contract.
///
/// Each variant names the rule that was broken, so a log line or an HTTP error can tell the
/// sender exactly what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The payload is larger than [`crate::MAX_PAYLOAD_BYTES`].
    #[error("payload is {size} bytes, more than the {max} a reading may take")]
    TooLarge {
        /// Size of the payload that was refused.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not a JSON object of the right shape (syntax error, wrong type, not UTF-8).
    #[error("payload is not a reading: {0}")]
    Malformed(String),
    /// A field the contract requires is absent or `null`.
    #[error("field `{0}` is missing")]
    MissingField(&'static str),
    /// A number is NaN or infinite.
    #[error("field `{field}` is not a finite number")]
    NotFinite {
        /// The offending field.
        field: &'static str,
    },
    /// A value lies outside what the sensor model can report.
    #[error("field `{field}` is {value}, outside the {model} range {min}..={max}")]
    OutOfRange {
        /// The offending field.
        field: &'static str,
        /// The value that was sent.
        value: f64,
        /// The sensor model whose range applies.
        model: &'static str,
        /// Lowest value the model reports.
        min: f64,
        /// Highest value the model reports.
        max: f64,
    },
    /// The sensor model is not one k3sense knows.
    #[error("model `{0}` is unknown (expected dht11 or dht22)")]
    UnknownModel(String),
    /// `read_at` is not the contract's form: RFC 3339 in UTC with exactly milliseconds and `Z`,
    /// no leap second.
    #[error(
        "field `read_at` is `{0}`, not a UTC timestamp with milliseconds such as 2026-11-27T04:00:00.123Z"
    )]
    BadTimestamp(String),
    /// `seq` is above [`crate::MAX_SEQ`].
    #[error("field `seq` is {0}, above the largest allowed ({max})", max = crate::MAX_SEQ)]
    SeqTooLarge(u64),
    /// A sensor id breaks the DNS-label rule.
    #[error(
        "sensor id `{0}` is not a DNS label: use 1-63 characters a-z, 0-9 and '-', starting and ending with a letter or digit"
    )]
    BadSensorId(String),
    /// A topic prefix that could not form valid topics.
    #[error(
        "topic prefix `{0}` is not usable: it must be non-empty, must not start with '$' or end with '/', and must not contain '+', '#' or NUL"
    )]
    BadPrefix(String),
    /// The `--broker` value is not `host:port`, `unix:PATH` or `unix:@NAME`.
    #[error(
        "broker address `{0}` is not host:port (for example broker:1883 or 127.0.0.1:1883), unix:PATH or unix:@NAME"
    )]
    BadBrokerAddress(String),
    /// The password file could not be read.
    #[error("cannot read the password file {path}: {reason}")]
    PasswordFile {
        /// The path from `--password-file`.
        path: std::path::PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// A password without a username, or the reverse.
    #[error("{0}")]
    Credentials(&'static str),
    /// The MQTT client's request queue is full (the broker is away or slow): try again later,
    /// or raise the client's capacity.
    #[error("the MQTT client's queue is full: the broker is unreachable or slow; try again later")]
    ClientBusy,
    /// The MQTT client stopped (after a goodbye, or its events were dropped).
    #[error("the MQTT client has stopped")]
    ClientStopped,
    /// An availability payload other than `online` or `offline`.
    #[error("availability payload must be `online` or `offline`")]
    BadAvailability,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
