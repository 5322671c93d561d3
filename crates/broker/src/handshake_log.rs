//! Rate limit for the INFO lines about failed handshakes (TLS refused, WebSocket upgrade
//! refused) and per-address refusals, so a device with a bad certificate or a client
//! over its address's limit leaves a trace but a scan or flood cannot fill the log.
//!
//! Per source address (IPv6 by /64), at most [`PER_WINDOW`] lines in [`WINDOW`]; the
//! first failure past that writes one line saying the rest are suppressed, and the first
//! line of the next window says how many were. At most [`MAX_TRACKED`] addresses are
//! remembered; past it, expired windows are forgotten first, then all.

use moatmq_auth::address_bucket;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines logged per address per window.
pub const PER_WINDOW: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most.
const MAX_TRACKED: usize = 10_000;

/// What to do with one failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` failures from this address were not logged before it.
    Log { suppressed: u64 },
    /// Log one line saying further failures are suppressed until the window ends.
    StartSuppressing,
    /// Log nothing.
    Quiet,
}

#[derive(Default)]
pub struct HandshakeLog {
    windows: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl HandshakeLog {
    pub fn check(&self, ip: IpAddr) -> Verdict {
        self.check_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Verdict {
        let key = address_bucket(ip);
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if windows.len() >= MAX_TRACKED && !windows.contains_key(&key) {
            windows.retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
            if windows.len() >= MAX_TRACKED {
                windows.clear();
            }
        }
        let w = windows.entry(key).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        let mut suppressed = 0;
        if now.saturating_duration_since(w.start) >= WINDOW {
            suppressed = w.suppressed;
            *w = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < PER_WINDOW {
            w.logged += 1;
            return Verdict::Log { suppressed };
        }
        w.suppressed += 1;
        if w.suppressed == 1 {
            Verdict::StartSuppressing
        } else {
            Verdict::Quiet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_per_minute_then_one_line_then_a_count() {
        let log = HandshakeLog::default();
        let a: IpAddr = [192, 0, 2, 1].into();
        let t0 = Instant::now();
        for _ in 0..PER_WINDOW {
            assert_eq!(log.check_at(a, t0), Verdict::Log { suppressed: 0 });
        }
        assert_eq!(log.check_at(a, t0), Verdict::StartSuppressing);
        for _ in 0..10 {
            assert_eq!(log.check_at(a, t0), Verdict::Quiet);
        }
        assert_eq!(
            log.check_at([192, 0, 2, 2].into(), t0),
            Verdict::Log { suppressed: 0 },
            "another address has its own budget"
        );
        assert_eq!(
            log.check_at(a, t0 + WINDOW),
            Verdict::Log { suppressed: 11 }
        );
        assert_eq!(log.check_at(a, t0 + WINDOW), Verdict::Log { suppressed: 0 });
    }
}
