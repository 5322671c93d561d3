//! The verified-credential cache: a client that reconnects with the username and
//! password it logged in with a moment ago skips the Argon2id check.
//!
//! A login storm after a network outage (10,000 devices reconnecting at once) would
//! otherwise queue 10,000 deliberately slow hashes. Every first verification still runs
//! the full hash; only its success is remembered, as an HMAC-SHA-256 of username,
//! password and the user's password-file entry under a key drawn at random when the
//! process starts. Nothing reversible is kept: no password, no hash of one that could
//! be checked without that key, never on disk or in a log. An entry lives at most `ttl`
//! from the verification that made it (a hit does not extend it), the cache holds at
//! most `capacity` entries (the oldest go first), a rejected password is never
//! remembered, and an entry is bound to the user's entry in the password file: a
//! changed or deleted entry no longer matches, and [`CredentialCache::retain_valid`]
//! drops such entries when the file is reloaded.
//!
//! The trade-off (docs/security.md): someone who can read the broker's memory can test
//! guesses against the cached entries at HMAC speed instead of Argon2id speed, for the
//! users that logged in within `ttl`. Such a reader already sees every message and the
//! retained-store key; `ttl = 0` turns the cache off.

use crate::password_file::{PasswordFile, Verdict};
use hmac::{Hmac, Mac};
use password_hash::rand_core::{OsRng, RngCore};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

type Tag = [u8; 32];

/// Remembers recent successful password verifications (see the module documentation).
pub struct CredentialCache {
    key: Zeroizing<[u8; 32]>,
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Tag, Entry>,
    /// Tags in insertion order, for expiry and eviction. A tag inserted again appears
    /// twice; the older position is skipped when its time does not match the entry's.
    order: VecDeque<(Tag, Instant)>,
}

struct Entry {
    user: Box<str>,
    /// The password-file entry this verification was against.
    stamp: [u8; 32],
    verdict: Verdict,
    at: Instant,
}

impl std::fmt::Debug for CredentialCache {
    // Never print tags or names: only the size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("entries", &self.len())
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl CredentialCache {
    /// A cache of at most `capacity` entries, each kept for `ttl`; either being zero
    /// turns it off (every lookup misses, nothing is stored).
    pub fn new(capacity: usize, ttl: Duration) -> CredentialCache {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut key[..]);
        CredentialCache {
            key,
            ttl,
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn enabled(&self) -> bool {
        self.capacity > 0 && !self.ttl.is_zero()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tag of a (user, password) pair against the user's current entry; `None` for
    /// a user the file does not have (nothing is cached for those).
    fn tag(&self, file: &PasswordFile, username: &str, password: &[u8]) -> Option<(Tag, [u8; 32])> {
        let stamp = *file.stamp(username)?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key[..]).ok()?;
        // Lengths first: no two different (user, password) pairs feed the same bytes.
        mac.update(&(username.len() as u64).to_be_bytes());
        mac.update(username.as_bytes());
        mac.update(&stamp);
        mac.update(password);
        Some((mac.finalize().into_bytes().into(), stamp))
    }

    /// The verdict of an earlier successful verification of exactly these credentials
    /// against `username`'s current entry in `file`, if one is cached and fresh.
    pub fn lookup(&self, file: &PasswordFile, username: &str, password: &[u8]) -> Option<Verdict> {
        if !self.enabled() {
            return None;
        }
        let (tag, stamp) = self.tag(file, username, password)?;
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(now, self.ttl);
        let entry = inner.entries.get(&tag)?;
        // The tag binds user and stamp already; this costs nothing and says so.
        (entry.stamp == stamp && &*entry.user == username).then_some(entry.verdict)
    }

    /// Remembers a verification; only successes are kept.
    pub fn insert(&self, file: &PasswordFile, username: &str, password: &[u8], verdict: Verdict) {
        if !self.enabled() || verdict == Verdict::Rejected {
            return;
        }
        let Some((tag, stamp)) = self.tag(file, username, password) else {
            return;
        };
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(now, self.ttl);
        // The same credentials again replace their entry (its old position goes stale).
        inner.entries.remove(&tag);
        while inner.entries.len() >= self.capacity {
            if !inner.evict_oldest() {
                break;
            }
        }
        inner.entries.insert(
            tag,
            Entry {
                user: username.into(),
                stamp,
                verdict,
                at: now,
            },
        );
        inner.order.push_back((tag, now));
    }

    /// The password file was reloaded: entries of users whose entry changed or is gone
    /// are dropped.
    pub fn retain_valid(&self, file: &PasswordFile) {
        let mut inner = self.lock();
        inner
            .entries
            .retain(|_, e| file.stamp(&e.user) == Some(&e.stamp));
        let Inner { entries, order } = &mut *inner;
        order.retain(|(tag, at)| entries.get(tag).is_some_and(|e| e.at == *at));
    }

    /// Entries held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Drops entries older than `ttl`.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some(&(_, at)) = self.order.front() {
            if now.duration_since(at) < ttl {
                break;
            }
            self.evict_oldest();
        }
    }

    /// Drops the oldest entry; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((tag, at)) = self.order.pop_front() {
            // A stale position (the tag was inserted again later) is skipped.
            if self.entries.get(&tag).is_some_and(|e| e.at == at) {
                self.entries.remove(&tag);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_password;
    use std::path::Path;

    fn file(users: &[(&str, &str)]) -> PasswordFile {
        let text: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", hash_password(p.as_bytes()).unwrap()))
            .collect();
        PasswordFile::parse(Path::new("passwd"), &text).unwrap()
    }

    const TTL: Duration = Duration::from_secs(600);

    #[test]
    fn a_success_is_remembered_for_exactly_those_credentials() {
        let f = file(&[("alice", "right"), ("bob", "other")]);
        let cache = CredentialCache::new(10, TTL);
        assert_eq!(cache.lookup(&f, "alice", b"right"), None);
        cache.insert(&f, "alice", b"right", Verdict::Accepted);
        assert_eq!(cache.lookup(&f, "alice", b"right"), Some(Verdict::Accepted));
        assert_eq!(cache.lookup(&f, "alice", b"wrong"), None);
        assert_eq!(cache.lookup(&f, "alice", b"right "), None);
        assert_eq!(cache.lookup(&f, "bob", b"right"), None);
        // Moving bytes between username and password gives another tag.
        assert_eq!(cache.lookup(&f, "alic", b"eright"), None);
    }

    #[test]
    fn a_rejection_is_never_remembered() {
        let f = file(&[("alice", "right")]);
        let cache = CredentialCache::new(10, TTL);
        cache.insert(&f, "alice", b"wrong", Verdict::Rejected);
        assert!(cache.is_empty());
        // Unknown users have no entry to bind to: nothing is cached for them.
        cache.insert(&f, "nobody", b"x", Verdict::Accepted);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_changed_or_deleted_entry_no_longer_matches_and_is_dropped_on_reload() {
        let old = file(&[("alice", "right"), ("bob", "bob-pw")]);
        let cache = CredentialCache::new(10, TTL);
        cache.insert(&old, "alice", b"right", Verdict::Accepted);
        cache.insert(&old, "bob", b"bob-pw", Verdict::Accepted);
        // alice's entry is re-hashed (same password, new salt); bob is deleted.
        let new = file(&[("alice", "right")]);
        assert_eq!(cache.lookup(&new, "alice", b"right"), None);
        assert_eq!(cache.lookup(&new, "bob", b"bob-pw"), None);
        cache.retain_valid(&new);
        assert!(cache.is_empty());
        // An unchanged entry survives a reload.
        cache.insert(&new, "alice", b"right", Verdict::Accepted);
        cache.retain_valid(&new);
        assert_eq!(
            cache.lookup(&new, "alice", b"right"),
            Some(Verdict::Accepted)
        );
    }

    #[test]
    fn bounded_oldest_first_and_expiring() {
        let users: Vec<(String, String)> =
            (0..5).map(|i| (format!("u{i}"), format!("p{i}"))).collect();
        let refs: Vec<(&str, &str)> = users.iter().map(|(u, p)| (&u[..], &p[..])).collect();
        let f = file(&refs);
        let cache = CredentialCache::new(3, TTL);
        for (u, p) in &refs {
            cache.insert(&f, u, p.as_bytes(), Verdict::Accepted);
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.lookup(&f, "u0", b"p0"), None);
        assert_eq!(cache.lookup(&f, "u1", b"p1"), None);
        assert_eq!(cache.lookup(&f, "u4", b"p4"), Some(Verdict::Accepted));
        // Inserting the same credentials again does not grow the cache.
        cache.insert(&f, "u4", b"p4", Verdict::Accepted);
        assert_eq!(cache.len(), 3);

        let short = CredentialCache::new(3, Duration::from_millis(30));
        short.insert(&f, "u0", b"p0", Verdict::Accepted);
        assert_eq!(short.lookup(&f, "u0", b"p0"), Some(Verdict::Accepted));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(short.lookup(&f, "u0", b"p0"), None);
        assert!(short.is_empty());
    }

    #[test]
    fn zero_capacity_or_ttl_turns_it_off() {
        let f = file(&[("alice", "right")]);
        for cache in [
            CredentialCache::new(0, TTL),
            CredentialCache::new(10, Duration::ZERO),
        ] {
            cache.insert(&f, "alice", b"right", Verdict::Accepted);
            assert_eq!(cache.lookup(&f, "alice", b"right"), None);
        }
    }

    #[test]
    fn two_processes_derive_different_tags() {
        let f = file(&[("alice", "right")]);
        let a = CredentialCache::new(1, TTL);
        let b = CredentialCache::new(1, TTL);
        assert_ne!(a.tag(&f, "alice", b"right"), b.tag(&f, "alice", b"right"));
    }
}
