//! `rumqttd-ref`: plain rumqttd with its own MQTT 3.1.1 listener, no auth, no TLS.
//!
//! The reference point for benchmarks: the same router moatmq wraps, with the same router
//! settings moatmq uses (crates/broker/src/router.rs), but rumqttd's own remote links in
//! place of moatmq's gateway. Never expose it: it accepts anyone.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;

#[derive(Parser)]
#[command(about = "Plain rumqttd (MQTT 3.1.1 over TCP, no auth) for benchmark comparisons")]
struct Args {
    /// Address to listen on; loopback unless you know why not.
    #[arg(long, default_value = "127.0.0.1:1884")]
    bind: SocketAddr,
    /// Largest accepted packet payload, bytes (moatmq's default limits.max_packet_size).
    #[arg(long, default_value_t = 1_048_576)]
    max_payload_size: usize,
    /// Unacknowledged QoS 1/2 publishes per client (moatmq's default limits.max_inflight).
    #[arg(long, default_value_t = 100)]
    max_inflight: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Mirrors RouterHandle::start in crates/broker with the default max_connections.
    let router = RouterConfig {
        max_connections: 10_000 * 2 + 64,
        max_outgoing_packet_count: 200,
        max_segment_size: 100 * 1024 * 1024,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let server = ServerSettings {
        name: "v4-ref".into(),
        listen: args.bind,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: args.max_payload_size,
            max_inflight_count: args.max_inflight,
            auth: None,
            external_auth: None,
            // As in moatmq: publishing to a topic nobody subscribed to is not an error.
            dynamic_filters: true,
        },
    };
    let config = Config {
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    };
    eprintln!("rumqttd-ref: listening on {} (no auth)", args.bind);
    Broker::new(config).start().context("rumqttd stopped")?;
    Ok(())
}
