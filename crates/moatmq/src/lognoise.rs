//! Drops the known-harmless WARN/ERROR lines our dependencies print for ordinary
//! traffic, so that at the default level every warning or error is worth reading.
//!
//! Matched by target *and* message prefix, never by target alone, so any other warning
//! or error from the same crate still shows:
//! - rustls WARN "Illegal SNI extension: ignoring IP address presented as hostname":
//!   clients that connect by IP address (mosquitto_pub -h 10.0.0.5) send it as SNI;
//!   rustls ignores it and the handshake goes on.
//! - rumqttd ERROR "no-connection id N is already gone": the router hears of a link's end
//!   twice (the gateway's DISCONNECT, then the link closing); the gateway has already
//!   logged the disconnect with its reason.
//! - rumqttd ERROR "Duplicate client_id, dropping previous connection": an ordinary MQTT
//!   session takeover, which the gateway logs as `session_taken_over`.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// (target prefix, message prefix, message suffix) of each known line.
const NOISE: &[(&str, &str, &str)] = &[
    (
        "rustls",
        "Illegal SNI extension: ignoring IP address presented as hostname",
        "",
    ),
    ("rumqttd", "no-connection id ", " is already gone"),
    (
        "rumqttd",
        "Duplicate client_id, dropping previous connection",
        "",
    ),
];

/// A per-layer filter that drops the lines in [`NOISE`].
pub struct KnownNoise;

impl<S> Filter<S> for KnownNoise {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        // Only warnings and errors are noise worth the look at the message.
        if *meta.level() > Level::WARN {
            return true;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        // Records from the `log` crate (rustls) carry their target as a field.
        let target = fields.log_target.as_deref().unwrap_or(meta.target());
        !NOISE.iter().any(|(t, prefix, suffix)| {
            target.starts_with(t)
                && fields.message.starts_with(prefix)
                && fields.message.ends_with(suffix)
        })
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "log.target" => self.log_target = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A rustls `log` WARN record as tracing-log forwards it: target `log`, the real
    /// target in the `log.target` field.
    fn rustls_log(message: &str) {
        let target = "rustls::msgs::handshake";
        tracing::warn!(target: "log", message, log.target = target);
    }

    #[test]
    fn known_noise_is_dropped_and_everything_else_kept() {
        let _one_at_a_time = crate::DISPATCHER_TESTS
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_filter(KnownNoise);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            // As tracing-log forwards a rustls `log` record.
            rustls_log("Illegal SNI extension: ignoring IP address presented as hostname (3132)");
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
            tracing::error!(target: "rumqttd::router::routing",
                "Duplicate client_id, dropping previous connection with connection_id: {}", 1);
            // Kept: other rustls and rumqttd problems, the same words elsewhere.
            rustls_log("Illegal SNI extension: duplicate host_name received");
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is busy", 7);
            tracing::error!(target: "moatmq_broker::router", "no-connection id 3 is already gone");
            tracing::info!(target: "rumqttd::router", "no-connection id 3 is already gone");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("duplicate host_name"), "{text}");
        assert!(lines[1].contains("is busy"), "{text}");
        assert!(lines[2].contains("moatmq_broker::router"), "{text}");
        assert!(lines[3].contains("INFO"), "{text}");
    }
}
