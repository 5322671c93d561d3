//! Slowing down online password guessing.
//!
//! Policy: failures are counted per source address (IPv4 address, or IPv6 /64 prefix,
//! since one IPv6 host usually controls a whole /64; IPv4-mapped IPv6 counts as IPv4).
//! The first [`FREE_FAILURES`] failures cost nothing; from then on every login attempt
//! from that address waits before its CONNACK, starting at 250 ms and doubling with each
//! further failure up to 10 s. A successful login clears the address; so does 10 minutes
//! without a failure. At most [`MAX_TRACKED`] addresses are remembered; when full, the
//! one whose last failure is oldest is forgotten.
//!
//! Intended use in the gateway: `delay_for` before answering *every* CONNECT from that
//! address (success or not, so the delay itself reveals nothing), then
//! `record_failure` or `record_success` once the password has been checked.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures from one address that are not delayed.
pub const FREE_FAILURES: u32 = 3;
/// The first delay, once the free failures are used up.
pub const BASE_DELAY: Duration = Duration::from_millis(250);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Quiet time after which an address's failures are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most addresses tracked at once.
pub const MAX_TRACKED: usize = 100_000;

/// Per-source-address failed-login throttle. `Send + Sync`; share it in an `Arc`.
pub struct LoginThrottle {
    max_tracked: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<IpAddr, Entry>,
    /// Entries ordered by last failure (a sequence number), oldest first, for eviction.
    by_age: BTreeMap<u64, IpAddr>,
    next_seq: u64,
}

struct Entry {
    failures: u32,
    last_failure: Instant,
    seq: u64,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle")
            .field("max_tracked", &self.max_tracked)
            .field("tracked", &self.lock().entries.len())
            .finish()
    }
}

impl LoginThrottle {
    /// A throttle tracking at most [`MAX_TRACKED`] addresses.
    pub fn new() -> Self {
        Self::with_capacity(MAX_TRACKED)
    }

    /// A throttle tracking at most `max_tracked` addresses (at least 1).
    pub fn with_capacity(max_tracked: usize) -> Self {
        LoginThrottle {
            max_tracked: max_tracked.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// How long to wait before answering the next login attempt from `ip`.
    pub fn delay_for(&self, ip: IpAddr) -> Duration {
        self.delay_at(ip, Instant::now())
    }

    /// Counts a failed login from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.failure_at(ip, Instant::now());
    }

    /// Forgets the failures of `ip` after a successful login.
    pub fn record_success(&self, ip: IpAddr) {
        let key = bucket(ip);
        let mut state = self.lock();
        if let Some(entry) = state.entries.remove(&key) {
            state.by_age.remove(&entry.seq);
        }
    }

    /// Number of addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is always consistent between statements, so a panic elsewhere while
        // holding the lock leaves nothing half-done: keep going rather than fail open.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn delay_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let key = bucket(ip);
        let mut state = self.lock();
        let Some(entry) = state.entries.get(&key) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(entry.last_failure) >= FORGET_AFTER {
            let seq = entry.seq;
            state.entries.remove(&key);
            state.by_age.remove(&seq);
            return Duration::ZERO;
        }
        delay_after(entry.failures)
    }

    fn failure_at(&self, ip: IpAddr, now: Instant) {
        let key = bucket(ip);
        let mut guard = self.lock();
        let state = &mut *guard;
        let seq = state.next_seq;
        state.next_seq += 1;
        if let Some(entry) = state.entries.get_mut(&key) {
            if now.saturating_duration_since(entry.last_failure) >= FORGET_AFTER {
                entry.failures = 0;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = now;
            state.by_age.remove(&entry.seq);
            entry.seq = seq;
            state.by_age.insert(seq, key);
            return;
        }
        while state.entries.len() >= self.max_tracked {
            let Some((_, oldest)) = state.by_age.pop_first() else {
                break;
            };
            state.entries.remove(&oldest);
        }
        state.entries.insert(
            key,
            Entry {
                failures: 1,
                last_failure: now,
                seq,
            },
        );
        state.by_age.insert(seq, key);
    }
}

/// The delay once `failures` failures have been recorded.
fn delay_after(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    BASE_DELAY
        .checked_mul(1u32 << doublings)
        .map_or(MAX_DELAY, |d| d.min(MAX_DELAY))
}

/// The address a limit counts against: IPv4 as is, IPv6 by its /64 (one subscriber's
/// prefix), so rotating through a prefix does not buy fresh budgets.
pub fn address_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The key failures are counted under.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn growth_and_cap() {
        let t = LoginThrottle::new();
        let now = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..12 {
            seen.push(t.delay_at(A, now));
            t.failure_at(A, now);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [0, 0, 0, 250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
        assert_eq!(
            t.delay_at(B, now),
            Duration::ZERO,
            "other addresses unaffected"
        );
        for _ in 0..1000 {
            t.failure_at(A, now);
        }
        assert_eq!(t.delay_at(A, now), MAX_DELAY);
    }

    #[test]
    fn success_resets() {
        let t = LoginThrottle::new();
        for _ in 0..5 {
            t.record_failure(A);
        }
        assert!(t.delay_for(A) > Duration::ZERO);
        t.record_success(A);
        assert_eq!(t.delay_for(A), Duration::ZERO);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn quiet_period_forgets() {
        let t = LoginThrottle::new();
        let start = Instant::now();
        for _ in 0..5 {
            t.failure_at(A, start);
        }
        assert_eq!(
            t.delay_at(A, start + Duration::from_secs(599)),
            Duration::from_secs(1)
        );
        assert_eq!(t.delay_at(A, start + FORGET_AFTER), Duration::ZERO);
        // A failure after the quiet period starts counting from one again.
        for _ in 0..5 {
            t.failure_at(B, start);
        }
        t.failure_at(B, start + FORGET_AFTER);
        assert_eq!(t.delay_at(B, start + FORGET_AFTER), Duration::ZERO);
    }

    #[test]
    fn bounded_memory_evicts_oldest() {
        let t = LoginThrottle::with_capacity(3);
        let now = Instant::now();
        for i in 0..10u8 {
            t.failure_at(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), now);
        }
        assert_eq!(t.tracked(), 3);
        // Keep A hot; it must survive a flood of new addresses.
        let t = LoginThrottle::with_capacity(3);
        for _ in 0..4 {
            t.failure_at(A, now);
        }
        for i in 0..10u8 {
            t.failure_at(A, now);
            t.failure_at(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), now);
        }
        assert_eq!(t.tracked(), 3);
        assert_eq!(t.delay_at(A, now), MAX_DELAY);
    }

    #[test]
    fn ipv6_counts_per_slash_64() {
        let t = LoginThrottle::new();
        let now = Instant::now();
        for i in 0..4u16 {
            t.failure_at(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, i, i, i, i)),
                now,
            );
        }
        let same_prefix = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
        let other_prefix = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert_eq!(t.delay_at(same_prefix, now), Duration::from_millis(500));
        assert_eq!(t.delay_at(other_prefix, now), Duration::ZERO);
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        for _ in 0..3 {
            t.failure_at(mapped, now);
        }
        assert_eq!(t.delay_at(A, now), BASE_DELAY);
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<LoginThrottle>();
        check::<crate::PasswordFile>();
    }
}
