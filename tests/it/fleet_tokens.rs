//! Fleet mode with LLM limits (§11, §12): token reservations and concurrency slots shared by
//! every replica in a `redis-server` of the test's own. First the scripts' arithmetic at fixed
//! times, then replicas as users run them: one token budget, one set of slots, and the slots of
//! a replica that dies coming back when their leases run out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use tollgate::limits::redis::Fleet;
use tollgate::limits::Limiter;

use crate::fleet_limits::{setup, three_replicas, MIDNIGHT, MS, NOON};
use crate::harness::*;
use crate::redis_server::RedisServer;
use crate::relay::Relay;
use crate::tokens::stream;
use crate::upstream::Upstream;

/// What one LLM decision said: admitted with the tokens left (`x-ratelimit-remaining-tokens`),
/// or refused by a limit with its Retry-After and whether SDKs should retry.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    Yes(Option<u64>),
    No(&'static str, u64),
}
use Said::*;

async fn llm(
    fleet: &Fleet,
    limiter: &Limiter,
    org: &str,
    tier: &str,
    now: i64,
    tokens: Option<u64>,
    lease: &str,
) -> Said {
    let org: Arc<str> = org.into();
    match fleet.decide_at(limiter, &org, tier, now, Some((tokens, lease))).await.unwrap() {
        Ok(q) => {
            let mut h = http::HeaderMap::new();
            q.write_headers(&mut h);
            Yes(h.get("x-ratelimit-remaining-tokens").map(|v| v.to_str().unwrap().parse().unwrap()))
        }
        Err(r) => {
            let tollgate::error::Error::RateLimited { retry_after, limit, .. } = r.error else {
                panic!("not a 429: {:?}", r.error)
            };
            No(limit.label(), retry_after)
        }
    }
}

async fn settle(
    fleet: &Fleet,
    limiter: &Limiter,
    org: &str,
    tier: &str,
    now: i64,
    held: (Option<u64>, &str),
    used: u64,
) -> (i64, i64) {
    fleet.settle_at(limiter, &org.into(), tier, now, held, used).await.unwrap()
}

const SECOND: i64 = 1_000 * MS;

#[tokio::test]
async fn the_shared_token_bucket_refills_goes_into_debt_and_a_refusal_takes_nothing() {
    let redis = RedisServer::start();
    let (_c, l, f) = setup(
        &redis.url(),
        "tiers:\n  t: { tokens_per_minute: 600 }\n  hundred: { tokens_per_minute: 100 }\n",
    );
    // 600 a minute: 10 tokens a second.
    assert_eq!(llm(&f, &l, "a", "t", NOON, Some(600), "l1").await, Yes(Some(0)));
    // 1 s later 10 are back: 11 is refused (for the 100 ms the missing one takes: Retry-After 1),
    // and that refusal took nothing — 10 still pass, then nothing.
    assert_eq!(llm(&f, &l, "a", "t", NOON + SECOND, Some(11), "l2").await, No("tokens_per_minute", 1));
    assert_eq!(llm(&f, &l, "a", "t", NOON + SECOND, Some(10), "l3").await, Yes(Some(0)));
    assert_eq!(llm(&f, &l, "a", "t", NOON + SECOND, Some(1), "l4").await, No("tokens_per_minute", 1));
    // The usage replaces the reservation: 10 reserved, 700 used: 690 in debt (and 1300 used
    // today), refused until 69.1 s of refill have paid it and one more token.
    assert_eq!(settle(&f, &l, "a", "t", NOON + SECOND, (Some(10), "l3"), 700).await, (-690, 1300));
    assert_eq!(llm(&f, &l, "a", "t", NOON + SECOND, Some(1), "l5").await, No("tokens_per_minute", 70));
    assert_eq!(
        llm(&f, &l, "a", "t", NOON + SECOND + 69_099 * MS, Some(1), "l6").await,
        No("tokens_per_minute", 1)
    );
    assert_eq!(llm(&f, &l, "a", "t", NOON + SECOND + 69_100 * MS, Some(1), "l7").await, Yes(Some(0)));
    // Less used than reserved gives the rest back, never past the capacity.
    assert_eq!(llm(&f, &l, "b", "t", NOON, Some(500), "m1").await, Yes(Some(100)));
    assert_eq!(settle(&f, &l, "b", "t", NOON, (Some(500), "m1"), 20).await, (580, 20));
    // Five concurrent requests of 175 tokens on 100 a minute: each reserves the whole bucket
    // (clamped), exactly one is admitted.
    let mut admitted = 0;
    for i in 0..5 {
        if matches!(llm(&f, &l, "c", "hundred", NOON, Some(175), &format!("c{i}")).await, Yes(_)) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 1);
}

#[tokio::test]
async fn the_shared_daily_token_budget_resets_at_midnight_and_a_refund_counts() {
    let redis = RedisServer::start();
    let (_c, l, f) = setup(&redis.url(), "tiers:\n  d: { daily_tokens: 1000 }\n");
    assert_eq!(llm(&f, &l, "a", "d", MIDNIGHT - SECOND, Some(900), "l1").await, Yes(Some(100)));
    assert_eq!(llm(&f, &l, "a", "d", MIDNIGHT - SECOND, Some(101), "l2").await, No("daily_tokens", 1));
    // Refunded (failed before any byte): the 900 are back.
    assert_eq!(settle(&f, &l, "a", "d", MIDNIGHT - SECOND / 2, (Some(900), "l1"), 0).await.1, 0);
    assert_eq!(llm(&f, &l, "a", "d", MIDNIGHT - SECOND / 2, Some(1000), "l3").await, Yes(Some(0)));
    assert_eq!(llm(&f, &l, "a", "d", MIDNIGHT - 1, Some(1), "l4").await, No("daily_tokens", 1));
    assert_eq!(llm(&f, &l, "a", "d", MIDNIGHT, Some(1), "l5").await, Yes(Some(999)), "reset at 00:00 UTC");
    // Yesterday's reservation of 1000 settled today at 1200: today is charged the 200 beyond it.
    assert_eq!(settle(&f, &l, "a", "d", MIDNIGHT + MS, (Some(1000), "l3"), 1200).await.1, 201);
}

#[tokio::test]
async fn tokens_slots_and_requests_are_one_decision_all_or_nothing() {
    let redis = RedisServer::start();
    let (_c, l, f) = setup(
        &redis.url(),
        "tiers:\n  t: { requests_per_second: 1, burst: 2, daily_requests: 3, tokens_per_minute: 100, max_concurrent_requests: 2 }\n",
    );
    // 100 tokens: the first request takes them all; the second is refused by the tokens and so
    // takes no request from the burst, no slot: a request that reserves nothing passes after.
    assert_eq!(llm(&f, &l, "a", "t", NOON, Some(100), "l1").await, Yes(Some(0)));
    assert_eq!(llm(&f, &l, "a", "t", NOON, Some(1), "l2").await, No("tokens_per_minute", 1));
    assert_eq!(llm(&f, &l, "a", "t", NOON, None, "l3").await, Yes(None));
    // Two slots held (l1, l3): a third is refused first, whatever else.
    assert_eq!(llm(&f, &l, "a", "t", NOON + 5 * SECOND, None, "l4").await, No("concurrent_requests", 1));
    settle(&f, &l, "a", "t", NOON + 5 * SECOND, (None, "l3"), 0).await;
    // A slot is free, the burst has refilled, 5 s brought 8.33 tokens: 5 are reserved, the
    // daily budget (3) is now used up.
    assert_eq!(llm(&f, &l, "a", "t", NOON + 5 * SECOND, Some(5), "l5").await, Yes(Some(3)));
    settle(&f, &l, "a", "t", NOON + 5 * SECOND, (Some(5), "l5"), 5).await;
    // Refused by the daily request budget: the token it would reserve stays in the bucket —
    // 3.33 + 1.67 refilled = 5 (a settlement of nothing reads the bucket).
    assert_eq!(llm(&f, &l, "a", "t", NOON + 6 * SECOND, Some(1), "l6").await, No("daily_requests", 43_194));
    assert_eq!(settle(&f, &l, "a", "t", NOON + 6 * SECOND, (Some(0), "none"), 0).await.0, 5);
    let after = llm(&f, &l, "b", "t", NOON + 6 * SECOND, Some(1), "other").await;
    assert_eq!(after, Yes(Some(99)), "another organisation's state is its own");
}

#[tokio::test]
async fn a_lease_that_is_not_renewed_runs_out_and_gives_its_slot_back() {
    let redis = RedisServer::start();
    let (_c, l, f) = setup(&redis.url(), "tiers:\n  two: { max_concurrent_requests: 2 }\n");
    assert_eq!(llm(&f, &l, "a", "two", NOON, None, "a").await, Yes(None));
    assert_eq!(llm(&f, &l, "a", "two", NOON, None, "b").await, Yes(None));
    assert_eq!(llm(&f, &l, "a", "two", NOON, None, "c").await, No("concurrent_requests", 1));
    // Released: exactly one place again.
    settle(&f, &l, "a", "two", NOON, (None, "a"), 0).await;
    assert_eq!(llm(&f, &l, "a", "two", NOON, None, "d").await, Yes(None));
    assert_eq!(llm(&f, &l, "a", "two", NOON, None, "e").await, No("concurrent_requests", 1));
    // Nobody renewed b and d (their replica died): after the lease (30 s by default) they are gone.
    assert_eq!(
        llm(&f, &l, "a", "two", NOON + 30 * SECOND - MS, None, "f").await,
        No("concurrent_requests", 1)
    );
    assert_eq!(llm(&f, &l, "a", "two", NOON + 30 * SECOND, None, "g").await, Yes(None));
    assert_eq!(llm(&f, &l, "a", "two", NOON + 30 * SECOND, None, "h").await, Yes(None));
}

fn chat(tg: &Tollgate, key: &str) -> http::Request<Full<bytes::Bytes>> {
    post_json(&tg.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("x-mock", "openai")
        .body(Full::from(r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#))
        .unwrap()
}

const TIERS: &str = "{ enterprise: { requests_per_second: 1000 }, tok: { requests_per_second: 1000, daily_tokens: 200 }, four: { requests_per_second: 1000, tokens_per_minute: 100000, max_concurrent_requests: 4 } }";

/// Three replicas spend one daily token budget: each response's remaining tokens count what
/// every replica's requests used (11 each, the upstream's usage), and the budget refuses at
/// exactly the request one budget would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_spend_one_token_budget() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let replicas = three_replicas(&up, &redis, TIERS);
    let keys: Vec<String> = replicas
        .iter()
        .map(|tg| tg.create_key(&["--org", "acme", "--tier", "tok", "--scope", "inference:write"]))
        .collect();
    let client = h1();
    let mut remaining = Vec::new();
    let mut refused_at = None;
    for i in 0..30 {
        let rsp = send(&client, chat(&replicas[i % 3], &keys[i % 3])).await;
        if rsp.status() == 429 {
            let body: serde_json::Value =
                serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!(body["error"]["details"]["limit"], "daily_tokens", "{body}");
            refused_at = Some(i);
            break;
        }
        assert_eq!(rsp.status(), 200);
        let left: u64 = rsp.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
        rsp.into_body().collect().await.unwrap();
        remaining.push(left);
        // No wait: a response ends once the fleet has settled it.
    }
    // Each request reserves the same estimate and then uses 11: what each sees left falls by 11.
    let estimate = 200 - remaining[0];
    for w in remaining.windows(2) {
        assert_eq!(w[0] - w[1], 11, "fleet-wide: {remaining:?}");
    }
    // Admitted while what is left covers the estimate: k requests used 11 k.
    let expect = (0..).take_while(|k| 200 - 11 * k >= estimate).count();
    assert_eq!(refused_at, Some(expect), "estimate {estimate}, seen {remaining:?}");
}

/// Ten concurrent streams over three replicas with four slots: exactly four run fleet-wide; when
/// one ends another is admitted (on any replica); a client that leaves frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_four_slots() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let replicas = three_replicas(&up, &redis, TIERS);
    let keys: Vec<String> = replicas
        .iter()
        .map(|tg| tg.create_key(&["--org", "acme", "--tier", "four", "--scope", "inference:write"]))
        .collect();
    let client = h1();
    let mut running = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        // The first ends first, once the ten are sent: 3 s, generous on a loaded machine (at
        // 0.5 s, a busy CI machine once took longer to send them, and a fifth was admitted).
        let events = if i == 0 { 30 } else { 300 };
        let rsp = send(&client, stream(&replicas[i % 3], &keys[i % 3], events, 100, &[])).await;
        if rsp.status() == 200 {
            running.push(rsp);
        } else {
            assert_eq!(rsp.status(), 429);
            let body: serde_json::Value =
                serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!(body["error"]["details"]["limit"], "concurrent_requests", "{body}");
            refused += 1;
        }
    }
    assert_eq!((running.len(), refused), (4, 6), "four slots for the fleet, not per replica");
    let mut gauges = 0.0;
    for tg in &replicas {
        gauges += tg.metric("tollgate_concurrent_requests{tier=\"four\"}").await.unwrap_or(0.0);
    }
    assert_eq!(gauges, 4.0, "each replica's gauge counts its own");
    // The first stream (on replica 0) ends: exactly one more is admitted, on replica 1.
    let first = running.remove(0);
    first.into_body().collect().await.unwrap();
    let again = wait_free(&client, &replicas[1], &keys[1]).await;
    assert_eq!(send(&client, stream(&replicas[2], &keys[2], 2, 10, &[])).await.status(), 429);
    // A client leaves mid-stream on replica 2's side or any: its slot is free again.
    drop(running.pop());
    let replaced = wait_free(&client, &replicas[2], &keys[2]).await;
    assert_eq!(send(&client, stream(&replicas[0], &keys[0], 2, 10, &[])).await.status(), 429);
    drop((again, replaced, running));
}

/// A long stream once a slot is free (within 5 s).
async fn wait_free(client: &TestClient, tg: &Tollgate, key: &str) -> http::Response<hyper::body::Incoming> {
    let started = Instant::now();
    loop {
        let rsp = send(client, stream(tg, key, 300, 100, &[])).await;
        if rsp.status() == 200 {
            return rsp;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no slot came free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stream longer than the lease keeps its slot (renewed); the replica killed mid-stream
/// cannot give it back, and the lease running out does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_slots_come_back_when_their_leases_run_out() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let replica = || {
        Tollgate::builder(&up.url())
            .section(
                "rate_limits",
                "{ backend: redis, redis: { url_env: TG_TEST_REDIS_URL, timeout: 500ms, concurrency_lease: 1s } }",
            )
            .section("tiers", "{ enterprise: { requests_per_second: 1000 }, one: { requests_per_second: 1000, max_concurrent_requests: 1 } }")
            .env("TG_TEST_REDIS_URL", &redis.url())
            .start()
    };
    let (a, b) = (replica(), replica());
    // Each replica has a store of its own here; the slots are the organisation's.
    let key = a.create_key(&["--org", "acme", "--tier", "one", "--scope", "inference:write"]);
    let key_b = b.create_key(&["--org", "acme", "--tier", "one", "--scope", "inference:write"]);
    let client = h1();
    let held = send(&client, stream(&a, &key, 100, 100, &[])).await;
    assert_eq!(held.status(), 200);
    // Three lease lifetimes later the stream still holds the only slot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(send(&client, stream(&b, &key_b, 2, 10, &[])).await.status(), 429, "renewed while it runs");
    drop(a);
    drop(held);
    let started = Instant::now();
    loop {
        let rsp = send(&client, stream(&b, &key_b, 2, 10, &[])).await;
        if rsp.status() == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(6), "the dead replica's slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A response's last bytes leave tollgate only once the fleet has settled it: a client that
/// goes to another replica as soon as it has the whole response — a stream, or a JSON body of
/// known length — finds its slot free and its unused tokens back, even when the settlement
/// takes long to reach Redis (150 ms here, on the way there only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_ends_only_once_the_fleet_has_settled_it() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let replica = |url: String| {
        Tollgate::builder(&up.url())
            .section("rate_limits", "{ backend: redis, redis: { url_env: TG_TEST_REDIS_URL, timeout: 3s } }")
            .section(
                "tiers",
                "{ enterprise: { requests_per_second: 1000 }, one: { requests_per_second: 1000, tokens_per_minute: 100, max_concurrent_requests: 1 } }",
            )
            .env("TG_TEST_REDIS_URL", &url)
            .start()
    };
    let (slow, direct) = (replica(format!("redis://{}", relay.addr)), replica(redis.url()));
    let key = slow.create_key(&["--org", "acme", "--tier", "one", "--scope", "inference:write"]);
    let other = direct.create_key(&["--org", "acme", "--tier", "one", "--scope", "inference:write"]);
    let client = h1();
    relay.delay_to_server(Duration::from_millis(150));
    for shape in ["stream", "json"] {
        // A stream reserves all 100 tokens of the minute and uses 11: unless the rest comes
        // back before the next request, that one is refused for its tokens as well as for the
        // only slot.
        let req = if shape == "stream" { stream(&slow, &key, 2, 10, &[]) } else { chat(&slow, &key) };
        let rsp = send(&client, req).await;
        assert_eq!(rsp.status(), 200, "{shape}");
        let started = Instant::now();
        rsp.into_body().collect().await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(120),
            "{shape}: the end did not wait for the settlement"
        );
        let next = send(&client, chat(&direct, &other)).await;
        let status = next.status();
        let body =
            String::from_utf8_lossy(&next.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_eq!(status, 200, "{shape}: the next request, on another replica: {body}");
    }
}

/// The official SDK's token test (identical streams with and without tollgate, a token 429 that
/// `RateLimitError` reports and a retry honours) with the tokens in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_meets_the_same_token_limits_with_redis() {
    let python = crate::sdk::python_with_openai();
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let tg = Tollgate::builder(&up.url())
        .section("rate_limits", "{ backend: redis, redis: { url_env: TG_TEST_REDIS_URL, timeout: 500ms } }")
        .section("tiers", crate::tokens::TIERS)
        .env("TG_TEST_REDIS_URL", &redis.url())
        .start();
    let scopes = ["--scope", "inference:read", "--scope", "inference:write"];
    let key = tg.create_key(&[&["--org", "acme", "--tier", "tok"][..], &scopes].concat());
    let tiny = tg.create_key(&[&["--org", "tinyco", "--tier", "tiny"][..], &scopes].concat());
    let (proxied, direct) = (format!("http://{}", tg.addr), up.url());
    tokio::task::spawn_blocking(move || {
        crate::sdk::run_script(&python, "openai_tokens.py", &[&proxied, &direct, &key, &tiny])
    })
    .await
    .unwrap();
    assert!(tg.metric("tollgate_ratelimit_settlements_total{outcome=\"ok\"}").await.unwrap() > 0.0);
    let fell_back = tg.metric("tollgate_ratelimit_decisions_total{source=\"fallback_local\"}").await;
    assert_eq!(fell_back.unwrap_or(0.0), 0.0, "every decision was Redis's");
}
