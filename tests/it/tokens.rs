//! LLM-aware limits (§12) as users meet them: the official SDK through tollgate and directly,
//! concurrent streams against `max_concurrent_requests`, clients leaving mid-stream, and an
//! upstream that never reports usage.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};

use crate::harness::*;
use crate::sdk::{python_with_openai, run_script};
use crate::upstream::Upstream;

pub(crate) const TIERS: &str = "{ enterprise: { requests_per_second: 1000 }, tok: { requests_per_second: 1000, tokens_per_minute: 100000, daily_tokens: 10000000 }, tiny: { requests_per_second: 1000, tokens_per_minute: 600 }, four: { requests_per_second: 1000, tokens_per_minute: 100000, max_concurrent_requests: 4 } }";

fn start(up: &Upstream) -> Tollgate {
    Tollgate::builder(&up.url()).section("tiers", TIERS).start()
}

#[tokio::test]
async fn the_openai_sdk_sees_the_same_streams_with_and_without_tollgate_and_a_token_429() {
    let python = python_with_openai();
    let up = Upstream::start().await;
    let tg = start(&up);
    let key = tg.create_key(&[
        "--org",
        "acme",
        "--tier",
        "tok",
        "--scope",
        "inference:read",
        "--scope",
        "inference:write",
    ]);
    let tiny = tg.create_key(&[
        "--org",
        "tinyco",
        "--tier",
        "tiny",
        "--scope",
        "inference:read",
        "--scope",
        "inference:write",
    ]);
    let (proxied, direct) = (format!("http://{}", tg.addr), up.url());
    tokio::task::spawn_blocking(move || {
        run_script(&python, "openai_tokens.py", &[&proxied, &direct, &key, &tiny])
    })
    .await
    .unwrap();
    // The injected streams asked the upstream for usage; it was counted.
    let prompt = tg.metric("tollgate_tokens_total{kind=\"prompt\",tier=\"tok\"}").await.unwrap_or(0.0);
    assert!(prompt >= 9.0 * 5.0, "prompt tokens counted: {prompt}");
    assert_eq!(tg.metric("tollgate_usage_unreported_total{reason=\"missing\"}").await, Some(0.0));
}

/// A streamed chat completion of `events` chunks `interval_ms` apart, from the mock OpenAI.
pub(crate) fn stream(
    tg: &Tollgate,
    key: &str,
    events: u32,
    interval_ms: u64,
    extra: &[(&str, &str)],
) -> http::Request<Full<bytes::Bytes>> {
    let mut b = post_json(&tg.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("x-mock", "openai")
        .header("x-mock-events", events.to_string())
        .header("x-mock-interval-ms", interval_ms.to_string());
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::from(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)).unwrap()
}

/// 10 concurrent streams, 4 allowed: exactly 4 run, the other 6 get 429 at once; when one
/// ends, a new one is admitted; the gauge follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_streams_with_four_allowed_run_four_and_refuse_six_at_once() {
    let up = Upstream::start().await;
    let tg = start(&up);
    let key = tg.create_key(&["--org", "acme", "--tier", "four", "--scope", "inference:write"]);
    let client = h1();
    let mut running = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        let started = Instant::now();
        // The first one ends first, once the ten are sent (3 s: generous on a loaded machine);
        // the others run for 30 s (held by tollgate until then).
        let events = if i == 0 { 30 } else { 300 };
        let rsp = send(&client, stream(&tg, &key, events, 100, &[])).await;
        if rsp.status() == 200 {
            running.push(rsp);
        } else {
            assert_eq!(rsp.status(), 429);
            assert!(started.elapsed() < Duration::from_secs(2), "refused at once (the streams run 30 s)");
            let body: serde_json::Value =
                serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!(body["error"]["details"]["limit"], "concurrent_requests", "{body}");
            refused += 1;
        }
    }
    assert_eq!((running.len(), refused), (4, 6));
    assert_eq!(tg.metric("tollgate_concurrent_requests{tier=\"four\"}").await, Some(4.0));
    // One stream read to its end: its slot is free, and exactly one more is admitted.
    let first = running.remove(0);
    let text = String::from_utf8(first.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"choices\":[]"), "the usage chunk tollgate asked for is not the client's");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = send(&client, stream(&tg, &key, 2, 10, &[])).await;
    assert_eq!(again.status(), 200);
    assert_eq!(send(&client, stream(&tg, &key, 2, 10, &[])).await.status(), 429);
    drop(again);
    drop(running);
}

/// A client leaving mid-stream frees its slot at once and is charged its reservation (no
/// usage came); an upstream that ignores `stream_options` is charged the estimate, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_frees_its_slot_and_unreported_usage_is_counted() {
    let up = Upstream::start().await;
    let tg = start(&up);
    let key = tg.create_key(&["--org", "acme", "--tier", "four", "--scope", "inference:write"]);
    let client = h1();
    let mut rsp = send(&client, stream(&tg, &key, 50, 100, &[])).await;
    assert_eq!(rsp.status(), 200);
    let _first = rsp.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(tg.metric("tollgate_concurrent_requests{tier=\"four\"}").await, Some(1.0));
    drop(rsp);
    let started = Instant::now();
    while tg.metric("tollgate_concurrent_requests{tier=\"four\"}").await != Some(0.0) {
        assert!(started.elapsed() < Duration::from_secs(5), "the slot was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = tg.metric("tollgate_usage_unreported_total{reason=\"client_gone\"}").await.unwrap();
    assert_eq!(gone, 1.0);

    let rsp = send(&client, stream(&tg, &key, 3, 10, &[("x-mock-usage", "ignore")])).await;
    assert_eq!(rsp.status(), 200);
    let text = String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let started = Instant::now();
    while tg.metric("tollgate_usage_unreported_total{reason=\"missing\"}").await != Some(1.0) {
        assert!(started.elapsed() < Duration::from_secs(5), "the missing usage was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A request that fails upstream before any byte (here: the upstream answers 500) is
    // refunded and frees its slot.
    let failed = send(
        &client,
        post_json(&tg.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-mock", "status")
            .body(Full::from(r#"{"model":"m","messages":[]}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(failed.status(), 500);
    drop(failed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(tg.metric("tollgate_concurrent_requests{tier=\"four\"}").await, Some(0.0));
}
