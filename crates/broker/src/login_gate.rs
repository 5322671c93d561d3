//! At most N password logins in progress per address, a short queue, else "busy".
//!
//! The throttle's delay only slows guessing if parallel attempts cannot each wait it
//! out at the same time: a login holds one of its address's slots
//! ([`ThrottleParams::in_progress_per_address`]) from before its delay until its hash
//! check is done. A few more wait for a slot
//! ([`ThrottleParams::waiting_per_address`]); past that the address is answered "server
//! busy" at once. Addresses are [`address_bucket`]s (IPv6 by /64).

use moatmq_auth::{address_bucket, ThrottleParams};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The address already has its slots taken and its queue full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateFull;

/// One address's slots.
struct Slots {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// The per-address slots of every address with a login in progress or waiting.
pub struct LoginGate {
    in_progress: usize,
    waiting: usize,
    addresses: Mutex<HashMap<IpAddr, Arc<Slots>>>,
}

/// A slot held for one login; released (and the address forgotten when idle) on drop.
pub struct LoginSlot<'a> {
    gate: &'a LoginGate,
    address: IpAddr,
    slots: Arc<Slots>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Takes one back from the waiting count when a waiter stops waiting (slot or cancel).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LoginGate {
    pub fn new(params: &ThrottleParams) -> LoginGate {
        LoginGate {
            in_progress: params.in_progress_per_address.max(1),
            waiting: params.waiting_per_address,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Arc<Slots>>> {
        self.addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for one of `peer`'s slots; `GateFull` at once if its queue is full too.
    pub async fn enter(&self, peer: IpAddr) -> Result<LoginSlot<'_>, GateFull> {
        let address = address_bucket(peer);
        let slots = self
            .lock()
            .entry(address)
            .or_insert_with(|| {
                Arc::new(Slots {
                    slots: Arc::new(Semaphore::new(self.in_progress)),
                    waiting: AtomicUsize::new(0),
                })
            })
            .clone();
        // Made before any early return, so a refusal also forgets an idle address.
        let mut slot = LoginSlot {
            gate: self,
            address,
            slots,
            permit: None,
        };
        let semaphore = slot.slots.slots.clone();
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            slot.permit = Some(permit);
            return Ok(slot);
        }
        if slot.slots.waiting.fetch_add(1, Ordering::AcqRel) >= self.waiting {
            slot.slots.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(GateFull);
        }
        let waiting = Waiting(&slot.slots.waiting);
        // The semaphore is never closed, so this only ends with a permit.
        let permit = semaphore.acquire_owned().await.map_err(|_| GateFull)?;
        drop(waiting);
        slot.permit = Some(permit);
        Ok(slot)
    }

    /// Addresses with a login in progress or waiting.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for LoginSlot<'_> {
    fn drop(&mut self) {
        let mut addresses = self.gate.lock();
        drop(self.permit.take());
        // Only the map and this slot hold the address's state: nobody is using it.
        if Arc::strong_count(&self.slots) == 2 {
            addresses.remove(&self.address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[tokio::test]
    async fn slots_then_queue_then_full() {
        let params = ThrottleParams::default();
        let gate = LoginGate::new(&params);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let s1 = gate.enter(a).await.expect("slot 1");
        let s2 = gate.enter(a).await.expect("slot 2");
        // The next ones wait; one more is refused at once.
        let mut waiters = Vec::new();
        for _ in 0..params.waiting_per_address {
            let mut w = Box::pin(gate.enter(a));
            assert!(futures_poll_once(&mut w).await.is_none(), "waits");
            waiters.push(w);
        }
        assert!(matches!(gate.enter(a).await, Err(GateFull)));
        // Another address is not affected.
        let other = gate.enter(b).await.expect("other address");
        drop(other);
        // A cancelled waiter frees its place in the queue.
        waiters.pop();
        let mut w = Box::pin(gate.enter(a));
        assert!(futures_poll_once(&mut w).await.is_none());
        waiters.push(w);
        drop(s1);
        let s3 = waiters
            .remove(0)
            .await
            .expect("a waiter gets the freed slot");
        drop((s2, s3));
        for w in waiters {
            drop(w.await.expect("each waiter in turn"));
        }
        assert_eq!(gate.tracked(), 0, "idle addresses are forgotten");
    }

    #[tokio::test]
    async fn an_ipv6_slash_64_shares_its_slots() {
        use std::net::Ipv6Addr;
        let params = ThrottleParams {
            waiting_per_address: 0,
            ..ThrottleParams::default()
        };
        let gate = LoginGate::new(&params);
        let host = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i));
        let _a = gate.enter(host(1)).await.expect("slot 1");
        let _b = gate.enter(host(2)).await.expect("slot 2");
        assert!(matches!(gate.enter(host(3)).await, Err(GateFull)));
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert!(gate.enter(other).await.is_ok(), "another /64 has its own");
    }

    /// Polls a future once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::time::timeout(std::time::Duration::from_millis(20), f)
            .await
            .ok()
    }
}
