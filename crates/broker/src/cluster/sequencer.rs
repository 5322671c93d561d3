//! Numbers what one task takes to NATS in the order it is queued and tells how far
//! NATS has taken it: the transfer stream's messages (`xfer.rs`) and the retained
//! bucket's changes (`state.rs`), which a QoS 1/2 publisher's acknowledgement waits for.

use std::sync::Mutex;
use tokio::sync::{mpsc, watch};

pub struct Sequencer<T> {
    /// The last number handed out, and the queue it went into under the same lock, so
    /// queue order is number order.
    last: Mutex<(u64, mpsc::Sender<T>)>,
    /// Every number up to this one is done (the task's side of it: [`Done`]).
    done: watch::Receiver<u64>,
}

/// The task's side: how far everything numbered is done.
pub type Done = watch::Sender<u64>;

/// A sequencer over a queue of `capacity`, its task's [`Done`] and queue.
pub fn sequencer<T>(capacity: usize) -> (Sequencer<T>, Done, mpsc::Receiver<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    let (done, watching) = watch::channel(0);
    let sequencer = Sequencer {
        last: Mutex::new((0, tx)),
        done: watching,
    };
    (sequencer, done, rx)
}

impl<T> Sequencer<T> {
    /// Queues `make(number)`; `None` when the queue is full.
    pub fn send(&self, make: impl FnOnce(u64) -> T) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let seq = last.0 + 1;
        last.1.try_send(make(seq)).ok()?;
        last.0 = seq;
        Some(seq)
    }

    /// The last number handed out.
    pub fn last(&self) -> u64 {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Waits until everything numbered up to `target` is done; `false` if it never will
    /// be (the task is gone: the broker is stopping).
    pub async fn done_through(&self, target: u64) -> bool {
        let mut done = self.done.clone();
        let reached = done.wait_for(|&d| d >= target).await.is_ok();
        reached
    }
}
