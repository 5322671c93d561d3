//! A message on its way into the broker, as `admit` checks it and the cluster forwards it.

use bytes::Bytes;
use rumqttd::protocol::{PublishProperties, QoS};
use std::time::Duration;

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

/// What is left of a message expiry interval of `interval` seconds after `waited`, in
/// whole seconds rounded up (so at least 1); `None` once it ran out. An interval of 0
/// stays 0, as published.
pub fn expiry_left(interval: u32, waited: Duration) -> Option<u32> {
    if interval == 0 {
        return Some(0);
    }
    let left = Duration::from_secs(u64::from(interval)).checked_sub(waited)?;
    if left.is_zero() {
        return None;
    }
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    Some(u32::try_from(secs).unwrap_or(interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_interval_counts_down_by_the_time_waited() {
        let ms = Duration::from_millis;
        assert_eq!(expiry_left(60, Duration::ZERO), Some(60));
        assert_eq!(expiry_left(60, ms(100)), Some(60), "rounded up");
        assert_eq!(expiry_left(60, ms(3_100)), Some(57));
        assert_eq!(expiry_left(60, ms(59_001)), Some(1));
        assert_eq!(expiry_left(2, ms(2_000)), None, "ran out");
        assert_eq!(expiry_left(2, ms(3_000)), None);
        assert_eq!(expiry_left(0, ms(5_000)), Some(0), "as published");
        assert_eq!(expiry_left(u32::MAX, ms(1)), Some(u32::MAX));
    }
}
