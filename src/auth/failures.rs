//! Failed attempts per source address (§4): a source over `failed_auth` is blocked with 429
//! before any further store or Argon2id work, and its concurrent cache misses are verified a few
//! at a time, so that they cannot all pass the block check before the first failure counts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Authenticator, Reason};
use crate::error::Error;
use crate::metrics::Metrics;

impl Authenticator {
    /// 429 while `source` is blocked for failed attempts.
    pub(super) async fn check_blocked(&self, source: IpAddr, metrics: &Metrics) -> Result<(), Error> {
        if let Some(until) = self.blocked.get(&source).await {
            let wait = until.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                metrics.auth_failures.with_label_values(&[Reason::RateLimited.label()]).inc();
                return Err(failed_auth_limited(wait));
            }
        }
        Ok(())
    }

    /// Waits for one of `source`'s verification slots (see `verifying`).
    pub(super) async fn verifying_slot(&self, source: IpAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = {
            let mut map = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(source)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.verifier_threads.max(1))))
                .clone()
        };
        // Never closed: `None` cannot happen, and would only mean no wait.
        slots.acquire_owned().await.ok()
    }

    pub(super) async fn count_failure(&self, source: IpAddr) {
        if let Err(not_until) = self.failures.check_key(&source) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(self.failures.clock()));
            self.blocked.insert(source, Instant::now() + wait).await;
        }
    }

    /// Forgets failure counters of sources that have been quiet, and profiles no cached key
    /// uses any more (bounded memory).
    pub fn forget_quiet_sources(&self) {
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
        // A source's slots go when nobody holds or waits for them.
        self.verifying.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, s| Arc::strong_count(s) > 1);
        self.profiles.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, p| p.strong_count() > 0);
    }
}

fn failed_auth_limited(wait: Duration) -> Error {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Error::RateLimited {
        message: "Too many failed authentication attempts from this address. Retry later.".into(),
        limit: crate::error::Limit::FailedAuth,
        tier: None,
        retry_after: secs.max(1),
        exhausted: false,
    }
}
