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
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use moka::future::Cache;
use tokio::sync::oneshot;

use crate::clock;
use crate::config;
use crate::error::Error;
use crate::keys::{self, KeyRecord, Verified};
use crate::metrics::Metrics;
use crate::store::{KeyStore, StoreError};
use crate::upstream::Identity;

/// What the keys of one organisation, workspace, tier and scope set have in common. Interned:
/// every cached key of a profile points at one copy, so a cached key costs little more than its
/// id (the load benchmark's S4 measures bytes per cached key).
#[derive(Debug)]
pub struct Profile {
    /// Shared, not owned: the rate limiter keys its state by it, once per request.
    pub org: Arc<str>,
    pub workspace: String,
    pub tier: String,
    pub scopes: Vec<String>,
    /// `x-tollgate-org`, `-tier` and `-scopes`, built once per profile rather than per request.
    pub identity: Identity,
}

impl Profile {
    pub fn scopes(&self) -> impl Iterator<Item = &str> + Clone {
        self.scopes.iter().map(String::as_str)
    }
}

/// An authenticated caller: its key and the profile it shares with similar keys. Derefs to the
/// profile (`principal.org`, `principal.tier`, …).
#[derive(Debug)]
pub struct Principal {
    /// Shared, not owned: the rate limiter keys per-key state by it.
    pub key_id: Arc<str>,
    profile: Arc<Profile>,
    pub expires_at: Option<i64>,
    last_used: AtomicI64,
    flushed: AtomicI64,
}

impl std::ops::Deref for Principal {
    type Target = Profile;
    fn deref(&self) -> &Profile {
        &self.profile
    }
}

/// The interned profiles, by (org, workspace, tier, scopes). Weak: a profile lives as long as a
/// cached key uses it; dead entries are swept with the failure counters.
type Profiles = HashMap<(String, String, String, Vec<String>), Weak<Profile>>;

impl Profile {
    fn new(r: &KeyRecord) -> Profile {
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("invalid"));
        let identity = Identity {
            headers: vec![
                (HeaderName::from_static("x-tollgate-org"), value(&r.org)),
                (HeaderName::from_static("x-tollgate-tier"), value(&r.tier)),
                (HeaderName::from_static("x-tollgate-scopes"), value(&r.scopes.join(" "))),
            ],
        };
        Profile {
            org: r.org.as_str().into(),
            workspace: r.workspace.clone(),
            tier: r.tier.clone(),
            scopes: r.scopes.clone(),
            identity,
        }
    }
}

impl Principal {
    fn new(r: &KeyRecord, profile: Arc<Profile>) -> Principal {
        Principal {
            key_id: r.id.as_str().into(),
            profile,
            expires_at: r.expires_at,
            last_used: AtomicI64::new(0),
            flushed: AtomicI64::new(0),
        }
    }
}

/// Why a token was refused; the `reason` label of `tollgate_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Malformed,
    Format,
    Checksum,
    Unknown,
    Mismatch,
    Revoked,
    Expired,
    Workspace,
    Unusable,
    RateLimited,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Malformed => "malformed",
            Reason::Format => "format",
            Reason::Checksum => "checksum",
            Reason::Unknown => "unknown",
            Reason::Mismatch => "mismatch",
            Reason::Revoked => "revoked",
            Reason::Expired => "expired",
            Reason::Workspace => "workspace",
            Reason::Unusable => "unusable",
            Reason::RateLimited => "rate_limited",
        }
    }

    fn error(self) -> Error {
        let message = match self {
            Reason::Missing => "Missing API key. Send it in the Authorization header as `Bearer <key>`.",
            Reason::Malformed => {
                "Invalid Authorization header: expected exactly one `Authorization: Bearer <key>`."
            }
            Reason::Format | Reason::Checksum => {
                "Invalid API key: it is not a well-formed key (check it for truncation or typos)."
            }
            // Only once the secret has verified may the message say more (§5).
            Reason::Revoked => "This API key has been revoked.",
            Reason::Expired => "This API key has expired.",
            _ => "Invalid API key. Include a valid Bearer token in the Authorization header.",
        };
        Error::Unauthorized { message: message.into(), reason: self.label() }
    }
}

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

/// A cache slot: the outcome and when it stops counting (milliseconds on the authenticator's
/// own monotonic clock; 8 bytes rather than an `Instant`'s 16, per cached key).
#[derive(Clone)]
struct Cached {
    entry: Entry,
    expires_ms: u64,
}

pub struct Authenticator {
    store: Arc<dyn KeyStore>,
    /// The verified-key cache. quick_cache rather than moka: moka's bookkeeping is 360–440 bytes
    /// per entry (measured with 100,000 entries), quick_cache's about 95 — and a cached key must
    /// cost under 450 bytes in all (issue: performance). Expiry is checked on read; concurrent
    /// misses for one token wait for the first one's outcome (its placeholder guard).
    cache: quick_cache::sync::Cache<[u8; 32], Cached>,
    valid_ttl: Duration,
    invalid_ttl: Duration,
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
}

/// Changes are read with an overlap, so that a write racing the previous poll is not missed.
pub const CHANGE_OVERLAP_MS: i64 = 2_000;

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
            valid_ttl: cfg.cache_ttl,
            invalid_ttl: cfg.negative_cache_ttl,
            epoch: Instant::now(),
            profiles: Mutex::new(HashMap::new()),
            digest_key,
            verifiers: Verifiers::start(cores)?,
            failures: RateLimiter::keyed(quota),
            blocked: Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(3600)).build(),
            verifying: Mutex::new(HashMap::new()),
            verifier_threads: cores,
            applied: Mutex::new(HashMap::new()),
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
        let cached =
            if prefixed { self.cache.get(&digest).filter(|c| c.expires_ms > clock_ms) } else { None };
        let entry = match cached {
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
                // An expired outcome must not be handed to the waiters below.
                self.cache.remove_if(&digest, |c| c.expires_ms <= clock_ms);
                let entry =
                    match self.cache.get_value_or_guard_async(&digest).await {
                        Ok(c) => c.entry,
                        // First of the concurrent misses for this token: the others wait for this
                        // outcome (or, if this fails, for one of them to try again).
                        Err(guard) => {
                            let _slot = self.verifying_slot(source).await;
                            self.check_blocked(source, metrics).await?;
                            let entry =
                            self.lookup_and_verify(parsed.id, parsed.secret(), metrics).await.map_err(|e| {
                                tracing::error!(error = %e, "key store unreachable during authentication");
                                Error::Unavailable("The key store is unreachable; try again shortly.")
                            })?;
                            let ttl = match entry {
                                Entry::Valid(_) => self.valid_ttl,
                                Entry::Invalid { .. } => self.invalid_ttl,
                            };
                            let expires_ms = self.clock_ms().saturating_add(millis(ttl));
                            let _ = guard.insert(Cached { entry: entry.clone(), expires_ms });
                            entry
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

    /// 429 while `source` is blocked for failed attempts.
    async fn check_blocked(&self, source: IpAddr, metrics: &Metrics) -> Result<(), Error> {
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
    async fn verifying_slot(&self, source: IpAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = {
            let mut map = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(source)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.verifier_threads.max(1))))
                .clone()
        };
        // Never closed: `None` cannot happen, and would only mean no wait.
        slots.acquire_owned().await.ok()
    }

    async fn count_failure(&self, source: IpAddr) {
        if let Err(not_until) = self.failures.check_key(&source) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(self.failures.clock()));
            self.blocked.insert(source, Instant::now() + wait).await;
        }
    }

    /// Drops every cached outcome for a key id: the next request reads the store again.
    pub fn invalidate(&self, key_id: &str) {
        self.cache.retain(|_, c| c.entry.key_id() != Some(key_id));
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

    /// One poll of the store for changes made elsewhere since `since`; returns where the next
    /// poll starts (with the overlap).
    pub async fn poll_changes(&self, since: i64) -> Result<i64, StoreError> {
        let now = clock::now_ms();
        for c in self.store.changed_since(since).await? {
            self.apply_change(&c.id, c.at);
        }
        let next = now - CHANGE_OVERLAP_MS;
        // Older changes are not returned by any later poll: nothing to remember them for.
        self.applied.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, at| *at >= next);
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
struct Verifiers {
    tx: std::sync::mpsc::Sender<Job>,
}

impl Verifiers {
    const IDLE: Duration = Duration::from_secs(30);

    fn start(threads: usize) -> Result<Verifiers, String> {
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

    async fn verify(&self, phc: String, secret: String) -> Verified {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Job { phc, secret, reply }).is_err() {
            return Verified::Unusable;
        }
        answer.await.unwrap_or(Verified::Unusable)
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

/// Extracts the token of exactly one `Authorization: Bearer <token>` header, strictly: one
/// header, the scheme (case-insensitive), one space, and a token of visible ASCII no longer than
/// any well-formed key.
fn bearer(headers: &HeaderMap) -> Result<&str, Reason> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next().ok_or(Reason::Missing)?;
    if all.next().is_some() {
        return Err(Reason::Malformed);
    }
    let bytes = value.as_bytes();
    if bytes.len() < 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(Reason::Malformed);
    }
    let token = &bytes[7..];
    if token.is_empty() || token.len() > keys::MAX_TOKEN_LEN || !token.iter().all(u8::is_ascii_graphic) {
        return Err(Reason::Malformed);
    }
    std::str::from_utf8(token).map_err(|_| Reason::Malformed)
}

/// Writes pending last-used timestamps; on failure they are written with the next batch.
pub async fn flush_usage(auth: &Authenticator) {
    let used = auth.take_usage();
    if let Err(e) = auth.store.touch(&used).await {
        tracing::warn!(error = %e, keys = used.len(), "cannot write last-used timestamps");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_is_strict() {
        assert_eq!(bearer(&headers(&[b"Bearer abc"])), Ok("abc"));
        assert_eq!(bearer(&headers(&[b"bearer abc"])), Ok("abc"));
        assert_eq!(bearer(&headers(&[])), Err(Reason::Missing));
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer  abc",
            b"Bearer abc ",
            b"Bearer a\tb",
            b"Bearerabc",
            b"Bearer \xc3\xa9",
        ] {
            assert_eq!(bearer(&headers(&[bad])), Err(Reason::Malformed), "{bad:?}");
        }
        assert_eq!(bearer(&headers(&[b"Bearer a", b"Bearer b"])), Err(Reason::Malformed));
        let long = format!("Bearer {}", "a".repeat(keys::MAX_TOKEN_LEN + 1));
        assert_eq!(bearer(&headers(&[long.as_bytes()])), Err(Reason::Malformed));
    }

    /// A config from `yaml` (cheap Argon2id parameters added) and a real SQLite store in `dir`.
    async fn config_and_store(
        yaml: &str,
        dir: &tempfile::TempDir,
    ) -> (crate::config::Config, Arc<dyn KeyStore>) {
        let yaml = format!("auth: {{ {yaml}, argon2: {{ memory_kib: 8, iterations: 1, parallelism: 1 }} }}");
        let config = crate::config::Config::from_yaml(&yaml, "test").unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
        (config, store)
    }

    /// Creates a key of org `acme`, tier `audit`, scope `inference:read`.
    async fn create_key(store: &Arc<dyn KeyStore>, config: &crate::config::Config) -> keys::Token {
        let spec = crate::keys::lifecycle::NewKeySpec {
            org: "acme".into(),
            tier: "audit".into(),
            scopes: vec!["inference:read".into()],
            name: None,
            workspace: None,
            expires_in: None,
        };
        crate::keys::lifecycle::create(
            store.as_ref(),
            config,
            spec,
            &crate::keys::lifecycle::Actor::Cli,
            None,
        )
        .await
        .unwrap()
        .1
    }

    /// Argon2id verifications so far, whatever their outcome.
    fn verifications(metrics: &Metrics) -> u64 {
        ["ok", "mismatch", "error"]
            .iter()
            .map(|r| metrics.argon2_verifications.with_label_values(&[r]).get())
            .sum()
    }

    /// The cache against a real SQLite store: hits cost no verification, outcomes expire after
    /// their TTL (valid and refused alike), and keys of one profile share it.
    #[tokio::test]
    async fn cached_outcomes_expire_and_profiles_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let (config, store) = config_and_store("cache_ttl: 300ms, negative_cache_ttl: 300ms", &dir).await;
        let one = create_key(&store, &config).await;
        let two = create_key(&store, &config).await;
        let auth = Authenticator::new(store, &config.auth).unwrap();
        let metrics = Metrics::new().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let verified = || verifications(&metrics);
        let bearer = |token: &str| headers(&[format!("Bearer {token}").as_bytes()]);

        let a = auth.authenticate(&config.auth, &bearer(one.expose()), ip, &metrics).await.unwrap();
        let b = auth.authenticate(&config.auth, &bearer(two.expose()), ip, &metrics).await.unwrap();
        assert!(Arc::ptr_eq(&a.profile, &b.profile), "keys of one profile share it");
        auth.authenticate(&config.auth, &bearer(one.expose()), ip, &metrics).await.unwrap();
        assert_eq!(verified(), 2, "a cache hit costs no verification");

        // A wrong secret for a real id: refused, and the refusal is cached too.
        let id = one.expose().split('_').nth(1).unwrap();
        let wrong = keys::assemble("tg", id, &"x".repeat(32));
        for _ in 0..2 {
            let e = auth.authenticate(&config.auth, &bearer(&wrong), ip, &metrics).await.unwrap_err();
            assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
        }
        assert_eq!(verified(), 3, "the refusal is remembered");

        tokio::time::sleep(Duration::from_millis(400)).await;
        auth.authenticate(&config.auth, &bearer(one.expose()), ip, &metrics).await.unwrap();
        auth.authenticate(&config.auth, &bearer(&wrong), ip, &metrics).await.unwrap_err();
        assert_eq!(verified(), 5, "both outcomes expired after their TTL");
    }

    /// A change is applied to the cache once, however many overlapping polls see it: a new or
    /// restored key in use is verified again once, not on every poll. (Before: every poll in
    /// the 2 s overlap evicted it, up to four verifications in its first seconds.) A later
    /// change — even one stamped earlier by a writer with a slower clock — still applies.
    #[tokio::test]
    async fn each_change_evicts_a_cached_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let (config, store) = config_and_store("cache_ttl: 1h", &dir).await;
        let key = create_key(&store, &config).await;
        let id = key.expose().split('_').nth(1).unwrap().to_string();
        let auth = Authenticator::new(store.clone(), &config.auth).unwrap();
        let metrics = Metrics::new().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let h = headers(&[format!("Bearer {}", key.expose()).as_bytes()]);
        let mut since = clock::now_ms() - CHANGE_OVERLAP_MS;
        for _ in 0..4 {
            auth.authenticate(&config.auth, &h, ip, &metrics).await.unwrap();
            since = auth.poll_changes(since).await.unwrap();
        }
        assert_eq!(verifications(&metrics), 2, "the creation evicted the key once, not per poll");

        // Revoked elsewhere (the CLI): the next poll applies it, and the key is refused.
        crate::keys::lifecycle::revoke(store.as_ref(), &id, &crate::keys::lifecycle::Actor::Cli)
            .await
            .unwrap();
        since = auth.poll_changes(since).await.unwrap();
        assert!(auth.authenticate(&config.auth, &h, ip, &metrics).await.is_err(), "revocation missed");
        // A restore stamped earlier than the revocation is still a new change.
        let e = crate::keys::AuditEvent {
            key_id: id.clone(),
            org: "acme".into(),
            action: "restore".into(),
            actor: "cli".into(),
            at: clock::now_ms() - 500,
            detail: None,
        };
        store.set_revoked(&id, None, &e).await.unwrap();
        for _ in 0..3 {
            since = auth.poll_changes(since).await.unwrap();
            auth.authenticate(&config.auth, &h, ip, &metrics).await.unwrap();
        }
        assert_eq!(verifications(&metrics), 4, "revoke and restore: one verification each");
    }

    /// Concurrent misses from one source cannot all slip past the failed-attempt block: they
    /// are verified a few at a time, and those that waited see the block the first failures
    /// caused. (Before: 40 concurrent wrong secrets, 40 verifications.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_wrong_secrets_from_one_source_are_verified_a_few_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (config, store) = config_and_store("failed_auth: { per_second: 1, burst: 2 }", &dir).await;
        let key = create_key(&store, &config).await;
        let id = key.expose().split('_').nth(1).unwrap().to_string();
        let auth = Arc::new(Authenticator::new(store, &config.auth).unwrap());
        let metrics = Arc::new(Metrics::new().unwrap());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();

        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let (auth, metrics, cfg) = (auth.clone(), metrics.clone(), config.auth.clone());
            let wrong = keys::assemble("tg", &id, &format!("{}{i:04}", "x".repeat(28)));
            tasks.spawn(async move {
                let h = headers(&[format!("Bearer {wrong}").as_bytes()]);
                auth.authenticate(&cfg, &h, ip, &metrics).await.map(|_| ()).unwrap_err()
            });
        }
        let errors = tasks.join_all().await;
        let verified = verifications(&metrics);
        let limited = errors
            .iter()
            .filter(|e| matches!(e, Error::RateLimited { limit: crate::error::Limit::FailedAuth, .. }))
            .count();
        assert!(verified >= 2, "the burst is verified: {verified}");
        assert!(
            verified <= 2 + 2 * auth.verifier_threads as u64,
            "{verified} verifications for 40 concurrent wrong secrets (burst 2, {} slots)",
            auth.verifier_threads
        );
        assert!(limited as u64 + verified + 2 >= 40, "the rest are refused with 429: {limited}");
    }
}
