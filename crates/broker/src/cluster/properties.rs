//! MQTT 5 publish properties across nodes: one `Moatmq-Properties` header holding a
//! JSON object, so that NATS services can read them too and no value needs escaping
//! beyond JSON's own (a header value cannot hold a line break):
//! `{"payload_format":1,"message_expiry":60,"content_type":"..","response_topic":"..",
//! "correlation_data":"<hex>","user":[["key","value"],...]}`, each key present only when
//! set. The topic alias and subscription identifiers are per connection and never sent.
//! Anything malformed is ignored: the message goes on without properties.

use rumqttd::protocol::PublishProperties;
use serde_json::{json, Map, Value};

/// The header's value, or `None` when there is nothing to carry.
pub fn encode(p: &PublishProperties) -> Option<String> {
    let mut m = Map::new();
    if let Some(f) = p.payload_format_indicator {
        m.insert("payload_format".into(), json!(f));
    }
    if let Some(e) = p.message_expiry_interval {
        m.insert("message_expiry".into(), json!(e));
    }
    if let Some(c) = &p.content_type {
        m.insert("content_type".into(), json!(c));
    }
    if let Some(r) = &p.response_topic {
        m.insert("response_topic".into(), json!(r));
    }
    if let Some(d) = &p.correlation_data {
        m.insert("correlation_data".into(), json!(hex(d)));
    }
    if !p.user_properties.is_empty() {
        m.insert("user".into(), json!(p.user_properties));
    }
    (!m.is_empty()).then(|| Value::Object(m).to_string())
}

/// The properties a header value carries; `None` if it is not one of ours.
pub fn decode(text: &str) -> Option<PublishProperties> {
    let Value::Object(m) = serde_json::from_str::<Value>(text).ok()? else {
        return None;
    };
    let string = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let user = match m.get("user") {
        None => Vec::new(),
        Some(Value::Array(pairs)) => pairs
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(k), Value::String(v)]) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
        Some(_) => return None,
    };
    Some(PublishProperties {
        payload_format_indicator: m
            .get("payload_format")
            .and_then(Value::as_u64)
            .and_then(|f| u8::try_from(f).ok()),
        message_expiry_interval: m
            .get("message_expiry")
            .and_then(Value::as_u64)
            .and_then(|e| u32::try_from(e).ok()),
        topic_alias: None,
        response_topic: string("response_topic"),
        correlation_data: match string("correlation_data") {
            Some(h) => Some(unhex(&h)?.into()),
            None => None,
        },
        user_properties: user,
        subscription_identifiers: Vec::new(),
        content_type: string("content_type"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_carried_property_round_trips() {
        let p = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            topic_alias: Some(3),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(vec![0, 0xff, 10].into()),
            user_properties: vec![("k".into(), "line\nbreak".into()), ("k".into(), "2".into())],
            subscription_identifiers: vec![7],
            content_type: Some("application/json".into()),
        };
        let header = encode(&p).unwrap();
        assert!(!header.contains('\n'), "{header}");
        let back = decode(&header).unwrap();
        assert_eq!(back.topic_alias, None, "per connection");
        assert!(back.subscription_identifiers.is_empty(), "per connection");
        assert_eq!(
            PublishProperties {
                topic_alias: Some(3),
                subscription_identifiers: vec![7],
                ..back
            },
            p
        );
        assert_eq!(encode(&PublishProperties::default()), None);
    }

    #[test]
    fn malformed_headers_carry_nothing() {
        for bad in [
            "",
            "[]",
            "{\"user\":[[\"k\"]]}",
            "{\"user\":\"x\"}",
            "{\"correlation_data\":\"abc\"}",
            "{\"correlation_data\":\"zz\"}",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
