//! Owners kept with records, and files written before owners existed.

use super::*;
use crate::record::{Record, RecordRef};
use serde::{Deserialize, Serialize};

fn owned(topic: &str, payload: &str, owner: &str) -> RetainedMessage {
    RetainedMessage {
        owner: Some(owner.to_owned()),
        ..v5_msg(topic, payload)
    }
}

#[test]
fn owner_survives_reopen_compaction_and_rekey() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    let a = owned("alice/x", "1", "alice");
    let b = msg("legacy/y", "2");
    s.set(a.clone()).unwrap();
    s.set(b.clone()).unwrap();
    s.flush().unwrap();
    drop(s);
    let (mut s, loaded) = open(dir.path()).unwrap();
    assert_eq!(sorted(loaded), vec![a.clone(), b.clone()]);
    s.compact().unwrap();
    drop(s);
    let (_, loaded) = open(dir.path()).unwrap();
    assert_eq!(sorted(loaded), vec![a.clone(), b.clone()]);
    crate::rekey(dir.path(), key(), &other_key()).unwrap();
    let (_, loaded) = Store::open(dir.path(), other_key(), LIMITS).unwrap();
    assert_eq!(sorted(loaded), vec![a, b]);
}

/// The record layout of format version 1, before owners: copied, not imported, so a
/// change to today's types cannot silently change it too.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct V1Message {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    properties: Option<MessageProperties>,
    expires_at: Option<u64>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
enum V1Record {
    Set(V1Message),
    Clear(String),
}

#[test]
fn records_without_owner_keep_the_v1_encoding() {
    let m = v5_msg("t", "p");
    let old = V1Record::Set(V1Message {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos,
        properties: m.properties.clone(),
        expires_at: m.expires_at,
    });
    let old_bytes = postcard::to_stdvec(&old).unwrap();
    assert_eq!(postcard::to_stdvec(&RecordRef::set(&m)).unwrap(), old_bytes);
    let read: Record = postcard::from_bytes(&old_bytes).unwrap();
    assert_eq!(read.into_change(), Ok(m));
    let clear = postcard::to_stdvec(&V1Record::Clear("t".into())).unwrap();
    let read: Record = postcard::from_bytes(&clear).unwrap();
    assert_eq!(read.into_change(), Err("t".to_owned()));
    // An owned record is a kind version 1 never wrote: an old reader refuses it rather
    // than misreading it.
    let new = postcard::to_stdvec(&RecordRef::set(&owned("t", "p", "alice"))).unwrap();
    assert!(postcard::from_bytes::<V1Record>(&new).is_err());
}

#[test]
fn stored_bytes_counts_properties_and_owner() {
    let plain = msg("t", "p");
    let mut props = v5_msg("t", "p");
    props.properties.as_mut().unwrap().user_properties = vec![("k".to_owned(), "v".repeat(10_000))];
    assert!(crate::stored_bytes(&props) > crate::stored_bytes(&plain) + 10_000);
    let with_owner = RetainedMessage {
        owner: Some("alice".into()),
        ..plain.clone()
    };
    assert!(crate::stored_bytes(&with_owner) > crate::stored_bytes(&plain));
    // It is the frame as written: a fresh store grows by exactly that much.
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    let before = s.file_bytes();
    s.set(props.clone()).unwrap();
    s.flush().unwrap();
    assert_eq!(s.file_bytes() - before, crate::stored_bytes(&props));
}
