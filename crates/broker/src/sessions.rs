//! Which connection holds each router session (keyed by router client id) right now.
//!
//! rumqttd takes a session over by tearing the old link down inside the router
//! (`Router::handle_disconnection`), which panics for a persistent session in a shared
//! group ("group must exists"). So the router never does a takeover: a new connection
//! for a router client id first asks the connection holding it to close, waits until
//! that gateway has torn its link down in order (`gateway::Gateway::run`), and only then
//! opens its own link. At most one connection holds a router client id at a time.
//!
//! It also keeps what moatmq knows of each persistent session while the router keeps it
//! (until a clean connection or expiry discards it): whose it is, for
//! `limits.max_sessions_per_user`, and its filters, so that
//! `limits.max_subscriptions_per_client` counts per session, not per connection.

use crate::durable::Replay;
use moatmq_store::SubscriptionOptions;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// The holders of router client ids and the kept persistent sessions.
#[derive(Default)]
pub struct Sessions {
    live: Arc<Mutex<HashMap<String, Holder>>>,
    next_generation: std::sync::atomic::AtomicU64,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// By router client id.
    sessions: HashMap<String, KeptSession>,
    /// Kept sessions per user (`None`: anonymous).
    per_user: HashMap<Option<String>, usize>,
}

struct KeptSession {
    user: Option<String>,
    filters: Filters,
}

/// A session's subscriptions: filter as the client wrote it, and its options.
pub type Filters = BTreeMap<String, SubscriptionOptions>;

/// The user already has `limits.max_sessions_per_user` persistent sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionQuota;

struct Holder {
    generation: u64,
    /// Asks the holder to close.
    kick: Arc<Notify>,
    /// Stored messages for the holder to replay (handed over late by another node).
    late: Arc<LateMail>,
    /// Becomes `true` once the holder's link is torn down.
    gone: watch::Receiver<bool>,
}

/// Holding a router client id; dropping it (after the link is torn down) frees it.
pub struct SessionHold {
    live: Arc<Mutex<HashMap<String, Holder>>>,
    router_id: String,
    generation: u64,
    gone: watch::Sender<bool>,
    /// Notified when a newer connection wants this session.
    pub kicked: Arc<Notify>,
    /// Stored messages handed to this connection to replay.
    pub late: Arc<LateMail>,
}

/// Messages another node handed over late for a connection's session, already stored
/// (`durable::SessionBook::late`): the connection replays them. Dropped with the
/// connection, the store still has them for the next resume.
#[derive(Default)]
pub struct LateMail {
    notify: Notify,
    messages: Mutex<Vec<Replay>>,
}

impl LateMail {
    /// Waits for mail (a permit is kept if it came while nobody waited).
    pub async fn arrived(&self) {
        self.notify.notified().await
    }

    /// The mail so far.
    pub fn take(&self) -> Vec<Replay> {
        std::mem::take(&mut *lock(&self.messages))
    }
}

impl Sessions {
    /// Takes `router_id`, closing the connection that holds it first. `None` if that
    /// connection did not let go within `wait`.
    pub async fn hold(&self, router_id: &str, wait: Duration) -> Option<SessionHold> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (kick, mut gone) = {
                let mut live = lock(&self.live);
                match live.get(router_id) {
                    None => return Some(self.insert(&mut live, router_id)),
                    Some(h) => (h.kick.clone(), h.gone.clone()),
                }
            };
            kick.notify_one();
            // An error means the holder was dropped: it is gone too.
            if tokio::time::timeout_at(deadline, gone.wait_for(|g| *g))
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Takes `router_id` only if no connection holds it (session expiry must not close a
    /// client that came back).
    pub fn try_hold(&self, router_id: &str) -> Option<SessionHold> {
        let mut live = lock(&self.live);
        if live.contains_key(router_id) {
            return None;
        }
        Some(self.insert(&mut live, router_id))
    }

    fn insert(&self, live: &mut HashMap<String, Holder>, router_id: &str) -> SessionHold {
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        let late = Arc::new(LateMail::default());
        let (gone_tx, gone_rx) = watch::channel(false);
        live.insert(
            router_id.to_string(),
            Holder {
                generation,
                kick: kick.clone(),
                late: late.clone(),
                gone: gone_rx,
            },
        );
        SessionHold {
            live: self.live.clone(),
            router_id: router_id.to_string(),
            generation,
            gone: gone_tx,
            kicked: kick,
            late,
        }
    }

    /// Hands `messages` to the connection holding `router_id` to replay; `false` if none
    /// does (the store keeps them for the next resume).
    pub fn mail_late(&self, router_id: &str, messages: Vec<Replay>) -> bool {
        let live = lock(&self.live);
        let Some(holder) = live.get(router_id) else {
            return false;
        };
        lock(&holder.late.messages).extend(messages);
        holder.late.notify.notify_one();
        true
    }
}

impl Sessions {
    /// Whether [`Sessions::resume`] would let `user` open or resume `router_id` now: it
    /// is kept here already, or `user` has fewer than `max_per_user`.
    pub fn within_quota(&self, router_id: &str, user: Option<&str>, max_per_user: usize) -> bool {
        let kept = lock(&self.kept);
        kept.sessions.contains_key(router_id)
            || kept
                .per_user
                .get(&user.map(str::to_string))
                .map_or(true, |n| *n < max_per_user)
    }

    /// A persistent session is opened or resumed under `router_id`: the filters it held
    /// (empty for a new one). A new one past `max_per_user` for `user` is refused.
    pub fn resume(
        &self,
        router_id: &str,
        user: Option<&str>,
        max_per_user: usize,
    ) -> Result<Filters, SessionQuota> {
        let mut kept = lock(&self.kept);
        if let Some(s) = kept.sessions.get(router_id) {
            return Ok(s.filters.clone());
        }
        let user = user.map(str::to_string);
        let count = kept.per_user.entry(user.clone()).or_insert(0);
        if *count >= max_per_user {
            return Err(SessionQuota);
        }
        *count += 1;
        kept.sessions.insert(
            router_id.to_string(),
            KeptSession {
                user,
                filters: Filters::new(),
            },
        );
        Ok(Filters::new())
    }

    /// Connected clients, persistent sessions whose client is away, and those sessions'
    /// subscriptions (the `$SYS` tree's aggregates; counted, never listed).
    pub fn counts(&self) -> (usize, usize, u64) {
        let kept = lock(&self.kept);
        let live = lock(&self.live);
        let (mut away, mut filters) = (0, 0u64);
        for (id, s) in &kept.sessions {
            if !live.contains_key(id) {
                away += 1;
                filters += s.filters.len() as u64;
            }
        }
        (live.len(), away, filters)
    }

    /// A persistent session's connection ended: its filters as the router keeps them.
    pub fn save(&self, router_id: &str, filters: &Filters) {
        if let Some(s) = lock(&self.kept).sessions.get_mut(router_id) {
            s.filters.clone_from(filters);
        }
    }

    /// The router no longer keeps this session (clean connection, expiry). `true` if
    /// it was kept: the router still holds it until a clean link under its id.
    pub fn forget(&self, router_id: &str) -> bool {
        let mut kept = lock(&self.kept);
        let Some(s) = kept.sessions.remove(router_id) else {
            return false;
        };
        if let Some(n) = kept.per_user.get_mut(&s.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                kept.per_user.remove(&s.user);
            }
        }
        true
    }
}

impl Drop for SessionHold {
    fn drop(&mut self) {
        let mut live = lock(&self.live);
        if live
            .get(&self.router_id)
            .is_some_and(|h| h.generation == self.generation)
        {
            live.remove(&self.router_id);
        }
        drop(live);
        let _ = self.gone.send(true);
    }
}

/// The map stays consistent under a panic elsewhere (every change is one insert or
/// remove), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_holder_waits_for_the_old_one_to_let_go() {
        let sessions = Arc::new(Sessions::default());
        let first = sessions.hold("a", Duration::from_secs(1)).await.unwrap();
        assert!(sessions.try_hold("a").is_none());
        let kicked = first.kicked.clone();
        let s = sessions.clone();
        let second = tokio::spawn(async move { s.hold("a", Duration::from_secs(5)).await });
        kicked.notified().await;
        drop(first);
        let second = second.await.unwrap().expect("taken over");
        assert!(sessions.try_hold("a").is_none());
        drop(second);
        assert!(sessions.try_hold("a").is_some());
    }

    #[test]
    fn kept_sessions_are_counted_per_user_until_forgotten() {
        let s = Sessions::default();
        assert!(s.resume("a1", Some("a"), 2).unwrap().is_empty());
        assert!(s.resume("a2", Some("a"), 2).is_ok());
        assert_eq!(s.resume("a3", Some("a"), 2), Err(SessionQuota));
        assert!(s.resume("b1", Some("b"), 2).is_ok(), "per user");
        // Resuming a kept session is not a new one, and keeps its filters.
        s.save(
            "a1",
            &Filters::from([("x/#".to_string(), Default::default())]),
        );
        assert_eq!(s.resume("a1", Some("a"), 2).unwrap().len(), 1);
        s.forget("a1");
        assert!(s.resume("a3", Some("a"), 2).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_holder_that_does_not_let_go_times_the_newcomer_out() {
        let sessions = Sessions::default();
        let _first = sessions.hold("a", Duration::from_secs(1)).await.unwrap();
        assert!(sessions
            .hold("a", Duration::from_millis(50))
            .await
            .is_none());
    }
}
