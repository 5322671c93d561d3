//! A durable session's router forwards as the session store keeps them while the client
//! has not acknowledged them: each QoS 1/2 forward written to the client is stored as
//! sent (`SessionBook::sent`) and completed by the client's PUBACK or PUBREC
//! (`SessionBook::acked`), so a restart or a crash (within the autosave rule) redelivers
//! it with DUP. The router keeps its own copy only in memory.

use crate::retained::from_router_properties;
use bytes::Bytes;
use moatmq_store::QueuedMessage;
use rumqttd::protocol::{PublishProperties, QoS};

/// A forward as the session store keeps it (its remaining expiry is not known here).
pub(super) fn as_queued(
    topic: &Bytes,
    payload: &Bytes,
    qos: QoS,
    properties: Option<&PublishProperties>,
) -> QueuedMessage {
    QueuedMessage {
        topic: String::from_utf8_lossy(topic).into_owned(),
        payload: payload.clone(),
        qos: qos as u8,
        retain: false,
        expires_at: None,
        properties: properties.map(|p| Box::new(from_router_properties(Some(p)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_keeps_its_topic_payload_qos_and_properties() {
        let props = PublishProperties {
            response_topic: Some("re/1".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let t = Bytes::from_static(b"a/b");
        let p = Bytes::from_static(b"x");
        let q = as_queued(&t, &p, QoS::ExactlyOnce, Some(&props));
        assert_eq!(
            (q.topic.as_str(), &q.payload[..], q.qos),
            ("a/b", &b"x"[..], 2)
        );
        let kept = q.properties.unwrap();
        assert_eq!(kept.response_topic.as_deref(), Some("re/1"));
        assert_eq!(kept.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(kept.user_properties, [("k".to_string(), "v".to_string())]);
        assert!(as_queued(&t, &p, QoS::AtLeastOnce, None)
            .properties
            .is_none());
    }
}
