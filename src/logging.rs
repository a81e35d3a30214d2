//! Logs: `tracing`, filtered by `RUST_LOG` (default `info`), as text or JSON lines on stderr;
//! rumqttd's alarms about normal disconnects are left out whatever `RUST_LOG` says
//! ([`QuietRumqttd`]).

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter, Layer, fmt,
    layer::{Context, SubscriberExt},
    util::SubscriberInitExt,
};

use crate::cli::LogFormat;

/// rumqttd logs every connection at `info`; a Pi's log does not need that.
const DEFAULT_FILTER: &str = "info,rumqttd=warn";

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only for a person at a terminal; a file or a log collector gets plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.finish().with(QuietRumqttd).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(QuietRumqttd)
            .init(),
    }
}

/// The lines the embedded rumqttd logs at ERROR for a normal disconnect: (target, message,
/// the `error` field as rumqttd's `Debug` prints it).
///
/// - `router-drop error=Recv(Disconnected)` (rumqttd 0.20, `server/broker.rs`, `remote()`): the
///   connection's task found its channel from rumqttd's router closed. The router closes it when
///   it has handled the connection's end, and in k3sense every connection to rumqttd is the
///   broker proxy's own (see broker/src/embedded.rs): the proxy ends its upstream connection for
///   every client that leaves, cleanly or not, and for its start-up probe. So this line comes
///   once per client disconnect, at every start (the probe) and every stop of `k3sense all`,
///   and says nothing is wrong. The one abnormal cause, the router task ending, is logged by
///   rumqttd itself (`Router done!`), and that line still shows, as does `router-drop` with any
///   other error.
///
/// Everything else rumqttd logs at WARN or ERROR (a listener that cannot bind, a bad CONNECT on
/// its internal port, a full router) still reaches the log.
const NORMAL_RUMQTTD_LINES: &[(&str, &str, &str)] = &[(
    "rumqttd::server::broker",
    "router-drop",
    "Recv(Disconnected)",
)];

/// Drops [`NORMAL_RUMQTTD_LINES`] before any output sees them, so a newcomer starting and
/// stopping `k3sense all` sees no ERROR for nothing; filtering on the message and field values
/// (not only the target) keeps rumqttd's real errors visible.
struct QuietRumqttd;

impl<S: Subscriber> Layer<S> for QuietRumqttd {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        !is_normal_rumqttd_line(event)
    }
}

fn is_normal_rumqttd_line(event: &Event<'_>) -> bool {
    let metadata = event.metadata();
    if *metadata.level() != Level::ERROR || !metadata.target().starts_with("rumqttd::") {
        return false;
    }
    let mut fields = MessageAndError::default();
    event.record(&mut fields);
    NORMAL_RUMQTTD_LINES.iter().any(|(target, message, error)| {
        metadata.target() == *target && fields.message == *message && fields.error == *error
    })
}

/// The `message` and `error` fields of an event, as `Debug` prints them.
#[derive(Default)]
struct MessageAndError {
    message: String,
    error: String,
}

impl tracing::field::Visit for MessageAndError {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The shape of rumqttd 0.20's `link::local::LinkError::Recv(flume::RecvError::Disconnected)`,
    /// whose `Debug` is what rumqttd logs as `error=…`.
    #[derive(Debug)]
    #[allow(dead_code)] // only ever printed with `Debug`, as rumqttd's is
    enum LinkError {
        Recv(RecvError),
        Send(&'static str),
    }
    #[derive(Debug)]
    enum RecvError {
        Disconnected,
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a subscriber built like [`init`]'s writes for rumqttd's lines (emitted here with
    /// rumqttd's targets, messages and fields; `tests/quiet_start_stop.rs` runs the real ones).
    #[test]
    fn drops_the_normal_disconnect_line_and_nothing_else() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = fmt()
            .with_env_filter(EnvFilter::new(DEFAULT_FILTER))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .with(QuietRumqttd);
        tracing::subscriber::with_default(subscriber, || {
            let normal = LinkError::Recv(RecvError::Disconnected);
            tracing::error!(target: "rumqttd::server::broker", error = ?normal, "router-drop");
            let other = LinkError::Send("full");
            tracing::error!(target: "rumqttd::server::broker", error = ?other, "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = ?normal, "Remote link error");
            tracing::error!(target: "rumqttd::router::routing", reason = "x", "Router done!");
            tracing::error!(target: "rumqttd::server::broker", error = "AddrInUse", "Server error - V4");
            tracing::warn!(target: "rumqttd::router::routing", "no space for new connection");
            tracing::error!(error = ?normal, "router-drop from k3sense itself");
        });
        let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 6, "{log}");
        assert!(
            !lines
                .iter()
                .any(|l| l.ends_with("router-drop error=Recv(Disconnected)")),
            "{log}"
        );
        for kept in [
            "router-drop error=Send(\"full\")",
            "Remote link error error=Recv(Disconnected)",
            "Router done! reason=\"x\"",
            "Server error - V4 error=\"AddrInUse\"",
            "no space for new connection",
            "router-drop from k3sense itself error=Recv(Disconnected)",
        ] {
            assert!(log.contains(kept), "{kept:?} missing from\n{log}");
        }
    }
}
