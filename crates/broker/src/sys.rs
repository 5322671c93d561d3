//! The `$SYS/broker/...` tree: broker statistics under Mosquitto 2.0's topic names and
//! payload formats, updated every `sys.interval` seconds (0: no tree at all).
//!
//! Every value is read from the counters and gauges the broker keeps anyway (the
//! Prometheus metrics, the session table, the retained set): nothing here is on a
//! message's path. Only aggregates are published, never a client id, username or topic.
//!
//! The messages are retained, QoS 0, owned by the broker. They go into the retained set
//! (so a subscriber that comes later gets the current values) as memory-only topics: the
//! encrypted store never writes them and they count toward no retained quota. Like
//! Mosquitto, which does not persist `$SYS` either, a restart starts the tree over. Live
//! updates reach subscribed gateways over a broadcast channel, not through the router:
//! rumqttd refuses (disconnects) any subscription to a `$` filter, so the gateway keeps
//! `$SYS/...` subscriptions itself and sends each update through its deliver step (read
//! ACL, packet size), like a retained message.
//!
//! Who may read: only an explicit ACL grant naming `$SYS/...` (a leading wildcard never
//! matches a `$` topic, so neither the built-in tenant rule nor `topic read #` does).
//! Nobody may write: `Policy::may_publish` refuses `$SYS/...` to every client.
//!
//! Like Mosquitto, a value is published at start and then only when it changed; the load
//! figures are Mosquitto's exponential moving averages of the per-minute rate.

use crate::shared::Shared;
use moatmq_store::RetainedMessage;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::sys_tree::Update;
/// What every topic of the tree starts with.
pub use crate::topic::{is_sys, SYS_PREFIX as PREFIX};

/// The quota owner of the tree's messages (no identity contains `/`).
const OWNER: &str = "/broker";

/// Publishes the tree every `sys.interval` seconds until the task is dropped.
pub async fn run(shared: Arc<Shared>) {
    let seconds = shared.config.sys.interval;
    if seconds == 0 {
        return;
    }
    let mut state = State::new(Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(seconds));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let values = state.values(&shared, Instant::now());
        publish(&shared, values);
    }
}

/// Puts `values` into the retained set and sends them to subscribed gateways.
fn publish(shared: &Shared, values: Vec<(String, String)>) {
    if values.is_empty() {
        return;
    }
    let mut changed = Vec::with_capacity(values.len());
    for (topic, payload) in values {
        let msg = RetainedMessage {
            topic,
            payload: payload.into_bytes(),
            qos: 0,
            properties: None,
            expires_at: None,
            owner: Some(OWNER.into()),
        };
        changed.push(Arc::new(msg.clone()));
        // Memory-only topics are outside every bound: this cannot be refused.
        if let Err(why) = shared.retained_index.set(msg) {
            tracing::warn!(reason = why.label(), "$SYS value not retained");
        }
    }
    // No receiver (nobody subscribed) is not an error.
    shared.sys.send(Arc::new(changed));
}

/// The counters a load average follows, read at one tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    messages_received: u64,
    messages_sent: u64,
    bytes_received: u64,
    bytes_sent: u64,
    dropped: u64,
    sockets: u64,
    connections: u64,
}

impl Counts {
    /// `(load topic family, value)` in Mosquitto's order.
    fn each(&self) -> [(&'static str, u64); 9] {
        [
            ("messages/received", self.messages_received),
            ("messages/sent", self.messages_sent),
            ("publish/dropped", self.dropped),
            ("publish/received", self.messages_received),
            ("publish/sent", self.messages_sent),
            ("bytes/received", self.bytes_received),
            ("bytes/sent", self.bytes_sent),
            ("sockets", self.sockets),
            ("connections", self.connections),
        ]
    }
}

/// The averaging windows of the load figures, in seconds, with their topic suffix.
const WINDOWS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

/// What the tree has published, to send only what changed.
struct State {
    started: Instant,
    last_tick: Option<(Instant, Counts)>,
    /// Current moving average per load topic.
    loads: HashMap<String, f64>,
    /// Last published payload per topic.
    published: HashMap<String, String>,
    clients_maximum: u64,
    rss_maximum: u64,
}

impl State {
    fn new(started: Instant) -> State {
        State {
            started,
            last_tick: None,
            loads: HashMap::new(),
            published: HashMap::new(),
            clients_maximum: 0,
            rss_maximum: 0,
        }
    }

    /// The `(topic, payload)` pairs to publish at `now`: everything the first time, then
    /// what changed.
    fn values(&mut self, shared: &Shared, now: Instant) -> Vec<(String, String)> {
        let m = &shared.metrics;
        let (connected, disconnected, offline_filters) = shared.sessions.counts();
        let total = (connected + disconnected) as u64;
        self.clients_maximum = self.clients_maximum.max(total);
        let sockets = shared
            .config
            .listener
            .iter()
            .map(|l| {
                m.connections_total
                    .get_or_create(&crate::metrics::ListenerLabel {
                        listener: l.name.clone(),
                    })
                    .get()
            })
            .sum();
        let counts = Counts {
            messages_received: m.messages_in.get(),
            messages_sent: m.messages_out.get(),
            bytes_received: m.bytes_in.get(),
            bytes_sent: m.bytes_out.get(),
            dropped: m.session_messages_dropped.get(),
            sockets,
            // Every CONNECT that reached authentication.
            connections: m.auth_success.get() + m.auth_failure.get(),
        };
        let subscriptions = u64::try_from(m.subscriptions.get()).unwrap_or(0) + offline_filters;
        let mut values: Vec<(String, String)> = vec![
            (
                "version".into(),
                format!("moatmq version {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "uptime".into(),
                format!("{} seconds", now.duration_since(self.started).as_secs()),
            ),
        ];
        let mut int = |name: &str, v: u64| values.push((name.into(), v.to_string()));
        int("clients/connected", connected as u64);
        int("clients/active", connected as u64);
        int("clients/disconnected", disconnected as u64);
        int("clients/inactive", disconnected as u64);
        int("clients/total", total);
        int("clients/maximum", self.clients_maximum);
        int("messages/received", counts.messages_received);
        int("messages/sent", counts.messages_sent);
        int("publish/messages/received", counts.messages_received);
        int("publish/messages/sent", counts.messages_sent);
        int("publish/messages/dropped", counts.dropped);
        int("bytes/received", counts.bytes_received);
        int("bytes/sent", counts.bytes_sent);
        int("subscriptions/count", subscriptions);
        int(
            "retained messages/count",
            shared.retained_index.len() as u64,
        );
        if let Some(rss) = crate::metrics::resident_memory_bytes() {
            self.rss_maximum = self.rss_maximum.max(rss);
            int("heap/current", rss);
            int("heap/maximum", self.rss_maximum);
        }
        self.loads(now, counts, &mut values);
        values
            .into_iter()
            .filter_map(|(name, payload)| {
                let topic = format!("{PREFIX}broker/{name}");
                if self.published.get(&topic) == Some(&payload) {
                    return None;
                }
                self.published.insert(topic.clone(), payload.clone());
                Some((topic, payload))
            })
            .collect()
    }

    /// Mosquitto's load figures: the per-minute rate over the last interval, averaged
    /// with weight `exp(-interval / window)` on the previous figure (0.00 at start).
    fn loads(&mut self, now: Instant, counts: Counts, values: &mut Vec<(String, String)>) {
        let previous = self.last_tick.replace((now, counts));
        let (dt, before) = match previous {
            Some((at, before)) => (now.duration_since(at).as_secs_f64(), Some(before)),
            None => (0.0, None),
        };
        for (i, (family, value)) in counts.each().into_iter().enumerate() {
            let before = before.map(|b| b.each()[i].1);
            for (window, suffix) in WINDOWS {
                let name = format!("load/{family}/{suffix}");
                let current = self.loads.get(&name).copied().unwrap_or(0.0);
                let next = match before {
                    Some(b) if dt > 0.0 => {
                        let rate = value.saturating_sub(b) as f64 * 60.0 / dt;
                        moving_average(current, rate, dt, window)
                    }
                    _ => current,
                };
                // Mosquitto publishes a load only once it moved by 0.01 or more.
                let shown = format!("{next:.2}");
                let moved = (next - current).abs() >= 0.01 || before.is_none();
                if moved {
                    self.loads.insert(name.clone(), next);
                    values.push((name, shown));
                }
            }
        }
    }
}

/// The next value of an exponential moving average over `window` seconds after `dt`
/// seconds at `rate`.
fn moving_average(current: f64, rate: f64, dt: f64, window: f64) -> f64 {
    let exponent = (-dt / window).exp();
    rate + exponent * (current - rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_moving_average_is_mosquittos() {
        // A steady 120 messages per minute for one 10 s interval from 0.
        let one = moving_average(0.0, 120.0, 10.0, 60.0);
        assert!((one - 120.0 * (1.0 - (-10.0f64 / 60.0).exp())).abs() < 1e-9);
        assert!((one - 18.42).abs() < 0.01, "{one}");
        // It converges on the rate, the 1 min window first.
        let (mut fast, mut slow) = (0.0, 0.0);
        for _ in 0..60 {
            fast = moving_average(fast, 120.0, 10.0, 60.0);
            slow = moving_average(slow, 120.0, 10.0, 900.0);
        }
        assert!((fast - 120.0).abs() < 0.01, "{fast}");
        // Ten minutes are two thirds of the 15 min window: 1 - e^(-2/3) of the rate.
        assert!(
            (slow - 120.0 * (1.0 - (-600.0f64 / 900.0).exp())).abs() < 0.01,
            "{slow}"
        );
        // With no traffic it decays.
        assert!(moving_average(100.0, 0.0, 60.0, 60.0) < 37.0);
    }

    #[test]
    fn only_the_tree_is_the_tree() {
        assert!(is_sys("$SYS/broker/uptime"));
        assert!(is_sys("$SYS/#"));
        assert!(!is_sys("$SYSTEM/x"));
        assert!(!is_sys("$SYS"));
        assert!(!is_sys("a/$SYS/x"));
        assert!(!is_sys("$share/g/$SYS/#"));
    }
}
