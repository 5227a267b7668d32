//! The fleet's rate limits in Redis (§11): one limit per organisation (or key) for every
//! replica, decided by one script on the Redis server (`decide.lua`, its clock), in at most one
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
//! - Keys: `<prefix>{<scope>:<entity>}:<tier>:<rps>-<burst>-<daily>:gcra|day` for the request
//!   limits, `…:<tier>:tok:<per minute>-<daily>` for the tokens and `…:<tier>:conc` for the
//!   concurrency leases. The braces are the Redis Cluster hash tag, so all keys of one decision
//!   share a slot; the limits are part of the names, so that a tier whose limits change on
//!   reload starts full, as §4 wants, while unchanged ones keep their state (leases are requests
//!   really running: they stay whatever the limit). All expire when idle (the GCRA and the
//!   tokens once full, a day's counters after the day, leases when they run out).
//! - Tokens and concurrency (§12) are decided in the same script and round trip as the request
//!   limits, all or nothing; what an admitted request holds is settled after its response
//!   (`lease.rs`). A request that reserves nothing sends only the two request keys.
//!
//! A failover of a Redis primary may lose the last writes (replication is asynchronous): the
//! decisions of those last milliseconds are forgotten, so the fleet may admit up to that
//! much again — at most one burst per entity, plus the daily requests in that window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus::{Histogram, IntCounterVec, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::quota::Quota;
use super::refusal::{message, reject, retry_after};
use super::{tokens, Hold, Limiter, Peek, Rejection, Scope};
use crate::config::{self, Config, OnError, Tier};
use crate::error::{Error, Limit};

mod breaker;
mod debit;
mod lease;
mod reply;

use breaker::Breaker;
use debit::{Debits, Next, Refund};
pub use lease::FleetHold;
use lease::Settlement;
use reply::{outcome, Reply};

const SCRIPT: &str = include_str!("decide.lua");
/// The read-only look of `GET /v1/limits` at the same keys.
const PEEK_SCRIPT: &str = include_str!("peek.lua");
const SETTLE_SCRIPT: &str = include_str!("settle.lua");
const RENEW_SCRIPT: &str = include_str!("renew.lua");
const REFUND_SCRIPT: &str = include_str!("refund.lua");

/// The longest a settlement or a renewal waits for Redis, neither on a request's path (a
/// settlement at least the decision timeout, which a response's last bytes wait for).
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(1);

/// Replicas announce themselves this often, and count as live this long.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
const LIVE_MS: i64 = 3_000;

/// The metrics of §11 for this backend.
pub struct FleetMetrics {
    pub up: IntGauge,
    pub duration: Histogram,
    pub decisions: IntCounterVec,
    /// Settlements of what admitted requests held (`ok`, `failed`).
    pub settlements: IntCounterVec,
}

/// What a request holds beyond the request limits, when its tier has such limits (§12).
pub struct Want {
    /// The tokens to reserve (`None`: a request that uses none, such as listing models).
    pub estimate: Option<u64>,
    /// `tollgate_concurrent_requests{tier}`.
    pub gauge: Option<IntGauge>,
}

pub struct Fleet {
    conn: ConnectionManager,
    script: redis::Script,
    peek_script: redis::Script,
    settle_script: redis::Script,
    renew_script: redis::Script,
    refund_script: redis::Script,
    prefix: String,
    timeout: Duration,
    on_error: OnError,
    breaker: Breaker,
    /// Per Redis key base, the refusal in force: until when, and what it said.
    refused: DashMap<String, (Instant, Refusal), foldhash::fast::RandomState>,
    /// This replica's name in the announcement set.
    instance: String,
    replicas: AtomicU32,
    /// The limiter of `local`: (the config generation it was built for, the divisor, it).
    fallback: Mutex<Option<(usize, u32, Arc<Limiter>)>>,
    metrics: FleetMetrics,
    /// The leases of this replica's requests in flight (lease → its key), renewed until they end.
    leases: DashMap<String, String>,
    next_lease: AtomicU64,
    lease_ms: u64,
    /// Debited leases of request limits (`debit_requests` > 0).
    debits: Option<Debits>,
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
            settle_script: redis::Script::new(SETTLE_SCRIPT),
            renew_script: redis::Script::new(RENEW_SCRIPT),
            refund_script: redis::Script::new(REFUND_SCRIPT),
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            on_error: cfg.on_error,
            breaker: Breaker::new(),
            refused: DashMap::default(),
            instance: format!("{:016x}", u64::from_le_bytes(id)),
            replicas: AtomicU32::new(1),
            fallback: Mutex::new(None),
            metrics,
            leases: DashMap::new(),
            next_lease: AtomicU64::new(0),
            lease_ms: u64::try_from(cfg.concurrency_lease.as_millis()).unwrap_or(30_000),
            debits: (cfg.debit_requests > 0).then(|| Debits::new(cfg.debit_requests, cfg.debit_within)),
        })
    }

    /// Decides one request for the fleet: the limits `limiter` resolves for it, in Redis —
    /// with `want`, also its concurrency slot and token reservation, held until the response
    /// ends (the `Hold`).
    pub async fn check(
        self: &Arc<Self>,
        config: &Config,
        limiter: &Limiter,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
        want: Option<Want>,
    ) -> Result<(Quota, Option<Hold>), Box<Rejection>> {
        let (bucket, entity, scope) = limiter.resolve(key_id, org, tier)?;
        let limits = bucket.limits;
        let ask = Ask::new(&limits, want.as_ref());
        if limits.requests_per_second.is_none() && limits.daily_requests.is_none() && !ask.holds() {
            return Ok((Quota::default(), None));
        }
        let base = self.entity_base(scope, entity, tier);
        let requests = requests_key(&base, &limits);
        let now = Instant::now();
        // A debited lease of this replica admits without Redis (requests it already took).
        let debits = self.debits.as_ref().filter(|_| !ask.holds());
        if let Some(spent) = debits.and_then(|d| d.spend(&requests, now)) {
            return Ok(self.debited(spent, requests, limits, tier));
        }
        if let Some(known) = self.refused.get(&requests) {
            if known.0 > now {
                self.count("local_cache");
                let r = &known.1;
                return Err(reject(
                    r.limit,
                    tier,
                    r.message.clone(),
                    retry_after(known.0 - now),
                    r.quota.clone(),
                ));
            }
        }
        if !self.breaker.allow() {
            return self.fall_back(config, limiter, key_id, org, tier, want);
        }
        let lease = ask.concurrent.map(|_| self.new_lease());
        let (mut take, mut decides) = (1, false);
        if let Some(d) = debits {
            // Another request's decision will bring a batch: wait for it rather than each
            // asking Redis, as long as a decision may take; then decide if none is under way.
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                match d.want(&requests, Instant::now()) {
                    Next::Ask { take: t, refund, decides: first } => {
                        if let Some(r) = refund {
                            self.spawn_refund(r);
                        }
                        (take, decides) = (t, first);
                        break;
                    }
                    Next::Wait(ready) => {
                        // Registered before looking again, so that its end is not missed.
                        let notified = ready.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let mut spent = d.spend(&requests, Instant::now());
                        if spent.is_none() {
                            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                                break;
                            }
                            spent = d.spend(&requests, Instant::now());
                        }
                        if let Some(spent) = spent {
                            return Ok(self.debited(spent, requests, limits, tier));
                        }
                    }
                }
            }
        }
        let started = Instant::now();
        let asked = tokio::time::timeout(
            self.timeout,
            self.ask(&base, &requests, &limits, &ask, (lease.as_deref(), take), None),
        )
        .await;
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        let reply = match asked {
            Ok(Ok(reply)) => reply,
            failed => {
                self.failed(&match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                });
                // The script may have run: a lease it wrote would hold a slot until it ran out.
                // (Tokens it may have reserved stay charged: a refund of a reservation that was
                // never made would give tokens away.)
                if let Some(lease) = lease {
                    self.release_lease(&base, lease);
                }
                if let Some(d) = debits.filter(|_| decides) {
                    d.decided_nothing(&requests);
                }
                return self.fall_back(config, limiter, key_id, org, tier, want);
            }
        };
        self.breaker.success();
        self.metrics.up.set(1);
        self.count("redis");
        let decided = outcome(&reply, &limits, tier, ask.tokens).map(|mut quota| {
            // The bucket's preformatted values, as the local limiter's admissions carry.
            quota.fixed = bucket.fixed.clone();
            quota
        });
        match decided {
            Ok(quota) if ask.holds() => {
                let job = Settlement::of(&base, &limits, ask.tokens, crate::clock::now_ms(), lease);
                let gauge = want.and_then(|w| w.gauge).filter(|_| ask.concurrent.is_some());
                let hold = Hold::shared(Box::new(FleetHold::new(self.clone(), job, quota.tokens, gauge)));
                Ok((quota, Some(hold)))
            }
            Ok(quota) => {
                if let Some(d) = debits {
                    let more = u32::try_from(reply.taken.max(1) - 1).unwrap_or(0);
                    let day = crate::clock::now_ms().div_euclid(86_400_000);
                    d.store(&requests, more, decides, now, (day, interval_us(&limits)), quota.clone());
                }
                Ok((quota, None))
            }
            Err(r) => {
                if let Some(d) = debits.filter(|_| decides) {
                    d.decided_nothing(&requests);
                }
                // Only the request limits' refusals hold for every request until their wait is
                // over: a token refusal depends on the size of the request, a concurrency one
                // ends when any request does.
                if let (Some(limit @ (Limit::RequestsPerSecond | Limit::DailyRequests)), Some(wait)) =
                    (r.limit, reply.wait())
                {
                    let refusal =
                        Refusal { limit, message: message(limit, &limits, tier, 0), quota: r.quota.clone() };
                    // With debits, requests other replicas took but did not use may come back
                    // to the daily budget: it is asked again each second.
                    let wait = match (limit, debits) {
                        (Limit::DailyRequests, Some(_)) => wait.min(Duration::from_secs(1)),
                        _ => wait,
                    };
                    self.refused.insert(requests, (now + wait, refusal));
                }
                Err(r)
            }
        }
    }

    fn new_lease(&self) -> String {
        format!("{}:{}", self.instance, self.next_lease.fetch_add(1, Ordering::Relaxed))
    }

    /// Releases a lease that a failed decision may have written.
    fn release_lease(self: &Arc<Self>, base: &str, lease: String) {
        let job = Settlement {
            tokens_key: String::new(),
            leases_key: leases_key(base),
            per_minute: None,
            daily: None,
            reserved: None,
            day: 0,
            used: 0,
            lease: Some(lease),
        };
        let fleet = self.clone();
        tokio::spawn(async move { fleet.settle(job).await });
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
        want: Option<Want>,
    ) -> Result<(Quota, Option<Hold>), Box<Rejection>> {
        match config.rate_limits.tier_on_error.get(tier).copied().unwrap_or(self.on_error) {
            OnError::Open => {
                self.count("fallback_open");
                Ok((Quota::default(), None))
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
                match want {
                    None => local.check_shared(key_id, org, tier).map(|q| (q, None)),
                    Some(w) => {
                        local.check_llm(key_id, org, tier, w.estimate, w.gauge).map(|(q, h)| (q, Some(h)))
                    }
                }
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

    /// `<prefix>{<scope>:<entity>}:<tier>`: the tier is named (two tiers with equal limits have
    /// separate state), overrides are `=`.
    fn entity_base(&self, scope: Scope, entity: &str, tier: &str) -> String {
        let (kind, bucket) = match scope {
            Scope::KeyOverride => ("k", "="),
            Scope::OrgOverride => ("o", "="),
            Scope::TierPerOrg => ("o", tier),
            Scope::TierPerKey => ("k", tier),
        };
        join(&[&self.prefix, "{", kind, ":", entity, "}:", bucket])
    }

    /// One run of the decision script. `now_us`: a fixed time (tests), else Redis's clock.
    /// `lease_take`: the concurrency lease, and how many requests to take (1, or more for a
    /// debited lease).
    async fn ask(
        &self,
        base: &str,
        requests: &str,
        limits: &Tier,
        ask: &Ask,
        (lease, take): (Option<&str>, u32),
        now_us: Option<i64>,
    ) -> redis::RedisResult<Reply> {
        let burst = limits.burst.or(limits.requests_per_second).unwrap_or(1);
        let mut conn = self.conn.clone();
        let mut call = self.script.key(join(&[requests, ":gcra"]));
        call.key(join(&[requests, ":day"]))
            .arg(interval_us(limits))
            .arg(burst)
            .arg(limits.daily_requests.unwrap_or(0))
            .arg(now_us.map_or_else(String::new, |t| t.to_string()))
            .arg(take)
            .arg(self.replicas.load(Ordering::Relaxed).max(1));
        if ask.holds() {
            call.key(tokens_key(base, limits))
                .key(leases_key(base))
                .arg(limits.tokens_per_minute.unwrap_or(0))
                .arg(limits.daily_tokens.unwrap_or(0))
                .arg(ask.tokens.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)))
                .arg(ask.concurrent.unwrap_or(0))
                .arg(lease.unwrap_or(""))
                .arg(self.lease_ms);
        }
        let v: Vec<u8> = call.invoke_async(&mut conn).await?;
        Reply::parse(&v).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "decision reply"))
        })
    }

    /// A request admitted from this replica's debited lease (`spent`: its quota, and the size
    /// of a refill to ask for now, if any).
    fn debited(
        self: &Arc<Self>,
        (quota, refill): (Quota, Option<u32>),
        requests: String,
        limits: Tier,
        tier: &str,
    ) -> (Quota, Option<Hold>) {
        self.count("debit");
        if let Some(take) = refill {
            self.spawn_refill(requests, limits, tier, take, quota.fixed.clone());
        }
        (quota, None)
    }

    /// Takes the next batch of a debited lease before the one running is spent, in the
    /// background (bounded by the decision timeout; a failure or a refusal only means that the
    /// next request asks Redis itself).
    fn spawn_refill(
        self: &Arc<Self>,
        requests: String,
        limits: Tier,
        tier: &str,
        take: u32,
        fixed: Option<Arc<super::quota::Fixed>>,
    ) {
        let (fleet, tier) = (self.clone(), tier.to_string());
        tokio::spawn(async move {
            let Some(debits) = &fleet.debits else { return };
            let ask = Ask { tokens: None, concurrent: None };
            let started = Instant::now();
            let asked = tokio::time::timeout(
                fleet.timeout,
                fleet.ask("", &requests, &limits, &ask, (None, take), None),
            )
            .await;
            fleet.metrics.duration.observe(started.elapsed().as_secs_f64());
            match asked.ok().and_then(Result::ok).map(|r| (r, outcome(&r, &limits, &tier, None))) {
                Some((reply, Ok(mut quota))) => {
                    quota.fixed = fixed;
                    let taken = u32::try_from(reply.taken.max(0)).unwrap_or(0);
                    let day = crate::clock::now_ms().div_euclid(86_400_000);
                    debits.store(&requests, taken, true, started, (day, interval_us(&limits)), quota);
                }
                _ => debits.decided_nothing(&requests),
            }
        });
    }

    /// Gives back what a debited lease did not use, in the background.
    fn spawn_refund(self: &Arc<Self>, refund: Refund) {
        let fleet = self.clone();
        tokio::spawn(async move {
            let asked = tokio::time::timeout(BACKGROUND_TIMEOUT, fleet.run_refund(&refund, None)).await;
            if !matches!(asked, Ok(Ok(_))) {
                // Not retried: the fleet admits less, never more.
                tracing::debug!("giving back a debited lease's unused requests to Redis failed");
            }
        });
    }

    /// Gives back what the leases that ran out did not use (every `debit_within`, at least 50 ms).
    pub async fn refund_debits(self: &Arc<Self>) {
        let Some(debits) = &self.debits else { return };
        for r in debits.expired(Instant::now()) {
            self.spawn_refund(r);
        }
    }

    /// How often `refund_debits` runs, if at all.
    pub fn refund_every(&self) -> Option<Duration> {
        self.debits.as_ref().map(Debits::sweep_every)
    }

    /// One run of the refund script; returns the requests given back to the daily budget.
    async fn run_refund(&self, r: &Refund, now_us: Option<i64>) -> redis::RedisResult<i64> {
        let mut conn = self.conn.clone();
        let mut call = self.refund_script.key(join(&[&r.key, ":gcra"]));
        call.key(join(&[&r.key, ":day"]))
            .arg(r.interval_us)
            .arg(r.requests)
            .arg(r.day)
            .arg(now_us.map_or_else(String::new, |t| t.to_string()));
        call.invoke_async(&mut conn).await
    }

    /// Settles what a request held (`lease.rs`), in the background.
    async fn settle(&self, job: Settlement) {
        let asked =
            tokio::time::timeout(BACKGROUND_TIMEOUT.max(self.timeout), self.run_settle(&job, None)).await;
        let outcome = match asked {
            Ok(Ok(_)) => "ok",
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "settling a request's tokens and slot in Redis failed");
                "failed"
            }
            Err(_) => "failed",
        };
        self.metrics.settlements.with_label_values(&[outcome]).inc();
    }

    /// One run of the settlement script; returns (whole tokens left, tokens used today).
    async fn run_settle(&self, job: &Settlement, now_us: Option<i64>) -> redis::RedisResult<(i64, i64)> {
        let mut conn = self.conn.clone();
        let mut call = self.settle_script.key(&job.tokens_key);
        call.key(&job.leases_key)
            .arg(job.per_minute.unwrap_or(0))
            .arg(job.daily.unwrap_or(0))
            .arg(job.reserved.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)))
            .arg(job.day)
            .arg(job.used)
            .arg(job.lease.as_deref().unwrap_or(""))
            .arg(now_us.map_or_else(String::new, |t| t.to_string()));
        call.invoke_async(&mut conn).await
    }

    /// Renews the leases of this replica's requests still running (every third of
    /// `concurrency_lease`), one call per key.
    pub async fn renew(&self) {
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for l in &self.leases {
            by_key.entry(l.value().clone()).or_default().push(l.key().clone());
        }
        for (key, leases) in by_key {
            let mut conn = self.conn.clone();
            let mut call = self.renew_script.key(&key);
            call.arg(self.lease_ms);
            for l in &leases {
                call.arg(l);
            }
            let asked = tokio::time::timeout(BACKGROUND_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await;
            if !matches!(asked, Ok(Ok(_))) {
                tracing::debug!("renewing concurrency leases in Redis failed; retried next round");
            }
        }
    }

    /// How often `renew` runs.
    pub fn renew_every(&self) -> Duration {
        Duration::from_millis(self.lease_ms / 3)
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
        let llm = limits.counts_tokens() || limits.max_concurrent_requests.is_some();
        if limits.requests_per_second.is_none() && limits.daily_requests.is_none() && !llm {
            let none = Peek { applies_to, per_second: None, daily: None, tokens: None, concurrent: None };
            return Ok((limits, Ok(none)));
        }
        let entity_base = self.entity_base(scope, entity, tier);
        let base = requests_key(&entity_base, &limits);
        let burst = limits.burst.or(limits.requests_per_second).unwrap_or(1);
        let mut conn = self.conn.clone();
        let mut call = self.peek_script.key(format!("{base}:gcra"));
        call.key(format!("{base}:day")).arg(interval_us(&limits)).arg(burst);
        if llm {
            call.key(tokens_key(&entity_base, &limits))
                .key(leases_key(&entity_base))
                .arg(limits.tokens_per_minute.unwrap_or(0))
                .arg(limits.daily_tokens.unwrap_or(0));
        }
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
        let [remaining, ahead_us, used, midnight_us, tokens, tokens_full_ms, tokens_today, in_flight] = v[..]
        else {
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
        let tokens_today = u64::try_from(tokens_today.max(0)).unwrap_or(0);
        let tokens = limits.counts_tokens().then(|| tokens::Left {
            per_minute: limits
                .tokens_per_minute
                .map(|m| (m, u64::try_from(tokens.max(0)).unwrap_or(0).min(m), tokens_full_ms.max(0))),
            daily: limits
                .daily_tokens
                .map(|d| (d, d.saturating_sub(tokens_today), midnight_us.max(0) / 1000)),
            used_today: tokens_today,
        });
        let concurrent = limits
            .max_concurrent_requests
            .map(|max| (max, u32::try_from(in_flight.max(0)).unwrap_or(u32::MAX)));
        Ok((limits, Ok(Peek { applies_to, per_second, daily, tokens, concurrent })))
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
    /// exact-arithmetic tests). With `lease`, the request also takes a concurrency slot and
    /// reserves `estimate` tokens, as an LLM request does; nothing is settled by itself.
    #[doc(hidden)]
    pub async fn decide_at(
        &self,
        limiter: &Limiter,
        entity: &Arc<str>,
        tier: &str,
        now_us: i64,
        llm: Option<(Option<u64>, &str)>,
    ) -> Result<Result<Quota, Box<Rejection>>, redis::RedisError> {
        let (limits, base) = self.resolve_at(limiter, entity, tier)?;
        let want = llm.map(|(estimate, _)| Want { estimate, gauge: None });
        let ask = Ask::new(&limits, want.as_ref());
        let lease = llm.map(|(_, l)| l);
        let reply =
            self.ask(&base, &requests_key(&base, &limits), &limits, &ask, (lease, 1), Some(now_us)).await?;
        Ok(outcome(&reply, &limits, tier, ask.tokens))
    }

    /// A debited lease's decision at a fixed time (the exact-arithmetic tests): up to `take`
    /// requests of `entity`'s request limits, the daily share for `replicas`; with the
    /// requests taken.
    #[doc(hidden)]
    pub async fn decide_debit_at(
        &self,
        limiter: &Limiter,
        entity: &Arc<str>,
        tier: &str,
        now_us: i64,
        take: u32,
        replicas: u32,
    ) -> Result<(Result<Quota, Box<Rejection>>, i64), redis::RedisError> {
        let (limits, base) = self.resolve_at(limiter, entity, tier)?;
        let ask = Ask::new(&limits, None);
        self.replicas.store(replicas, Ordering::Relaxed);
        let reply =
            self.ask(&base, &requests_key(&base, &limits), &limits, &ask, (None, take), Some(now_us)).await?;
        Ok((outcome(&reply, &limits, tier, None), reply.taken))
    }

    /// Gives back `requests` of a debited lease taken on UTC day `day`, at a fixed time (the
    /// exact-arithmetic tests): returns what the daily budget got back.
    #[doc(hidden)]
    pub async fn refund_at(
        &self,
        limiter: &Limiter,
        entity: &Arc<str>,
        tier: &str,
        now_us: i64,
        requests: u32,
        day: i64,
    ) -> redis::RedisResult<i64> {
        let (limits, base) = self.resolve_at(limiter, entity, tier)?;
        let refund =
            Refund { key: requests_key(&base, &limits), requests, day, interval_us: interval_us(&limits) };
        self.run_refund(&refund, Some(now_us)).await
    }

    /// Settles at a fixed time what `decide_at` held — `held`: (tokens reserved, lease) — with
    /// `used` tokens (the exact-arithmetic tests): returns (whole tokens left, used today).
    #[doc(hidden)]
    pub async fn settle_at(
        &self,
        limiter: &Limiter,
        entity: &Arc<str>,
        tier: &str,
        now_us: i64,
        held: (Option<u64>, &str),
        used: u64,
    ) -> redis::RedisResult<(i64, i64)> {
        let (reserved, lease) = held;
        let (limits, base) = self.resolve_at(limiter, entity, tier)?;
        let mut job = Settlement::of(&base, &limits, reserved, now_us / 1000, Some(lease.to_string()));
        job.used = used;
        self.run_settle(&job, Some(now_us)).await
    }

    /// The limits and the key base of an entity under a tier (the fixed-time entry points).
    fn resolve_at(
        &self,
        limiter: &Limiter,
        entity: &Arc<str>,
        tier: &str,
    ) -> redis::RedisResult<(Tier, String)> {
        let (bucket, entity, scope) = limiter.resolve(entity, entity, tier).map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "tier not configured"))
        })?;
        Ok((bucket.limits, self.entity_base(scope, entity, tier)))
    }
}

/// What the script is asked beyond the request limits.
struct Ask {
    /// Tokens to reserve, clamped to the limits.
    tokens: Option<u64>,
    /// Concurrent requests allowed.
    concurrent: Option<u32>,
}

impl Ask {
    fn new(limits: &Tier, want: Option<&Want>) -> Ask {
        let Some(want) = want else {
            return Ask { tokens: None, concurrent: None };
        };
        let tokens = want
            .estimate
            .filter(|_| limits.counts_tokens())
            .map(|e| tokens::clamp(limits.tokens_per_minute, limits.daily_tokens, e));
        Ask { tokens, concurrent: limits.max_concurrent_requests }
    }

    /// Whether the request holds anything until its response ends.
    fn holds(&self) -> bool {
        self.tokens.is_some() || self.concurrent.is_some()
    }
}

/// The GCRA's emission interval in microseconds (0: no per-second limit).
fn interval_us(limits: &Tier) -> f64 {
    limits.requests_per_second.map_or(0.0, |r| 1e6 / f64::from(r.max(1)))
}

/// The request limits' keys: `<entity base>:<rps>-<burst>-<daily>` (`:gcra`, `:day`).
fn requests_key(base: &str, limits: &Tier) -> String {
    let n = |x: Option<u32>| x.map_or(0, u64::from);
    let (mut a, mut b, mut c) = (itoa::Buffer::new(), itoa::Buffer::new(), itoa::Buffer::new());
    join(&[
        base,
        ":",
        a.format(n(limits.requests_per_second)),
        "-",
        b.format(n(limits.burst)),
        "-",
        c.format(limits.daily_requests.unwrap_or(0)),
    ])
}

/// `parts` end to end, in one allocation: the keys of every decision, without `format!`'s
/// machinery (measured with `benches/load/profile.sh`, `EXTRA` for Redis).
fn join(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// The token state's key: `<entity base>:tok:<per minute>-<daily>`.
fn tokens_key(base: &str, limits: &Tier) -> String {
    format!("{base}:tok:{}-{}", limits.tokens_per_minute.unwrap_or(0), limits.daily_tokens.unwrap_or(0))
}

/// The concurrency leases' key.
fn leases_key(base: &str) -> String {
    join(&[base, ":conc"])
}
