//! The fleet's rate limits in Redis (§11): one limit per organisation (or key) for every
//! replica, decided by one script on the Redis server (`redis.lua`, its clock), in at most one
//! round trip per request.
//!
//! - One multiplexed, auto-reconnecting connection (redis-rs's `ConnectionManager`), its own
//!   timeouts set to ours, and an outer `timeout` on every decision as well: redis-rs's
//!   defaults are far longer, a timeout does not reconnect, and a reconnect can outlast the
//!   response timeout.
//! - A refusal's wait is remembered here, so requests already known to be refused are answered
//!   without asking Redis (`local_cache`).
//! - When Redis fails or is late, `on_error` decides (`local`: this replica's share of the
//!   tier, the tier divided by the live replicas it last saw; `open`; `closed`: 503). A
//!   circuit breaker stops paying the timeout on every request while Redis keeps failing: after
//!   three failures in a row, decisions fall back at once, and one request at a time probes
//!   Redis with the decision script itself (a `PING` still answers under `CLIENT PAUSE WRITE`)
//!   after a back-off that doubles from 100 ms to 2 s; the first success restores shared limits.
//! - Each replica announces itself every second (a sorted set scored by time); the count of
//!   the last three seconds is the divisor of `local`.
//! - Keys: `<prefix>{<scope>:<entity>}:<tier>:<limits>:gcra|day`. The braces are the Redis
//!   Cluster hash tag, so both keys of one decision share a slot; `<limits>` names the limits, so that
//!   a tier whose limits change on reload starts full, as §4 wants, while unchanged ones keep
//!   their state. Both expire when idle (the GCRA once full, the day after two days).
//!
//! A failover of a Redis primary may lose the last writes (replication is asynchronous): the
//! decisions of those last milliseconds are forgotten, so the fleet may admit up to that
//! much again — at most one burst per entity, plus the daily requests in that window.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus::{Histogram, IntCounterVec, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::quota::Quota;
use super::{reject, Limiter, Peek, Rejection, Scope};
use crate::config::{self, Config, OnError, Tier};
use crate::error::{Error, Limit};

const SCRIPT: &str = include_str!("redis.lua");
/// The read-only look of `GET /v1/limits` at the same two keys.
const PEEK_SCRIPT: &str = include_str!("redis_peek.lua");

/// Failures in a row that open the breaker, and its back-off.
const BREAKER_FAILURES: u32 = 3;
const BACKOFF_MIN_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 2_000;

/// Replicas announce themselves this often, and count as live this long.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
const LIVE_MS: i64 = 3_000;

/// The metrics of §11 for this backend.
pub struct FleetMetrics {
    pub up: IntGauge,
    pub duration: Histogram,
    pub decisions: IntCounterVec,
}

pub struct Fleet {
    conn: ConnectionManager,
    script: redis::Script,
    peek_script: redis::Script,
    prefix: String,
    timeout: Duration,
    on_error: OnError,
    breaker: Breaker,
    /// Per Redis key base, the refusal in force: until when, and what it said.
    refused: DashMap<String, (Instant, Refusal)>,
    /// This replica's name in the announcement set.
    instance: String,
    replicas: AtomicU32,
    /// The limiter of `local`: (the config generation it was built for, the divisor, it).
    fallback: Mutex<Option<(usize, u32, Arc<Limiter>)>>,
    metrics: FleetMetrics,
}

#[derive(Clone)]
struct Refusal {
    limit: Limit,
    message: String,
    quota: Quota,
}

impl Fleet {
    /// The connection is made lazily: tollgate starts, and falls back, while Redis is down.
    pub fn new(cfg: &config::Redis, metrics: FleetMetrics) -> Result<Fleet, String> {
        let url = std::env::var(&cfg.url_env).map_err(|_| {
            format!("rate_limits.redis: the environment variable {} (url_env) is not set", cfg.url_env)
        })?;
        Fleet::with_url(&url, cfg, metrics)
    }

    /// `new` with the URL given (the value of `url_env`).
    pub fn with_url(url: &str, cfg: &config::Redis, metrics: FleetMetrics) -> Result<Fleet, String> {
        // Not the client's message: it may quote the URL, password included.
        let bad_url = |_| {
            format!(
                "rate_limits.redis: ${} is not a valid redis:// or rediss:// URL (redis://[user:password@]host:6379[/db])",
                cfg.url_env
            )
        };
        let client = match &cfg.ca_file {
            None => redis::Client::open(url).map_err(bad_url)?,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("rate_limits.redis.ca_file: cannot read {}: {e}", path.display()))?;
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                redis::Client::build_with_tls(url, certs).map_err(bad_url)?
            }
        };
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(cfg.timeout))
            .set_connection_timeout(Some(cfg.timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|_| format!("rate_limits.redis: cannot set up the connection to ${}", cfg.url_env))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| format!("the OS random generator failed: {e}"))?;
        metrics.up.set(1);
        Ok(Fleet {
            conn,
            script: redis::Script::new(SCRIPT),
            peek_script: redis::Script::new(PEEK_SCRIPT),
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            on_error: cfg.on_error,
            breaker: Breaker::new(),
            refused: DashMap::new(),
            instance: format!("{:016x}", u64::from_le_bytes(id)),
            replicas: AtomicU32::new(1),
            fallback: Mutex::new(None),
            metrics,
        })
    }

    /// Decides one request for the fleet: the limits `limiter` resolves for it, in Redis.
    pub async fn check(
        &self,
        config: &Config,
        limiter: &Limiter,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
    ) -> Result<Quota, Box<Rejection>> {
        let (bucket, entity, scope) = limiter.resolve(key_id, org, tier)?;
        let limits = bucket.limits;
        if limits.requests_per_second.is_none() && limits.daily_requests.is_none() {
            return Ok(Quota::default());
        }
        let base = self.key_base(scope, entity, tier, &limits);
        let now = Instant::now();
        if let Some(known) = self.refused.get(&base) {
            if known.0 > now {
                self.count("local_cache");
                let r = &known.1;
                return Err(reject(
                    r.limit,
                    tier,
                    r.message.clone(),
                    retry_secs(known.0 - now),
                    r.quota.clone(),
                ));
            }
        }
        if !self.breaker.allow() {
            return self.fall_back(config, limiter, key_id, org, tier);
        }
        let started = Instant::now();
        let asked = tokio::time::timeout(self.timeout, self.ask(&base, &limits, None)).await;
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        match asked {
            Ok(Ok(reply)) => {
                self.breaker.success();
                self.metrics.up.set(1);
                self.count("redis");
                let decided = outcome(&reply, &limits, tier);
                if let Err(r) = &decided {
                    if let (Some(limit), Some(wait)) = (r.limit, reply.wait()) {
                        let refusal =
                            Refusal { limit, message: message(limit, &limits, tier), quota: r.quota.clone() };
                        self.refused.insert(base, (now + wait, refusal));
                    }
                }
                decided
            }
            Ok(Err(e)) => {
                self.failed(&format!("{e}"));
                self.fall_back(config, limiter, key_id, org, tier)
            }
            Err(_) => {
                self.failed("timed out");
                self.fall_back(config, limiter, key_id, org, tier)
            }
        }
    }

    fn failed(&self, why: &str) {
        if self.breaker.failure() {
            tracing::warn!(
                error = why,
                "Redis rate limits unavailable; falling back per on_error until it answers"
            );
        }
        self.metrics.up.set(0);
    }

    fn count(&self, source: &str) {
        self.metrics.decisions.with_label_values(&[source]).inc();
    }

    /// The decision while Redis cannot make it: the tier's `on_store_error`, else `on_error`.
    fn fall_back(
        &self,
        config: &Config,
        limiter: &Limiter,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
    ) -> Result<Quota, Box<Rejection>> {
        match config.rate_limits.tier_on_error.get(tier).copied().unwrap_or(self.on_error) {
            OnError::Open => {
                self.count("fallback_open");
                Ok(Quota::default())
            }
            OnError::Closed => {
                self.count("fallback_closed");
                Err(Box::new(Rejection {
                    error: Error::Unavailable("Rate limits cannot be checked right now; try again shortly."),
                    quota: Quota::default(),
                    limit: None,
                }))
            }
            OnError::Local => {
                self.count("fallback_local");
                let local = self.local(config, limiter);
                local.check_shared(key_id, org, tier)
            }
        }
    }

    /// This replica's share of the limits, rebuilt when the config or the replica count
    /// changes (state carried over for unchanged limits).
    fn local(&self, config: &Config, limiter: &Limiter) -> Arc<Limiter> {
        let generation = std::ptr::from_ref(limiter) as usize;
        let n = self.replicas.load(Ordering::Relaxed).max(1);
        let mut slot = self.fallback.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, m, l)) = slot.as_ref() {
            if *g == generation && *m == n {
                return l.clone();
            }
        }
        let previous = slot.as_ref().map(|(_, _, l)| l.clone());
        let built = Arc::new(Limiter::divided(config, n, previous.as_deref()));
        *slot = Some((generation, n, built.clone()));
        built
    }

    /// `<prefix>{<scope>:<entity>}:<tier>:<rps>-<burst>-<daily>`: the tier is named (two tiers
    /// with equal limits have separate state), overrides are `=`.
    fn key_base(&self, scope: Scope, entity: &str, tier: &str, limits: &Tier) -> String {
        let (kind, bucket) = match scope {
            Scope::KeyOverride => ("k", "="),
            Scope::OrgOverride => ("o", "="),
            Scope::TierPerOrg => ("o", tier),
            Scope::TierPerKey => ("k", tier),
        };
        let n = |x: Option<u32>| x.map_or(0, u64::from);
        format!(
            "{}{{{kind}:{entity}}}:{bucket}:{}-{}-{}",
            self.prefix,
            n(limits.requests_per_second),
            n(limits.burst),
            limits.daily_requests.unwrap_or(0)
        )
    }

    /// One run of the decision script. `now_us`: a fixed time (tests), else Redis's clock.
    async fn ask(&self, base: &str, limits: &Tier, now_us: Option<i64>) -> redis::RedisResult<Reply> {
        let interval = limits.requests_per_second.map_or(0.0, |r| 1e6 / f64::from(r.max(1)));
        let burst = limits.burst.or(limits.requests_per_second).unwrap_or(1);
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .script
            .key(format!("{base}:gcra"))
            .key(format!("{base}:day"))
            .arg(interval)
            .arg(burst)
            .arg(limits.daily_requests.unwrap_or(0))
            .arg(now_us.map_or_else(String::new, |t| t.to_string()))
            .invoke_async(&mut conn)
            .await?;
        Reply::from(&v).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "decision reply"))
        })
    }

    /// Connects before the first request, for up to `within`: the connection is made lazily,
    /// and a first decision that had to wait for it (a TLS handshake, say) would exceed the
    /// decision timeout and fall back. Redis down: logged, and `on_error` applies meanwhile.
    pub async fn warm_up(&self, within: Duration) {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        match tokio::time::timeout(within, cmd.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis rate limits unreachable at start; on_error applies until it answers")
            }
            Err(_) => tracing::warn!(
                ?within,
                "Redis rate limits not reachable at start; on_error applies until it answers"
            ),
        }
    }

    /// What remains for the caller in the fleet's shared state, read without consuming
    /// anything (`GET /v1/limits`). Bounded by the same `timeout` as a decision; a failure is
    /// reported (`Err`, a message for the caller), never waited out, and leaves the breaker
    /// alone: a look at the limits must not decide how requests are limited.
    pub async fn peek(
        &self,
        limiter: &Limiter,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
    ) -> Result<(Tier, Result<Peek, String>), Box<Rejection>> {
        let (bucket, entity, scope) = limiter.resolve(key_id, org, tier)?;
        let limits = bucket.limits;
        let applies_to = super::applies_to(scope);
        if limits.requests_per_second.is_none() && limits.daily_requests.is_none() {
            return Ok((limits, Ok(Peek { applies_to, per_second: None, daily: None })));
        }
        let base = self.key_base(scope, entity, tier, &limits);
        let interval = limits.requests_per_second.map_or(0.0, |r| 1e6 / f64::from(r.max(1)));
        let burst = limits.burst.or(limits.requests_per_second).unwrap_or(1);
        let mut conn = self.conn.clone();
        let mut call = self.peek_script.key(format!("{base}:gcra"));
        call.key(format!("{base}:day")).arg(interval).arg(burst);
        let asked = tokio::time::timeout(self.timeout, call.invoke_async::<Vec<i64>>(&mut conn)).await;
        let unknown =
            |why: String| Ok((limits, Err(format!("{why}; the shared limits are unknown right now."))));
        let v = match asked {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis limits peek failed");
                return unknown("Redis could not be read".into());
            }
            Err(_) => return unknown(format!("Redis did not answer within {}ms", self.timeout.as_millis())),
        };
        let [remaining, ahead_us, used, midnight_us] = v[..] else {
            return unknown("Redis gave an unexpected answer".into());
        };
        let per_second = limits.requests_per_second.map(|rps| {
            let burst = limits.burst.unwrap_or(rps);
            (burst, u32::try_from(remaining.max(0)).unwrap_or(0), rps, ahead_us.max(0) / 1000)
        });
        let daily = limits.daily_requests.map(|budget| {
            let used = u64::try_from(used.max(0)).unwrap_or(0);
            (budget, used, budget.saturating_sub(used), midnight_us.max(0) / 1000)
        });
        Ok((limits, Ok(Peek { applies_to, per_second, daily })))
    }

    /// Announces this replica and reads how many are live (every `ANNOUNCE_EVERY`).
    pub async fn announce(&self) {
        let set = format!("{}replicas", self.prefix);
        let now = crate::clock::now_ms();
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd(&set, &self.instance, now)
            .ignore()
            .zrembyscore(&set, "-inf", now - LIVE_MS)
            .ignore()
            .pexpire(&set, LIVE_MS * 2)
            .ignore()
            .zcard(&set);
        let asked = tokio::time::timeout(self.timeout * 10, pipe.query_async::<(u32,)>(&mut conn)).await;
        if let Ok(Ok((n,))) = asked {
            self.replicas.store(n.max(1), Ordering::Relaxed);
        }
    }

    /// Forgets refusals that are over (bounded memory with many refused entities).
    pub fn forget_idle(&self) {
        let now = Instant::now();
        self.refused.retain(|_, (until, _)| *until > now);
    }

    /// The live replicas last seen.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// The decision for `entity` of `tier` at a fixed time, straight from the script (the
    /// exact-arithmetic tests).
    #[doc(hidden)]
    pub async fn decide_at(
        &self,
        limiter: &Limiter,
        entity: &Arc<str>,
        tier: &str,
        now_us: i64,
    ) -> Result<Result<Quota, Box<Rejection>>, redis::RedisError> {
        let (bucket, entity, scope) = limiter.resolve(entity, entity, tier).map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "tier not configured"))
        })?;
        let limits = bucket.limits;
        let reply = self.ask(&self.key_base(scope, entity, tier, &limits), &limits, Some(now_us)).await?;
        Ok(outcome(&reply, &limits, tier))
    }
}

/// The script's answer.
#[derive(Debug, Clone, Copy)]
struct Reply {
    admitted: bool,
    refused_by: i64,
    wait_us: i64,
    burst_left: i64,
    daily_left: i64,
    until_midnight_us: i64,
}

impl Reply {
    fn from(v: &[i64]) -> Option<Reply> {
        match *v {
            [a, by, wait, burst, daily, midnight] => Some(Reply {
                admitted: a == 1,
                refused_by: by,
                wait_us: wait,
                burst_left: burst,
                daily_left: daily,
                until_midnight_us: midnight,
            }),
            _ => None,
        }
    }

    fn wait(&self) -> Option<Duration> {
        (!self.admitted).then(|| Duration::from_micros(u64::try_from(self.wait_us.max(1)).unwrap_or(1)))
    }
}

fn message(limit: Limit, limits: &Tier, tier: &str) -> String {
    match limit {
        Limit::DailyRequests => format!(
            "Daily request budget of {} exhausted for tier `{tier}`; it resets at 00:00 UTC.",
            limits.daily_requests.unwrap_or(0)
        ),
        _ => {
            let rps = limits.requests_per_second.unwrap_or(0);
            let burst = limits.burst.unwrap_or(rps);
            format!("Rate limit of {rps} requests per second (burst {burst}) exceeded for tier `{tier}`.")
        }
    }
}

/// The script's answer as the local limiter gives it: a quota, or a 429.
fn outcome(r: &Reply, limits: &Tier, tier: &str) -> Result<Quota, Box<Rejection>> {
    let until_midnight_ms = r.until_midnight_us / 1000;
    let mut quota = Quota::default();
    if let Some(rps) = limits.requests_per_second {
        let burst = limits.burst.unwrap_or(rps);
        quota.per_second = Some((burst, u32::try_from(r.burst_left.max(0)).unwrap_or(0), rps));
    }
    if let Some(budget) = limits.daily_requests {
        quota.daily = Some((budget, u64::try_from(r.daily_left.max(0)).unwrap_or(0), until_midnight_ms));
    }
    if r.admitted {
        return Ok(quota);
    }
    let limit = if r.refused_by == 2 { Limit::DailyRequests } else { Limit::RequestsPerSecond };
    if limit == Limit::DailyRequests {
        // As the local limiter: only the daily budget is reported on its refusal.
        quota.per_second = None;
    }
    let wait = Duration::from_micros(u64::try_from(r.wait_us.max(1)).unwrap_or(1));
    Err(reject(limit, tier, message(limit, limits, tier), retry_secs(wait), quota))
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
fn retry_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// A circuit breaker without locks: the request path reads one atomic when Redis is healthy.
struct Breaker {
    epoch: Instant,
    /// 0: closed; else open until this many milliseconds after `epoch`.
    open_until: AtomicU64,
    failures: AtomicU32,
    backoff_ms: AtomicU64,
    /// A probe is in flight (one at a time while open).
    probing: AtomicBool,
}

impl Breaker {
    fn new() -> Breaker {
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
    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        self.now_ms() >= until
            && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    fn success(&self) {
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
    fn failure(&self) -> bool {
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
#[allow(clippy::unwrap_used)]
mod tests {
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

    #[test]
    fn replies_become_quotas_and_refusals() {
        let t = Tier {
            requests_per_second: Some(50),
            burst: Some(200),
            daily_requests: Some(100_000),
            ..Tier::default()
        };
        let ok = Reply::from(&[1, 0, 0, 199, 99_999, 3_600_000_000]).unwrap();
        let q = outcome(&ok, &t, "audit").unwrap();
        assert_eq!((q.per_second, q.daily), (Some((200, 199, 50)), Some((100_000, 99_999, 3_600_000))));
        let slow = Reply::from(&[0, 1, 20_000, 0, 99_000, 3_600_000_000]).unwrap();
        let r = outcome(&slow, &t, "audit").unwrap_err();
        assert_eq!(r.limit, Some(Limit::RequestsPerSecond));
        assert!(matches!(r.error, Error::RateLimited { retry_after: 1, exhausted: false, .. }));
        let day = Reply::from(&[0, 2, 3_600_000_000, -1, 0, 3_600_000_000]).unwrap();
        let r = outcome(&day, &t, "audit").unwrap_err();
        assert_eq!(r.limit, Some(Limit::DailyRequests));
        assert!(matches!(r.error, Error::RateLimited { retry_after: 3600, exhausted: true, .. }));
        assert_eq!(r.quota.per_second, None);
        assert!(Reply::from(&[1, 0]).is_none());
    }
}
