//! Sealing for cluster state kept in NATS JetStream key-value buckets (docs/cluster.md,
//! "Stored state"): what a NATS operator or a copy of the JetStream volume sees is keyed
//! hashes and ciphertext, never a topic or a payload.
//!
//! Two keys are derived from the retained-store key, never the key itself:
//! `HMAC-SHA-256(retained key, "moatmq cluster seal v1")` seals values with AES-256-GCM,
//! `HMAC-SHA-256(retained key, "moatmq cluster key v1")` hashes topics into KV keys
//! (64 hex characters, a valid NATS subject token). The retained key is 32 random bytes,
//! so one HMAC block each is a sound key derivation (HKDF's expand step with one block).
//!
//! A value is `version 1 | nonce [12] | ciphertext+tag`, or, for retained values and
//! wills, `2 | sealed at (Unix ms) u64 BE | nonce | ciphertext+tag` (the broker refuses
//! one JetStream stored long after that: a replay); its associated data names the
//! version, the bucket and the KV key (and the time), so a value only opens under the key it was put
//! at in the bucket it was put in: copied to another topic's key, or into another bucket
//! or cluster prefix, it fails. Retained values hold one record of the store's log
//! encoding (`SetOwned`: topic, payload, QoS, properties, expiry, owner), and a value
//! also fails unless its topic hashes to the key it sits at.
//!
//! Messages in the transfer stream (`<prefix>_xfer`) are sealed the same way, with
//! associated data of their own kind naming the stream and the message id
//! (`<node>:<epoch>:<sequence>`), so one opens only as the message it was published as.
//! Session ownership values ([`Owner`]) hold the owning node's name and its connection
//! epoch, at the keyed hash of the session ([`ClusterSeal::session_key_of`]: the
//! identity-qualified client id, domain-separated from topics).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::record::{self, RecordRef, NONCE_LEN, TAG_LEN};
use crate::{RetainedKey, RetainedMessage, StoreError};

/// First byte of every sealed value (also bound into its associated data).
const VERSION: u8 = 1;
/// First byte of a KV value that carries the time it was sealed, bound into its
/// associated data: `2 | sealed at (Unix ms) u64 BE | nonce | ciphertext+tag`
/// (retained values and wills; a node compares it with the time JetStream stored the
/// value to refuse replays, docs/cluster.md "Replays").
const TIMED: u8 = 2;
/// What the key marker holds: any node with the cluster's key opens it.
const MARKER_TEXT: &[u8] = b"moatmq cluster key check v1";

/// Which node holds a session, and which of its connections (docs/cluster.md, session
/// ownership).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The `node_name` of the node that accepted the connection.
    pub node: String,
    /// That node's number for the connection, unique on the node across restarts.
    pub epoch: u64,
    /// Whether the session outlives the connection (a node taking it over waits for
    /// the old node to hand it over only then).
    pub persistent: bool,
}

/// First bytes of an ownership value's plaintext (before epoch and node name).
const OWNER_TAG: &[u8] = b"owner1";

/// First bytes of a session handoff value's plaintext.
const HANDOFF_TAG: &[u8] = b"handoff1";

/// First bytes of a pending will's plaintext.
const WILL_TAG: &[u8] = b"will1";

/// First bytes of a node's entry (`<prefix>_nodes`).
const NODE_TAG: &[u8] = b"node1";

/// The keys a cluster node seals and hashes its shared state with.
pub struct ClusterSeal {
    cipher: Aes256Gcm,
    hash_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ClusterSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSeal(<redacted>)")
    }
}

/// `HMAC-SHA-256(key, label)`, in memory zeroed on drop.
fn derive(key: &[u8], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // HMAC takes a key of any length: this cannot fail.
    if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) {
        mac.update(label);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

impl ClusterSeal {
    /// The cluster keys derived from the retained-store key.
    pub fn new(key: &RetainedKey) -> ClusterSeal {
        // Exposed only to derive the two cluster keys.
        let raw = key.expose_secret();
        let seal = derive(raw, b"moatmq cluster seal v1");
        ClusterSeal {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(seal.as_ref())),
            hash_key: derive(raw, b"moatmq cluster key v1"),
        }
    }

    /// The KV key of `name` (a topic): its keyed hash, as 64 lowercase hex characters.
    pub fn key_of(&self, name: &str) -> String {
        hex::encode(derive(self.hash_key.as_ref(), name.as_bytes()).as_ref())
    }

    /// The KV key of a session: the keyed hash of `session` (a client id qualified by
    /// its identity, one string per identity and client id), kept apart from topics.
    pub fn session_key_of(&self, session: &str) -> String {
        self.key_of(&format!("session\0{session}"))
    }

    /// The KV key of node `name`'s entry, kept apart from topics and sessions.
    pub fn node_key_of(&self, name: &str) -> String {
        self.key_of(&format!("node\0{name}"))
    }

    /// A node's entry (`plain`, the broker's encoding) sealed at `bucket`/`key` at
    /// `sealed_at` (Unix ms).
    pub fn seal_node(
        &self,
        bucket: &str,
        key: &str,
        plain: &[u8],
        sealed_at: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let mut tagged = Zeroizing::new(Vec::with_capacity(NODE_TAG.len() + plain.len()));
        tagged.extend_from_slice(NODE_TAG);
        tagged.extend_from_slice(plain);
        self.seal_at(bucket, key, &tagged, Some(sealed_at))
    }

    /// The node entry sealed at `bucket`/`key` and when it was sealed; an error if it
    /// does not authenticate there, is no node entry or carries no time.
    pub fn open_node(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, u64), StoreError> {
        let (plain, sealed_at) = self.open_at(bucket, key, value)?;
        let at = sealed_at.ok_or_else(|| refused(bucket, key, "a node entry without its time"))?;
        match plain.strip_prefix(NODE_TAG) {
            Some(rest) => Ok((Zeroizing::new(rest.to_vec()), at)),
            None => Err(refused(bucket, key, "authenticated but not a node entry")),
        }
    }

    /// The sealed ownership value at `bucket`/`key`.
    pub fn seal_owner(
        &self,
        bucket: &str,
        key: &str,
        owner: &Owner,
    ) -> Result<Vec<u8>, StoreError> {
        let mut plain = Vec::with_capacity(OWNER_TAG.len() + 9 + owner.node.len());
        plain.extend_from_slice(OWNER_TAG);
        plain.extend_from_slice(&owner.epoch.to_be_bytes());
        plain.push(u8::from(owner.persistent));
        plain.extend_from_slice(owner.node.as_bytes());
        self.seal(bucket, key, &plain)
    }

    /// The ownership value sealed at `bucket`/`key`; an error if it does not
    /// authenticate there or is not an ownership value.
    pub fn open_owner(&self, bucket: &str, key: &str, value: &[u8]) -> Result<Owner, StoreError> {
        let refused = |reason: &str| refused(bucket, key, reason);
        let plain = self.open(bucket, key, value)?;
        let rest = plain
            .strip_prefix(OWNER_TAG)
            .ok_or_else(|| refused("authenticated but not an ownership value"))?;
        if rest.len() < 9 {
            return Err(refused("authenticated but not an ownership value"));
        }
        let (epoch, rest) = rest.split_at(8);
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(epoch);
        let persistent = match rest[0] {
            0 => false,
            1 => true,
            _ => return Err(refused("authenticated but not an ownership value")),
        };
        let node = std::str::from_utf8(&rest[1..])
            .map_err(|_| refused("authenticated but its node name is not UTF-8"))?;
        Ok(Owner {
            node: node.to_owned(),
            epoch: u64::from_be_bytes(bytes),
            persistent,
        })
    }

    /// A session handed to another node (`plain`, the broker's encoding), sealed at
    /// `bucket`/`key` (the session's key).
    pub fn seal_handoff(
        &self,
        bucket: &str,
        key: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let mut tagged = Zeroizing::new(Vec::with_capacity(HANDOFF_TAG.len() + plain.len()));
        tagged.extend_from_slice(HANDOFF_TAG);
        tagged.extend_from_slice(plain);
        self.seal(bucket, key, &tagged)
    }

    /// The handed-off session sealed at `bucket`/`key`; an error if it does not
    /// authenticate there or is no handoff value.
    pub fn open_handoff(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let refused = |reason: &str| refused(bucket, key, reason);
        let plain = self.open(bucket, key, value)?;
        match plain.strip_prefix(HANDOFF_TAG) {
            Some(rest) => Ok(Zeroizing::new(rest.to_vec())),
            None => Err(refused("authenticated but not a handoff value")),
        }
    }

    /// A pending will (`plain`, the broker's encoding), sealed at `bucket`/`key` (its
    /// session's key) at `sealed_at` (Unix ms; `None`: without it, as releases before
    /// it wrote wills).
    pub fn seal_will(
        &self,
        bucket: &str,
        key: &str,
        plain: &[u8],
        sealed_at: Option<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut tagged = Zeroizing::new(Vec::with_capacity(WILL_TAG.len() + plain.len()));
        tagged.extend_from_slice(WILL_TAG);
        tagged.extend_from_slice(plain);
        self.seal_at(bucket, key, &tagged, sealed_at)
    }

    /// The pending will sealed at `bucket`/`key`, and when it was sealed (if it says);
    /// an error if it does not authenticate there or is no will.
    pub fn open_will(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, Option<u64>), StoreError> {
        let (plain, sealed_at) = self.open_at(bucket, key, value)?;
        match plain.strip_prefix(WILL_TAG) {
            Some(rest) => Ok((Zeroizing::new(rest.to_vec()), sealed_at)),
            None => Err(refused(bucket, key, "authenticated but not a will")),
        }
    }

    /// The value of the key marker at `bucket`/`key`.
    pub fn seal_marker(&self, bucket: &str, key: &str) -> Result<Vec<u8>, StoreError> {
        self.seal(bucket, key, MARKER_TEXT)
    }

    /// Whether `value` is the key marker at `bucket`/`key` sealed under these keys.
    pub fn opens_marker(&self, bucket: &str, key: &str, value: &[u8]) -> bool {
        self.open(bucket, key, value)
            .is_ok_and(|plain| plain.as_slice() == MARKER_TEXT)
    }

    /// The KV key and sealed value of a retained message in `bucket`, sealed at
    /// `sealed_at` (Unix ms; `None`: without it, as releases before it wrote them).
    pub fn seal_retained(
        &self,
        bucket: &str,
        msg: &RetainedMessage,
        sealed_at: Option<u64>,
    ) -> Result<(String, Vec<u8>), StoreError> {
        let key = self.key_of(&msg.topic);
        let plain = record::encode(&RecordRef::set(msg))?;
        Ok((key.clone(), self.seal_at(bucket, &key, &plain, sealed_at)?))
    }

    /// The retained message sealed at `bucket`/`key`, and when it was sealed (if it
    /// says); an error if the value does not authenticate there (altered, moved from
    /// another key or bucket, another key, its time changed) or does not hold a message
    /// of the topic `key` is the hash of.
    pub fn open_retained(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(RetainedMessage, Option<u64>), StoreError> {
        let refused = |reason: &str| refused(bucket, key, reason);
        let (plain, sealed_at) = self.open_at(bucket, key, value)?;
        let msg = record::decode_record(&plain)
            .map_err(|_| refused("authenticated but not a retained record"))?
            .into_change()
            .map_err(|_| refused("authenticated but not a retained message"))?;
        if msg.payload.is_empty() || self.key_of(&msg.topic) != key {
            return Err(refused("its topic does not belong at this key"));
        }
        Ok((msg, sealed_at))
    }

    /// A message forwarded to other nodes, sealed for the transfer stream `stream` under
    /// its message id (`<node>:<epoch>:<sequence>`): it opens only there, under that id.
    pub fn seal_transfer(
        &self,
        stream: &str,
        msg_id: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.seal_with(&transfer_aad(stream, msg_id), plain)
    }

    /// The plaintext of a transfer message; an error if it does not authenticate as
    /// sealed for `stream` under `msg_id` with this cluster's key.
    pub fn open_transfer(
        &self,
        stream: &str,
        msg_id: &str,
        value: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.open_with(&transfer_aad(stream, msg_id), value)
            .map_err(|()| transfer_refused(stream, msg_id))
    }

    /// A batch of messages forwarded to other nodes (`count u32 | (len u32 | message)*`
    /// before sealing), sealed for the transfer stream `stream` under the batch's message
    /// id (`<node>:<epoch>:<first sequence>`), with associated data of its own kind: a
    /// batch never opens as one message, nor one message as a batch.
    pub fn seal_transfer_batch(
        &self,
        stream: &str,
        msg_id: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.seal_with(&transfer_batch_aad(stream, msg_id), plain)
    }

    /// The plaintext of a transfer batch; an error if it does not authenticate as a
    /// batch sealed for `stream` under `msg_id` with this cluster's key.
    pub fn open_transfer_batch(
        &self,
        stream: &str,
        msg_id: &str,
        value: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.open_with(&transfer_batch_aad(stream, msg_id), value)
            .map_err(|()| transfer_refused(stream, msg_id))
    }

    fn seal(&self, bucket: &str, key: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.seal_with(&aad(bucket, key), plain)
    }

    /// [`ClusterSeal::seal`] with the time it is sealed at bound in ([`TIMED`]).
    fn seal_at(
        &self,
        bucket: &str,
        key: &str,
        plain: &[u8],
        sealed_at: Option<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        let Some(at) = sealed_at else {
            return self.seal(bucket, key, plain);
        };
        let untimed = self.seal_with(&timed_aad(bucket, key, at), plain)?;
        // `VERSION | nonce | sealed` as `TIMED | time | nonce | sealed`.
        let mut out = Vec::with_capacity(8 + untimed.len());
        out.push(TIMED);
        out.extend_from_slice(&at.to_be_bytes());
        out.extend_from_slice(&untimed[1..]);
        Ok(out)
    }

    /// [`ClusterSeal::open`] of a value with or without its sealing time, and the time.
    fn open_at(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, Option<u64>), StoreError> {
        let Some((&TIMED, rest)) = value.split_first() else {
            return self.open(bucket, key, value).map(|plain| (plain, None));
        };
        let at = rest
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| refused(bucket, key, "too short"))?;
        self.decrypt(&timed_aad(bucket, key, at), &rest[8..])
            .map(|plain| (plain, Some(at)))
            .map_err(|()| {
                refused(
                    bucket,
                    key,
                    "failed authentication (altered, moved from another key, its time changed, or sealed under another key)",
                )
            })
    }

    fn seal_with(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let nonce = record::fresh_nonce();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| StoreError::Encode("cluster value encryption failed".to_owned()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext sealed at `bucket`/`key`; the error a value that does not
    /// authenticate there gets.
    fn open(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.open_with(&aad(bucket, key), value).map_err(|()| {
            refused(
                bucket,
                key,
                "failed authentication (altered, moved from another key, or sealed under another key)",
            )
        })
    }

    fn open_with(&self, aad: &[u8], value: &[u8]) -> Result<Zeroizing<Vec<u8>>, ()> {
        let Some((&VERSION, rest)) = value.split_first() else {
            return Err(());
        };
        self.decrypt(aad, rest)
    }

    /// `nonce | ciphertext+tag` opened under `aad`.
    fn decrypt(&self, aad: &[u8], rest: &[u8]) -> Result<Zeroizing<Vec<u8>>, ()> {
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(());
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map(Zeroizing::new)
            .map_err(|_| ())
    }
}

/// A transfer message or batch that does not authenticate.
fn transfer_refused(stream: &str, msg_id: &str) -> StoreError {
    refused(
        stream,
        msg_id,
        "failed authentication (altered, moved from another message id, or sealed under another key)",
    )
}

/// A value at `bucket`/`key` refused for `reason`.
fn refused(bucket: &str, key: &str, reason: &str) -> StoreError {
    StoreError::SealedValue {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

/// `moatmq-cluster-kv | version | len(bucket) u32 LE | bucket | key`.
fn aad(bucket: &str, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + bucket.len() + key.len());
    aad.extend_from_slice(b"moatmq-cluster-kv");
    aad.push(VERSION);
    aad.extend_from_slice(&(bucket.len() as u32).to_le_bytes());
    aad.extend_from_slice(bucket.as_bytes());
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// `moatmq-cluster-kv | 2 | len(bucket) u32 LE | bucket | len(key) u32 LE | key |
/// sealed at u64 BE`.
fn timed_aad(bucket: &str, key: &str, at: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(40 + bucket.len() + key.len());
    aad.extend_from_slice(b"moatmq-cluster-kv");
    aad.push(TIMED);
    aad.extend_from_slice(&(bucket.len() as u32).to_le_bytes());
    aad.extend_from_slice(bucket.as_bytes());
    aad.extend_from_slice(&(key.len() as u32).to_le_bytes());
    aad.extend_from_slice(key.as_bytes());
    aad.extend_from_slice(&at.to_be_bytes());
    aad
}

/// `moatmq-cluster-xfer | version | len(stream) u32 LE | stream | message id`: a
/// transfer message never opens as a KV value, nor the reverse.
fn transfer_aad(stream: &str, msg_id: &str) -> Vec<u8> {
    stream_aad(b"moatmq-cluster-xfer", VERSION, stream, msg_id)
}

/// `moatmq-cluster-xfer-batch | 2 | len(stream) u32 LE | stream | message id`.
fn transfer_batch_aad(stream: &str, msg_id: &str) -> Vec<u8> {
    stream_aad(b"moatmq-cluster-xfer-batch", 2, stream, msg_id)
}

fn stream_aad(kind: &[u8], version: u8, stream: &str, msg_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(kind.len() + 5 + stream.len() + msg_id.len());
    aad.extend_from_slice(kind);
    aad.push(version);
    aad.extend_from_slice(&(stream.len() as u32).to_le_bytes());
    aad.extend_from_slice(stream.as_bytes());
    aad.extend_from_slice(msg_id.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(byte: u8) -> ClusterSeal {
        ClusterSeal::new(&RetainedKey::from_hex(&format!("{byte:02x}").repeat(32)).unwrap())
    }

    fn message(topic: &str) -> RetainedMessage {
        RetainedMessage {
            topic: topic.to_owned(),
            payload: b"payload".to_vec(),
            qos: 1,
            properties: None,
            expires_at: Some(99),
            owner: Some("alice".to_owned()),
        }
    }

    const AT: u64 = 1_765_000_000_000;

    #[test]
    fn retained_values_round_trip_without_plaintext() {
        let s = seal(1);
        let (key, value) = s
            .seal_retained("p_retained", &message("alice/x"), Some(AT))
            .unwrap();
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(key, seal(2).key_of("alice/x"), "the hash is keyed");
        let find = |needle: &[u8]| value.windows(needle.len()).any(|w| w == needle);
        assert!(!find(b"alice") && !find(b"payload"));
        assert_eq!(
            s.open_retained("p_retained", &key, &value).unwrap(),
            (message("alice/x"), Some(AT))
        );
        // As releases before the time wrote them: opens, saying so.
        let (_, untimed) = s
            .seal_retained("p_retained", &message("alice/x"), None)
            .unwrap();
        assert_eq!(
            s.open_retained("p_retained", &key, &untimed).unwrap(),
            (message("alice/x"), None)
        );
    }

    #[test]
    fn altered_moved_or_foreign_values_are_refused() {
        let s = seal(1);
        let (key, value) = s
            .seal_retained("p_retained", &message("alice/x"), Some(AT))
            .unwrap();
        let other = s.key_of("alice/y");
        let refused = |r: Result<(RetainedMessage, Option<u64>), StoreError>| {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })), "{r:?}")
        };
        // The version, the time (an old value passed off as new), the nonce, the tag.
        for i in [0, 5, 12, value.len() - 1] {
            let mut bad = value.clone();
            bad[i] ^= 1;
            refused(s.open_retained("p_retained", &key, &bad));
        }
        // Nor as an untimed value.
        let mut untimed = vec![VERSION];
        untimed.extend_from_slice(&value[9..]);
        refused(s.open_retained("p_retained", &key, &untimed));
        refused(s.open_retained("p_retained", &other, &value));
        refused(s.open_retained("q_retained", &key, &value));
        refused(seal(2).open_retained("p_retained", &key, &value));
        refused(s.open_retained("p_retained", &key, &value[..10]));
        refused(s.open_retained("p_retained", &key, b""));
        // A value sealed for its key, but holding another topic.
        let moved = s
            .seal(
                "p_retained",
                &other,
                &record::encode(&RecordRef::set(&message("alice/x"))).unwrap(),
            )
            .unwrap();
        refused(s.open_retained("p_retained", &other, &moved));
    }

    #[test]
    fn node_entries_round_trip_timed_and_refuse_other_values() {
        let s = seal(1);
        let key = s.node_key_of("moatmq-0");
        assert_ne!(key, s.key_of("moatmq-0"), "apart from topics");
        assert_ne!(key, s.session_key_of("moatmq-0"), "apart from sessions");
        let value = s.seal_node("p_nodes", &key, b"{}", AT).unwrap();
        let (plain, at) = s.open_node("p_nodes", &key, &value).unwrap();
        assert_eq!((plain.as_slice(), at), (&b"{}"[..], AT));
        let refused = |r: Result<(Zeroizing<Vec<u8>>, u64), StoreError>| {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })), "{r:?}")
        };
        refused(s.open_node("p_nodes", &s.node_key_of("moatmq-1"), &value));
        refused(seal(2).open_node("p_nodes", &key, &value));
        // Without a time, or another kind of value sealed at the same key.
        refused(s.open_node(
            "p_nodes",
            &key,
            &s.seal("p_nodes", &key, b"node1{}").unwrap(),
        ));
        let will = s.seal_will("p_nodes", &key, b"{}", Some(AT)).unwrap();
        refused(s.open_node("p_nodes", &key, &will));
    }

    #[test]
    fn owner_values_round_trip_and_refuse_tampering() {
        let s = seal(1);
        let key = s.session_key_of("ualice:dev1");
        assert_ne!(
            key,
            s.key_of("ualice:dev1"),
            "sessions and topics hash apart"
        );
        assert_ne!(key, s.session_key_of("ubob:dev1"));
        let owner = Owner {
            node: "node-a".into(),
            epoch: 7,
            persistent: true,
        };
        let value = s.seal_owner("p_owner", &key, &owner).unwrap();
        assert!(!value.windows(6).any(|w| w == b"node-a"));
        assert_eq!(s.open_owner("p_owner", &key, &value).unwrap(), owner);
        let refused = |r: Result<Owner, StoreError>| {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })), "{r:?}")
        };
        let mut bad = value.clone();
        bad[20] ^= 1;
        refused(s.open_owner("p_owner", &key, &bad));
        refused(s.open_owner("p_owner", &s.session_key_of("ubob:dev1"), &value));
        refused(s.open_owner("q_owner", &key, &value));
        refused(seal(2).open_owner("p_owner", &key, &value));
        // The key marker is no ownership value, even where it authenticates.
        let marker = s.seal_marker("p_owner", &key).unwrap();
        refused(s.open_owner("p_owner", &key, &marker));
    }

    #[test]
    fn wills_open_only_where_they_were_sealed() {
        let s = seal(1);
        let key = s.session_key_of("ualice:dev1");
        let value = s.seal_will("p_wills", &key, b"will", Some(AT)).unwrap();
        let (plain, at) = s.open_will("p_wills", &key, &value).unwrap();
        assert_eq!((plain.as_slice(), at), (&b"will"[..], Some(AT)));
        let untimed = s.seal_will("p_wills", &key, b"will", None).unwrap();
        assert_eq!(s.open_will("p_wills", &key, &untimed).unwrap().1, None);
        fn refused<T>(r: Result<T, StoreError>) {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })))
        }
        refused(s.open_will("p_wills", &s.session_key_of("ubob:dev1"), &value));
        refused(s.open_will("p_handoff", &key, &value));
        refused(seal(2).open_will("p_wills", &key, &value));
        let mut later = value.clone();
        later[8] ^= 1;
        refused(s.open_will("p_wills", &key, &later));
        let handoff = s.seal_handoff("p_wills", &key, b"will").unwrap();
        refused(s.open_will("p_wills", &key, &handoff));
        refused(s.open_handoff("p_wills", &key, &value));
    }

    #[test]
    fn handoff_values_open_only_where_they_were_sealed() {
        let s = seal(1);
        let key = s.session_key_of("ualice:dev1");
        let value = s.seal_handoff("p_handoff", &key, b"session").unwrap();
        assert_eq!(
            s.open_handoff("p_handoff", &key, &value)
                .unwrap()
                .as_slice(),
            b"session"
        );
        let refused = |r: Result<Zeroizing<Vec<u8>>, StoreError>| {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })))
        };
        refused(s.open_handoff("p_handoff", &s.session_key_of("ubob:dev1"), &value));
        refused(s.open_handoff("p_owner", &key, &value));
        refused(seal(2).open_handoff("p_handoff", &key, &value));
        let owner = s
            .seal_owner(
                "p_handoff",
                &key,
                &Owner {
                    node: "a".into(),
                    epoch: 1,
                    persistent: false,
                },
            )
            .unwrap();
        refused(s.open_handoff("p_handoff", &key, &owner));
    }

    #[test]
    fn the_marker_opens_only_under_the_same_key() {
        let value = seal(1).seal_marker("p_meta", "key-check").unwrap();
        assert!(seal(1).opens_marker("p_meta", "key-check", &value));
        assert!(!seal(2).opens_marker("p_meta", "key-check", &value));
        assert!(!seal(1).opens_marker("q_meta", "key-check", &value));
    }

    #[test]
    fn transfer_messages_open_only_under_their_stream_and_id() {
        let s = seal(1);
        let value = s
            .seal_transfer("p_xfer", "a:1:7", b"topic and payload")
            .unwrap();
        let find = |needle: &[u8]| value.windows(needle.len()).any(|w| w == needle);
        assert!(!find(b"topic") && !find(b"payload"));
        assert_eq!(
            s.open_transfer("p_xfer", "a:1:7", &value)
                .unwrap()
                .as_slice(),
            b"topic and payload"
        );
        let refused = |r: Result<Zeroizing<Vec<u8>>, StoreError>| {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })), "{r:?}")
        };
        let mut bad = value.clone();
        bad[20] ^= 1;
        refused(s.open_transfer("p_xfer", "a:1:7", &bad));
        refused(s.open_transfer("p_xfer", "a:1:8", &value));
        refused(s.open_transfer("q_xfer", "a:1:7", &value));
        refused(seal(2).open_transfer("p_xfer", "a:1:7", &value));
        refused(s.open_transfer("p_xfer", "a:1:7", b""));
        // A KV value never opens as a transfer message.
        let kv = s.seal("p_xfer", "a:1:7", b"x").unwrap();
        refused(s.open_transfer("p_xfer", "a:1:7", &kv));
    }

    #[test]
    fn batches_and_single_messages_never_open_as_each_other() {
        let s = seal(1);
        let batch = s.seal_transfer_batch("p_xfer", "a:1:7", b"batch").unwrap();
        assert_eq!(
            s.open_transfer_batch("p_xfer", "a:1:7", &batch)
                .unwrap()
                .as_slice(),
            b"batch"
        );
        let refused = |r: Result<Zeroizing<Vec<u8>>, StoreError>| {
            assert!(matches!(r, Err(StoreError::SealedValue { .. })), "{r:?}")
        };
        refused(s.open_transfer("p_xfer", "a:1:7", &batch));
        refused(s.open_transfer_batch("p_xfer", "a:1:8", &batch));
        refused(s.open_transfer_batch("q_xfer", "a:1:7", &batch));
        refused(seal(2).open_transfer_batch("p_xfer", "a:1:7", &batch));
        let single = s.seal_transfer("p_xfer", "a:1:7", b"batch").unwrap();
        refused(s.open_transfer_batch("p_xfer", "a:1:7", &single));
    }
}
