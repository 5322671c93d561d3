//! The rumqttd router and the links into it.
//!
//! We start `rumqttd::Router` ourselves and never use its listeners. The router's event
//! sender has a type rumqttd does not export, so it lives inside a closure: that closure
//! is the only way the rest of the broker reaches the router.
//!
//! `LinkBuilder::build` blocks its thread until the router answers, and the router never
//! answers a connection it refuses (a full slab, a client id it dislikes): it runs on the
//! blocking pool under a timeout, and the gateway only hands it client ids it has encoded
//! to be acceptable (see [`router_client_id`]).

use crate::codec::make_router_publish;
use bytes::Bytes;
use futures_util::FutureExt;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, PubRel, PubRelReason, PublishProperties, QoS};
use rumqttd::{Notification, Router, RouterConfig};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long we wait for the router to accept a new link before giving up.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
// The error is rumqttd's LinkError as text: the type itself is large.

type BuildLink = dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync;

/// A running router.
#[derive(Clone)]
pub struct RouterHandle {
    build: Arc<BuildLink>,
    internal: Arc<Mutex<InternalLink>>,
}

/// The broker's own link: publishes wills.
struct InternalLink {
    tx: LinkTx,
    next_pkid: u16,
}

impl RouterHandle {
    /// Starts the router thread. `max_connections` is our own limit; the router gets room
    /// for the overlap while old links are being torn down.
    ///
    /// The router keeps every message in an in-memory log per subscribed filter, for
    /// subscribers that have not read it yet (offline persistent sessions, slow readers).
    /// `max_queued_bytes` bounds that log: four segments of a quarter each (the active
    /// segment comes on top); past it the oldest segment is dropped. rumqttd's own default
    /// is ten segments of 100 MiB, about 1 GiB per filter.
    pub fn start(max_connections: usize, max_queued_bytes: usize) -> Result<RouterHandle, String> {
        const SEGMENTS: usize = 4;
        let config = RouterConfig {
            max_connections: max_connections.saturating_mul(2).saturating_add(64),
            max_outgoing_packet_count: 200,
            // rumqttd refuses segments under 1 KiB.
            max_segment_size: (max_queued_bytes / SEGMENTS).max(1024),
            max_segment_count: SEGMENTS,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, config).spawn();
        let build: Arc<BuildLink> = Arc::new(move |client_id: &str, clean: bool| {
            // Dynamic filters on: otherwise the router disconnects anyone publishing to a
            // topic nobody subscribed to yet.
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean)
                .dynamic_filters(true)
                .build()
                .map_err(|e: LinkError| e.to_string())
        });
        let (tx, mut rx, _ack) = build("moatmq-internal", true)
            .map_err(|e| format!("the router refused the broker's own link: {e}"))?;
        // Drain the internal link's acks and finish QoS 2 handshakes it started.
        let internal = Arc::new(Mutex::new(InternalLink { tx, next_pkid: 0 }));
        let drain = internal.clone();
        std::thread::Builder::new()
            .name("moatmq-internal-link".into())
            .spawn(move || {
                while let Ok(Some(n)) = rx.recv() {
                    if let Some(Packet::PubRec(rec, _)) = Option::<Packet>::from(n) {
                        if let Ok(mut link) = drain.lock() {
                            let rel = PubRel {
                                pkid: rec.pkid,
                                reason: PubRelReason::Success,
                            };
                            let _ = link.tx.send(Packet::PubRel(rel, None)).now_or_never();
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the internal link thread: {e}"))?;
        Ok(RouterHandle { build, internal })
    }

    /// Opens a link for a client; runs the blocking handshake off the async workers.
    pub async fn connect(
        &self,
        router_client_id: String,
        clean: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), ConnectError> {
        let build = self.build.clone();
        let job = tokio::task::spawn_blocking(move || build(&router_client_id, clean));
        match tokio::time::timeout(LINK_TIMEOUT, job).await {
            Ok(Ok(Ok(link))) => Ok(link),
            Ok(Ok(Err(e))) => Err(ConnectError::Link(e)),
            Ok(Err(_)) => Err(ConnectError::Link("link task failed".into())),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// Publishes a message as the broker itself (wills). Never retained: the router
    /// keeps no retained messages, moatmq serves them (`retained_index.rs`).
    pub fn publish(
        &self,
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        properties: Option<PublishProperties>,
    ) {
        let Ok(mut link) = self.internal.lock() else {
            return;
        };
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            _ => {
                link.next_pkid = link.next_pkid.checked_add(1).unwrap_or(1);
                link.next_pkid
            }
        };
        let publish = make_router_publish(topic, payload, qos, pkid);
        let _ = link
            .tx
            .send(Packet::Publish(publish, properties))
            .now_or_never();
    }
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The router refused or failed the link.
    #[error("router refused the link: {0}")]
    Link(String),
    /// The router did not answer in time (it is overloaded or stuck).
    #[error("router did not answer in time")]
    Timeout,
}

/// The client id the router sees: sessions are namespaced by identity, so two users with
/// the same client id get two sessions and neither can take over or read the other's.
/// Characters the router refuses (`/ + # $`) and our separators are percent-escaped.
pub fn router_client_id(username: Option<&str>, client_id: &str) -> String {
    let mut out = String::with_capacity(client_id.len() + 16);
    match username {
        None => out.push('-'),
        Some(u) => {
            out.push('u');
            for b in u.bytes() {
                out.push_str(&format!("{b:02x}"));
            }
        }
    }
    out.push(':');
    for c in client_id.chars() {
        match c {
            '%' | '/' | '+' | '#' | '$' | '.' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::router_client_id;

    #[test]
    fn router_ids_are_namespaced_and_safe() {
        assert_eq!(router_client_id(None, "c1"), "-:c1");
        assert_eq!(router_client_id(Some("al"), "c1"), "u616c:c1");
        assert_ne!(
            router_client_id(Some("a"), "x"),
            router_client_id(Some("b"), "x")
        );
        let id = router_client_id(Some("a"), "x/+#$%.y");
        assert!(!id.contains(['/', '+', '#', '$']), "{id}");
        assert_ne!(router_client_id(None, "%2F"), router_client_id(None, "/"));
    }
}
