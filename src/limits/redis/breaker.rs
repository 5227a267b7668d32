//! The fleet limits' circuit breaker (§11): while Redis keeps failing, decisions stop paying
//! the timeout on every request. After three failures in a row, decisions fall back at once,
//! and one request at a time probes Redis after a back-off that doubles from 100 ms to 2 s; the
//! first success closes it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Failures in a row that open the breaker, and its back-off.
const BREAKER_FAILURES: u32 = 3;
const BACKOFF_MIN_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 2_000;

/// A circuit breaker without locks: the request path reads one atomic when Redis is healthy.
pub(super) struct Breaker {
    epoch: Instant,
    /// 0: closed; else open until this many milliseconds after `epoch`.
    open_until: AtomicU64,
    failures: AtomicU32,
    backoff_ms: AtomicU64,
    /// A probe is in flight (one at a time while open).
    probing: AtomicBool,
}

impl Breaker {
    pub(super) fn new() -> Breaker {
        Breaker {
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            backoff_ms: AtomicU64::new(BACKOFF_MIN_MS),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Whether this decision may ask Redis: closed, or the probe after the back-off.
    pub(super) fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        self.now_ms() >= until
            && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    pub(super) fn success(&self) {
        if self.open_until.load(Ordering::Acquire) != 0 || self.failures.load(Ordering::Relaxed) != 0 {
            if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                tracing::info!("Redis rate limits answer again; shared limits restored");
            }
            self.failures.store(0, Ordering::Relaxed);
            self.backoff_ms.store(BACKOFF_MIN_MS, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Records a failure; returns whether it opened the breaker (for the log).
    pub(super) fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        if failures < BREAKER_FAILURES && !was_probe {
            return false;
        }
        let backoff = self.backoff_ms.load(Ordering::Relaxed);
        self.backoff_ms.store((backoff * 2).min(BACKOFF_MAX_MS), Ordering::Relaxed);
        self.open_until.swap(self.now_ms() + backoff, Ordering::AcqRel) == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_breaker_opens_after_three_failures_and_probes_one_at_a_time() {
        let b = Breaker::new();
        assert!(b.allow());
        assert!(!b.failure() && !b.failure());
        assert!(b.allow(), "two failures: still closed");
        assert!(b.failure(), "the third opens it");
        assert!(!b.allow(), "open: no request asks Redis during the back-off");
        std::thread::sleep(Duration::from_millis(BACKOFF_MIN_MS + 20));
        assert!(b.allow(), "after the back-off, one probe");
        assert!(!b.allow(), "and only one");
        assert!(!b.failure(), "a failed probe keeps it open (already open)");
        std::thread::sleep(Duration::from_millis(BACKOFF_MIN_MS + 20));
        assert!(!b.allow(), "the back-off doubled");
        std::thread::sleep(Duration::from_millis(BACKOFF_MIN_MS + 20));
        assert!(b.allow());
        b.success();
        assert!(b.allow() && b.allow(), "closed again");
    }
}
