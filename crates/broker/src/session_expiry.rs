//! Session expiry: rumqttd keeps a persistent session forever and knows only "clean or
//! not", so the gateway expires disconnected sessions itself (MQTT 5 session expiry,
//! capped by `limits.max_session_expiry`; 3.1.1 persistent sessions after the cap).

use crate::shared::Shared;
use moatmq_store::SessionKey;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use std::sync::Arc;
use std::time::Duration;

/// Expires the disconnected session `router_id` after `after`, unless its client is
/// back by then ([`cancel`]).
pub fn expire_after(shared: &Arc<Shared>, router_id: &str, key: SessionKey, after: Duration) {
    let (s, id) = (shared.clone(), router_id.to_string());
    shared
        .session_timers
        .start(router_id, after, move || async move {
            // A client that is back holds the id: its session is not expired.
            if let (true, Some(_hold)) = (s.session_timers.fire(&id), s.sessions.try_hold(&id)) {
                discard(&s, &id, &key).await;
            }
        });
}

/// The session's client is back: its expiry is off.
pub fn cancel(shared: &Shared, router_id: &str) {
    shared.session_timers.cancel(router_id);
}

/// Drops a disconnected session's state in the router and the session store: a clean link under the same
/// router client id, closed at once. The caller holds the router client id
/// (`sessions.rs`), so no live connection is taken over inside the router.
pub async fn discard(shared: &Shared, router_id: &str, key: &SessionKey) {
    shared.sessions.forget(router_id);
    if let Some(book) = &shared.durable {
        book.remove(key);
    }
    if let Some(cluster) = &shared.cluster {
        // Ended here: its entry leaves the ownership bucket if this node wrote it last.
        cluster.owners.release(router_id).await;
        cluster.owners.forget_offline(router_id);
    }
    clear_router(shared, router_id).await;
}

/// Drops what the router keeps under `router_id` (subscriptions, queue, messages in
/// flight): a clean link under that id, closed at once. The caller holds the router
/// client id.
pub(crate) async fn clear_router(shared: &Shared, router_id: &str) {
    if let Ok((mut tx, _rx, _ack)) = shared.router.connect(router_id.to_string(), true).await {
        let bye = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        let _ = futures_util::FutureExt::now_or_never(tx.send(bye));
    }
}
