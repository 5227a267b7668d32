//! Rate limits (§4): per tier — or per organisation / key override — a GCRA per-second limit
//! (governor) and a daily budget that resets at 00:00 UTC, applied per organisation or per key.
//!
//! One decision per request: the daily budget is reserved first, then the GCRA is asked; if the
//! GCRA refuses, the reservation is returned, so a refused request consumes nothing. Both clocks
//! are injected (governor's `Clock` for the GCRA, a wall clock for the UTC day) so the
//! arithmetic is tested exactly. Sits after the scope check in the pipeline.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::{Quota as GovernorQuota, RateLimiter};

use crate::clock::DAY_MS;
use crate::config::{Config, LimitPer, Tier};
use crate::error::{Error, Limit};

pub mod concurrency;
mod hold;
mod quota;
pub mod redis;
mod refusal;
pub mod report;
pub mod tokens;

pub use hold::{Hold, Settling, TokenHold};

#[cfg(test)]
use quota::put_openai_duration;
pub use quota::Quota;
use quota::{seconds_ceil, Fixed};
use refusal::{message, reject, retry_after};

type Gcra<C> = RateLimiter<Arc<str>, SharedCells, C, StateInformationMiddleware>;

/// A map by key or organisation id. foldhash, not SipHash: the ids are our store's, never a
/// client's choice, so flood resistance buys nothing, and each limited request hashes its
/// entity once per map it touches.
pub(crate) type Map<V> = DashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// governor's own DashMap of GCRA cells, shared with the bucket so that `peek` can read a cell.
/// governor keeps its state store private and offers no read-only check (every `check_key`
/// consumes a cell), but its `StateStore` trait lets the caller own the store: this one hands
/// every operation to the DashMap, and `peek` reads a cell's theoretical arrival time through
/// the same trait with a closure that declines to replace it — nothing is consumed.
#[derive(Default, Clone)]
pub struct SharedCells(Arc<DashMapStateStore<Arc<str>, foldhash::fast::RandomState>>);

impl StateStore for SharedCells {
    type Key = Arc<str>;

    fn measure_and_replace<T, F, E>(&self, key: &Arc<str>, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Arc<str>> for SharedCells {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below)
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0)
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

impl SharedCells {
    /// The theoretical arrival time of `entity`'s cell (nanoseconds after the limiter's start),
    /// `None` for an entity without state (a full bucket). Read-only: an absent entity is not
    /// inserted, and the closure's `Err` tells governor to leave the cell as it is.
    fn tat(&self, entity: &Arc<str>) -> Option<u64> {
        if !self.0.contains_key(entity) {
            return None;
        }
        let read: Result<(), Option<Nanos>> = self.0.measure_and_replace(entity, Err);
        read.err().flatten().map(Nanos::as_u64)
    }
}

/// Wall clock in Unix milliseconds (the UTC day of the daily budget).
pub type Wall = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The limits of one tier or override, with the state of every organisation (or key) under it.
pub struct Bucket<C: Clock + Clone> {
    limits: Tier,
    gcra: Option<Gcra<C>>,
    /// The GCRA's cells (shared with `gcra`) and its reference instant, for `peek`.
    cells: SharedCells,
    start: C::Instant,
    /// Per limited entity: (UTC day number, requests admitted that day).
    daily: Map<Mutex<(i64, u64)>>,
    /// The header values that depend on the limits alone, formatted once.
    fixed: Option<Arc<Fixed>>,
    /// Token limits (§12), shared with the reservations in flight.
    tokens: Option<Arc<tokens::Tokens>>,
    concurrency: Option<concurrency::Concurrency>,
}

impl<C: Clock + Clone> Bucket<C> {
    fn new(limits: Tier, clock: &C) -> Bucket<C> {
        let cells = SharedCells::default();
        // governor takes its own start from the clock inside `new`, a moment after this one;
        // `peek` measures from this one, so it sees time at most those nanoseconds later than
        // governor does (never an earlier, emptier bucket). With a fake clock both are equal.
        let start = clock.now();
        let gcra = limits.requests_per_second.and_then(NonZeroU32::new).map(|rps| {
            let burst = limits.burst.and_then(NonZeroU32::new).unwrap_or(rps);
            let quota = GovernorQuota::per_second(rps).allow_burst(burst);
            RateLimiter::<Arc<str>, _, C, governor::middleware::NoOpMiddleware<C::Instant>>::new(
                quota,
                cells.clone(),
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>()
        });
        let full = Quota {
            per_second: gcra.as_ref().map(|_| {
                let rps = limits.requests_per_second.unwrap_or(1);
                let burst = limits.burst.unwrap_or(rps);
                (burst, burst, rps)
            }),
            daily: limits.daily_requests.map(|budget| (budget, budget, 0)),
            fixed: None,
            tokens: limits.counts_tokens().then_some(tokens::Left {
                per_minute: limits.tokens_per_minute.map(|m| (m, m, 0)),
                daily: limits.daily_tokens.map(|d| (d, d, 0)),
                used_today: 0,
            }),
        };
        Bucket {
            limits,
            gcra,
            cells,
            start,
            daily: Map::default(),
            fixed: full.format_fixed().map(Arc::new),
            tokens: tokens::Tokens::new(limits.tokens_per_minute, limits.daily_tokens).map(Arc::new),
            concurrency: concurrency::Concurrency::new(limits.max_concurrent_requests),
        }
    }

    /// The limits of this bucket (what `/v1/limits` reports).
    pub fn limits(&self) -> &Tier {
        &self.limits
    }
}

/// What remains for one entity, read without consuming anything (`/v1/limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    /// Whose state it is: `organisation`, `key`, `organisation override`, `key override`.
    pub applies_to: &'static str,
    /// (burst, requests admissible at once now, requests per second, ms until the bucket is full).
    pub per_second: Option<(u32, u32, u32, i64)>,
    /// (daily budget, used today, remaining today, ms until 00:00 UTC).
    pub daily: Option<(u64, u64, u64, i64)>,
    /// What remains of the token limits (§12), when the tier has them.
    pub tokens: Option<tokens::Left>,
    /// (concurrent requests allowed, in flight now), when the tier limits them.
    pub concurrent: Option<(u32, u32)>,
}

impl Peek {
    /// The rate-limit headers of a response that consumed nothing.
    pub fn quota(&self) -> Quota {
        Quota {
            per_second: self.per_second.map(|(burst, remaining, rps, _)| (burst, remaining, rps)),
            daily: self.daily.map(|(budget, _, remaining, ms)| (budget, remaining, ms)),
            fixed: None,
            tokens: self.tokens,
        }
    }
}

/// GCRA arithmetic shared by the local peek and the reading of Redis's state: with `tat` the
/// theoretical arrival time, `now`, and `t` the emission interval (same unit), a request is
/// admitted while `tat - now <= (burst - 1) · t` (governor: `t0 >= tat - tau`, tau =
/// (burst-1)·t), so `floor((burst·t - (tat - now)) / t)` requests fit now, and the bucket is
/// full again `tat - now` from now.
fn gcra_remaining(burst: u32, tat: Option<u64>, now: u64, t: u64) -> (u32, u64) {
    let ahead = tat.map_or(0, |tat| tat.saturating_sub(now));
    let capacity = u64::from(burst).saturating_mul(t.max(1));
    let fit = capacity.saturating_sub(ahead) / t.max(1);
    (u32::try_from(fit.min(u64::from(burst))).unwrap_or(burst), ahead)
}

/// Which state a decision uses: the kind of bucket and of entity (part of the fleet's Redis
/// key names, so that an organisation's tier state and its override's never mix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    KeyOverride,
    OrgOverride,
    TierPerOrg,
    TierPerKey,
}

/// `Peek::applies_to` of a scope.
pub(crate) fn applies_to(scope: Scope) -> &'static str {
    match scope {
        Scope::KeyOverride => "key override",
        Scope::OrgOverride => "organisation override",
        Scope::TierPerOrg => "organisation",
        Scope::TierPerKey => "key",
    }
}

/// What `resolve` finds: the bucket, the entity whose state it is, and the kind of both.
pub(crate) type Resolved<'a, C = DefaultClock> = (&'a Arc<Bucket<C>>, &'a Arc<str>, Scope);

/// A refused request: the 429 and the headers that go with it.
#[derive(Debug)]
pub struct Rejection {
    pub error: Error,
    pub quota: Quota,
    /// `tollgate_rate_limited_total{limit}`; `None` when no limit refused the request but the
    /// configuration does not fit it (an unconfigured tier: 500, not 429).
    pub limit: Option<Limit>,
}

type Buckets<C> = HashMap<String, Arc<Bucket<C>>, foldhash::fast::RandomState>;

pub struct Limiter<C: Clock + Clone = DefaultClock> {
    per: LimitPer,
    /// By name, from the config (looked up on every request: foldhash, as `Map`).
    tiers: Buckets<C>,
    orgs: Buckets<C>,
    keys: Buckets<C>,
    clock: C,
    wall: Wall,
    /// Unconfigured tiers already logged.
    unconfigured: Mutex<std::collections::HashSet<String>>,
}

impl Limiter<DefaultClock> {
    /// The production limiter: governor's monotonic clock and the system's wall clock.
    pub fn from_config(config: &Config, previous: Option<&Limiter>) -> Limiter {
        let clock = previous.map_or_else(DefaultClock::default, |p| p.clock.clone());
        Limiter::new(config, previous, clock, Arc::new(crate::clock::now_ms))
    }
}

impl Limiter<DefaultClock> {
    /// The limits of `config` shared among `replicas`, each rounded up: what one replica
    /// enforces by itself while the fleet's shared state is unreachable (`on_error: local`).
    /// Together the replicas admit at most the tier's limits plus one per replica.
    pub fn divided(config: &Config, replicas: u32, previous: Option<&Limiter>) -> Limiter {
        let n = replicas.max(1);
        let share32 = |x: Option<u32>| x.map(|v| v.div_ceil(n).max(1));
        let share64 = |x: Option<u64>| x.map(|v| v.div_ceil(u64::from(n)).max(1));
        let divide = |m: &mut std::collections::BTreeMap<String, Tier>| {
            for t in m.values_mut() {
                *t = Tier {
                    requests_per_second: share32(t.requests_per_second),
                    burst: share32(t.burst),
                    daily_requests: share64(t.daily_requests),
                    tokens_per_minute: share64(t.tokens_per_minute),
                    daily_tokens: share64(t.daily_tokens),
                    max_concurrent_requests: share32(t.max_concurrent_requests),
                    default_output_tokens: t.default_output_tokens,
                };
            }
        };
        let mut shared = config.clone();
        divide(&mut shared.tiers);
        divide(&mut shared.rate_limits.org_overrides);
        divide(&mut shared.rate_limits.key_overrides);
        Limiter::from_config(&shared, previous)
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// Builds the limiter of a config generation. Buckets whose limits are unchanged are taken
    /// over from `previous` with their state; changed or new ones start full.
    pub fn new(config: &Config, previous: Option<&Limiter<C>>, clock: C, wall: Wall) -> Limiter<C> {
        // State is keyed by the bare organisation name or key id (a bucket holds one kind of
        // entity), so it is only taken over while `per` stays the same.
        let same_per = previous.is_some_and(|p| p.per == config.rate_limits.per);
        let build = |limits: &Tier, old: Option<&Arc<Bucket<C>>>| match old {
            Some(b) if b.limits == *limits && same_per => b.clone(),
            _ => Arc::new(Bucket::new(*limits, &clock)),
        };
        let map = |src: &std::collections::BTreeMap<String, Tier>, old: Option<&Buckets<C>>| {
            src.iter()
                .map(|(name, limits)| (name.clone(), build(limits, old.and_then(|o| o.get(name)))))
                .collect()
        };
        let rl = &config.rate_limits;
        Limiter {
            per: rl.per,
            tiers: map(&config.tiers, previous.map(|p| &p.tiers)),
            orgs: map(&rl.org_overrides, previous.map(|p| &p.orgs)),
            keys: map(&rl.key_overrides, previous.map(|p| &p.keys)),
            clock,
            wall,
            unconfigured: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Decides one request of key `key_id` of organisation `org` in tier `tier`.
    pub fn check(&self, key_id: &str, org: &str, tier: &str) -> Result<Quota, Box<Rejection>> {
        self.check_shared(&key_id.into(), &org.into(), tier)
    }

    /// `check` for callers that hold the names shared already (the request path: a verified
    /// key's principal), so that a decision allocates nothing.
    pub fn check_shared(
        &self,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
    ) -> Result<Quota, Box<Rejection>> {
        let (bucket, entity, _) = self.resolve(key_id, org, tier)?;
        self.decide(bucket, entity, tier)
    }

    /// The decision of an LLM request (§12): the request limits, and with them, all or nothing,
    /// a concurrency slot and a reservation of `estimate` tokens (`None`: a request that uses
    /// no tokens, such as listing models). What is held is given back when the `Hold` is
    /// dropped, unless it is settled first.
    pub fn check_llm(
        &self,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
        estimate: Option<u64>,
        gauge: Option<prometheus::IntGauge>,
    ) -> Result<(Quota, Hold), Box<Rejection>> {
        let resolved = self.resolve(key_id, org, tier)?;
        let (quota, hold) = self.admit(resolved, tier, Some((estimate, gauge)))?;
        Ok((quota, hold.unwrap_or_default()))
    }

    /// The limits of a caller that `resolve` found, when they go beyond requests (tokens or
    /// concurrency): what the request path asks before it decides, on the same resolution.
    pub(crate) fn llm_limits(resolved: &Resolved<'_, C>) -> Option<Tier> {
        let limits = resolved.0.limits;
        (limits.counts_tokens() || limits.max_concurrent_requests.is_some()).then_some(limits)
    }

    /// The decision of this process's state on a resolved caller (the request path resolves
    /// once per request): with `hold`, an LLM request's slot and reservation first, given back
    /// by dropping the hold if the request limits then refuse.
    pub(crate) fn admit(
        &self,
        (bucket, entity, _): Resolved<'_, C>,
        tier: &str,
        hold: Option<(Option<u64>, Option<prometheus::IntGauge>)>,
    ) -> Result<(Quota, Option<Hold>), Box<Rejection>> {
        let Some((estimate, gauge)) = hold else {
            return self.decide(bucket, entity, tier).map(|q| (q, None));
        };
        let hold = self.hold(bucket, entity, tier, estimate, gauge)?;
        let quota = self.decide(bucket, entity, tier)?.with_tokens(&hold);
        Ok((quota, Some(hold)))
    }

    /// The concurrency slot and the token reservation of one request, before the request
    /// limits are asked (those cannot be given back once governor has counted them): on a
    /// refusal here nothing else was taken; on a refusal after, dropping the hold returns it.
    pub(crate) fn hold(
        &self,
        bucket: &Bucket<C>,
        entity: &Arc<str>,
        tier: &str,
        estimate: Option<u64>,
        gauge: Option<prometheus::IntGauge>,
    ) -> Result<Hold, Box<Rejection>> {
        let mut hold = Hold::default();
        if let Some(c) = &bucket.concurrency {
            match c.acquire(entity, gauge) {
                Some(slot) => hold.slot = Some(slot),
                None => {
                    let limit = Limit::ConcurrentRequests;
                    let message = message(limit, &bucket.limits, tier, 0);
                    return Err(reject(limit, tier, message, 1, Quota::default()));
                }
            }
        }
        if let (Some(t), Some(estimate)) = (&bucket.tokens, estimate) {
            let now = (self.wall)();
            let amount = t.clamp(estimate);
            match t.reserve(entity, amount, now) {
                Ok(left) => {
                    hold.tokens =
                        Some(TokenHold::new(t.clone(), entity.clone(), amount, now, left, self.wall.clone()))
                }
                Err((refused, left)) => {
                    let quota = Quota { tokens: Some(left), ..Quota::default() };
                    let (limit, wait) = match refused {
                        tokens::Refused::PerMinute { wait_ms } => (Limit::TokensPerMinute, wait_ms),
                        tokens::Refused::Daily { wait_ms } => (Limit::DailyTokens, wait_ms),
                    };
                    let message = message(limit, &bucket.limits, tier, amount);
                    return Err(reject(limit, tier, message, seconds_ceil(wait), quota));
                }
            }
        }
        Ok(hold)
    }

    /// What remains for the caller now and today, without consuming anything: the GCRA's cell
    /// is read (not checked), the daily counter is read. The tier name is the one reported.
    pub fn peek(
        &self,
        key_id: &Arc<str>,
        org: &Arc<str>,
        tier: &str,
    ) -> Result<(Tier, Peek), Box<Rejection>> {
        let (bucket, entity, scope) = self.resolve(key_id, org, tier)?;
        Ok((bucket.limits, self.peek_bucket(bucket, entity, scope)))
    }

    fn peek_bucket(&self, bucket: &Bucket<C>, entity: &Arc<str>, scope: Scope) -> Peek {
        let now_ms = (self.wall)();
        let day = now_ms.div_euclid(DAY_MS);
        let until_midnight = (day + 1) * DAY_MS - now_ms;
        let daily = bucket.limits.daily_requests.map(|budget| {
            let used = bucket.daily.get(entity).map_or(0, |slot| {
                let used = slot.lock().unwrap_or_else(|e| e.into_inner());
                if used.0 == day {
                    used.1
                } else {
                    0
                }
            });
            (budget, used, budget.saturating_sub(used), until_midnight)
        });
        let per_second = match (&bucket.gcra, bucket.limits.requests_per_second) {
            (Some(_), Some(rps)) => {
                let burst = bucket.limits.burst.unwrap_or(rps);
                // governor's emission interval for `per_second(rps)`: whole nanoseconds.
                let t = GovernorQuota::per_second(NonZeroU32::new(rps).unwrap_or(NonZeroU32::MIN))
                    .replenish_interval();
                let t = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
                let now = self.clock.now().duration_since(bucket.start).as_u64();
                let (remaining, ahead) = gcra_remaining(burst, bucket.cells.tat(entity), now, t);
                Some((burst, remaining, rps, i64::try_from(ahead / 1_000_000).unwrap_or(i64::MAX)))
            }
            _ => None,
        };
        let tokens = bucket.tokens.as_ref().map(|t| t.peek(entity, now_ms));
        let concurrent = bucket
            .concurrency
            .as_ref()
            .map(|c| (bucket.limits.max_concurrent_requests.unwrap_or(0), c.in_flight(entity)));
        Peek { applies_to: applies_to(scope), per_second, daily, tokens, concurrent }
    }

    /// Which limits apply to a request, and to whose state: a key's override, its
    /// organisation's, or its tier (per organisation or per key). A tier that is not
    /// configured is a configuration problem (500), not a limit.
    pub(crate) fn resolve<'a>(
        &'a self,
        key_id: &'a Arc<str>,
        org: &'a Arc<str>,
        tier: &str,
    ) -> Result<Resolved<'a, C>, Box<Rejection>> {
        // Overrides are negotiated per key or per organisation; their state is their own.
        if let Some(b) = self.keys.get(&**key_id) {
            Ok((b, key_id, Scope::KeyOverride))
        } else if let Some(b) = self.orgs.get(&**org) {
            Ok((b, org, Scope::OrgOverride))
        } else if let Some(b) = self.tiers.get(tier) {
            Ok(match self.per {
                LimitPer::Org => (b, org, Scope::TierPerOrg),
                LimitPer::Key => (b, key_id, Scope::TierPerKey),
            })
        } else {
            // Retrying later (the old 429) would not help. Logged once per tier and config
            // generation: any holder of such a key could flood the log.
            if self.unconfigured.lock().unwrap_or_else(|e| e.into_inner()).insert(tier.to_string()) {
                tracing::error!(tier, org = %org, "a key's tier is not configured; its requests get 500");
            }
            let message = format!(
                "This key's tier `{tier}` is not configured on this server; an operator must configure the tier or move the key to another one."
            );
            Err(Box::new(Rejection { error: Error::Internal(message), quota: Quota::default(), limit: None }))
        }
    }

    /// The decision of this process's own state for `entity` under `bucket`.
    pub(crate) fn decide(
        &self,
        bucket: &Bucket<C>,
        entity: &Arc<str>,
        tier: &str,
    ) -> Result<Quota, Box<Rejection>> {
        let mut quota = Quota::default();
        let now_ms = (self.wall)();
        let day = now_ms.div_euclid(DAY_MS);
        let until_midnight = (day + 1) * DAY_MS - now_ms;

        // 1. Reserve today's budget.
        let reserved = match bucket.limits.daily_requests {
            None => false,
            Some(budget) => {
                let slot = bucket.daily.entry(entity.clone()).or_insert_with(|| Mutex::new((day, 0)));
                let mut used = slot.lock().unwrap_or_else(|e| e.into_inner());
                if used.0 != day {
                    *used = (day, 0);
                }
                if used.1 >= budget {
                    // Only the daily budget is reported: governor has no read-only look at the
                    // per-second bucket, and asking it would consume a cell.
                    quota.daily = Some((budget, 0, until_midnight));
                    let limit = Limit::DailyRequests;
                    let message = message(limit, &bucket.limits, tier, 0);
                    return Err(reject(limit, tier, message, seconds_ceil(until_midnight), quota));
                }
                used.1 += 1;
                quota.daily = Some((budget, budget - used.1, until_midnight));
                true
            }
        };

        // 2. The per-second GCRA.
        if let (Some(gcra), Some(rps)) = (&bucket.gcra, bucket.limits.requests_per_second) {
            let burst = bucket.limits.burst.unwrap_or(rps);
            match gcra.check_key(entity) {
                Ok(snapshot) => quota.per_second = Some((burst, snapshot.remaining_burst_capacity(), rps)),
                Err(not_until) => {
                    // A refused request consumes nothing: give the daily reservation back.
                    if reserved {
                        if let Some(slot) = bucket.daily.get(entity) {
                            let mut used = slot.lock().unwrap_or_else(|e| e.into_inner());
                            if used.0 == day {
                                used.1 = used.1.saturating_sub(1);
                            }
                            if let Some(d) = quota.daily.as_mut() {
                                d.1 = d.0 - used.1;
                            }
                        }
                    }
                    let wait = not_until.wait_time_from(self.clock.now());
                    quota.per_second = Some((burst, 0, rps));
                    let limit = Limit::RequestsPerSecond;
                    let message = message(limit, &bucket.limits, tier, 0);
                    return Err(reject(limit, tier, message, retry_after(wait), quota));
                }
            }
        }
        quota.fixed = bucket.fixed.clone();
        Ok(quota)
    }

    /// Forgets state that carries no information: GCRA cells that have refilled completely and
    /// daily counters of past days. Keeps memory bounded with many organisations.
    pub fn forget_idle(&self) {
        let day = (self.wall)().div_euclid(DAY_MS);
        for b in self.tiers.values().chain(self.orgs.values()).chain(self.keys.values()) {
            if let Some(g) = &b.gcra {
                g.retain_recent();
                g.shrink_to_fit();
            }
            b.daily.retain(|_, v| v.get_mut().map(|v| v.0 == day).unwrap_or(false));
            b.daily.shrink_to_fit();
            if let Some(t) = &b.tokens {
                t.forget_idle((self.wall)());
            }
            if let Some(c) = &b.concurrency {
                c.forget_idle();
            }
        }
    }

    /// Tokens left now in the per-minute bucket of `entity` under tier `t` (tests).
    #[cfg(test)]
    pub(crate) fn tokens_left(&self, entity: &str) -> Option<u64> {
        let t = self.tiers.get("t")?.tokens.as_ref()?;
        t.peek(&entity.into(), (self.wall)()).per_minute.map(|p| p.1)
    }

    /// Requests of `entity` in flight under tier `t` (tests).
    #[cfg(test)]
    pub(crate) fn in_flight(&self, entity: &str) -> u32 {
        self.tiers.get("t").and_then(|b| b.concurrency.as_ref()).map_or(0, |c| c.in_flight(entity))
    }

    /// Entities with state (for the memory benchmark and tests).
    pub fn tracked(&self) -> usize {
        self.tiers
            .values()
            .chain(self.orgs.values())
            .chain(self.keys.values())
            .map(|b| b.gcra.as_ref().map_or(0, |g| g.len()).max(b.daily.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests;
