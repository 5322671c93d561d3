//! Start-up of durable sessions: the stored sessions are brought back before the
//! listeners open (`durable/` keeps them while the broker runs). Each one's
//! subscriptions are made again in the router, its expiry timer and its delayed will
//! are scheduled, and it counts against its owner's `max_sessions_per_user`.

use crate::durable::{Loaded, SessionBook};
use crate::event::Event;
use crate::policy::Identity;
use crate::resubscribe::router_subscribes;
use crate::router::router_client_id;
use crate::shared::{ConnInfo, Shared};
use futures_util::StreamExt;
use moatmq_store::{now_unix, SubscriptionOptions};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::Notification;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Brings the stored sessions back before the listeners open: each one's subscriptions
/// are made again in the router (which then queues what arrives while its client is
/// away), counted against its owner's `max_sessions_per_user`, and its expiry counts on
/// from its disconnection (from now for one that was connected when the broker stopped).
pub async fn restore(shared: &Arc<Shared>, loaded: Vec<Loaded>) {
    let Some(book) = &shared.durable else {
        return;
    };
    let weak: Weak<Shared> = Arc::downgrade(shared);
    if shared.cluster.is_some() {
        // Offline sessions stay parked in NATS as they change (`cluster/park.rs`).
        if let Some(feed) = book.park_feed() {
            tokio::spawn(crate::cluster::park::run(weak.clone(), feed));
        }
    }
    book.run(Arc::new(move |key, limit| {
        if let Some(shared) = weak.upgrade() {
            shared.emit_global(Event::SessionQueueFull {
                owner: key.owner.as_deref(),
                client_id: &key.client_id,
                limit,
            });
        }
    }));
    let started = Instant::now();
    let count = loaded.len();
    // Each session's router link is a round trip through the router thread: many at
    // once keep it busy while each waits for its SUBACK.
    futures_util::stream::iter(loaded)
        .for_each_concurrent(RESTORE_AT_ONCE, |l| restore_one(shared, book, l))
        .await;
    if count > 0 {
        info!(
            sessions = count,
            took_ms = started.elapsed().as_millis() as u64,
            "persistent sessions restored"
        );
    }
}

/// How many stored sessions are made again in the router at a time at start-up.
const RESTORE_AT_ONCE: usize = 64;

async fn restore_one(shared: &Arc<Shared>, book: &SessionBook, loaded: Loaded) {
    let Loaded {
        key,
        mut meta,
        will,
    } = loaded;
    let now = now_unix();
    {
        let owner = key.owner.as_deref();
        let router_id = router_client_id(owner, &key.client_id);
        if let Some(w) = will {
            let identity = Identity {
                username: key.owner.clone(),
                client_id: key.client_id.clone(),
            };
            let w = crate::will::restored(w, identity, restored_connection());
            crate::will::publish_will(shared, &router_id, Some(&key), w, true);
        }
        if let Err(e) = resubscribe(shared, &router_id, owner, &meta.subscriptions).await {
            warn!(client_id = %key.client_id, error = %e, "stored session not restored in the router");
        }
        if shared
            .sessions
            .resume(&router_id, owner, usize::MAX)
            .is_ok()
        {
            shared.sessions.save(&router_id, &meta.subscriptions);
        }
        if let Some(cluster) = &shared.cluster {
            // Last held here: handed over if another node claims it; parked anew from
            // the store meanwhile (`cluster/park.rs`).
            cluster.kept_offline(&router_id, key.clone());
        }
        let since = *meta.disconnected_at.get_or_insert(now);
        book.update(&key, meta.clone());
        let left = since
            .saturating_add(meta.expiry_interval)
            .saturating_sub(now);
        crate::session_expiry::expire_after(shared, &router_id, key, Duration::from_secs(left));
    }
}

/// The connection a restored session's will is audited as coming from: none, the
/// session store.
fn restored_connection() -> ConnInfo {
    ConnInfo::internal("session-store")
}

/// Makes a stored session's subscriptions again under its router client id, then
/// leaves it disconnected: the router keeps it as a persistent session.
pub(crate) async fn resubscribe(
    shared: &Shared,
    router_id: &str,
    owner: Option<&str>,
    subscriptions: &BTreeMap<String, SubscriptionOptions>,
) -> Result<(), RestoreError> {
    let (mut tx, mut rx, _ack) = shared.router.connect(router_id.to_string(), false).await?;
    let groups = shared.cluster.as_ref().map(|c| &c.groups);
    for subscribe in router_subscribes(groups, owner, subscriptions, |_, _| true) {
        tx.send(subscribe).await.map_err(Box::new)?;
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(Notification::DeviceAck(_)) = rx.next().await.map_err(Box::new)? {
                    return Ok::<(), RestoreError>(());
                }
            }
        })
        .await;
        acked.map_err(|_| RestoreError::NoSubAck)??;
    }
    let bye = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    tx.send(bye).await.map_err(Box::new)?;
    Ok(())
}

/// Why a stored session could not be made again in the router.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RestoreError {
    #[error("router link: {0}")]
    Connect(#[from] crate::router::ConnectError),
    #[error("router link: {0}")]
    Link(#[from] Box<rumqttd::local::LinkError>),
    #[error("no SUBACK from the router")]
    NoSubAck,
}
