//! The password-hashing pool: one thread per core, started once, served fairly by
//! source address.
//!
//! An Argon2id check takes ~19 MiB and ~30 ms of one core, by design. Running checks on
//! tokio's blocking pool let every one of its (up to 512) threads keep its own malloc
//! arena with a freed 19 MiB block in it (the soak run reached 756 MiB); a fixed pool
//! bounds both the CPU a login storm takes from connected clients and the memory to
//! about one block per core.
//!
//! Waiting checks are queued per address ([`moatmq_auth::address_bucket`]) and the
//! threads take one from each address in turn, so a flood from some addresses delays a
//! login from another by one round, not by the whole backlog (with the login gate's 2
//! logins in progress per address, a round is at most 2 checks per flooding address).
//!
//! Overload (a fleet reconnecting after a restart, more logins than the cores can hash
//! before the devices' own timeouts): each address's newest check goes first, and past
//! [`QUEUE`] waiting checks the oldest one of the address with the most waiting is
//! answered "server busy" (not a failed login) to make room. First come, first served
//! would hash, under a standing backlog, only checks that waited almost as long as their
//! clients do: most clients gave up during their own hash and retried, the work was
//! wasted, and without the credential cache a fleet of 10,000 stalled (209 back in
//! 5 minutes). The newest check's client is the one most likely still there.

use moatmq_auth::{address_bucket, PasswordFile, Verdict};
use prometheus_client::metrics::counter::Counter;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

/// Checks waiting for a hashing thread at most, all addresses together.
pub const QUEUE: usize = 1024;

/// How often "queue full" is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The pool has no room for another check (or has stopped): answer "server busy".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// Run on the hashing thread with the verdict of a check it ran, before the caller
/// hears it and whether or not the caller is still there.
pub type Settle = Box<dyn FnOnce(Verdict) + Send>;

struct Job {
    file: Arc<PasswordFile>,
    username: String,
    password: Zeroizing<Vec<u8>>,
    reply: oneshot::Sender<Verdict>,
    settle: Settle,
}

/// Waiting jobs, per address oldest first, and the order in which addresses get a turn.
#[derive(Default)]
struct Queue {
    by_address: HashMap<IpAddr, VecDeque<Job>>,
    /// Each address with waiting jobs appears exactly once.
    turns: VecDeque<IpAddr>,
    len: usize,
    stopped: bool,
    /// When "queue full" was last logged.
    warned: Option<Instant>,
}

impl Queue {
    /// Adds `job`; past `capacity` waiting, first gives up the oldest job of the address
    /// with the most waiting (its caller hears "busy"), which is returned.
    fn push(&mut self, address: IpAddr, job: Job, capacity: usize) -> Option<Job> {
        let evicted = (self.len >= capacity).then(|| self.evict()).flatten();
        let jobs = self.by_address.entry(address).or_default();
        if jobs.is_empty() {
            self.turns.push_back(address);
        }
        jobs.push_back(job);
        self.len += 1;
        evicted
    }

    /// Takes the oldest job of the address with the most waiting.
    fn evict(&mut self) -> Option<Job> {
        let (&address, _) = self.by_address.iter().max_by_key(|(_, jobs)| jobs.len())?;
        let jobs = self.by_address.get_mut(&address)?;
        let job = jobs.pop_front();
        if jobs.is_empty() {
            self.by_address.remove(&address);
            self.turns.retain(|a| *a != address);
        }
        self.len -= usize::from(job.is_some());
        job
    }

    /// The next job: the newest of the address whose turn it is.
    fn pop(&mut self) -> Option<Job> {
        let address = self.turns.pop_front()?;
        let jobs = self.by_address.get_mut(&address)?;
        let job = jobs.pop_back();
        if jobs.is_empty() {
            self.by_address.remove(&address);
        } else {
            self.turns.push_back(address);
        }
        self.len -= usize::from(job.is_some());
        job
    }
}

struct Inner {
    queue: Mutex<Queue>,
    work: Condvar,
    /// Passwords actually checked (a job whose client is gone is skipped).
    checks: Counter,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every statement leaves the queue consistent: carry on after a panic elsewhere.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fixed set of threads that verify passwords.
pub struct HashPool {
    inner: Arc<Inner>,
    capacity: usize,
}

impl HashPool {
    /// Starts `threads` hashing threads; each check counts in `checks`.
    pub fn new(threads: usize, checks: Counter) -> HashPool {
        HashPool::with_capacity(threads, QUEUE, checks)
    }

    /// Like `new`, with at most `capacity` checks waiting.
    fn with_capacity(threads: usize, capacity: usize, checks: Counter) -> HashPool {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            checks,
        });
        for i in 0..threads.max(1) {
            let inner = inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("moatmq-hash-{i}"))
                .spawn(move || work(&inner));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        HashPool { inner, capacity }
    }

    /// Verifies a password on the pool, queued behind `peer`'s address; `Busy` when the
    /// pool has stopped or has no room, or when this check waited longest of the busiest
    /// address as the queue overflowed. A caller dropped before a thread takes the
    /// check costs nothing; once taken, the check runs to the end and `settle` gets its
    /// verdict even if the caller is gone (a client that hung up while its hash ran):
    /// the verdict's consequences (a failure counted, a success remembered) never depend
    /// on whether the client waited for it.
    pub async fn verify(
        &self,
        peer: IpAddr,
        file: Arc<PasswordFile>,
        username: &str,
        password: Zeroizing<Vec<u8>>,
        settle: Settle,
    ) -> Result<Verdict, Busy> {
        let (reply, verdict) = oneshot::channel();
        let evicted = {
            let mut queue = self.inner.lock();
            if queue.stopped || self.capacity == 0 {
                return Err(Busy);
            }
            let job = Job {
                file,
                username: username.to_string(),
                password,
                reply,
                settle,
            };
            let evicted = queue.push(address_bucket(peer), job, self.capacity);
            if evicted.is_some() {
                // Once per 10 s: a flood must not flood the log too (the login_busy
                // metric and audit events count every one).
                let now = Instant::now();
                if queue.warned.map_or(true, |at| now - at >= WARN_EVERY) {
                    queue.warned = Some(now);
                    tracing::warn!(
                        "password check queue full: the oldest waiting logins are answered busy"
                    );
                }
            }
            evicted
        };
        // Dropped outside the lock: its caller hears "busy" (its reply channel closed).
        drop(evicted);
        self.inner.work.notify_one();
        verdict.await.map_err(|_| Busy)
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        // Waiting jobs are dropped with their reply channels: their callers see `Busy`.
        let mut queue = self.inner.lock();
        queue.stopped = true;
        queue.by_address.clear();
        queue.turns.clear();
        queue.len = 0;
        drop(queue);
        self.inner.work.notify_all();
    }
}

/// One hashing thread: takes jobs in turn until the pool stops.
fn work(inner: &Inner) {
    loop {
        let job = {
            let mut queue = inner.lock();
            loop {
                if queue.stopped {
                    return;
                }
                if let Some(job) = queue.pop() {
                    break job;
                }
                queue = inner
                    .work
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        // The client gave up (connection task ended): spend nothing on it.
        if job.reply.is_closed() {
            continue;
        }
        inner.checks.inc();
        let verdict = job.file.verify(&job.username, &job.password);
        (job.settle)(verdict);
        let _ = job.reply.send(verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn job() -> (Job, oneshot::Receiver<Verdict>) {
        let (reply, rx) = oneshot::channel();
        let file = PasswordFile::parse(std::path::Path::new("p"), "").expect("empty file");
        let job = Job {
            file: Arc::new(file),
            username: String::new(),
            password: Zeroizing::new(Vec::new()),
            reply,
            settle: Box::new(|_| {}),
        };
        (job, rx)
    }

    #[tokio::test]
    async fn no_room_is_busy_not_rejected() {
        let checks = Counter::default();
        let (j, _rx) = job();
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let full = HashPool::with_capacity(1, 0, checks.clone());
        let pw = Zeroizing::new(b"pw".to_vec());
        let settled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = |settled: &Arc<std::sync::Mutex<Vec<Verdict>>>| -> Settle {
            let settled = settled.clone();
            Box::new(move |v| settled.lock().unwrap().push(v))
        };
        let busy = full.verify(peer, j.file.clone(), "u", pw.clone(), recorder(&settled));
        assert_eq!(busy.await, Err(Busy));
        assert!(
            settled.lock().unwrap().is_empty(),
            "a refused check never runs"
        );
        let pool = HashPool::new(1, checks.clone());
        let verdict = pool.verify(peer, j.file.clone(), "u", pw, recorder(&settled));
        assert_eq!(verdict.await, Ok(Verdict::Rejected));
        assert_eq!(*settled.lock().unwrap(), vec![Verdict::Rejected]);
        assert_eq!(checks.get(), 1, "only the check that ran is counted");
    }

    #[test]
    fn addresses_take_turns() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let mut q = Queue::default();
        let mut names = Vec::new();
        for (addr, name) in [(a, "a1"), (a, "a2"), (a, "a3"), (b, "b1")] {
            let (mut j, rx) = job();
            j.username = name.into();
            names.push(rx);
            assert!(q.push(addr, j, QUEUE).is_none());
        }
        // Each address in turn; within one, the newest first (its client most likely
        // still waits).
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).map(|j| j.username).collect();
        assert_eq!(order, ["a3", "b1", "a2", "a1"]);
        assert_eq!(q.len, 0);
        assert!(q.by_address.is_empty() && q.turns.is_empty());
    }

    #[test]
    fn a_full_queue_gives_up_the_oldest_check_of_the_busiest_address() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let mut q = Queue::default();
        let push = |q: &mut Queue, addr, name: &str| {
            let (mut j, rx) = job();
            j.username = name.into();
            (q.push(addr, j, 3).map(|e| e.username), rx)
        };
        assert_eq!(push(&mut q, a, "a1").0, None);
        assert_eq!(push(&mut q, b, "b1").0, None);
        assert_eq!(push(&mut q, a, "a2").0, None);
        // Full: the newcomer gets in, the flooding address loses its oldest.
        let (evicted, _) = push(&mut q, b, "b2");
        assert_eq!(evicted.as_deref(), Some("a1"));
        let (evicted, _) = push(&mut q, b, "b3");
        assert!(
            matches!(evicted.as_deref(), Some("a2" | "b1")),
            "{evicted:?}: an oldest of a busiest address"
        );
        assert_eq!(q.len, 3);
        let left: Vec<String> = std::iter::from_fn(|| q.pop()).map(|j| j.username).collect();
        assert_eq!(left.len(), 3);
        assert!(q.by_address.is_empty() && q.turns.is_empty());
    }

    #[tokio::test]
    async fn the_caller_of_a_given_up_check_hears_busy_and_it_never_runs() {
        // One thread kept busy by a check that waits on a gate, so the others queue.
        let checks = Counter::default();
        let pool = Arc::new(HashPool::with_capacity(1, 1, checks.clone()));
        let (j, _rx) = job();
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let blocking = {
            let gate = gate.clone();
            Box::new(move |_| {
                let _ = gate.lock().unwrap().recv();
            }) as Settle
        };
        let pw = || Zeroizing::new(b"pw".to_vec());
        let first = tokio::spawn({
            let (pool, file) = (pool.clone(), j.file.clone());
            async move { pool.verify(peer, file, "u", pw(), blocking).await }
        });
        while checks.get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let settled = Arc::new(Mutex::new(0));
        let count = |settled: &Arc<Mutex<i32>>| -> Settle {
            let settled = settled.clone();
            Box::new(move |_| *settled.lock().unwrap() += 1)
        };
        let old = tokio::spawn({
            let (pool, file, settle) = (pool.clone(), j.file.clone(), count(&settled));
            async move { pool.verify(peer, file, "u", pw(), settle).await }
        });
        while pool.inner.lock().len == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let new = tokio::spawn({
            let (pool, file, settle) = (pool.clone(), j.file.clone(), count(&settled));
            async move { pool.verify(peer, file, "u", pw(), settle).await }
        });
        assert_eq!(
            old.await.unwrap(),
            Err(Busy),
            "the older waiting check gave way"
        );
        gate_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(Verdict::Rejected));
        assert_eq!(new.await.unwrap(), Ok(Verdict::Rejected));
        assert_eq!(*settled.lock().unwrap(), 1, "only the newer one ran");
        assert_eq!(checks.get(), 2);
    }
}
