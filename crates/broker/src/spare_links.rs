//! Spare router links: a few clean links built ahead of need, handed at once to a
//! connection that logged in without one (lazy links, `gateway/link.rs`).
//!
//! Why: building a link is a round trip through rumqttd's router thread that blocks its
//! caller (`LinkBuilder::build`). For a lazy connection's first SUBSCRIBE that trip (a
//! blocking-pool hop, the router's answer, waking the connection again) was 210 µs of the
//! 270 µs between reading the SUBSCRIBE and the router holding its filter (median of 30
//! on loopback, release build, docs/compliance.md); with a spare the SUBSCRIBE reaches the
//! router in the same turn it is read, like a connection that has its link, and a
//! publish from another client read after it can no longer overtake it on the way
//! (that the SUBSCRIBE is read first is `gateway/mod.rs`'s part: `others_first`).
//!
//! The spares are named from a pool, not after their clients: only clean sessions the
//! router keeps nothing of are lazy (`connect.rs`), and for those the router's name is
//! of no use to anyone. Names are reused, because rumqttd keeps a record under every
//! client id it has seen (its graveyard, never expired; so it no longer grows with every
//! clean client id that ever subscribed or published): a name goes back to the pool
//! when its link is dropped, after the link's DISCONNECT was sent, and the router handles
//! events in order, so it has let go of the old link before a new one takes the name.
//!
//! [`SPARES`] links wait at most; a thread of their own builds a new one after each is
//! taken. rumqttd allocates its queues per link up front: the four spares add about
//! 545 KiB to an idle broker's RSS (10.2 MiB before), once; idle connections still hold
//! no link (docs/benchmarks.md).

use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::Notification;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How many spare links wait: up to four connections needing a link at the same moment
/// get one at once; beyond that, links are built on demand as before.
pub const SPARES: usize = 4;
/// After a failed build (the router gone or full), the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);

type Build =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync;

/// The pool of spare links and of their names.
pub struct SpareLinks {
    state: Mutex<State>,
    /// Signalled when a spare was taken (or the broker stops).
    taken: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    ready: Vec<(LinkTx, LinkRx, u32)>,
    /// Names no link holds, reused first (lowest last).
    free: Vec<u32>,
    /// The next name never used.
    next: u32,
}

/// A link's name from the pool; dropping it gives the name back.
pub struct LinkName {
    n: u32,
    pool: Arc<SpareLinks>,
}

impl Drop for LinkName {
    fn drop(&mut self) {
        self.pool.lock().free.push(self.n);
    }
}

impl SpareLinks {
    /// Starts the thread that keeps [`SPARES`] links ready, built with `build`.
    pub fn start(build: Arc<Build>) -> std::io::Result<Arc<SpareLinks>> {
        let pool = Arc::new(SpareLinks {
            state: Mutex::new(State::default()),
            taken: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let filler = pool.clone();
        std::thread::Builder::new()
            .name("moatmq-spare-links".into())
            .spawn(move || filler.fill(&*build))?;
        Ok(pool)
    }

    /// A spare link, if one is ready; another is built to replace it.
    pub fn take(self: &Arc<Self>) -> Option<(LinkTx, LinkRx, LinkName)> {
        let (tx, rx, n) = self.lock().ready.pop()?;
        self.taken.notify_one();
        Some((tx, rx, self.name(n)))
    }

    /// A name from the pool for a link built now (no spare was ready).
    pub fn new_name(self: &Arc<Self>) -> (String, LinkName) {
        let n = self.lock().take_name();
        (router_name(n), self.name(n))
    }

    /// The filling thread ends (the broker is stopping); spares are dropped with the pool.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.taken.notify_all();
    }

    fn name(self: &Arc<Self>, n: u32) -> LinkName {
        LinkName {
            n,
            pool: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across anything that can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fill(&self, build: &Build) {
        // One warning per run of failures: a dead router fails the broker anyway.
        let mut failing = false;
        loop {
            let n = {
                let mut state = self.lock();
                while state.ready.len() >= SPARES && !self.stop.load(Ordering::Acquire) {
                    state = self.taken.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                state.take_name()
            };
            // Blocks until the router answers; a router that never does fails the broker
            // through the watchdog (`router.rs`).
            match build(&router_name(n), true) {
                Ok((tx, rx, _connack)) => {
                    failing = false;
                    self.lock().ready.push((tx, rx, n));
                }
                Err(e) => {
                    self.lock().free.push(n);
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot build a spare router link");
                    }
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
    }
}

impl State {
    fn take_name(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        })
    }
}

/// The client id the router sees for pool name `n`: `router_client_id` always puts a
/// `:` in, so no client's id can be one of these.
fn router_name(n: u32) -> String {
    format!("moatmq-link-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_reused_once_given_back() {
        let pool = Arc::new(SpareLinks {
            state: Mutex::new(State::default()),
            taken: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (a, name_a) = pool.new_name();
        let (b, name_b) = pool.new_name();
        assert_eq!((&a[..], &b[..]), ("moatmq-link-1", "moatmq-link-2"));
        drop(name_a);
        let (c, _name_c) = pool.new_name();
        assert_eq!(c, "moatmq-link-1", "a name given back is taken again");
        drop(name_b);
        assert_eq!(pool.new_name().0, "moatmq-link-2");
    }
}
