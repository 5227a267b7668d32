//! Authentication (§2): `Authorization: Bearer` → `Principal`.
//!
//! Strict header parsing → format and checksum (no I/O) → the verified-key cache, keyed by a
//! per-process keyed BLAKE3 digest of the token (never the token itself) → on a miss, and only
//! for one of many concurrent requests with the same token: fetch the record by id and verify
//! with Argon2id on the fixed verifier threads (one per core) → cache the outcome,
//! including failures (briefly). Failed attempts are counted per source address, and a source
//! over its budget gets 429 before any further store or Argon2 work.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use moka::future::Cache;

use crate::clock;
use crate::config;
use crate::error::Error;
use crate::keys::{self, KeyRecord, Verified};
use crate::metrics::Metrics;
use crate::store::{Change, Cursor, KeyStore, StoreError};

mod bearer;
mod by_id;
mod failures;
mod principal;
#[cfg(test)]
mod tests;
mod verifier;

pub use bearer::bearer;
pub use bearer::Reason;
use principal::Profiles;
pub use principal::{Principal, Profile};
use verifier::Verifiers;

/// A cache entry: a verified principal, or a refusal remembered for `negative_cache_ttl`.
#[derive(Clone)]
enum Entry {
    Valid(Arc<Principal>),
    Invalid { reason: Reason, key_id: Option<String> },
}

impl Entry {
    fn key_id(&self) -> Option<&str> {
        match self {
            Entry::Valid(p) => Some(&p.key_id),
            Entry::Invalid { key_id, .. } => key_id.as_deref(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A cache slot: the outcome, when it stops being fresh (`cache_ttl`) and when it stops
/// counting at all (`stale_if_unavailable` later, for a valid key: it is used past its
/// freshness only while the store is unreachable). Milliseconds on the authenticator's own
/// monotonic clock, 8 bytes each rather than an `Instant`'s 16, per cached key.
#[derive(Clone)]
struct Cached {
    entry: Entry,
    fresh_ms: u64,
    expires_ms: u64,
}

pub struct Authenticator {
    store: Arc<dyn KeyStore>,
    /// The verified-key cache. quick_cache rather than moka: moka's bookkeeping is 360–440 bytes
    /// per entry (measured with 100,000 entries), quick_cache's about 95 — and a cached key must
    /// cost under 450 bytes in all (issue: performance). Expiry is checked on read; concurrent
    /// misses for one token wait for the first one's outcome (its placeholder guard).
    cache: quick_cache::sync::Cache<[u8; 32], Cached>,
    /// The origin of `Cached::expires_ms`.
    epoch: Instant,
    profiles: Mutex<Profiles>,
    /// Per-process key of the cache digest: a memory dump of the cache yields no usable digests
    /// for another process, and digests cannot be precomputed.
    digest_key: [u8; 32],
    verifiers: Verifiers,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Cache<IpAddr, Instant>,
    /// Per source address, the cache misses being looked up and verified: at most one per
    /// verifier thread (all one source could use), the others wait and then see the block that
    /// the failures before them caused. Without it, a flood's concurrent misses all passed the
    /// block check before the first failure was counted (64 connections: ~19 verifications a
    /// second instead of `failed_auth.per_second`).
    verifying: Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>,
    verifier_threads: usize,
    /// The changes applied to the cache, by key id: the time of the latest one. The poll reads
    /// changes with an overlap, so one change is seen up to three times; each costs a new
    /// Argon2id verification of a key in use, so it is applied once.
    applied: Mutex<HashMap<String, i64>>,
    /// Per key, the last eviction of its cached outcomes: its number in `evictions` and when
    /// (`clock_ms`), so that a lookup in flight then does not cache what it read before it.
    evicted: Mutex<HashMap<String, (u64, u64)>>,
    /// Evictions so far: a lookup notes the count when it starts.
    evictions: std::sync::atomic::AtomicU64,
    /// The latest lookup could not reach the store: a stale valid entry is used without
    /// trying again (each try would cost its request the store's timeout).
    store_down: std::sync::atomic::AtomicBool,
    /// Last-used timestamps whose write failed, retried with the next batch.
    unwritten: Mutex<HashMap<String, i64>>,
    /// Key id → the digest of its cached valid or revoked outcome. Locked around each insert
    /// into the cache as well, so that pruning never drops the entry of an insert under way.
    by_id: Mutex<by_id::ById>,
}

/// At most this many unwritten last-used timestamps are kept for a store that stays down.
const UNWRITTEN_MAX: usize = 1_000_000;

/// How long an applied change is remembered, so that seeing it again evicts nothing a second
/// time: pushed, then polled; polled again in SQLite's overlap; or polled again while a
/// PostgreSQL poll's cursor is held back by a long transaction anywhere in the cluster. An
/// hour, so that a forgotten change costs a key in use one extra verification an hour at
/// most; a few tens of bytes per change made.
const APPLIED_MEMORY_MS: i64 = 3_600_000;

/// How long an eviction is remembered: longer than any lookup and verification takes.
const EVICTION_MEMORY_MS: u64 = 60_000;

impl Authenticator {
    pub fn new(store: Arc<dyn KeyStore>, cfg: &config::Auth) -> Result<Authenticator, String> {
        let mut digest_key = [0u8; 32];
        getrandom::fill(&mut digest_key).map_err(|e| format!("the OS random generator failed: {e}"))?;
        // quick_cache's capacity is approximate (per shard); the headroom makes `cache_capacity`
        // keys fit, so a hot set of exactly that size does not churn through Argon2id.
        let capacity =
            usize::try_from(cfg.cache_capacity + cfg.cache_capacity / 16).unwrap_or(usize::MAX).max(1);
        let cache = quick_cache::sync::Cache::new(capacity);
        // Argon2id is memory-hard and CPU-bound: more verifiers than cores only adds latency.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(cfg.failed_auth_per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(cfg.failed_auth_burst).unwrap_or(one));
        Ok(Authenticator {
            store,
            cache,
            epoch: Instant::now(),
            profiles: Mutex::new(HashMap::new()),
            digest_key,
            verifiers: Verifiers::start(cores)?,
            failures: RateLimiter::keyed(quota),
            blocked: Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(3600)).build(),
            verifying: Mutex::new(HashMap::new()),
            verifier_threads: cores,
            applied: Mutex::new(HashMap::new()),
            evicted: Mutex::new(HashMap::new()),
            evictions: std::sync::atomic::AtomicU64::new(0),
            store_down: std::sync::atomic::AtomicBool::new(false),
            unwritten: Mutex::new(HashMap::new()),
            by_id: Mutex::new(by_id::ById::default()),
        })
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Authenticates one request, or says why not.
    pub async fn authenticate(
        &self,
        cfg: &config::Auth,
        headers: &HeaderMap,
        source: IpAddr,
        metrics: &Metrics,
    ) -> Result<Arc<Principal>, Error> {
        let fail = |reason: Reason| {
            metrics.auth_failures.with_label_values(&[reason.label()]).inc();
            reason.error()
        };
        let token = bearer(headers).map_err(fail)?;
        let digest = *blake3::keyed_hash(&self.digest_key, token.as_bytes()).as_bytes();
        let now = clock::now_ms();

        // Only tokens that passed the format and checksum checks are ever cached, so a hit needs
        // no second look — except at the prefix, which a reload may change.
        let clock_ms = self.clock_ms();
        let prefixed = token.strip_prefix(cfg.key_prefix.as_str()).is_some_and(|rest| rest.starts_with('_'));
        let slot = if prefixed { self.cache.get(&digest).filter(|c| c.expires_ms > clock_ms) } else { None };
        let (fresh, stale) = match slot {
            Some(c) if c.fresh_ms > clock_ms => (Some(c), None),
            other => (None, other),
        };
        // Past `cache_ttl`, a verified key is checked against the store again; while the store
        // is known to be unreachable, it is served as it was (§11).
        let served = fresh.or_else(|| stale.clone().filter(|_| self.store_down.load(Ordering::Relaxed)));
        let entry = match served {
            Some(c) => {
                metrics.auth_cache_hits.inc();
                c.entry
            }
            None => {
                let parsed = keys::parse(&cfg.key_prefix, token).map_err(|m| {
                    fail(match m {
                        keys::Malformed::Shape => Reason::Format,
                        keys::Malformed::Checksum => Reason::Checksum,
                    })
                })?;
                metrics.auth_cache_misses.inc();
                self.check_blocked(source, metrics).await?;
                // An outcome past its freshness must not be handed to the waiters below.
                self.cache.remove_if(&digest, |c| c.fresh_ms <= clock_ms);
                let entry = match self.cache.get_value_or_guard_async(&digest).await {
                    Ok(c) => c.entry,
                    // First of the concurrent misses for this token: the others wait for this
                    // outcome (or, if this fails, for one of them to try again).
                    Err(guard) => {
                        let _slot = self.verifying_slot(source).await;
                        self.check_blocked(source, metrics).await?;
                        let looked_up = self.evictions.load(Ordering::SeqCst);
                        let stale_valid = stale.filter(|c| matches!(c.entry, Entry::Valid(_)));
                        match self.lookup_and_verify(parsed.id, parsed.secret(), metrics).await {
                            Ok(entry) => {
                                self.store_down.store(false, Ordering::Relaxed);
                                // From the request's config generation: a reload applies.
                                let (ttl, stale_for) = match entry {
                                    Entry::Valid(_) => (cfg.cache_ttl, cfg.stale_if_unavailable),
                                    Entry::Invalid { .. } => (cfg.negative_cache_ttl, Duration::ZERO),
                                };
                                let fresh_ms = self.clock_ms().saturating_add(millis(ttl));
                                let expires_ms = fresh_ms.saturating_add(millis(stale_for));
                                // A change applied while this lookup ran found nothing to
                                // evict (the slot was a placeholder): this outcome may predate
                                // it, so it is not cached; the next request reads the store
                                // again.
                                if !self.evicted_since(parsed.id, looked_up) {
                                    let cached = Cached { entry: entry.clone(), fresh_ms, expires_ms };
                                    self.insert(&digest, parsed.id, cached, |c| {
                                        let _ = guard.insert(c);
                                    });
                                }
                                entry
                            }
                            Err(e) => {
                                self.store_down.store(true, Ordering::Relaxed);
                                match stale_valid {
                                    // Kept for the waiters, still stale: once the store is
                                    // back, the next request past this one verifies again.
                                    Some(c) => {
                                        tracing::warn!(error = %e, "key store unreachable; serving a key verified before");
                                        self.insert(&digest, parsed.id, c.clone(), |c| {
                                            let _ = guard.insert(c);
                                        });
                                        c.entry
                                    }
                                    None => {
                                        tracing::error!(error = %e, "key store unreachable during authentication");
                                        return Err(Error::Unavailable(
                                            "The key store is unreachable; try again shortly.",
                                        ));
                                    }
                                }
                            }
                        }
                    }
                };
                if let Entry::Invalid { reason: Reason::Unknown | Reason::Mismatch, .. } = entry {
                    self.count_failure(source).await;
                }
                entry
            }
        };
        let principal = match entry {
            Entry::Invalid { reason, .. } => return Err(fail(reason)),
            Entry::Valid(p) => p,
        };
        // Checked on every use: a cached principal may expire, and `workspace` may be reloaded.
        if principal.expires_at.is_some_and(|e| e <= now) {
            return Err(fail(Reason::Expired));
        }
        if cfg.workspace.as_ref().is_some_and(|w| *w != principal.workspace) {
            return Err(fail(Reason::Workspace));
        }
        principal.last_used.store(now, Ordering::Relaxed);
        Ok(principal)
    }

    async fn lookup_and_verify(
        &self,
        id: &str,
        secret: &str,
        metrics: &Metrics,
    ) -> Result<Entry, StoreError> {
        let Some(record) = self.store.get(id).await? else {
            return Ok(Entry::Invalid { reason: Reason::Unknown, key_id: None });
        };
        let invalid = |reason| Entry::Invalid { reason, key_id: Some(record.id.clone()) };
        let verified = self.verifiers.verify(record.secret_hash.clone(), secret.to_string()).await;
        let result = match verified {
            Verified::Match => "ok",
            Verified::Mismatch => "mismatch",
            Verified::Unusable => "error",
        };
        metrics.argon2_verifications.with_label_values(&[result]).inc();
        Ok(match verified {
            Verified::Mismatch => invalid(Reason::Mismatch),
            Verified::Unusable => {
                tracing::error!(key_id = %record.id, "stored hash is unusable (not Argon2id, or over the work bounds)");
                invalid(Reason::Unusable)
            }
            Verified::Match if record.revoked_at.is_some() => invalid(Reason::Revoked),
            Verified::Match => Entry::Valid(Arc::new(Principal::new(&record, self.profile(&record)))),
        })
    }

    /// Applies the change of key `id` that the store stamped `at`: its cached outcomes are
    /// dropped, once per change however often it is seen. A different stamp is a new change
    /// even when it is older (writers' clocks may disagree). Returns whether it was new.
    pub fn apply_change(&self, id: &str, at: i64) -> bool {
        if !self.note_change(id, at) {
            return false;
        }
        self.invalidate(id);
        true
    }

    /// Caches an outcome (through the placeholder guard of its lookup), indexed by key id when
    /// a change of the key can make it stale.
    /// `insert` puts `c` in the cache.
    fn insert(&self, digest: &[u8; 32], id: &str, c: Cached, insert: impl FnOnce(Cached)) {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(c.entry, Entry::Valid(_) | Entry::Invalid { reason: Reason::Revoked, .. }) {
            by_id.note(id, *digest);
        }
        insert(c);
    }

    /// Drops the cached outcomes of a key id that a change can make stale, and remembers when,
    /// for lookups in flight.
    pub fn invalidate(&self, key_id: &str) {
        let n = self.evictions.fetch_add(1, Ordering::SeqCst) + 1;
        self.evicted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key_id.to_string(), (n, self.clock_ms()));
        let evict = self.by_id.lock().unwrap_or_else(|e| e.into_inner()).take(key_id);
        match evict {
            by_id::Evict::Nothing => {}
            by_id::Evict::One(digest) => {
                self.cache.remove(&digest);
            }
            by_id::Evict::Scan => self.cache.retain(|_, c| c.entry.key_id() != Some(key_id)),
        }
    }

    /// Forgets index entries of outcomes no longer cached (run with the other upkeep).
    pub fn forget_uncached_ids(&self) {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner()).retain(|d| self.cache.contains_key(d));
    }

    /// Whether `key_id`'s cached outcomes were evicted after the lookup that noted `seen`.
    fn evicted_since(&self, key_id: &str, seen: u64) -> bool {
        self.evicted.lock().unwrap_or_else(|e| e.into_inner()).get(key_id).is_some_and(|(n, _)| *n > seen)
    }

    /// Applies a change reported by the store (polled or pushed). A creation evicts nothing:
    /// no token of the key existed before, so all that could be cached is its own fresh,
    /// valid outcome (evicting it cost a second Argon2id verification of a key in use).
    pub fn apply(&self, c: &Change) -> bool {
        if c.created {
            return self.note_change(&c.id, c.at);
        }
        self.apply_change(&c.id, c.at)
    }

    /// Records a change as applied without evicting anything (a key created here: nothing can
    /// be cached for it). Returns whether it was new.
    pub fn note_change(&self, id: &str, at: i64) -> bool {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if applied.get(id) == Some(&at) {
            return false;
        }
        applied.insert(id.to_string(), at);
        true
    }

    /// One poll of the store for changes made elsewhere since `cursor` (`None`: from now);
    /// `on_applied` is told of each change new here. Returns where the next poll starts.
    pub async fn poll_changes(
        &self,
        cursor: Option<Cursor>,
        mut on_applied: impl FnMut(&Change),
    ) -> Result<Cursor, StoreError> {
        let (changes, next) = self.store.changes(cursor).await?;
        self.store_down.store(false, Ordering::Relaxed);
        for c in &changes {
            if self.apply(c) {
                on_applied(c);
            }
        }
        let forget = clock::now_ms() - APPLIED_MEMORY_MS;
        self.applied.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, at| *at >= forget);
        let recent = self.clock_ms().saturating_sub(EVICTION_MEMORY_MS);
        self.evicted.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, (_, at)| *at >= recent);
        Ok(next)
    }

    /// Milliseconds since this authenticator started (monotonic).
    fn clock_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// The interned profile of a key record.
    fn profile(&self, r: &KeyRecord) -> Arc<Profile> {
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        let key = (r.org.clone(), r.workspace.clone(), r.tier.clone(), r.scopes.clone());
        if let Some(p) = profiles.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        let p = Arc::new(Profile::new(r));
        profiles.insert(key, Arc::downgrade(&p));
        p
    }

    /// Last-used timestamps not yet written, marked as written.
    pub fn take_usage(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for (_, cached) in self.cache.iter() {
            if let Entry::Valid(p) = cached.entry {
                let used = p.last_used.load(Ordering::Relaxed);
                if used > p.flushed.swap(used, Ordering::Relaxed) {
                    out.push((p.key_id.to_string(), used));
                }
            }
        }
        out
    }
}

/// Writes pending last-used timestamps. A batch that fails is kept and written with the next
/// one (the newest time per key), not dropped; returns whether this batch was written.
pub async fn flush_usage(auth: &Authenticator) -> bool {
    let mut batch: HashMap<String, i64> =
        std::mem::take(&mut *auth.unwritten.lock().unwrap_or_else(|e| e.into_inner()));
    for (id, at) in auth.take_usage() {
        let slot = batch.entry(id).or_insert(at);
        *slot = (*slot).max(at);
    }
    if batch.is_empty() {
        return true;
    }
    let used: Vec<(String, i64)> = batch.into_iter().collect();
    match auth.store.touch(&used).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, keys = used.len(), "cannot write last-used timestamps; retrying with the next batch");
            let mut unwritten = auth.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            for (id, at) in used {
                if unwritten.len() >= UNWRITTEN_MAX {
                    break;
                }
                let slot = unwritten.entry(id).or_insert(at);
                *slot = (*slot).max(at);
            }
            false
        }
    }
}
