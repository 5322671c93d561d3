//! The password-hashing pool: one thread per core, started once.
//!
//! An Argon2id check takes ~19 MiB and ~30 ms of one core, by design. Running checks on
//! tokio's blocking pool let every one of its (up to 512) threads keep its own malloc
//! arena with a freed 19 MiB block in it (the soak run reached 756 MiB); a fixed pool
//! bounds both the CPU a login storm takes from connected clients and the memory to
//! about one block per core. Requests wait in a bounded queue; past it, logins fail.

use moatmq_auth::{PasswordFile, Verdict};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

/// Logins waiting for a hashing thread at most.
const QUEUE: usize = 1024;

struct Job {
    file: Arc<PasswordFile>,
    username: String,
    password: Zeroizing<Vec<u8>>,
    reply: oneshot::Sender<Verdict>,
}

/// A fixed set of threads that verify passwords.
pub struct HashPool {
    jobs: SyncSender<Job>,
}

impl HashPool {
    /// Starts `threads` hashing threads.
    pub fn new(threads: usize) -> HashPool {
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("moatmq-hash-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job.
                    let job = match queue.lock() {
                        Ok(q) => q.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let verdict = job.file.verify(&job.username, &job.password);
                    let _ = job.reply.send(verdict);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        HashPool { jobs }
    }

    /// Verifies a password on the pool; a full queue or a stopped pool rejects.
    pub async fn verify(
        &self,
        file: Arc<PasswordFile>,
        username: &str,
        password: Zeroizing<Vec<u8>>,
    ) -> Verdict {
        let (reply, verdict) = oneshot::channel();
        let job = Job {
            file,
            username: username.to_string(),
            password,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => verdict.await.unwrap_or(Verdict::Rejected),
            Err(TrySendError::Full(_)) => {
                tracing::warn!("password check queue full: login refused");
                Verdict::Rejected
            }
            Err(TrySendError::Disconnected(_)) => Verdict::Rejected,
        }
    }
}
