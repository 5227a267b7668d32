//! Rate limits end to end (§4): bursts, shared organisation budgets, headers, reload, and the
//! official SDK's retry honouring `Retry-After`. The arithmetic itself is tested exactly with a
//! fake clock in `src/ratelimit/tests.rs`; here a 1 request/s refill keeps timing out of the way.

use std::time::Duration;

use http_body_util::Full;

use crate::harness::*;
use crate::upstream::Upstream;

const TIERS: &str = "{ enterprise: { requests_per_second: 1000, burst: 4000 }, slow: { requests_per_second: 1, burst: 10 }, daily: { daily_requests: 3 }, kept: { daily_requests: 10 }, changed: { daily_requests: 2 } }";

fn with(tg: &Tollgate, key: &str) -> http::Request<Full<bytes::Bytes>> {
    get(&tg.url("/v1/models")).header("authorization", format!("Bearer {key}")).body(Full::default()).unwrap()
}

#[tokio::test]
async fn a_concurrent_burst_admits_the_burst_and_refuses_the_rest_with_headers() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("tiers", TIERS).start();
    let key = tg.create_key(&["--org", "acme", "--tier", "slow", "--scope", "inference:read"]);
    // Warm the key first, so that the burst is not spread out by one Argon2 verification.
    let first = send(&h1(), with(&tg, &key)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "10");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "9");
    assert_eq!(first.headers()["ratelimit-policy"], "\"requests_per_second\";q=10;w=10");

    let client = h2c();
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (client, req) = (client.clone(), with(&tg, &key));
        tasks.push(tokio::spawn(async move { send_json(&client, req).await }));
    }
    let mut admitted = 1;
    let mut refused = Vec::new();
    for t in tasks {
        let (rsp, body) = t.await.unwrap();
        match rsp.status().as_u16() {
            200 => admitted += 1,
            429 => refused.push((rsp, body)),
            s => panic!("unexpected status {s}"),
        }
    }
    // 10 at once; an 11th only if the run took over a second (1 request/s refill).
    assert!((10..=11).contains(&admitted), "admitted {admitted}");
    assert_eq!(up.requests().len(), admitted, "a refused request reached the upstream");
    let (rsp, body) = &refused[0];
    assert_error(rsp, body, 429, "rate_limited");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["details"]["limit"], "requests_per_second");
    assert_eq!(body["error"]["details"]["tier"], "slow");
    assert_eq!(body["error"]["details"]["retry_after_seconds"], 1);
    assert_eq!(rsp.headers()["retry-after"], "1");
    assert!(rsp.headers().get("x-should-retry").is_none());
    assert_eq!(rsp.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(rsp.headers()["ratelimit"].to_str().unwrap().starts_with("\"requests_per_second\";r=0;t="));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused_count =
        tg.metric("tollgate_rate_limited_total{limit=\"requests_per_second\",tier=\"slow\"}").await;
    assert_eq!(refused_count, Some(refused.len() as f64));
}

#[tokio::test]
async fn keys_of_one_organisation_share_its_daily_budget() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("tiers", TIERS).start();
    let a = tg.create_key(&["--org", "acme", "--tier", "daily", "--scope", "inference:read"]);
    let b = tg.create_key(&["--org", "acme", "--tier", "daily", "--scope", "inference:read"]);
    let other = tg.create_key(&["--org", "globex", "--tier", "daily", "--scope", "inference:read"]);
    let client = h1();
    assert_eq!(send(&client, with(&tg, &a)).await.status(), 200);
    assert_eq!(send(&client, with(&tg, &b)).await.status(), 200);
    let third = send(&client, with(&tg, &a)).await;
    assert_eq!(third.status(), 200);
    assert_eq!(third.headers()["x-ratelimit-remaining-requests"], "0");
    let (rsp, body) = send_json(&client, with(&tg, &b)).await;
    assert_error(&rsp, &body, 429, "rate_limited");
    assert_eq!(body["error"]["details"]["limit"], "daily_requests");
    assert_eq!(rsp.headers()["x-should-retry"], "false");
    let retry: u64 = rsp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert_eq!(send(&client, with(&tg, &other)).await.status(), 200, "another organisation was limited");
}

/// Daily budgets, which cannot refill during the test: the outcome does not depend on how long
/// the reload takes. (A 1/s refill raced the reload poll and failed on a loaded machine.)
#[tokio::test]
async fn a_reload_changing_one_tier_keeps_the_state_of_the_others() {
    let up = Upstream::start().await;
    let builder = Tollgate::builder(&up.url()).section("tiers", TIERS);
    let tg = builder.start();
    let kept = tg.create_key(&["--org", "acme", "--tier", "kept", "--scope", "inference:read"]);
    let changed = tg.create_key(&["--org", "acme", "--tier", "changed", "--scope", "inference:read"]);
    let client = h1();
    let exhaust = |key: String| {
        let (client, tg_url) = (client.clone(), tg.url("/v1/models"));
        async move {
            let mut n = 0;
            loop {
                let req = get(&tg_url).header("authorization", format!("Bearer {key}")).body(Full::default());
                if send(&client, req.unwrap()).await.status() == 429 {
                    return n;
                }
                n += 1;
            }
        }
    };
    assert_eq!(exhaust(kept.clone()).await, 10);
    assert_eq!(exhaust(changed.clone()).await, 2);

    let config = std::fs::read_to_string(&tg.config).unwrap();
    let edited = config.replace("changed: { daily_requests: 2 }", "changed: { daily_requests: 50 }");
    assert_ne!(config, edited);
    std::fs::write(&tg.config, edited).unwrap();
    assert!(tg.wait_log("config reloaded", Duration::from_secs(10)).await);
    assert_eq!(send(&client, with(&tg, &kept)).await.status(), 429, "the unchanged tier lost its state");
    assert_eq!(exhaust(changed).await, 50, "the changed tier starts with its new, full budget");
}

#[tokio::test]
async fn the_openai_sdk_raises_rate_limit_error_and_its_retry_succeeds() {
    let python = crate::sdk::python_with_openai();
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section(
            "tiers",
            "{ enterprise: { requests_per_second: 1000 }, tiny: { requests_per_second: 1, burst: 1 } }",
        )
        .start();
    let key = tg.create_key(&["--org", "acme", "--tier", "tiny", "--scope", "inference:read"]);
    let base = format!("http://{}", tg.addr);
    tokio::task::spawn_blocking(move || crate::sdk::run_script(&python, "openai_retry.py", &[&base, &key]))
        .await
        .unwrap();
}
