//! Wills: rumqttd 0.20 publishes a will only for its own listeners, so the gateway
//! keeps each client's will and publishes it here when the connection ends abnormally,
//! at once or after its MQTT 5 delay, through the same [`admit`] step as every other
//! message (the ACL in force then, the payload limit, the retained quota).

use crate::admit::{admit, Admitted, Inbound, Source};
use crate::policy::Identity;
use crate::shared::{ConnInfo, Shared};
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
/// that reconnects first cancels it (`shared.delayed_wills`).
pub fn publish_will(shared: &Arc<Shared>, router_id: &str, will: Will) {
    if will.delay.is_zero() {
        publish_now(shared, will);
        return;
    }
    let (s, id) = (shared.clone(), router_id.to_string());
    shared
        .delayed_wills
        .start(router_id, will.delay, move || async move {
            if s.delayed_wills.fire(&id) {
                publish_now(&s, will);
            }
        });
}

/// Publishes a will if [`admit`] lets it in.
fn publish_now(shared: &Shared, will: Will) {
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
    match admit(shared, &info, &owner, Source::Will, inbound) {
        // A will has no client waiting for an acknowledgement: the saver persists a
        // retained one on its next round, also with autosave_interval = 0.
        Ok(Admitted::Now | Admitted::AfterSave) => {
            shared
                .router
                .publish(will.topic, will.message, will.qos, properties)
        }
        Err(why) => tracing::debug!(topic, ?why, "will not published"),
    }
}
