//! Fleet mode II (§11, §4): one rate limit for every replica, in a `redis-server` of the
//! test's own. First the decision script's arithmetic at fixed times (its test-only time
//! argument), then replicas as users run them, then Redis failing under each `on_error`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::config::Config;
use tollgate::limits::redis::{Fleet, FleetMetrics};
use tollgate::limits::Limiter;

use crate::harness::*;
use crate::redis_server::RedisServer;
use crate::relay::{Mode, Relay};
use crate::upstream::Upstream;

pub(crate) fn metrics() -> FleetMetrics {
    FleetMetrics {
        up: prometheus::IntGauge::new("up", "up").unwrap(),
        duration: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("d", "d")).unwrap(),
        decisions: prometheus::IntCounterVec::new(prometheus::Opts::new("n", "n"), &["source"]).unwrap(),
        settlements: prometheus::IntCounterVec::new(prometheus::Opts::new("s", "s"), &["outcome"]).unwrap(),
    }
}

pub(crate) fn setup(url: &str, yaml: &str) -> (Config, Limiter, Fleet) {
    let yaml = format!("rate_limits:\n  backend: redis\n  redis: {{ url_env: UNUSED, timeout: 1s }}\n{yaml}");
    let config = Config::from_yaml(&yaml, "test").unwrap();
    let tollgate::config::LimitBackend::Redis(redis) = &config.rate_limits.backend else { panic!("redis") };
    let fleet = Fleet::with_url(url, redis, metrics()).unwrap();
    let limiter = Limiter::from_config(&config, None);
    (config, limiter, fleet)
}

/// 2026-12-02T12:00:00Z in microseconds, and midnight after it.
pub(crate) const NOON: i64 = 1_796_212_800_000_000;
pub(crate) const MIDNIGHT: i64 = NOON + 12 * 3_600_000_000;
pub(crate) const MS: i64 = 1_000;

/// What one decision said: admitted with (burst left, daily left), or refused by a limit
/// with its Retry-After.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    Ok(Option<u32>, Option<u64>),
    No(&'static str, u64),
}

async fn at(fleet: &Fleet, limiter: &Limiter, org: &str, tier: &str, now: i64) -> Said {
    let org: Arc<str> = org.into();
    said(fleet.decide_at(limiter, &org, tier, now, None).await.unwrap())
}

/// A decision as `Said`, read from its headers as a client reads them.
fn said(decided: Result<tollgate::limits::Quota, Box<tollgate::limits::Rejection>>) -> Said {
    match decided {
        Ok(q) => {
            let mut h = http::HeaderMap::new();
            q.write_headers(&mut h);
            let policy = h.get("ratelimit").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            // `RateLimit: "requests_per_second";r=N;t=…, "daily_requests";r=M;t=…` (IETF).
            let remaining = |name: &str| {
                policy.split(", ").find(|p| p.starts_with(&format!("\"{name}\""))).and_then(|p| {
                    p.split(';').find_map(|f| f.strip_prefix("r=")).and_then(|r| r.parse::<u64>().ok())
                })
            };
            Said::Ok(
                remaining("requests_per_second").map(|r| u32::try_from(r).unwrap()),
                remaining("daily_requests"),
            )
        }
        Err(r) => {
            let tollgate::error::Error::RateLimited { retry_after, limit, .. } = r.error else {
                panic!("not a 429: {:?}", r.error)
            };
            Said::No(limit.label(), retry_after)
        }
    }
}

#[tokio::test]
async fn the_shared_decision_is_exact_burst_then_rate_refusals_free_daily_reset_at_midnight() {
    let redis = RedisServer::start();
    let (_config, limiter, fleet) = setup(
        &redis.url(),
        "tiers:\n  t: { requests_per_second: 2, burst: 3, daily_requests: 5 }\n  d: { requests_per_second: 1, burst: 5, daily_requests: 2 }\n",
    );

    // A full bucket admits `burst` at once, then one each 500 ms; a refusal takes nothing from
    // the daily budget.
    use Said::*;
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON).await, Ok(Some(2), Some(4)));
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON).await, Ok(Some(1), Some(3)));
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON).await, Ok(Some(0), Some(2)));
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON).await, No("requests_per_second", 1));
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON + 499 * MS).await, No("requests_per_second", 1));
    assert_eq!(
        at(&fleet, &limiter, "acme", "t", NOON + 500 * MS).await,
        Ok(Some(0), Some(1)),
        "refusals were free"
    );
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON + 1000 * MS).await, Ok(Some(0), Some(0)));
    // The budget is spent: refused until midnight (12 h), whatever the bucket holds.
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON + 9000 * MS).await, No("daily_requests", 43_191));
    // Another organisation has its own state.
    assert_eq!(at(&fleet, &limiter, "globex", "t", NOON + 9000 * MS).await, Ok(Some(2), Some(4)));

    // A daily refusal consumes nothing from the bucket: at 23:59:59.990 the budget (2) is
    // spent, five more are refused; at midnight the budget is back and the bucket holds what
    // 10 ms of refill gives it, as if the refused requests had never come.
    let before = MIDNIGHT - 10 * MS;
    assert_eq!(at(&fleet, &limiter, "acme", "d", before).await, Ok(Some(4), Some(1)));
    assert_eq!(at(&fleet, &limiter, "acme", "d", before).await, Ok(Some(3), Some(0)));
    for _ in 0..5 {
        assert_eq!(at(&fleet, &limiter, "acme", "d", before).await, No("daily_requests", 1));
    }
    assert_eq!(at(&fleet, &limiter, "acme", "d", MIDNIGHT).await, Ok(Some(2), Some(1)), "reset at 00:00 UTC");

    // Redis forgot the script (a restart, a failover): reloaded, same arithmetic.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(at(&fleet, &limiter, "initech", "t", NOON).await, Ok(Some(2), Some(4)));

    // Keys carry the entity's hash tag (Redis Cluster) and expire when idle.
    let keys = redis.cli(&["--scan", "--pattern", "tollgate:*"]);
    assert!(keys.lines().all(|k| k.contains("{o:")), "{keys}");
    for k in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", k]).parse().unwrap();
        assert!(ttl > 0, "{k} never expires");
    }
}

/// A debited lease's decision at a fixed time: (admitted with burst and daily left, or the
/// limit that refused), and the requests taken.
async fn debit(
    fleet: &Fleet,
    limiter: &Limiter,
    tier: &str,
    now: i64,
    take: u32,
    replicas: u32,
) -> (Said, i64) {
    let org: Arc<str> = "acme".into();
    let (decided, taken) = fleet.decide_debit_at(limiter, &org, tier, now, take, replicas).await.unwrap();
    let said = said(decided);
    (said, taken)
}

/// A debited lease (`debit_requests`) takes as many requests as the bucket holds, up to what it
/// asks for, and of a daily budget at most what is left shared by twice the replicas (its last
/// requests one at a time); what a lease gives back returns to both limits, the same day only.
#[tokio::test]
async fn a_debit_takes_what_the_limits_hold_and_a_refund_gives_it_back() {
    let redis = RedisServer::start();
    let (_config, limiter, fleet) = setup(
        &redis.url(),
        "tiers:\n  t: { requests_per_second: 2, burst: 5, daily_requests: 100 }\n  d: { requests_per_second: 100000, daily_requests: 60 }\n",
    );
    use Said::*;
    let today = NOON.div_euclid(86_400_000_000);
    assert_eq!(debit(&fleet, &limiter, "t", NOON, 3, 1).await, (Ok(Some(2), Some(97)), 3));
    assert_eq!(
        debit(&fleet, &limiter, "t", NOON, 3, 1).await,
        (Ok(Some(0), Some(95)), 2),
        "what the bucket held"
    );
    assert_eq!(debit(&fleet, &limiter, "t", NOON, 3, 1).await, (No("requests_per_second", 1), 0));
    // Two of them unused: back in the bucket (two intervals) and in the day's budget.
    let org: Arc<str> = "acme".into();
    assert_eq!(fleet.refund_at(&limiter, &org, "t", NOON, 2, today).await.unwrap(), 2);
    assert_eq!(debit(&fleet, &limiter, "t", NOON, 1, 1).await, (Ok(Some(1), Some(96)), 1));
    // A refund of another day gives nothing back to today's budget (the bucket, which knows
    // no days, gets its request back).
    assert_eq!(fleet.refund_at(&limiter, &org, "t", NOON, 1, today - 1).await.unwrap(), 0);
    // Half a second later the bucket has refilled one more: three.
    assert_eq!(debit(&fleet, &limiter, "t", NOON + 500 * MS, 5, 1).await, (Ok(Some(0), Some(93)), 3));

    // The daily share: 60 left, three replicas: at most 10 (60 / 6), then 8 (50 / 6), …; the
    // last five one at a time, and the budget exactly spent.
    assert_eq!(debit(&fleet, &limiter, "d", NOON, 50, 3).await, (Ok(Some(99_990), Some(50)), 10));
    assert_eq!(debit(&fleet, &limiter, "d", NOON, 50, 3).await.1, 8);
    let mut taken = vec![10, 8];
    loop {
        match debit(&fleet, &limiter, "d", NOON, 50, 3).await {
            (Ok(..), n) => taken.push(n),
            (No(limit, _), n) => {
                assert_eq!((limit, n), ("daily_requests", 0));
                break;
            }
        }
    }
    assert_eq!(taken.iter().sum::<i64>(), 60, "{taken:?}");
    assert_eq!(taken[taken.len() - 5..], [1, 1, 1, 1, 1], "{taken:?}");
}

/// Overrides have state of their own and their own limits; a tier reload that changes a
/// tier's limits starts it full, while an unchanged tier keeps its state (§4).
#[tokio::test]
async fn overrides_and_reloaded_tiers_behave_as_locally() {
    let redis = RedisServer::start();
    let tiers =
        "tiers:\n  t: { requests_per_second: 1, burst: 2 }\n  u: { requests_per_second: 1, burst: 2 }\n";
    let (_c, limiter, fleet) = setup(&redis.url(), tiers);
    use Said::*;
    for _ in 0..2 {
        assert!(matches!(at(&fleet, &limiter, "acme", "t", NOON).await, Ok(..)));
        assert!(matches!(at(&fleet, &limiter, "acme", "u", NOON).await, Ok(..)));
    }
    assert_eq!(at(&fleet, &limiter, "acme", "t", NOON).await, No("requests_per_second", 1));

    // Reloaded: t's limits change, u's do not.
    let yaml = "rate_limits:\n  backend: redis\n  redis: { url_env: UNUSED }\n  overrides: { orgs: { vip: { requests_per_second: 100, burst: 100 } } }\ntiers:\n  t: { requests_per_second: 1, burst: 3 }\n  u: { requests_per_second: 1, burst: 2 }\n";
    let config = Config::from_yaml(yaml, "test").unwrap();
    let reloaded = Limiter::from_config(&config, Some(&limiter));
    assert_eq!(at(&fleet, &reloaded, "acme", "t", NOON).await, Ok(Some(2), None), "changed: starts full");
    assert_eq!(
        at(&fleet, &reloaded, "acme", "u", NOON).await,
        No("requests_per_second", 1),
        "unchanged: kept"
    );
    // An organisation's override: its own limits and state, whatever its keys' tier.
    for i in 0..100 {
        assert!(matches!(at(&fleet, &reloaded, "vip", "t", NOON).await, Ok(..)), "vip request {i}");
    }
    assert_eq!(at(&fleet, &reloaded, "vip", "t", NOON).await, No("requests_per_second", 1));
}

/// Three replicas on one Redis with these tiers. The decision timeout is generous: exactness is
/// under test there, not latency, so no decision may fall back.
pub(crate) fn three_replicas(up: &Upstream, redis: &RedisServer, tiers: &str) -> [Tollgate; 3] {
    three_replicas_with(up, redis, tiers, "")
}

/// `three_replicas` with more of `rate_limits.redis` (`, field: value`).
fn three_replicas_with(up: &Upstream, redis: &RedisServer, tiers: &str, redis_extra: &str) -> [Tollgate; 3] {
    let replica = || {
        Tollgate::builder(&up.url())
            .section(
                "rate_limits",
                &format!("{{ backend: redis, redis: {{ url_env: TG_TEST_REDIS_URL, timeout: 500ms{redis_extra} }} }}"),
            )
            .section("tiers", tiers)
            .env("TG_TEST_REDIS_URL", &redis.url())
            .start()
    };
    [replica(), replica(), replica()]
}

/// Three replicas, one limit: what they admit together is what one limiter admits for the
/// same arrivals — the daily budget exactly, the burst exactly (no refill in the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_together_what_one_would() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let replicas = three_replicas(&up, &redis, "{ enterprise: { requests_per_second: 1000 }, burst: { requests_per_second: 1, burst: 10 }, daily: { requests_per_second: 1000, daily_requests: 12 } }");
    let client = h1();
    for (tier, expect) in [("burst", 10), ("daily", 12)] {
        let keys: Vec<String> = replicas
            .iter()
            .map(|tg| tg.create_key(&["--org", tier, "--tier", tier, "--scope", "inference:read"]))
            .collect();
        let started = Instant::now();
        let mut admitted = 0;
        let mut remaining = Vec::new();
        for i in 0..30 {
            let (tg, key) = (&replicas[i % 3], &keys[i % 3]);
            let rsp = send(&client, call(tg, "GET", "/v1/models", key, None)).await;
            if rsp.status() == 200 {
                admitted += 1;
                remaining.push(rsp.headers()["x-ratelimit-remaining-requests"].to_str().unwrap().to_string());
            } else {
                assert_eq!(rsp.status(), 429);
                assert!(rsp.headers().contains_key("retry-after"));
            }
        }
        let elapsed = started.elapsed();
        // The exact model of these arrivals: a burst of 10 refills 1 a second.
        let refill = if tier == "burst" { usize::try_from(elapsed.as_secs()).unwrap() } else { 0 };
        assert!(
            admitted >= expect && admitted <= expect + refill,
            "{tier}: admitted {admitted} of 30 in {elapsed:?} by three replicas; one limiter admits {expect}"
        );
        // The headers count down the fleet's state, not one replica's.
        let counted: Vec<String> = (0..expect).rev().map(|n| n.to_string()).collect();
        if tier == "daily" {
            assert_eq!(remaining, counted, "fleet-wide remaining");
        }
    }
    for tg in &replicas {
        assert!(tg.metric("tollgate_ratelimit_decisions_total{source=\"redis\"}").await.unwrap() > 0.0);
        // Refusals already known (the burst's 1 s wait, the budget's until midnight) were
        // answered without Redis.
        assert!(tg.metric("tollgate_ratelimit_decisions_total{source=\"local_cache\"}").await.unwrap() > 0.0);
        assert_eq!(tg.metric("tollgate_ratelimit_backend_up").await, Some(1.0));
    }
}

/// Redis unreachable (through a relay of the test's own): each tier answers as its
/// `on_store_error` (or `on_error`) says, within the timeout; `local` enforces this replica's
/// share (the tier divided by the two replicas last seen); back, shared limits resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_fails_each_tier_answers_as_configured_and_shared_limits_resume() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let url = format!("redis://{}", relay.addr);
    let replica = || {
        Tollgate::builder(&up.url())
            .section("rate_limits", "{ backend: redis, redis: { url_env: TG_TEST_REDIS_URL, timeout: 100ms, on_error: local } }")
            .section(
                "tiers",
                "{ enterprise: { requests_per_second: 1000 }, local: { requests_per_second: 1000, daily_requests: 10 }, open: { requests_per_second: 1, burst: 1, on_store_error: open }, closed: { requests_per_second: 1000, on_store_error: closed } }",
            )
            .env("TG_TEST_REDIS_URL", &url)
            .start()
    };
    let (a, _b) = (replica(), replica());
    let client = h1();
    let key = |tier: &str| a.create_key(&["--org", tier, "--tier", tier, "--scope", "inference:read"]);
    let (local, open, closed) = (key("local"), key("open"), key("closed"));
    // Each key used once while Redis is up: verified and cached, so what is timed below is the
    // rate-limit decision, not a first Argon2id verification on a loaded machine.
    for k in [&local, &open, &closed] {
        assert_eq!(send(&client, call(&a, "GET", "/v1/models", k, None)).await.status(), 200);
    }
    // Both replicas announced themselves (every second).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    relay.set(Mode::Refuse);
    relay.cut();
    // local: 10 a day shared by 2 replicas → 5 here (the one admitted before is Redis's).
    let mut admitted = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let status = send(&client, call(&a, "GET", "/v1/models", &local, None)).await.status();
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        admitted += usize::from(status == 200);
    }
    assert_eq!(admitted, 5, "this replica's share of the daily budget");
    // open: admitted past its limit (1/s, burst 1).
    for _ in 0..5 {
        assert_eq!(send(&client, call(&a, "GET", "/v1/models", &open, None)).await.status(), 200);
    }
    // closed: 503 `unavailable`, Retry-After 1 (the fault is ours).
    let started = Instant::now();
    let (rsp, body) = send_json(&client, call(&a, "GET", "/v1/models", &closed, None)).await;
    assert_error(&rsp, &body, 503, "unavailable");
    assert_eq!(rsp.headers()["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(a.metric("tollgate_ratelimit_backend_up").await, Some(0.0));
    for source in ["fallback_local", "fallback_open", "fallback_closed"] {
        let n = a.metric(&format!("tollgate_ratelimit_decisions_total{{source=\"{source}\"}}")).await;
        assert!(n.unwrap_or(0.0) > 0.0, "{source}: {n:?}");
    }

    // Back: the breaker's probe finds Redis, and shared limits resume by themselves (open is
    // limited again: 1/s, burst 1).
    relay.set(Mode::Pass);
    let started = Instant::now();
    loop {
        let first = send(&client, call(&a, "GET", "/v1/models", &open, None)).await.status();
        let second = send(&client, call(&a, "GET", "/v1/models", &open, None)).await.status();
        if first == 200 && second == 429 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "shared limits did not resume");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(a.metric("tollgate_ratelimit_backend_up").await, Some(1.0));
    assert!(!a.logs().contains(&url), "the Redis URL is logged");
}

/// A replica against `url` (the Redis URL in its environment), with three tiers answering
/// Redis failures differently.
fn against(up: &Upstream, url: &str, redis_extra: &str) -> Tollgate {
    Tollgate::builder(&up.url())
        .section(
            "rate_limits",
            // 250 ms rather than 20: what is tested is the answer to a failure, not latency on a
            // loaded test machine (where a healthy decision can take longer than 20 ms).
            &format!("{{ backend: redis, redis: {{ url_env: TG_TEST_REDIS_URL, timeout: 250ms{redis_extra} }} }}"),
        )
        .section("tiers", "{ enterprise: { requests_per_second: 1000 }, closed: { requests_per_second: 1000, on_store_error: closed } }")
        .env("TG_TEST_REDIS_URL", url)
        .start()
}

async fn redis_decisions(tg: &Tollgate) -> f64 {
    tg.metric("tollgate_ratelimit_decisions_total{source=\"redis\"}").await.unwrap_or(0.0)
}

/// Password auth and TLS (`rediss://`, a private CA in `ca_file`) work; the password is never
/// logged, and a wrong one is a Redis failure like any other (503 for a `closed` tier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_and_tls_work_and_the_password_is_never_logged() {
    let up = Upstream::start().await;
    let client = h1();
    let redis = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let tg = against(&up, &format!("redis://:s3cret-pw@127.0.0.1:{}", redis.port), "");
    let key = tg.create_key(&["--org", "acme", "--tier", "closed", "--scope", "inference:read"]);
    assert_eq!(send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status(), 200);
    assert!(redis_decisions(&tg).await >= 1.0);
    let wrong = against(&up, &format!("redis://:wrong-pw@127.0.0.1:{}", redis.port), "");
    let key = wrong.create_key(&["--org", "acme", "--tier", "closed", "--scope", "inference:read"]);
    let (rsp, body) = send_json(&client, call(&wrong, "GET", "/v1/models", &key, None)).await;
    assert_error(&rsp, &body, 503, "unavailable");
    for t in [&tg, &wrong] {
        let logs = t.logs();
        assert!(!logs.contains("s3cret-pw") && !logs.contains("wrong-pw"), "a password is logged");
    }

    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key_file, ck.key_pair.serialize_pem()).unwrap();
    let tls = RedisServer::start_with(&[
        "--tls-port",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key_file.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]);
    let tg = against(
        &up,
        &format!("rediss://localhost:{}", tls.port),
        &format!(", ca_file: \"{}\"", cert.display()),
    );
    let key = tg.create_key(&["--org", "acme", "--tier", "closed", "--scope", "inference:read"]);
    assert_eq!(
        send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status(),
        200,
        "{}",
        tg.logs()
    );
    assert!(redis_decisions(&tg).await >= 1.0, "decided by Redis over TLS");
    // Without the CA, the server's certificate is not trusted: a failure, not a silent pass.
    let untrusted = against(&up, &format!("rediss://localhost:{}", tls.port), "");
    let key = untrusted.create_key(&["--org", "acme", "--tier", "closed", "--scope", "inference:read"]);
    let (rsp, body) = send_json(&client, call(&untrusted, "GET", "/v1/models", &key, None)).await;
    assert_error(&rsp, &body, 503, "unavailable");
}

/// Redis slower than the timeout (`DEBUG SLEEP`), then refusing writes while `PING` still
/// answers (`CLIENT PAUSE … WRITE`): every decision comes within the timeout (plus margin) as
/// `on_store_error` says, the breaker's probe is the decision script (so a live `PING` does
/// not end the fallback early), and shared limits resume by themselves after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_write_paused_redis_gets_the_fallback_within_the_timeout() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let tg = against(&up, &redis.url(), "");
    let client = h1();
    let key = tg.create_key(&["--org", "acme", "--tier", "closed", "--scope", "inference:read"]);
    assert_eq!(send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status(), 200);

    for fault in [&["DEBUG", "SLEEP", "2"][..], &["CLIENT", "PAUSE", "2000", "WRITE"][..]] {
        let port = redis.port;
        let args: Vec<String> = fault.iter().map(|a| a.to_string()).collect();
        let cli = std::thread::spawn(move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(&args)
                .output()
                .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        if fault[0] == "CLIENT" {
            assert_eq!(redis.cli(&["PING"]), "PONG", "PING answers while writes are paused");
        }
        for _ in 0..5 {
            let started = Instant::now();
            let (rsp, body) = send_json(&client, call(&tg, "GET", "/v1/models", &key, None)).await;
            assert_error(&rsp, &body, 503, "unavailable");
            // 20 ms of timeout; the margin is for a loaded machine (the fault lasts 2 s).
            assert!(started.elapsed() < Duration::from_secs(1), "{fault:?}: {:?}", started.elapsed());
        }
        cli.join().unwrap();
        let before = redis_decisions(&tg).await;
        let started = Instant::now();
        while send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status() != 200 {
            assert!(started.elapsed() < Duration::from_secs(10), "{fault:?}: shared limits did not resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(redis_decisions(&tg).await > before, "{fault:?}: decided by Redis again");
    }
}

/// Redis killed mid-run, then started again (empty) on its port: every request is answered
/// within the timeout plus margin as `on_store_error` says, and shared limits resume by
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_gets_the_fallback_and_shared_limits_resume_when_it_is_back() {
    let up = Upstream::start().await;
    let mut redis = RedisServer::start();
    let tg = against(&up, &redis.url(), "");
    let client = h1();
    let key = tg.create_key(&["--org", "acme", "--tier", "closed", "--scope", "inference:read"]);
    assert_eq!(send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status(), 200);
    redis.kill();
    for _ in 0..10 {
        let started = Instant::now();
        let (rsp, body) = send_json(&client, call(&tg, "GET", "/v1/models", &key, None)).await;
        assert_error(&rsp, &body, 503, "unavailable");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }
    redis.restart();
    let before = redis_decisions(&tg).await;
    let started = Instant::now();
    while send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status() != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "shared limits did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(redis_decisions(&tg).await > before);
}

/// The exact GCRA of §4 over `arrivals` (offsets from the first): how many one limiter admits.
fn exact_gcra(arrivals: &mut [Duration], rps: u32, burst: u32) -> usize {
    arrivals.sort();
    let t = Duration::from_secs(1) / rps;
    let mut tat = Duration::ZERO;
    let mut admitted = 0;
    for &a in arrivals.iter() {
        let next = tat.max(a) + t;
        if next <= a + t * burst {
            tat = next;
            admitted += 1;
        }
    }
    admitted
}

/// Fleet accuracy: three replicas on one Redis, one organisation at 50/s with a burst of 100,
/// three clients at about three times that for 20 s: together they admit what one exact GCRA
/// admits for the same arrivals, within 2 %; a daily budget of 500 across the three admits
/// exactly 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_at_three_times_the_limit_admit_what_one_exact_gcra_would() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let replicas = three_replicas(&up, &redis, "{ enterprise: { requests_per_second: 1000 }, acc: { requests_per_second: 50, burst: 100 }, day: { requests_per_second: 100000, daily_requests: 500 } }");
    let keys: Vec<String> = replicas
        .iter()
        .map(|tg| tg.create_key(&["--org", "acme", "--tier", "acc", "--scope", "inference:read"]))
        .collect();
    // Each key used once (cached) and the bucket given time to be full again.
    let client = h1();
    for (tg, k) in replicas.iter().zip(&keys) {
        send(&client, call(tg, "GET", "/v1/models", k, None)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let start = Instant::now();
    let run = |i: usize| {
        let (tg, key, client) = (&replicas[i], keys[i].clone(), h1());
        async move {
            let mut arrivals = Vec::new();
            let mut admitted = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while start.elapsed() < Duration::from_secs(20) {
                tick.tick().await;
                let sent = start.elapsed();
                let status = send(&client, call(tg, "GET", "/v1/models", &key, None)).await.status();
                if status == 200 {
                    admitted += 1;
                } else {
                    assert_eq!(status, 429);
                }
                arrivals.push(sent);
            }
            (arrivals, admitted)
        }
    };
    let ((a0, n0), (a1, n1), (a2, n2)) = tokio::join!(run(0), run(1), run(2));
    let mut arrivals: Vec<Duration> = [a0, a1, a2].concat();
    let offered = arrivals.len();
    let admitted = n0 + n1 + n2;
    let exact = exact_gcra(&mut arrivals, 50, 100);
    let error = (admitted as f64 - exact as f64) / exact as f64;
    eprintln!("fleet accuracy: {offered} offered in 20 s, {admitted} admitted by three replicas, an exact GCRA admits {exact}: {:+.2} %", error * 100.0);
    assert!(error.abs() <= 0.02, "admitted {admitted}, exact {exact}");

    // The daily budget: 3 × 250 requests, 500 admitted exactly.
    let keys: Vec<String> = replicas
        .iter()
        .map(|tg| tg.create_key(&["--org", "daily", "--tier", "day", "--scope", "inference:read"]))
        .collect();
    let burst = |i: usize| {
        let (tg, key, client) = (&replicas[i], keys[i].clone(), h1());
        async move {
            let mut admitted = 0;
            for _ in 0..250 {
                admitted += usize::from(
                    send(&client, call(tg, "GET", "/v1/models", &key, None)).await.status() == 200,
                );
            }
            admitted
        }
    };
    let (d0, d1, d2) = tokio::join!(burst(0), burst(1), burst(2));
    assert_eq!(d0 + d1 + d2, 500, "{d0} + {d1} + {d2}");
}

/// Debited leases (`debit_requests: 16`, `debit_within: 50ms`: long enough for a loaded CI
/// machine's one-request-at-a-time clients to use a lease before it ends) on three replicas: a busy entity
/// asks Redis for a fraction of its requests; three clients flat out at a 200/s tier admit what
/// one exact GCRA admits for the same arrivals within 2 %, never more than
/// `burst + rate × (window + debit_within)`; a daily budget of 500 is never exceeded, and what
/// leases did not use comes back to it (exactly 500 in the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debited_leases_ask_redis_less_and_keep_the_fleet_within_its_limits() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let replicas = three_replicas_with(
        &up,
        &redis,
        "{ enterprise: { requests_per_second: 1000 }, big: { requests_per_second: 100000 }, acc: { requests_per_second: 200, burst: 100 }, day: { requests_per_second: 100000, daily_requests: 500 } }",
        ", debit_requests: 16, debit_within: 50ms",
    );
    let keys = |tier: &str| -> Vec<String> {
        replicas
            .iter()
            .map(|tg| tg.create_key(&["--org", tier, "--tier", tier, "--scope", "inference:read"]))
            .collect()
    };
    let (big, acc, day) = (keys("big"), keys("acc"), keys("day"));
    let client = h1();
    for (tg, k) in replicas.iter().zip(acc.iter().chain(&big).chain(&day)) {
        send(&client, call(tg, "GET", "/v1/models", k, None)).await;
    }
    let decisions = |source: &'static str| {
        let replicas = &replicas;
        async move {
            let mut n = 0.0;
            for tg in replicas {
                n += tg
                    .metric(&format!("tollgate_ratelimit_decisions_total{{source=\"{source}\"}}"))
                    .await
                    .unwrap_or(0.0);
            }
            n
        }
    };

    // A busy entity that is never limited: most requests come from leases, and Redis round
    // trips (decisions and refills ahead, as the backend's duration histogram counts them) are
    // a fraction of the requests.
    let trips = || {
        let replicas = &replicas;
        async move {
            let mut n = 0.0;
            for tg in replicas {
                n += tg.metric("tollgate_ratelimit_backend_duration_seconds_count").await.unwrap_or(0.0);
            }
            n
        }
    };
    let (trips_before, debit_before) = (trips().await, decisions("debit").await);
    let flat_out = |i: usize, keys: &[String], n: usize| {
        let (tg, key, client) = (&replicas[i], keys[i].clone(), h1());
        async move {
            let mut admitted = 0;
            for _ in 0..n {
                admitted += usize::from(
                    send(&client, call(tg, "GET", "/v1/models", &key, None)).await.status() == 200,
                );
            }
            admitted
        }
    };
    let (a, b, c) = tokio::join!(flat_out(0, &big, 300), flat_out(1, &big, 300), flat_out(2, &big, 300));
    assert_eq!(a + b + c, 900);
    let asked = trips().await - trips_before;
    let leased = decisions("debit").await - debit_before;
    eprintln!("debited leases: 900 requests, {asked} Redis round trips, {leased} admitted from leases");
    assert!(
        leased >= 900.0 * 0.75 && asked <= 900.0 / 4.0,
        "{asked} Redis round trips, {leased} from leases"
    );

    // Accuracy under three times and more the limit, for 5 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let run = |i: usize| {
        let (tg, key, client) = (&replicas[i], acc[i].clone(), h1());
        async move {
            let mut arrivals = Vec::new();
            let mut admitted = 0usize;
            while start.elapsed() < Duration::from_secs(5) {
                let sent = start.elapsed();
                let status = send(&client, call(tg, "GET", "/v1/models", &key, None)).await.status();
                if status == 200 {
                    admitted += 1;
                } else {
                    assert_eq!(status, 429);
                }
                arrivals.push(sent);
            }
            (arrivals, admitted)
        }
    };
    let ((a0, n0), (a1, n1), (a2, n2)) = tokio::join!(run(0), run(1), run(2));
    let mut arrivals: Vec<Duration> = [a0, a1, a2].concat();
    let window = arrivals.iter().max().copied().unwrap_or_default();
    let (offered, admitted) = (arrivals.len(), n0 + n1 + n2);
    let exact = exact_gcra(&mut arrivals, 200, 100);
    let bound = 100.0 + 200.0 * (window.as_secs_f64() + 0.050);
    let error = (admitted as f64 - exact as f64) / exact as f64;
    eprintln!("debited fleet accuracy: {offered} offered in {window:?}, {admitted} admitted, exact GCRA {exact} ({:+.2} %), bound {bound:.0}", error * 100.0);
    assert!(
        error.abs() <= 0.02 && admitted as f64 <= bound + 1.0,
        "admitted {admitted}, exact {exact}, bound {bound:.0}"
    );

    // The daily budget: never more than 500; what leases did not use comes back.
    let (a, b, c) = tokio::join!(flat_out(0, &day, 250), flat_out(1, &day, 250), flat_out(2, &day, 250));
    let first = a + b + c;
    assert!(first <= 500, "{a} + {b} + {c}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (a, b, c) = tokio::join!(flat_out(0, &day, 50), flat_out(1, &day, 50), flat_out(2, &day, 50));
    assert_eq!(first + a + b + c, 500, "{first}, then {a} + {b} + {c}");
}
