//! Whether NATS still answers over a connection that looks up. The NATS client finds a
//! dead connection only when the socket closes or its pings go unanswered, and it pings
//! only an idle connection: a node whose traffic keeps its connection busy (a transfer
//! message every few seconds is enough) on a network path that stalls (a partition
//! that drops packets without closing anything, a stuck proxy) stayed ready,
//! accepting clients it could not route and holding their QoS 1/2 publishes, for as
//! long as the stall. So the node asks NATS a question of its own every [`EVERY`]
//! (the transfer stream's info: a JetStream API round trip the node makes anyway to
//! set the stream up, so its permissions allow it); after
//! [`MISSES`] unanswered in a row it makes the client reconnect, which makes it unready
//! (the `Disconnected` event) until the path carries traffic again.

use crate::metrics::Metrics;
use std::sync::Weak;
use std::time::Duration;

/// How often the node asks.
const EVERY: Duration = Duration::from_secs(5);
/// How long an answer may take.
const WAIT: Duration = Duration::from_secs(5);
/// Unanswered questions in a row that make the client reconnect.
const MISSES: u32 = 2;

/// Asks NATS over `client` about the transfer stream `stream` while the broker (its
/// `metrics`) is there.
pub async fn run(client: async_nats::Client, stream: String, metrics: Weak<Metrics>) {
    let subject = format!("$JS.API.STREAM.INFO.{stream}");
    let mut misses = 0;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if metrics.strong_count() == 0 {
            return;
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            misses = 0;
            continue;
        }
        let asked = client.request(subject.clone(), bytes::Bytes::new());
        match tokio::time::timeout(WAIT, asked).await {
            Ok(Ok(_)) => misses = 0,
            // Answered with an error (no such stream yet, or no responders): NATS is there.
            Ok(Err(e)) if e.kind() != async_nats::RequestErrorKind::TimedOut => misses = 0,
            _ => {
                misses += 1;
                if misses >= MISSES {
                    misses = 0;
                    tracing::warn!(
                        seconds = (WAIT * MISSES).as_secs(),
                        "cluster: NATS does not answer over a connection that looks up; \
                         reconnecting"
                    );
                    if let Err(e) = client.force_reconnect().await {
                        tracing::debug!("cluster: reconnecting to NATS: {e}");
                    }
                }
            }
        }
    }
}
