//! `Metrics`: every Prometheus series of SPEC §10, owned by one registry that hangs off `State`
//! (no process globals, so every test and every embedded instance gets its own).
//!
//! Labels are low-cardinality by construction: `route` is a route *pattern* (or `unmatched`),
//! `method` is folded to the standard methods, `code` is an error code of §5 or `ok`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub auth_cache_hits: IntCounter,
    pub auth_cache_misses: IntCounter,
    pub argon2_verifications: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub inflight: IntGauge,
    pub upstream_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub store_up: IntGauge,
    pub store_errors: IntCounterVec,
    pub key_change_lag: Histogram,
    pub ratelimit_backend_up: IntGauge,
    pub ratelimit_backend_duration: Histogram,
    pub ratelimit_decisions: IntCounterVec,
    pub ratelimit_settlements: IntCounterVec,
    pub tokens: IntCounterVec,
    pub usage_unreported: IntCounterVec,
    pub usage_unparsed: IntCounterVec,
    pub concurrent: IntGaugeVec,
    /// The per-tier series of LLM requests, resolved once per tier: a label lookup costs
    /// hundreds of instructions, and a token-limited request needs three.
    tiers: RwLock<HashMap<String, Arc<TierMetrics>>>,
}

/// One tier's series of `tollgate_tokens_total` and `tollgate_concurrent_requests`.
#[derive(Debug)]
pub struct TierMetrics {
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub concurrent: IntGauge,
}

/// Latency buckets from 1 ms to 10 min: inference requests run from milliseconds (embeddings)
/// to many minutes (long streams).
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

/// Key change lag buckets, 5 ms to 30 s: pushed changes land in milliseconds, polled ones
/// within `revocation_poll`, and a catch-up after an outage later still.
const LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Shared rate-limit decision buckets, 100 µs to 100 ms (the timeout is 20 ms by default).
const BACKEND_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1];

impl Metrics {
    /// The series of `tier` (tiers are few: configured ones).
    pub fn tier(&self, tier: &str) -> Arc<TierMetrics> {
        if let Some(t) = self.tiers.read().unwrap_or_else(|e| e.into_inner()).get(tier) {
            return t.clone();
        }
        let mut tiers = self.tiers.write().unwrap_or_else(|e| e.into_inner());
        tiers
            .entry(tier.to_string())
            .or_insert_with(|| {
                Arc::new(TierMetrics {
                    prompt_tokens: self.tokens.with_label_values(&[tier, "prompt"]),
                    completion_tokens: self.tokens.with_label_values(&[tier, "completion"]),
                    concurrent: self.concurrent.with_label_values(&[tier]),
                })
            })
            .clone()
    }

    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram_vec = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(REQUEST_BUCKETS.to_vec()),
                &["route"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };

        let m = Metrics {
            requests: counter_vec(
                "tollgate_requests_total",
                "Requests answered, by matched route pattern, method, status and code (`ok` or an error code).",
                &["route", "method", "status", "code"],
            )?,
            request_duration: histogram_vec(
                "tollgate_request_duration_seconds",
                "Whole-request duration, from the request head to the last byte of the response body.",
            )?,
            upstream_duration: histogram_vec(
                "tollgate_upstream_duration_seconds",
                "Time from sending a request upstream to receiving its response headers.",
            )?,
            auth_cache_hits: counter(
                "tollgate_auth_cache_hits_total",
                "Authentications answered from the verified-key cache.",
            )?,
            auth_cache_misses: counter(
                "tollgate_auth_cache_misses_total",
                "Authentications that needed the store (and possibly Argon2id).",
            )?,
            argon2_verifications: counter_vec(
                "tollgate_argon2_verifications_total",
                "Argon2id verifications, by result (`ok`, `mismatch`, `error`).",
                &["result"],
            )?,
            auth_failures: counter_vec(
                "tollgate_auth_failures_total",
                "Rejected authentications, by reason.",
                &["reason"],
            )?,
            rate_limited: counter_vec(
                "tollgate_rate_limited_total",
                "Requests rejected with 429, by tier and limit.",
                &["tier", "limit"],
            )?,
            inflight: IntGauge::new("tollgate_inflight_requests", "Requests in flight, streams included.")?,
            upstream_errors: counter_vec(
                "tollgate_upstream_errors_total",
                "Upstream failures, by kind (`connect`, `reset`, `timeout`, `stream_idle`, `stream_broken`).",
                &["kind"],
            )?,
            config_reloads: counter_vec(
                "tollgate_config_reloads_total",
                "Config reload attempts, by result (`success`, `error`).",
                &["result"],
            )?,
            store_up: IntGauge::new(
                "tollgate_store_up",
                "1 if the latest call to the key store succeeded, 0 if it could not reach it.",
            )?,
            store_errors: counter_vec(
                "tollgate_store_errors_total",
                "Key store calls that failed to reach the store, by operation.",
                &["op"],
            )?,
            key_change_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_key_change_lag_seconds",
                    "From a key's change in the store (its writer's clock) to the change applied on this replica.",
                )
                .buckets(LAG_BUCKETS.to_vec()),
            )?,
            ratelimit_backend_up: IntGauge::new(
                "tollgate_ratelimit_backend_up",
                "1 if the latest call to the shared rate-limit backend (Redis) succeeded, else 0; 1 with the local backend.",
            )?,
            ratelimit_backend_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_ratelimit_backend_duration_seconds",
                    "Time of one shared rate-limit decision (one Redis round trip), timeouts included.",
                )
                .buckets(BACKEND_BUCKETS.to_vec()),
            )?,
            ratelimit_decisions: counter_vec(
                "tollgate_ratelimit_decisions_total",
                "Rate-limit decisions of the Redis backend, by source (`redis`, `local_cache`, `fallback_local`, `fallback_open`, `fallback_closed`).",
                &["source"],
            )?,
            ratelimit_settlements: counter_vec(
                "tollgate_ratelimit_settlements_total",
                "Settlements in Redis of what admitted requests held (token reservations, concurrency leases), by outcome (`ok`, `failed`: the reservation stands, the lease runs out).",
                &["outcome"],
            )?,
            tokens: counter_vec(
                "tollgate_tokens_total",
                "Tokens the upstream reported, by tier and kind (`prompt`, `completion`).",
                &["tier", "kind"],
            )?,
            usage_unreported: counter_vec(
                "tollgate_usage_unreported_total",
                "Token-counted responses without reported usage, charged their estimate, by reason (`missing`, `client_gone`, `stopped`).",
                &["reason"],
            )?,
            usage_unparsed: counter_vec(
                "tollgate_usage_unparsed_requests_total",
                "Token-counted requests forwarded untouched, estimated from their length, by reason (`not_json`, `no_length`, `too_large`).",
                &["reason"],
            )?,
            concurrent: IntGaugeVec::new(
                Opts::new("tollgate_concurrent_requests", "Requests holding a concurrency slot, by tier."),
                &["tier"],
            )?,
            tiers: RwLock::new(HashMap::new()),
            registry,
        };
        m.registry.register(Box::new(m.inflight.clone()))?;
        m.registry.register(Box::new(m.concurrent.clone()))?;
        for r in ["missing", "client_gone", "stopped"] {
            m.usage_unreported.with_label_values(&[r]);
        }
        m.registry.register(Box::new(m.ratelimit_backend_up.clone()))?;
        m.registry.register(Box::new(m.ratelimit_backend_duration.clone()))?;
        m.ratelimit_backend_up.set(1);
        m.registry.register(Box::new(m.store_up.clone()))?;
        m.registry.register(Box::new(m.key_change_lag.clone()))?;
        // Pre-created, so that a rate over them is 0 rather than absent before the first error.
        for op in ["get", "changes", "touch", "purge", "insert", "set_revoked", "list", "audit", "record"] {
            m.store_errors.with_label_values(&[op]);
        }
        let build = IntGaugeVec::new(
            Opts::new("tollgate_build_info", "Build information; the value is always 1."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(build))?;
        // Pre-create the reload series so that alerts on `result="error"` see a 0, not nothing.
        for r in ["success", "error"] {
            m.config_reloads.with_label_values(&[r]);
        }
        Ok(m)
    }

    /// Renders every series in the Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed metric family,
        // which the registry refuses at registration time.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// The histogram for one route, resolved once per request.
    pub fn request_duration(&self, route: &str) -> Histogram {
        self.request_duration.with_label_values(&[route])
    }

    /// The upstream histogram for one route (`Route::upstream_duration` keeps it).
    pub fn upstream_duration(&self, route: &str) -> Histogram {
        self.upstream_duration.with_label_values(&[route])
    }
}

/// Folds a method into a bounded label set: a client cannot mint new series with made-up methods.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_names() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["/v1/models", "GET", "200", "ok"]).inc();
        m.request_duration("/v1/models").observe(0.01);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "tollgate_requests_total{code=\"ok\",method=\"GET\",route=\"/v1/models\",status=\"200\"} 1",
            "tollgate_request_duration_seconds_bucket",
            "tollgate_inflight_requests 0",
            "tollgate_config_reloads_total{result=\"error\"} 0",
            "tollgate_build_info{version=",
            "tollgate_auth_cache_hits_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn two_instances_do_not_share_series() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.inflight.inc();
        assert_eq!(b.inflight.get(), 0);
    }
}
