//! Per-session timers (a will's delay, a disconnected session's expiry), keyed by
//! router client id: at most one of each kind per session, cancelled when the client
//! comes back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::task::AbortHandle;

/// Timers of one kind, by router client id.
#[derive(Default)]
pub struct Timers(Mutex<HashMap<String, AbortHandle>>);

impl Timers {
    /// Runs `then` after `after` unless cancelled first; replaces (and cancels) an
    /// earlier timer for the same id. `then` is told whether it was still due when it
    /// woke, i.e. nobody cancelled it in the meantime.
    pub fn start<F, Fut>(&self, id: &str, after: Duration, then: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // The lock is held until the timer is registered, so even a zero delay finds
        // its entry and `fire` below cannot run before the insert.
        let Ok(mut timers) = self.0.lock() else {
            return;
        };
        let task = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            then().await;
        });
        if let Some(old) = timers.insert(id.to_string(), task.abort_handle()) {
            old.abort();
        }
    }

    /// Called by a timer's `then` when it fires: removes its entry; `false` if it had
    /// been cancelled or replaced meanwhile (then it must do nothing).
    pub fn fire(&self, id: &str) -> bool {
        self.0
            .lock()
            .map(|mut t| t.remove(id).is_some())
            .unwrap_or(false)
    }

    /// Cancels the timer for `id`, if any: `true` if there was one.
    pub fn cancel(&self, id: &str) -> bool {
        let Ok(mut timers) = self.0.lock() else {
            return false;
        };
        match timers.remove(id) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_timer_fires_once_unless_cancelled_or_replaced() {
        let timers = Arc::new(Timers::default());
        let fired = Arc::new(AtomicUsize::new(0));
        let arm = |id: &'static str, secs| {
            let (t, f) = (timers.clone(), fired.clone());
            timers.start(id, Duration::from_secs(secs), move || async move {
                if t.fire(id) {
                    f.fetch_add(1, Ordering::SeqCst);
                }
            });
        };
        arm("a", 5);
        arm("b", 5);
        timers.cancel("b");
        arm("c", 5);
        arm("c", 10); // replaces the first "c"
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 1, "only a by now");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 2, "then the second c");
    }
}
