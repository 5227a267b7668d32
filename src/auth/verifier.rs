//! The Argon2id verifier threads.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::keys::{self, Verified};

struct Job {
    phc: String,
    secret: String,
    reply: oneshot::Sender<Verified>,
}

/// A fixed pool of Argon2id verifier threads, one per core. A fixed pool rather than tokio's
/// blocking pool bounds both concurrent work (more verifiers than cores only adds latency) and
/// memory: each thread keeps one `m` KiB working buffer, reused across verifications and released
/// after `IDLE` without work — the blocking pool's many short-lived threads each kept a 19 MiB
/// allocation in their malloc arena (a wrong-secret flood grew RSS by 240 MiB).
pub(super) struct Verifiers {
    tx: std::sync::mpsc::Sender<Job>,
}

impl Verifiers {
    const IDLE: Duration = Duration::from_secs(30);

    pub(super) fn start(threads: usize) -> Result<Verifiers, String> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("tollgate-argon2-{i}"))
                .spawn(move || {
                    // Below the request path's priority: see `priority`.
                    crate::priority::lower_current_thread();
                    let mut blocks = Vec::new();
                    loop {
                        // One thread waits on the queue at a time; the others wait for the lock.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv_timeout(Self::IDLE),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => {
                                let _ = job.reply.send(keys::verify_with(&job.phc, &job.secret, &mut blocks));
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => blocks = Vec::new(),
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                })
                .map_err(|e| format!("cannot start the Argon2id verifier threads: {e}"))?;
        }
        Ok(Verifiers { tx })
    }

    pub(super) async fn verify(&self, phc: String, secret: String) -> Verified {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Job { phc, secret, reply }).is_err() {
            return Verified::Unusable;
        }
        answer.await.unwrap_or(Verified::Unusable)
    }
}
