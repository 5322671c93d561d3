//! Wills: rumqttd 0.20 publishes a will only for its own listeners, so the gateway
//! keeps each client's will and publishes it here when the connection ends abnormally,
//! at once or after its MQTT 5 delay, through the same [`admit`] step as every other
//! message (the ACL in force then, the payload limit, the retained quota).

use crate::admit::{admit, Admitted, Inbound, Source};
use crate::cluster::wills::Held;
use crate::policy::Identity;
use crate::retained::from_router_properties;
use crate::retained_index::{qos_from, stored_properties};
use crate::shared::{ConnInfo, Shared};
use bytes::Bytes;
use moatmq_store::{now_unix, PendingWill, QueuedMessage, SessionKey};
use rumqttd::protocol::{LastWill, PublishProperties};
use std::sync::Arc;
use std::time::Duration;

/// A client's last will, as its CONNECT gave it.
pub struct Will {
    pub will: LastWill,
    /// Whether the client spoke MQTT 5 (its will's properties are kept).
    pub v5: bool,
    /// MQTT 5 will properties, as the properties of the published message.
    pub properties: Option<PublishProperties>,
    pub delay: Duration,
    /// Whose will it is: the write ACL is checked again when it is published.
    pub owner: Identity,
    /// The connection it came from, for the audit log.
    pub info: ConnInfo,
}

/// Publishes a will now or after its delay (MQTT 5 will delay interval); a client
/// that reconnects first cancels it (`shared.delayed_wills`). The will of a durable
/// session (`key`) waits in the session store, so a restart does not lose it; in a
/// cluster it waits in NATS too (`cluster/wills.rs`), so the loss of this node does
/// not either. `restored`: it comes from the session store at start-up.
pub fn publish_will(
    shared: &Arc<Shared>,
    router_id: &str,
    key: Option<&SessionKey>,
    will: Will,
    restored: bool,
) {
    if will.delay.is_zero() && !restored {
        publish_now(shared, will);
        return;
    }
    let publish_at = now_unix().saturating_add(will.delay.as_secs());
    let pending = pending(&will, publish_at);
    if let (Some(book), Some(key), false) = (&shared.durable, key, restored) {
        book.set_will(key, Some(pending.clone()));
    }
    let at = tokio::time::Instant::now() + will.delay;
    let (s, id, key) = (shared.clone(), router_id.to_string(), key.cloned());
    // Cancelled (aborted) by the client coming back, at any point.
    shared
        .delayed_wills
        .start(router_id, Duration::ZERO, move || async move {
            let held = match (&s.cluster, &key) {
                (Some(_), Some(key)) => {
                    crate::cluster::wills::hold(&s, &id, key, &pending, restored, at).await
                }
                _ => Held::Here,
            };
            if !matches!(held, Held::Taken) {
                tokio::time::sleep_until(at).await;
            }
            if !s.delayed_wills.fire(&id) {
                return;
            }
            let publish = match held {
                Held::Here => true,
                Held::Taken => false,
                Held::Nats(revision) => crate::cluster::wills::take(&s, &id, revision).await,
            };
            if let (Some(book), Some(key)) = (&s.durable, &key) {
                book.set_will(key, None);
            }
            if publish {
                publish_now(&s, will);
            }
        });
}

/// Publishes now a pending will of session `key` that another node held and did not
/// publish in time (`cluster/wills.rs`), as the session's identity.
pub fn publish_overdue(shared: &Shared, key: SessionKey, mut will: PendingWill) {
    let identity = Identity {
        username: key.owner,
        client_id: key.client_id,
    };
    // Its time has passed: now.
    will.publish_at = 0;
    // Audited as from the cluster: the connection it came with was another node's.
    let will = restored(will, identity, ConnInfo::internal("cluster"));
    publish_now(shared, will);
}

/// A will as the session store keeps it.
fn pending(will: &Will, publish_at: u64) -> PendingWill {
    let w = &will.will;
    PendingWill {
        message: QueuedMessage {
            topic: String::from_utf8_lossy(&w.topic).into_owned(),
            payload: w.message.clone(),
            qos: w.qos as u8,
            retain: w.retain,
            properties: will
                .v5
                .then(|| Box::new(from_router_properties(will.properties.as_ref()))),
            expires_at: None,
        },
        publish_at,
    }
}

/// A will the session store kept, back as the will of `owner`'s session; it is
/// published when its time comes (at once if that passed while the broker was down).
pub fn restored(stored: PendingWill, owner: Identity, info: ConnInfo) -> Will {
    let m = stored.message;
    let v5 = m.properties.is_some();
    Will {
        will: LastWill {
            topic: Bytes::from(m.topic),
            message: m.payload,
            qos: qos_from(m.qos),
            retain: m.retain,
        },
        v5,
        properties: stored_properties(m.properties.as_deref(), None, 0),
        delay: Duration::from_secs(stored.publish_at.saturating_sub(now_unix())),
        owner,
        info,
    }
}

/// Publishes a will if [`admit`] lets it in.
pub(crate) fn publish_now(shared: &Shared, will: Will) {
    let Will {
        will,
        v5,
        properties,
        owner,
        info,
        ..
    } = will;
    let Ok(topic) = std::str::from_utf8(&will.topic) else {
        return;
    };
    let inbound = Inbound {
        topic,
        payload: &will.message,
        qos: will.qos,
        retain: will.retain,
        properties: properties.as_ref(),
        v5,
    };
    // Until the router has it (`SessionBook::admitting`), as for a client's publish.
    let _routing = shared.durable.as_ref().map(|book| book.admitting());
    match admit(shared, &info, &owner, Source::Will, inbound) {
        // A will has no client waiting for an acknowledgement: the saver persists a
        // retained one on its next round, also with autosave_interval = 0.
        Ok(Admitted::Now | Admitted::AfterSave | Admitted::AfterTransfer) => {
            shared
                .router
                .publish(will.topic, will.message, will.qos, will.retain, properties)
        }
        Err(why) => tracing::debug!(topic, ?why, "will not published"),
    }
}
