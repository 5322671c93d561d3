//! Store inputs: valid log images written through the store crate's own API (random
//! sets, clears, flushes and compactions), checked against the store's live set before
//! the mutator damages them. Random bytes alone almost never pass the header's key check.

use moatmq_store::{MessageProperties, RetainedMessage, Store, StoreLimits};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;

/// The key every store input is decoded with (the store crate's test key).
pub fn store_key() -> moatmq_store::RetainedKey {
    moatmq_store::RetainedKey::from_hex(&"11".repeat(32)).expect("fixed key")
}

/// A random retained message on one of a few topics (so replacements happen).
pub fn message(rng: &mut StdRng) -> RetainedMessage {
    let topic = match rng.gen_range(0..6) {
        0 => "é/ü/\u{1F600}".to_string(),
        1 => "a/".repeat(rng.gen_range(1..40)) + "z",
        _ => format!("t/{}", rng.gen_range(0..8)),
    };
    let payload_len = if rng.gen_bool(0.1) {
        rng.gen_range(1..20_000)
    } else {
        rng.gen_range(1..64)
    };
    let properties = rng.gen_bool(0.5).then(|| MessageProperties {
        payload_format_indicator: rng.gen_bool(0.5).then(|| rng.gen_range(0..2)),
        content_type: rng.gen_bool(0.5).then(|| "application/json".into()),
        response_topic: rng.gen_bool(0.3).then(|| "reply/x".into()),
        correlation_data: rng.gen_bool(0.3).then(|| vec![1, 2, 3]),
        user_properties: (0..rng.gen_range(0..3))
            .map(|i| (format!("k{i}"), "v".into()))
            .collect(),
    });
    RetainedMessage {
        topic,
        payload: (0..payload_len).map(|_| rng.gen()).collect(),
        qos: rng.gen_range(0..3),
        properties,
        expires_at: rng.gen_bool(0.2).then_some(u64::MAX / 2),
        owner: rng.gen_bool(0.5).then(|| "alice".into()),
    }
}

/// Writes a store with random operations and returns its log file's bytes, after
/// checking that decoding the image gives exactly the store's live messages.
pub fn generate(rng: &mut StdRng) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, _) =
        Store::open(dir.path(), store_key(), StoreLimits::UNLIMITED).expect("store opens");
    for _ in 0..rng.gen_range(1..4) {
        for _ in 0..rng.gen_range(0..6) {
            if rng.gen_bool(0.8) {
                store.set(message(rng)).expect("unlimited store accepts");
            } else {
                store.clear(&format!("t/{}", rng.gen_range(0..8)));
            }
        }
        store.flush().expect("flush");
        if rng.gen_bool(0.2) {
            store.compact().expect("compact");
        }
    }
    let image = std::fs::read(store.log_path()).expect("read log");
    let expected: BTreeMap<String, RetainedMessage> = store
        .messages()
        .iter()
        .map(|m| (m.topic.clone(), (**m).clone()))
        .collect();
    let decoded: BTreeMap<String, RetainedMessage> =
        moatmq_store::decode_log_image(&store_key(), &image)
            .expect("a log the store wrote decodes")
            .into_iter()
            .map(|m| (m.topic.clone(), m))
            .collect();
    assert_eq!(decoded, expected, "decoded image differs from the store");
    image
}
