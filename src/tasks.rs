//! Every background loop, in one place. Each maintains something that lives in `State` (the
//! authenticator, the limiter of the current snapshot), so living here rather than beside what
//! it maintains keeps `auth` and `limits` free of any dependency on `state`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{flush_usage, Authenticator};
use crate::clock;
use crate::state::State;
use crate::store::{Change, Pushed};

/// Background work of the authenticator: applies changes made elsewhere (pushed by the store
/// as they happen, if it can, and polled every `auth.revocation_poll` in any case), checks the
/// store is still usable, writes last-used timestamps in batches, purges keys past the restore
/// window. A pushed `Gap` (the feed's connection was lost and is back) polls at once.
pub async fn maintain_keys(auth: Arc<Authenticator>, state: Arc<State>) {
    const FLUSH_EVERY: Duration = Duration::from_secs(10);
    const PURGE_EVERY: Duration = Duration::from_secs(3600);
    let lag = |c: &Change| {
        let ms = (clock::now_ms() - c.at).max(0);
        state.metrics.key_change_lag.observe(ms as f64 / 1000.0);
    };
    let mut pushed = auth.store().subscribe();
    // From now: the cache is empty, nothing before can be stale in it. If the store cannot say
    // where "now" is, from the beginning (cursor 0, for every backend): a change made while it
    // was unreachable must not be skipped (each change is applied once either way).
    let mut cursor = match auth.poll_changes(None, lag).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the key store's change position; reading every change once it answers");
            Some(0)
        }
    };
    let mut last_flush = Instant::now();
    let mut last_purge: Option<Instant> = None;
    // After a failed poll, the next one comes soon: it may be the catch-up after a gap in the
    // feed, and `revocation_poll` may be long when changes are pushed.
    let mut retry_soon = false;
    loop {
        let cfg = state.snapshot().config.auth.clone();
        let wait = if retry_soon { cfg.revocation_poll.min(RETRY_POLL) } else { cfg.revocation_poll };
        let poll = tokio::time::sleep(wait);
        tokio::pin!(poll);
        loop {
            tokio::select! {
                _ = &mut poll => break,
                change = async {
                    match pushed.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match change {
                    Some(Pushed::Change(c)) => {
                        if auth.apply(&c) {
                            lag(&c);
                        }
                    }
                    Some(Pushed::Gap) => break,
                    // The feed ended: polling alone from here on.
                    None => pushed = None,
                },
            }
        }
        let now = clock::now_ms();
        match auth.store().check().await {
            Ok(()) => {
                if !state.set_store_ok(true) {
                    tracing::info!("the key store is usable again; readiness restored");
                }
            }
            Err(e) => {
                if state.set_store_ok(false) {
                    tracing::error!(error = %e, "the key store cannot be used; readiness is 503");
                }
            }
        }
        match auth.poll_changes(cursor, lag).await {
            Ok(next) => {
                cursor = Some(next);
                retry_soon = false;
            }
            Err(e) => {
                retry_soon = true;
                tracing::warn!(error = %e, "cannot poll the key store for revocations");
            }
        }
        // sqlx starts a SQLite worker thread per connection, on demand: found by name.
        crate::priority::lower_threads_named("sqlx-sqlite");
        if last_flush.elapsed() >= FLUSH_EVERY {
            last_flush = Instant::now();
            let _ = flush_usage(&auth).await;
            auth.forget_quiet_sources();
            auth.forget_uncached_ids();
        }
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            last_purge = Some(Instant::now());
            let retention = i64::try_from(cfg.revocation_retention.as_millis()).unwrap_or(i64::MAX);
            match auth.store().purge(now.saturating_sub(retention), now).await {
                Ok(ids) => {
                    for id in ids {
                        tracing::info!(target: "audit", action = "purge", key_id = %id, actor = "system", "key purged");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot purge expired revocations"),
            }
        }
    }
}

/// How soon a failed poll is tried again.
const RETRY_POLL: Duration = Duration::from_millis(250);

/// Background work: forgets idle limiter state every 30 s (bounded memory with many
/// organisations; governor's keyed stores never shrink unless told to).
pub async fn forget_idle_limits(state: Arc<State>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        state.snapshot().limiter.forget_idle();
        if let Some(f) = &state.fleet {
            f.forget_idle();
        }
    }
}

/// Background work of the Redis backend: keeps the concurrency leases of this replica's
/// requests still running (a replica that dies stops, and its slots come back when they run
/// out).
pub async fn renew_leases(fleet: Arc<crate::limits::redis::Fleet>) {
    loop {
        tokio::time::sleep(fleet.renew_every()).await;
        fleet.renew().await;
    }
}

/// Background work of the Redis backend with debited leases: gives back what leases that ran
/// out did not use (none: returns at once).
pub async fn refund_debits(fleet: Arc<crate::limits::redis::Fleet>) {
    let Some(every) = fleet.refund_every() else { return };
    loop {
        tokio::time::sleep(every).await;
        fleet.refund_debits().await;
    }
}

/// Background work of the Redis backend: announces this replica every second, and learns
/// how many are live (the divisor of `on_error: local`).
pub async fn announce_replica(fleet: Arc<crate::limits::redis::Fleet>) {
    loop {
        fleet.announce().await;
        tokio::time::sleep(crate::limits::redis::ANNOUNCE_EVERY).await;
    }
}
