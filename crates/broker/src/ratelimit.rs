//! Token buckets for `[rate_limit]`: new connections per source address, and PUBLISH
//! messages and bytes per client.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second. Connections
//! over the limit are refused. Publishers over the limit are not refused: the gateway
//! stops reading their socket until the bucket has refilled (back-pressure), so a client
//! that waits for its acknowledgements is paced and never cut off. Only with
//! `disconnect_after` set is a client that stays over its limit that long without a
//! break disconnected. `[[rate_limit.user]]` gives one username other rates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; past it, full (idle) buckets are forgotten first.
const MAX_TRACKED: usize = 100_000;

/// One token bucket; `tokens` may go negative (a debt) for publishers.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens if there are that many.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if needed; returns the debt (0 if none).
    pub fn take(&mut self, n: f64, now: Instant) -> f64 {
        self.refill(now);
        self.tokens -= n;
        (-self.tokens).max(0.0)
    }

    /// How long until the debt is paid back.
    pub fn wait(&self) -> Duration {
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// New-connection limits per source address.
pub struct ConnectionLimiter {
    rate: u32,
    burst: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ConnectionLimiter {
    pub fn new(rate: u32, burst: u32) -> ConnectionLimiter {
        ConnectionLimiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a new connection from `ip` is within the limit (0 = no limit).
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.rate == 0 {
            return true;
        }
        let ip = moatmq_auth::address_bucket(ip);
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < b.burst
            });
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        buckets
            .entry(ip)
            .or_insert_with(|| Bucket::new(f64::from(self.rate), f64::from(self.burst)))
            .try_take(1.0, now)
    }
}

/// One client's PUBLISH limits.
pub struct PublishLimiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Since when every publish has found the client over its limit.
    throttled_since: Option<Instant>,
    /// How long it may stay there before it is disconnected; None = never.
    disconnect_after: Option<Duration>,
}

/// What the gateway should do after a PUBLISH.
#[derive(Debug, PartialEq, Eq)]
pub enum Pace {
    /// Within the limit.
    Go,
    /// Stop reading for this long.
    SlowDown(Duration),
    /// Over the limit without a break for `disconnect_after`: disconnect.
    Disconnect,
}

impl PublishLimiter {
    /// The limiter for a client authenticated as `username` (None: anonymous).
    pub fn new(config: &moatmq_config::RateLimit, username: Option<&str>) -> PublishLimiter {
        let rates = config.publish_rates(username);
        PublishLimiter {
            messages: (rates.messages_per_second > 0).then(|| {
                Bucket::new(
                    f64::from(rates.messages_per_second),
                    f64::from(rates.message_burst),
                )
            }),
            bytes: (rates.bytes_per_second > 0).then(|| {
                let rate = rates.bytes_per_second as f64;
                Bucket::new(rate, rate)
            }),
            throttled_since: None,
            disconnect_after: (config.disconnect_after > 0)
                .then(|| Duration::from_secs(config.disconnect_after)),
        }
    }

    /// Accounts one PUBLISH of `len` bytes.
    pub fn publish(&mut self, len: usize) -> Pace {
        self.publish_at(len, Instant::now())
    }

    fn publish_at(&mut self, len: usize, now: Instant) -> Pace {
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.messages, 1.0), (&mut self.bytes, len as f64)] {
            if let Some(b) = bucket {
                b.take(n, now);
                wait = wait.max(b.wait());
            }
        }
        if wait.is_zero() {
            self.throttled_since = None;
            return Pace::Go;
        }
        let since = *self.throttled_since.get_or_insert(now);
        if self
            .disconnect_after
            .is_some_and(|limit| now.saturating_duration_since(since) > limit)
        {
            Pace::Disconnect
        } else {
            Pace::SlowDown(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_burst_then_refused_per_address() {
        let l = ConnectionLimiter::new(1, 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!((0..3).all(|_| l.allow(a)));
        assert!(!l.allow(a));
        assert!(l.allow(b), "another address is not affected");
        assert!(ConnectionLimiter::new(0, 0).allow(a), "0 = off");
    }

    fn config(disconnect_after: u64) -> moatmq_config::RateLimit {
        moatmq_config::RateLimit {
            connections_per_second: 0,
            connection_burst: 0,
            messages_per_second: 10,
            message_burst: 5,
            bytes_per_second: 0,
            disconnect_after,
            user: Vec::new(),
        }
    }

    /// Publishes every 50 ms, always over the limit, for `secs` seconds.
    fn flood(l: &mut PublishLimiter, t0: Instant, secs: u64) -> Pace {
        let mut t = t0;
        let mut outcome = Pace::Go;
        while t < t0 + Duration::from_secs(secs) {
            t += Duration::from_millis(50);
            outcome = l.publish_at(10, t);
        }
        outcome
    }

    #[test]
    fn publisher_is_slowed_then_disconnected_after_disconnect_after() {
        let config = config(10);
        let mut l = PublishLimiter::new(&config, None);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(l.publish_at(10, t0), Pace::Go);
        }
        assert!(matches!(l.publish_at(10, t0), Pace::SlowDown(d) if d > Duration::ZERO));
        assert!(matches!(flood(&mut l, t0, 9), Pace::SlowDown(_)));
        assert_eq!(
            flood(&mut l, t0 + Duration::from_secs(9), 2),
            Pace::Disconnect
        );
        // A client that slows down is forgiven.
        let mut l = PublishLimiter::new(&config, None);
        assert!(matches!(l.publish_at(10, t0), Pace::Go));
        for _ in 0..10 {
            l.publish_at(10, t0);
        }
        assert!(matches!(
            l.publish_at(10, t0 + Duration::from_secs(5)),
            Pace::Go
        ));
    }

    #[test]
    fn by_default_a_publisher_is_only_paced() {
        let mut l = PublishLimiter::new(&config(0), None);
        assert!(matches!(
            flood(&mut l, Instant::now(), 60),
            Pace::SlowDown(d) if d > Duration::ZERO
        ));
    }

    #[test]
    fn a_user_override_of_zero_is_unlimited() {
        let mut config = config(1);
        config.user.push(moatmq_config::UserRateLimit {
            name: "ingest".into(),
            messages_per_second: Some(0),
            message_burst: None,
            bytes_per_second: None,
        });
        let t0 = Instant::now();
        let mut ingest = PublishLimiter::new(&config, Some("ingest"));
        assert!((0..10_000).all(|_| ingest.publish_at(10, t0) == Pace::Go));
        let mut other = PublishLimiter::new(&config, Some("other"));
        assert!((0..10).any(|_| other.publish_at(10, t0) != Pace::Go));
    }
}
