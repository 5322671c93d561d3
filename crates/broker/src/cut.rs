//! Where a cluster node's traffic stood (`cluster/`); here apart, since the session
//! store (`durable/`) carries it to the node's parks too.

/// Where a node's traffic stood at one moment, to find in the transfer stream what
/// came after: every message of other nodes up to stream sequence `stream` had been
/// admitted on the node, and its own messages numbered up to `forwarded` (ids
/// `<origin>:<number>`, `origin` being `<node>:<epoch>`) were in its router; its own
/// numbered later are in the stream after `own_from`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cut {
    pub stream: u64,
    pub origin: String,
    pub forwarded: u64,
    pub own_from: u64,
}
