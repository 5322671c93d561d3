//! Slowing down online password guessing.
//!
//! Policy ([`ThrottleParams`], defaults in brackets): failures are counted twice, per
//! source address ([`address_bucket`]: IPv4 as is, IPv6 by /64) and per (address,
//! username). Each count has its free failures ([3] per (address, username), [10] per
//! address); past them every login attempt from that address (for that username) waits
//! before it is checked, starting at [250 ms] and doubling with each further failure up
//! to [10 s]; the longer of the two delays applies. A successful login clears only its
//! own (address, username) count: never the address's, never another user's, so an
//! attacker logging into its own account buys nothing. 10 minutes without a failure
//! forget a count. At most [`MAX_TRACKED`] keys are remembered per table; when full, the
//! one whose last failure is oldest is forgotten. Usernames are kept as keyed 64-bit
//! hashes, so a long name costs no memory.
//!
//! An address is *throttled* while its next attempt would wait for at least one
//! username: its own count, or one of its (address, username) counts, is past its free
//! failures and not yet forgotten ([`LoginThrottle::throttled_addresses`], the
//! `moatmq_login_throttled_addresses` gauge).
//!
//! The delay alone does not bound guessing: parallel attempts would each wait it once.
//! The broker therefore lets at most [2] password logins per address be in progress
//! (waiting out the delay or being hashed) and [16] more wait for a turn; the rest are
//! answered "server busy". [`max_checked_guesses`] turns these parameters into the
//! worst-case number of passwords one address gets checked in a time window.
//!
//! Intended use in the gateway: take an in-progress slot, `delay_for` before answering
//! *every* CONNECT (success or not, so the delay itself reveals nothing), then
//! `record_failure` or `record_success` once the password has been checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Quiet time after which an address's failures are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most keys tracked at once, per table (addresses; (address, username) pairs).
pub const MAX_TRACKED: usize = 100_000;

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

/// The throttle's parameters; [`ThrottleParams::default`] is what the broker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleParams {
    /// Failures per (address, username) that are not delayed.
    pub free_per_user: u32,
    /// Failures per address (any usernames) that are not delayed.
    pub free_per_address: u32,
    /// The first delay, once the free failures are used up.
    pub base_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// Password logins from one address in progress at once (delay plus hash check).
    pub in_progress_per_address: usize,
    /// Password logins from one address waiting for an in-progress slot; more are
    /// answered "server busy". Waiting costs no check, so this does not change
    /// [`max_checked_guesses`]; it lets a burst of correct logins from one address (a
    /// fleet behind one NAT, a login benchmark) queue instead of being refused.
    pub waiting_per_address: usize,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            free_per_user: 3,
            free_per_address: 10,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            in_progress_per_address: 2,
            waiting_per_address: 16,
        }
    }
}

impl ThrottleParams {
    /// The delay once `failures` failures have been recorded against a count with
    /// `free` free failures.
    fn delay_after(&self, failures: u32, free: u32) -> Duration {
        if failures < free {
            return Duration::ZERO;
        }
        let doublings = (failures - free).min(16);
        self.base_delay
            .checked_mul(1u32 << doublings)
            .map_or(self.max_delay, |d| d.min(self.max_delay))
    }

    /// Checked guesses per second one address sustains once its delay is at the cap.
    pub fn sustained_guesses_per_second(&self) -> f64 {
        let slots = self.in_progress_per_address.max(1) as f64;
        slots / self.max_delay.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// The most passwords one address can have checked within `window`, starting with no
/// recorded failures, under `params`.
///
/// Worst case for the defender: the attacker keeps every in-progress slot busy, spreads
/// its guesses over usernames (so only the per-address count delays it), and a check
/// itself takes no time. A slot reads the count when it starts, and may miss the checks
/// the other slots have in progress (a failure is recorded only once its hash is done),
/// so up to `in_progress_per_address - 1` guesses more than the free ones are undelayed.
/// Real hash checks only make the true number smaller.
pub fn max_checked_guesses(params: &ThrottleParams, window: Duration) -> u64 {
    if params.base_delay.is_zero() || params.max_delay.is_zero() {
        return u64::MAX;
    }
    let slots = params.in_progress_per_address.max(1);
    let mut free_at = vec![Duration::ZERO; slots];
    let mut done = vec![false; slots];
    let mut completions: Vec<Duration> = Vec::new();
    loop {
        let next = (0..slots).filter(|&i| !done[i]).min_by_key(|&i| free_at[i]);
        let Some(i) = next else { break };
        let start = free_at[i];
        // Starts never go back in time and delays never shrink, so completions are sorted.
        let done_before = completions.partition_point(|&c| c <= start);
        let seen = done_before.saturating_sub(slots - 1);
        let seen = u32::try_from(seen).unwrap_or(u32::MAX);
        let check = start + params.delay_after(seen, params.free_per_address);
        if check > window {
            done[i] = true;
            continue;
        }
        completions.push(check);
        free_at[i] = check;
    }
    completions.len() as u64
}

/// Per-address and per-(address, username) failed-login throttle. `Send + Sync`; share
/// it in an `Arc`.
pub struct LoginThrottle {
    params: ThrottleParams,
    max_tracked: usize,
    /// Keys usernames, so stored names are fixed-size and not chosen by the attacker.
    hasher: RandomState,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_address: Table<IpAddr>,
    by_user: Table<(IpAddr, u64)>,
}

/// Failure counts under one kind of key, with eviction of the stalest.
struct Table<K> {
    entries: HashMap<K, Entry>,
    /// Entries ordered by last failure (a sequence number), oldest first, for eviction.
    by_age: BTreeMap<u64, K>,
    next_seq: u64,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            next_seq: 0,
        }
    }
}

struct Entry {
    failures: u32,
    last_failure: Instant,
    seq: u64,
}

impl Entry {
    /// Whether its failures no longer count at `now` ([`FORGET_AFTER`] of quiet).
    fn forgotten_at(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_failure) >= FORGET_AFTER
    }
}

impl<K: Hash + Eq + Copy> Table<K> {
    /// Failures recorded for `key` that still count at `now`.
    fn failures(&mut self, key: K, now: Instant) -> u32 {
        let Some(entry) = self.entries.get(&key) else {
            return 0;
        };
        if entry.forgotten_at(now) {
            self.remove(key);
            return 0;
        }
        entry.failures
    }

    fn record(&mut self, key: K, now: Instant, max_tracked: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(entry) = self.entries.get_mut(&key) {
            if entry.forgotten_at(now) {
                entry.failures = 0;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = now;
            self.by_age.remove(&entry.seq);
            entry.seq = seq;
            self.by_age.insert(seq, key);
            return;
        }
        while self.entries.len() >= max_tracked {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.entries.insert(
            key,
            Entry {
                failures: 1,
                last_failure: now,
                seq,
            },
        );
        self.by_age.insert(seq, key);
    }

    /// Keys whose failures still count at `now`, with their counts; forgotten entries
    /// are skipped, not removed (a read-only walk).
    fn live(&self, now: Instant) -> impl Iterator<Item = (&K, u32)> {
        self.entries
            .iter()
            .filter(move |(_, e)| !e.forgotten_at(now))
            .map(|(k, e)| (k, e.failures))
    }

    fn remove(&mut self, key: K) {
        if let Some(entry) = self.entries.remove(&key) {
            self.by_age.remove(&entry.seq);
        }
    }
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle")
            .field("params", &self.params)
            .field("max_tracked", &self.max_tracked)
            .field("tracked", &self.tracked())
            .finish()
    }
}

impl LoginThrottle {
    /// A throttle with the default parameters, tracking at most [`MAX_TRACKED`] keys.
    pub fn new() -> Self {
        Self::with_params(ThrottleParams::default(), MAX_TRACKED)
    }

    /// A throttle with default parameters tracking at most `max_tracked` keys (at least 1).
    pub fn with_capacity(max_tracked: usize) -> Self {
        Self::with_params(ThrottleParams::default(), max_tracked)
    }

    /// A throttle with `params`, tracking at most `max_tracked` keys per table.
    pub fn with_params(params: ThrottleParams, max_tracked: usize) -> Self {
        LoginThrottle {
            params,
            max_tracked: max_tracked.max(1),
            hasher: RandomState::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> &ThrottleParams {
        &self.params
    }

    /// How long to wait before checking the next login attempt from `ip` for `username`
    /// (`""` when the client sent none).
    pub fn delay_for(&self, ip: IpAddr, username: &str) -> Duration {
        self.delay_at(ip, username, Instant::now())
    }

    /// Counts a failed login from `ip` for `username`.
    pub fn record_failure(&self, ip: IpAddr, username: &str) {
        self.failure_at(ip, username, Instant::now());
    }

    /// Forgets the failures of `username` from `ip` after it logged in. The address's
    /// own count and other users' counts stay.
    pub fn record_success(&self, ip: IpAddr, username: &str) {
        let key = self.user_key(ip, username);
        self.lock().by_user.remove(key);
    }

    /// Number of keys currently tracked (addresses plus (address, username) pairs).
    pub fn tracked(&self) -> usize {
        let state = self.lock();
        state.by_address.entries.len() + state.by_user.entries.len()
    }

    /// Addresses (IPv4, IPv6 /64) whose next login attempt waits for at least one
    /// username: see the module doc.
    ///
    /// Walks both tables under the lock that logins take, so it is meant for a scrape,
    /// not a hot path. Measured with both tables full ([`MAX_TRACKED`] keys each, release
    /// build, 2 shared cores): 1.5 ms with no address throttled, 7 ms with all 100,000
    /// throttled: a login waits at most that long once per scrape.
    pub fn throttled_addresses(&self) -> usize {
        self.throttled_at(Instant::now())
    }

    fn throttled_at(&self, now: Instant) -> usize {
        let p = &self.params;
        let state = self.lock();
        // The delay decides, as for a login: no second copy of the "past free" rule.
        let mut throttled: HashSet<IpAddr> = state
            .by_address
            .live(now)
            .filter(|&(_, failures)| !p.delay_after(failures, p.free_per_address).is_zero())
            .map(|(&address, _)| address)
            .collect();
        throttled.extend(
            state
                .by_user
                .live(now)
                .filter(|&(_, failures)| !p.delay_after(failures, p.free_per_user).is_zero())
                .map(|(&(address, _), _)| address),
        );
        throttled.len()
    }

    fn user_key(&self, ip: IpAddr, username: &str) -> (IpAddr, u64) {
        (address_bucket(ip), self.hasher.hash_one(username))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is always consistent between statements, so a panic elsewhere while
        // holding the lock leaves nothing half-done: keep going rather than fail open.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn delay_at(&self, ip: IpAddr, username: &str, now: Instant) -> Duration {
        let user_key = self.user_key(ip, username);
        let mut state = self.lock();
        let by_address = state.by_address.failures(address_bucket(ip), now);
        let by_user = state.by_user.failures(user_key, now);
        let p = &self.params;
        p.delay_after(by_address, p.free_per_address)
            .max(p.delay_after(by_user, p.free_per_user))
    }

    fn failure_at(&self, ip: IpAddr, username: &str, now: Instant) {
        let user_key = self.user_key(ip, username);
        let mut state = self.lock();
        state
            .by_address
            .record(address_bucket(ip), now, self.max_tracked);
        state.by_user.record(user_key, now, self.max_tracked);
    }
}

#[cfg(test)]
mod tests;
