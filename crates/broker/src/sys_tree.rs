//! The broadcast side of the `$SYS` tree (`sys.rs` publishes, gateways holding a
//! `$SYS/...` subscription listen), kept in `Shared`.

use moatmq_store::RetainedMessage;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Updates a slow subscriber may fall behind before it gets the current values again
/// from the retained set instead.
const BACKLOG: usize = 4;

/// One update: the messages whose values changed.
pub type Update = Arc<Vec<Arc<RetainedMessage>>>;

/// The broadcast side of the tree, held in `Shared`.
pub struct SysTree {
    updates: broadcast::Sender<Update>,
}

impl Default for SysTree {
    fn default() -> SysTree {
        SysTree {
            updates: broadcast::channel(BACKLOG).0,
        }
    }
}

impl SysTree {
    /// Live updates from now on, for a gateway holding a `$SYS/...` subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Hands an update to every subscribed gateway (none listening is fine).
    pub fn send(&self, update: Update) {
        let _ = self.updates.send(update);
    }
}
