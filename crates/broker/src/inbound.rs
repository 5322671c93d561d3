//! A message on its way into the broker, as `admit` checks it and the cluster forwards it.

use bytes::Bytes;
use rumqttd::protocol::{PublishProperties, QoS};

/// A message asking to enter the broker.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub topic: &'a str,
    pub payload: &'a Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<&'a PublishProperties>,
    /// Sent by an MQTT 5 client (its properties are kept with a retained copy).
    pub v5: bool,
}

impl Inbound<'_> {
    /// The absolute expiry (unix seconds) of a message with an MQTT 5 message expiry
    /// interval, counted from now.
    pub fn expires_at(&self) -> Option<u64> {
        self.properties
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| moatmq_store::now_unix() + u64::from(secs))
    }
}
