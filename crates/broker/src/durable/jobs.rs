//! The session writer's queue of changes: every sender appends under one lock, in one
//! order, and the writer takes all that gathered at once by swapping vectors, so a
//! change costs a push into memory the queue already has (no per-message allocation,
//! freed later on the writer's thread, as a channel's blocks are) and a wake-up only
//! when the writer sleeps. Past a number of changes waiting the writer is *behind*
//! ([`Jobs::is_behind`]) until it takes them: the gateways of connected persistent
//! sessions hold their deliveries meanwhile, so what they record cannot pile up.

use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Jobs' worth of room a vector keeps once empty: a burst (a writer held up by a slow
/// disk) does not leave its memory with the queue for good.
const KEEP: usize = 1024;

pub(super) struct Jobs<T> {
    queue: Mutex<Queue<T>>,
    ready: Condvar,
    /// More than `behind_at` changes wait for the writer (changed under the queue's
    /// lock, as is `behind_gauge`, the metric showing it).
    behind: AtomicBool,
    behind_at: usize,
    behind_gauge: Gauge,
    /// The writer took what was waiting, or is gone.
    caught_up: tokio::sync::Notify,
}

struct Queue<T> {
    items: Vec<T>,
    /// The writer sleeps in [`Jobs::take`]: the next sender wakes it.
    waiting: bool,
    /// No sender is left ([`Jobs::close`]).
    closed: bool,
}

/// What [`Jobs::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Taken {
    /// Changes were moved into the caller's vector.
    Some,
    /// The deadline passed with nothing queued.
    Timeout,
    /// Nothing queued and nothing will be.
    Closed,
}

impl<T> Jobs<T> {
    /// The writer is behind once more than `behind_at` changes wait for it; `gauge` is
    /// 1 meanwhile.
    pub(super) fn new(behind_at: usize, gauge: Gauge) -> Jobs<T> {
        Jobs {
            queue: Mutex::new(Queue {
                items: Vec::new(),
                waiting: false,
                closed: false,
            }),
            ready: Condvar::new(),
            behind: AtomicBool::new(false),
            behind_at,
            behind_gauge: gauge,
            caught_up: tokio::sync::Notify::new(),
        }
    }

    /// Whether more changes wait than the writer should be behind by.
    pub(super) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Relaxed)
    }

    /// Returns once the writer is not behind (at once if it is not now).
    pub(super) async fn caught_up(&self) {
        let notified = self.caught_up.notified();
        tokio::pin!(notified);
        // Registered before the check: a catching up in between still wakes it.
        notified.as_mut().enable();
        if self.is_behind() {
            notified.await;
        }
    }

    /// Under the queue's lock: nothing waits now. Whether the writer was behind: its
    /// waiters are to be told ([`Jobs::caught_up`]).
    fn not_behind(&self) -> bool {
        let was = self.behind.swap(false, Ordering::Relaxed);
        if was {
            self.behind_gauge.set(0);
        }
        was
    }

    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends `job`; gives it back once the queue is closed.
    pub(super) fn send(&self, job: T) -> Result<(), T> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(job);
        }
        queue.items.push(job);
        if queue.items.len() > self.behind_at && !self.behind.load(Ordering::Relaxed) {
            self.behind.store(true, Ordering::Relaxed);
            self.behind_gauge.set(1);
        }
        let wake = std::mem::take(&mut queue.waiting);
        drop(queue);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves everything queued into `into` (empty when called), waiting for something
    /// until `deadline` (`None`: as long as it takes; a deadline passed: not at all).
    pub(super) fn take(&self, into: &mut Vec<T>, deadline: Option<Instant>) -> Taken {
        let mut queue = self.lock();
        loop {
            if !queue.items.is_empty() {
                std::mem::swap(&mut queue.items, into);
                // The writer's emptied vector, in the queue now.
                queue.items.shrink_to(KEEP);
                let caught_up = self.not_behind();
                drop(queue);
                if caught_up {
                    self.caught_up.notify_waiters();
                }
                return Taken::Some;
            }
            if queue.closed {
                return Taken::Closed;
            }
            queue.waiting = true;
            queue = match deadline {
                None => self
                    .ready
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        queue.waiting = false;
                        return Taken::Timeout;
                    }
                    self.ready
                        .wait_timeout(queue, left)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
    }

    /// No more changes will come: the writer takes what is left, then sees it closed.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The writer is gone: what is queued is dropped (a sender waiting for a reply
    /// hears that none comes) and later changes are given back to their senders.
    pub(super) fn abandon(&self) {
        let (left, caught_up) = {
            let mut queue = self.lock();
            queue.closed = true;
            // Nothing will be taken: nobody waits for it.
            (std::mem::take(&mut queue.items), self.not_behind())
        };
        drop(left);
        if caught_up {
            self.caught_up.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn jobs_come_out_in_the_order_they_went_in_across_threads() {
        let jobs = Arc::new(Jobs::new(usize::MAX, Gauge::default()));
        let senders: Vec<_> = (0..4u64)
            .map(|t| {
                let jobs = Arc::clone(&jobs);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        jobs.send((t, i)).unwrap();
                    }
                })
            })
            .collect();
        let mut next = [0u64; 4];
        let mut batch = Vec::new();
        while next.iter().sum::<u64>() < 40_000 {
            assert_eq!(jobs.take(&mut batch, None), Taken::Some);
            for (t, i) in batch.drain(..) {
                assert_eq!(i, next[t as usize], "each sender's order is kept");
                next[t as usize] += 1;
            }
        }
        for s in senders {
            s.join().unwrap();
        }
    }

    #[test]
    fn a_burst_leaves_no_more_room_behind_than_a_vector_keeps() {
        let jobs = Jobs::new(usize::MAX, Gauge::default());
        let mut batch = Vec::new();
        for round in 0..3 {
            for i in 0..100_000 {
                jobs.send(i).unwrap();
            }
            assert_eq!(jobs.take(&mut batch, None), Taken::Some);
            assert_eq!(batch.len(), 100_000, "round {round}");
            batch.clear();
        }
        // Quiet again: each of the two vectors passes through the queue once more.
        for _ in 0..2 {
            jobs.send(0).unwrap();
            assert_eq!(jobs.take(&mut batch, None), Taken::Some);
            batch.clear();
        }
        assert!(jobs.lock().items.capacity() <= KEEP);
        assert!(batch.capacity() <= KEEP);
    }

    #[test]
    fn a_deadline_ends_the_wait_and_a_close_ends_it_after_what_is_left() {
        let jobs = Jobs::new(usize::MAX, Gauge::default());
        let mut batch = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(jobs.take(&mut batch, Some(deadline)), Taken::Timeout);
        assert!(Instant::now() >= deadline);
        jobs.send(1).unwrap();
        jobs.close();
        assert_eq!(jobs.send(2), Err(2), "closed: nothing more goes in");
        assert_eq!(jobs.take(&mut batch, None), Taken::Some);
        assert_eq!(batch, [1], "what was queued before the close is taken");
        batch.clear();
        assert_eq!(jobs.take(&mut batch, None), Taken::Closed);
    }

    #[test]
    fn an_abandoned_queue_drops_what_waits_so_its_senders_hear_no_reply_comes() {
        let jobs = Jobs::new(usize::MAX, Gauge::default());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        jobs.send(tx).unwrap();
        jobs.abandon();
        assert!(rx.recv().is_err(), "the reply's sender was dropped");
        let (tx, _rx) = std::sync::mpsc::channel::<()>();
        assert!(jobs.send(tx).is_err());
    }

    #[tokio::test]
    async fn past_its_mark_the_writer_is_behind_until_it_takes_what_waits() {
        let gauge = Gauge::default();
        let jobs = Arc::new(Jobs::new(3, gauge.clone()));
        for i in 0..3 {
            jobs.send(i).unwrap();
        }
        assert!(!jobs.is_behind(), "3 waiting is not past 3");
        jobs.caught_up().await;
        jobs.send(3).unwrap();
        assert!(jobs.is_behind());
        assert_eq!(gauge.get(), 1, "the metric shows it");
        let waiter = tokio::spawn({
            let jobs = Arc::clone(&jobs);
            async move { jobs.caught_up().await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "waits while the writer is behind");
        let mut batch = Vec::new();
        assert_eq!(jobs.take(&mut batch, None), Taken::Some);
        assert!(!jobs.is_behind());
        assert_eq!(gauge.get(), 0);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken once the writer took what waited")
            .unwrap();
        // A writer gone leaves nobody waiting for it.
        for i in 0..4 {
            jobs.send(i).unwrap();
        }
        assert!(jobs.is_behind());
        jobs.abandon();
        assert!(!jobs.is_behind());
    }

    #[test]
    fn a_sleeping_writer_is_woken_by_a_sender() {
        let jobs = Arc::new(Jobs::new(usize::MAX, Gauge::default()));
        let sender = {
            let jobs = Arc::clone(&jobs);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                jobs.send(7).unwrap();
            })
        };
        let mut batch = Vec::new();
        assert_eq!(jobs.take(&mut batch, None), Taken::Some);
        assert_eq!(batch, [7]);
        sender.join().unwrap();
    }
}
