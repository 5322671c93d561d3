#![forbid(unsafe_code)]
//! moatmq's broker: listeners, the per-connection gateway and the rumqttd router wiring.
//!
//! Data flow: listener (TCP | TLS | WebSocket) -> gateway (one task per connection:
//! CONNECT, authentication, then every packet checked in both directions) -> rumqttd
//! router (topic tree, sessions, QoS state) through a local link.

mod acks;
mod admission;
mod admit;
mod audit;
#[doc(hidden)] // the subject mapping, for the cluster tests: not a stable API
pub mod cluster;
mod cluster_groups;
mod cluster_input;
#[doc(hidden)] // reachable for the fuzz harness (fuzz/): not a stable API
pub mod codec;
mod connect;
mod cut;
mod durable;
mod error;
mod event;
mod forwarded;
mod gateway;
mod handshake_log;
mod hashing;
mod hooks;
mod inbound;
mod listener;
mod login_gate;
mod metrics;
mod origin;
pub mod policy;
mod preflight;
#[doc(hidden)] // reachable for the fuzz harness (fuzz/): not a stable API
pub mod proxy;
mod ratelimit;
mod resubscribe;
pub mod retained;
mod retained_index;
mod router;
mod server;
mod session_expiry;
mod session_restore;
mod sessions;
mod shared;
mod spare_links;
mod sys;
mod sys_tree;
mod timers;
mod tls;
pub mod topic;
mod transport;
mod will;
mod ws_upgrade;

pub use error::BrokerError;
pub use preflight::validate;
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use router::RouterFault;
pub use router::{RouterFailure, WEDGED_AFTER};
pub use server::{run, shutdown_signal, Broker, Reloader};
