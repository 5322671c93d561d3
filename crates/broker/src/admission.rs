//! Per-address connection slots, taken at accept before any TLS or WebSocket handshake.
//!
//! Every connection from one source address (IPv4 address, IPv6 /64, see
//! [`moatmq_auth::address_bucket`]) holds one of `limits.max_connections_per_address`
//! slots for its whole life, and one of `limits.max_pending_per_address` pending slots
//! until its CONNACK is sent. A connection that finds either full is closed at once, so
//! idle sockets from one address can neither hold every `max_connections` slot nor keep
//! handshakes running. Slots are RAII guards: dropping the guard frees them, whatever
//! path the connection took.

use moatmq_auth::address_bucket;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Why a connection was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The address holds `max_connections_per_address` connections.
    Connections,
    /// The address has `max_pending_per_address` connections not yet logged in.
    Pending,
}

impl Full {
    pub fn limit(self) -> &'static str {
        match self {
            Full::Connections => "max_connections_per_address",
            Full::Pending => "max_pending_per_address",
        }
    }
}

/// Slot counts per address bucket.
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    max_pending: usize,
    counts: Mutex<HashMap<IpAddr, Counts>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    connections: usize,
    pending: usize,
}

impl Admission {
    pub fn new(max_connections: usize, max_pending: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_connections,
            max_pending,
            counts: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Counts>> {
        // The map holds plain counters: a panic elsewhere cannot leave it half-updated.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a connection slot and a pending slot for `ip`, or says which limit is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let key = address_bucket(ip);
        let mut counts = self.lock();
        let c = counts.entry(key).or_default();
        let refused = if c.connections >= self.max_connections {
            Some(Full::Connections)
        } else if c.pending >= self.max_pending {
            Some(Full::Pending)
        } else {
            None
        };
        if let Some(full) = refused {
            if c.connections == 0 {
                counts.remove(&key);
            }
            return Err(full);
        }
        c.connections += 1;
        c.pending += 1;
        Ok(Slot {
            table: self.clone(),
            key,
            pending: AtomicBool::new(true),
        })
    }

    fn release(&self, key: IpAddr, pending: bool) {
        let mut counts = self.lock();
        if let Some(c) = counts.get_mut(&key) {
            if pending {
                c.pending = c.pending.saturating_sub(1);
            }
            c.connections = c.connections.saturating_sub(1);
            if c.connections == 0 {
                counts.remove(&key);
            }
        }
    }

    fn end_pending(&self, key: IpAddr) {
        if let Some(c) = self.lock().get_mut(&key) {
            c.pending = c.pending.saturating_sub(1);
        }
    }
}

/// One connection's slots; dropping it frees them.
#[derive(Debug)]
pub struct Slot {
    table: Arc<Admission>,
    key: IpAddr,
    pending: AtomicBool,
}

impl Slot {
    /// The connection is logged in (CONNACK sent): it no longer counts as pending.
    /// Idempotent.
    pub fn established(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            self.table.end_pending(self.key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table
            .release(self.key, self.pending.load(Ordering::Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn connection_and_pending_limits_per_address() {
        let table = Admission::new(3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let first = table.admit(a).unwrap();
        let second = table.admit(a).unwrap();
        assert_eq!(table.admit(a).unwrap_err(), Full::Pending);
        first.established();
        first.established(); // idempotent
        let third = table.admit(a).unwrap();
        third.established();
        assert_eq!(table.admit(a).unwrap_err(), Full::Connections);
        assert!(table.admit([10, 0, 0, 2].into()).is_ok(), "other address");
        drop(second);
        let fourth = table.admit(a).unwrap();
        drop((first, third, fourth));
        assert!(table.lock().is_empty(), "nothing left behind");
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_slots() {
        let table = Admission::new(2, 2);
        let host = |i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, 7, i, i, i, i));
        let _a = table.admit(host(1)).unwrap();
        let _b = table.admit(host(2)).unwrap();
        assert_eq!(table.admit(host(3)).unwrap_err(), Full::Connections);
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, 8, 0, 0, 0, 1));
        assert!(table.admit(other).is_ok());
    }
}
