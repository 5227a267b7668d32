//! Authentication (§2): `Authorization: Bearer` → `Principal`.
//!
//! Strict header parsing → format and checksum (no I/O) → the verified-key cache, keyed by a
//! per-process keyed BLAKE3 digest of the token (never the token itself) → on a miss, and only
//! for one of many concurrent requests with the same token: fetch the record by id and verify
//! with Argon2id on the fixed verifier threads (one per core) → cache the outcome,
//! including failures (briefly). Failed attempts are counted per source address, and a source
//! over its budget gets 429 before any further store or Argon2 work.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use moka::future::Cache;
use moka::Expiry;
use tokio::sync::oneshot;

use crate::clock;
use crate::config;
use crate::error::Error;
use crate::forward::Identity;
use crate::keys::{self, KeyRecord, KeyStore, StoreError, Verified};
use crate::metrics::Metrics;

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// Shared, not owned: the rate limiter keys its state by these, once per request.
    pub key_id: Arc<str>,
    pub org: Arc<str>,
    pub workspace: String,
    pub tier: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<i64>,
    /// The `x-tollgate-*` headers, built once per verification rather than per request.
    pub identity: Identity,
    last_used: AtomicI64,
    flushed: AtomicI64,
}

impl Principal {
    fn new(r: &KeyRecord) -> Principal {
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("invalid"));
        let identity = Identity {
            headers: vec![
                (HeaderName::from_static("x-tollgate-key-id"), value(&r.id)),
                (HeaderName::from_static("x-tollgate-org"), value(&r.org)),
                (HeaderName::from_static("x-tollgate-tier"), value(&r.tier)),
                (HeaderName::from_static("x-tollgate-scopes"), value(&r.scopes.join(" "))),
            ],
        };
        Principal {
            key_id: r.id.as_str().into(),
            org: r.org.as_str().into(),
            workspace: r.workspace.clone(),
            tier: r.tier.clone(),
            scopes: r.scopes.clone(),
            expires_at: r.expires_at,
            identity,
            last_used: AtomicI64::new(0),
            flushed: AtomicI64::new(0),
        }
    }

    pub fn scopes(&self) -> impl Iterator<Item = &str> + Clone {
        self.scopes.iter().map(String::as_str)
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

struct Ttl {
    valid: Duration,
    invalid: Duration,
}

impl Expiry<[u8; 32], Entry> for Ttl {
    fn expire_after_create(&self, _: &[u8; 32], v: &Entry, _: std::time::Instant) -> Option<Duration> {
        Some(match v {
            Entry::Valid(_) => self.valid,
            Entry::Invalid { .. } => self.invalid,
        })
    }
}

pub struct Authenticator {
    store: Arc<dyn KeyStore>,
    cache: Cache<[u8; 32], Entry>,
    /// Per-process key of the cache digest: a memory dump of the cache yields no usable digests
    /// for another process, and digests cannot be precomputed.
    digest_key: [u8; 32],
    verifiers: Verifiers,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Cache<IpAddr, Instant>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn KeyStore>, cfg: &config::Auth) -> Result<Authenticator, String> {
        let mut digest_key = [0u8; 32];
        getrandom::fill(&mut digest_key).map_err(|e| format!("the OS random generator failed: {e}"))?;
        let cache = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .expire_after(Ttl { valid: cfg.cache_ttl, invalid: cfg.negative_cache_ttl })
            .support_invalidation_closures()
            .build();
        // Argon2id is memory-hard and CPU-bound: more verifiers than cores only adds latency.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(cfg.failed_auth_per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(cfg.failed_auth_burst).unwrap_or(one));
        Ok(Authenticator {
            store,
            cache,
            digest_key,
            verifiers: Verifiers::start(cores)?,
            failures: RateLimiter::keyed(quota),
            blocked: Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(3600)).build(),
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
        let parsed = keys::parse(&cfg.key_prefix, token).map_err(|m| {
            fail(match m {
                keys::Malformed::Shape => Reason::Format,
                keys::Malformed::Checksum => Reason::Checksum,
            })
        })?;
        let digest = *blake3::keyed_hash(&self.digest_key, token.as_bytes()).as_bytes();
        let now = clock::now_ms();

        let entry = match self.cache.get(&digest).await {
            Some(e) => {
                metrics.auth_cache_hits.inc();
                e
            }
            None => {
                metrics.auth_cache_misses.inc();
                if let Some(until) = self.blocked.get(&source).await {
                    let wait = until.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        metrics.auth_failures.with_label_values(&[Reason::RateLimited.label()]).inc();
                        return Err(failed_auth_limited(wait));
                    }
                }
                let init = self.lookup_and_verify(parsed.id, parsed.secret(), metrics);
                let entry = self.cache.try_get_with(digest, init).await.map_err(|e| {
                    tracing::error!(error = %e, "key store unreachable during authentication");
                    Error::Unavailable("The key store is unreachable; try again shortly.")
                })?;
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
            Verified::Match => Entry::Valid(Arc::new(Principal::new(&record))),
        })
    }

    async fn count_failure(&self, source: IpAddr) {
        if let Err(not_until) = self.failures.check_key(&source) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(self.failures.clock()));
            self.blocked.insert(source, Instant::now() + wait).await;
        }
    }

    /// Drops every cached outcome for a key id: the next request reads the store again.
    pub fn invalidate(&self, key_id: &str) {
        let id = key_id.to_string();
        if let Err(e) = self.cache.invalidate_entries_if(move |_, v| v.key_id() == Some(id.as_str())) {
            tracing::error!(error = %e, "cannot invalidate cached keys");
            self.cache.invalidate_all();
        }
    }

    /// Last-used timestamps not yet written, marked as written.
    pub fn take_usage(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for (_, entry) in self.cache.iter() {
            if let Entry::Valid(p) = entry {
                let used = p.last_used.load(Ordering::Relaxed);
                if used > p.flushed.swap(used, Ordering::Relaxed) {
                    out.push((p.key_id.to_string(), used));
                }
            }
        }
        out
    }

    /// Forgets failure counters of sources that have been quiet (bounded memory).
    pub fn forget_quiet_sources(&self) {
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
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
        limit: "failed_auth",
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

/// Background work of the authenticator: picks up revocations made elsewhere, writes last-used
/// timestamps in batches, purges keys past the restore window.
pub async fn maintain(auth: Arc<Authenticator>, state: Arc<crate::state::State>) {
    const FLUSH_EVERY: Duration = Duration::from_secs(10);
    const PURGE_EVERY: Duration = Duration::from_secs(3600);
    // Changes are read with an overlap, so that a write racing the previous poll is not missed.
    const OVERLAP_MS: i64 = 2_000;
    let mut since = clock::now_ms() - OVERLAP_MS;
    let mut last_flush = Instant::now();
    let mut last_purge: Option<Instant> = None;
    loop {
        let cfg = state.snapshot().config.auth.clone();
        tokio::time::sleep(cfg.revocation_poll).await;
        let now = clock::now_ms();
        match auth.store.changed_since(since).await {
            Ok(ids) => {
                for id in &ids {
                    auth.invalidate(id);
                }
                since = now - OVERLAP_MS;
            }
            Err(e) => tracing::warn!(error = %e, "cannot poll the key store for revocations"),
        }
        if last_flush.elapsed() >= FLUSH_EVERY {
            last_flush = Instant::now();
            flush_usage(&auth).await;
            auth.forget_quiet_sources();
        }
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            last_purge = Some(Instant::now());
            let retention = i64::try_from(cfg.revocation_retention.as_millis()).unwrap_or(i64::MAX);
            match auth.store.purge(now.saturating_sub(retention), now).await {
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
}
