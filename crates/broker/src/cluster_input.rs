//! Cluster input (docs/cluster.md): every message on the cluster's subjects, from
//! another node or a NATS-native client, is admitted here as [`Source::Cluster`] and
//! handed to the router on the broker's own link. Apart from `cluster/` (the way out,
//! which `Shared` holds) so that the way in can use `admit` and `Shared` freely.

use crate::admit::{admit, Admitted, Source};
use crate::cluster::*;
use crate::inbound::Inbound;
use crate::policy::Identity;
use crate::shared::{ConnInfo, Shared};
use bytes::Bytes;
use futures_util::StreamExt;
use rumqttd::protocol::QoS;
use std::sync::Arc;

/// Takes every message of the cluster's subjects into this node until shutdown.
pub async fn run_input(shared: Arc<Shared>, input: Input) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let mut subscriber = input.0;
    let info = cluster_connection();
    while let Some(message) = subscriber.next().await {
        receive(&shared, cluster, &info, message);
    }
}

/// One message from NATS: admitted as cluster input, then into the router.
fn receive(shared: &Shared, cluster: &Cluster, info: &ConnInfo, message: async_nats::Message) {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let Some(rest) = message
        .subject
        .as_str()
        .strip_prefix(cluster.prefix.as_str())
        .and_then(|s| s.strip_prefix('.'))
    else {
        return;
    };
    let topic = to_topic(rest);
    if !crate::topic::valid_topic_name(&topic, shared.config.limits.max_topic_levels)
        || topic.starts_with('$')
    {
        tracing::debug!("cluster: message on a subject with no valid topic dropped");
        return;
    }
    let who = match header(NODE) {
        Some(node) if node == cluster.node => return,
        Some(_) => Identity {
            username: header(USER),
            client_id: header(CLIENT).unwrap_or_default(),
        },
        None => match &cluster.native_user {
            Some(user) => Identity {
                username: Some(user.clone()),
                client_id: NATIVE_CLIENT_ID.to_string(),
            },
            None => {
                shared.metrics.cluster_dropped.inc();
                tracing::debug!(
                    topic,
                    "cluster: message from a NATS client dropped (no native_user)"
                );
                return;
            }
        },
    };
    let qos = match header(QOS).as_deref() {
        Some("1") => QoS::AtLeastOnce,
        Some("2") => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
    let retain = header(RETAIN).as_deref() == Some("1");
    // Properties mean an MQTT 5 publisher: a retained copy keeps them, as on one node.
    let props = header(PROPERTIES).and_then(|p| crate::cluster::decode_properties(&p));
    let inbound = Inbound {
        topic: &topic,
        payload: &message.payload,
        qos,
        retain,
        properties: props.as_ref(),
        v5: props.is_some(),
    };
    match admit(shared, info, &who, Source::Cluster, inbound) {
        Ok(Admitted::Now | Admitted::AfterSave) => {
            shared.metrics.cluster_received.inc();
            shared.router.publish(
                Bytes::from(topic.into_bytes()),
                message.payload.clone(),
                qos,
                retain,
                props,
            );
        }
        Err(why) => tracing::debug!(topic, ?why, "cluster: message not admitted"),
    }
}

/// The connection cluster input is audited as coming from.
fn cluster_connection() -> ConnInfo {
    ConnInfo::internal("cluster")
}
