//! The key dashboard (§13) as a client sees it: its page and assets with their security headers,
//! `GET /v1/limits` for every kind of key (and not counted), and the seeds' scope rules
//! (`tiers.X.scopes`, `default_scopes`) through the API and the CLI. The page itself is driven
//! in a real browser by tests/browser/.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::harness::*;
use crate::upstream::Upstream;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn id_of(key: &str) -> String {
    key.split('_').nth(1).unwrap().to_string()
}

#[tokio::test]
async fn the_page_and_its_assets_carry_strict_headers_and_need_no_key() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let client = h1();
    for (path, ty, needle) in [
        ("/dashboard", "text/html; charset=utf-8", "<script src=\"/dashboard/app.js\" defer>"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8", "Authorization"),
        ("/dashboard/app.css", "text/css; charset=utf-8", "@media"),
    ] {
        // No Authorization header at all: the page is public, its API calls carry the key.
        let rsp = send(&client, get(&tg.url(path)).body(Full::default()).unwrap()).await;
        assert_eq!(rsp.status(), 200, "{path}");
        let h = rsp.headers().clone();
        assert_eq!(h["content-type"], ty, "{path}");
        assert_eq!(h["content-security-policy"], CSP, "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        // Not rate-limited, so no rate-limit headers; nothing of it went upstream.
        assert!(h.get("x-ratelimit-limit-requests").is_none(), "{path}");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");
    }
    assert!(up.requests().is_empty(), "dashboard requests reached the upstream");
    // Other files under /dashboard do not exist; neither do other methods.
    let (rsp, body) =
        send_json(&client, get(&tg.url("/dashboard/secret.txt")).body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 404, "not_found");
    let (rsp, body) =
        send_json(&client, post_json(&tg.url("/dashboard")).body(Full::from("{}")).unwrap()).await;
    assert_error(&rsp, &body, 404, "not_found");
    // A key in the URL is refused here as anywhere.
    let (rsp, body) = send_json(
        &client,
        get(&tg.url(&format!("/dashboard?api_key={}", tg.key))).body(Full::default()).unwrap(),
    )
    .await;
    assert_error(&rsp, &body, 400, "key_in_url");
}

#[tokio::test]
async fn a_disabled_dashboard_is_an_unknown_route() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("dashboard", "{ enabled: false }").start();
    let client = h1();
    for path in ["/dashboard", "/dashboard/app.js"] {
        let (rsp, body) = send_json(&client, tg.get(path).body(Full::default()).unwrap()).await;
        assert_error(&rsp, &body, 404, "not_found");
        // Without a key, exactly what any unknown path answers.
        let anon = send(&client, get(&tg.url(path)).body(Full::default()).unwrap()).await.status();
        let unknown = send(&client, get(&tg.url("/nowhere")).body(Full::default()).unwrap()).await.status();
        assert_eq!(anon, unknown, "{path}");
    }
    // /v1/limits does not depend on the dashboard.
    let (rsp, _) = send_json(&client, tg.get("/v1/limits").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 200);
}

#[tokio::test]
async fn limits_are_reported_to_every_key_and_not_counted() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section(
            "tiers",
            "{ small: { requests_per_second: 2, burst: 5, daily_requests: 20 }, open: {}, enterprise: {} }",
        )
        .start();
    let client = h1();
    let read_only = tg.create_key(&["--org", "acme", "--tier", "small", "--scope", "inference:read"]);
    let admin = tg.create_key(&["--org", "acme", "--tier", "small", "--scope", "admin:keys"]);
    let odd = tg.create_key(&["--org", "globex", "--tier", "open", "--scope", "something:else"]);

    for key in [&read_only, &admin] {
        let (rsp, v) = send_json(&client, call(&tg, "GET", "/v1/limits", key, None)).await;
        assert_eq!(rsp.status(), 200, "{v}");
        assert_eq!(rsp.headers()["cache-control"], "no-store");
        assert_eq!(v["object"], "limits");
        assert_eq!(v["key_id"], id_of(key));
        assert_eq!((v["org"].as_str(), v["tier"].as_str()), (Some("acme"), Some("small")));
        assert_eq!((v["backend"].as_str(), v["state"].as_str()), (Some("local"), Some("ok")));
        assert_eq!(v["applies_to"], "organisation");
        let rps = &v["limits"]["requests_per_second"];
        assert_eq!((rps["limit"].as_u64(), rps["burst"].as_u64()), (Some(2), Some(5)));
        assert_eq!(v["limits"]["daily_requests"]["limit"], 20);
    }

    // Reading the limits N times spends nothing: what remains is still the whole burst and budget.
    let remaining = |v: &serde_json::Value| {
        (
            v["limits"]["requests_per_second"]["remaining"].as_u64(),
            v["limits"]["daily_requests"]["remaining"].as_u64(),
            v["limits"]["daily_requests"]["used"].as_u64(),
        )
    };
    for _ in 0..12 {
        let (rsp, v) = send_json(&client, call(&tg, "GET", "/v1/limits", &read_only, None)).await;
        assert_eq!(rsp.status(), 200, "{v}");
        assert_eq!(remaining(&v), (Some(5), Some(20), Some(0)), "{v}");
        // Its rate-limit headers tell the same, unconsumed.
        assert_eq!(rsp.headers()["x-ratelimit-remaining-requests"], "20");
    }
    // Requests that are counted show up, for every key of the organisation.
    for _ in 0..3 {
        assert_eq!(send(&client, call(&tg, "GET", "/v1/models", &read_only, None)).await.status(), 200);
    }
    let (_, v) = send_json(&client, call(&tg, "GET", "/v1/limits", &admin, None)).await;
    let (burst_left, day_left, used) = remaining(&v);
    assert_eq!((day_left, used), (Some(17), Some(3)), "{v}");
    assert!(burst_left.is_some_and(|b| (2..=3).contains(&b)), "{v}");

    // A tier without limits: every limit null (unlimited), any scope is enough.
    let (rsp, v) = send_json(&client, call(&tg, "GET", "/v1/limits", &odd, None)).await;
    assert_eq!(rsp.status(), 200, "{v}");
    let nulls = json!({"requests_per_second": null, "daily_requests": null, "tokens_per_minute": null,
        "daily_tokens": null, "concurrent_requests": null});
    assert_eq!(v["limits"], nulls);
    assert_eq!(v["scopes"], json!(["something:else"]));

    // A missing or wrong key is refused like anywhere else; other methods are not served.
    let (rsp, body) = send_json(&client, get(&tg.url("/v1/limits")).body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 401, "unauthorized");
    let (rsp, body) = send_json(&client, call(&tg, "POST", "/v1/limits", &admin, None)).await;
    assert_error(&rsp, &body, 404, "not_found");
}

#[tokio::test]
async fn tier_scopes_and_default_scopes_bind_the_api_and_the_cli() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section(
            "tiers",
            "{ audit: { requests_per_second: 50, burst: 200, scopes: [inference:read, inference:write, vetted:read, admin:keys] }, \
               audit-plus: { requests_per_second: 200, burst: 800 }, enterprise: {} }",
        )
        .section("default_scopes", "[inference:read, vetted:read]")
        .start();
    let client = h1();

    // CLI: a scope outside the tier's list is refused, non-zero, naming it.
    let out = tg.keys(&["create", "--org", "acme", "--tier", "audit", "--scope", "vetted:export"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`vetted:export`") && err.contains("tier `audit`"), "{err}");
    // Without --scope: the configured default_scopes.
    let out = tg.keys(&["create", "--org", "acme", "--tier", "audit", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["scopes"], json!(["inference:read", "vetted:read"]));
    // A tier without a list allows anything.
    tg.create_key(&["--org", "acme", "--tier", "audit-plus", "--scope", "vetted:export"]);

    // The API: an admin of tier audit that holds vetted:lineage itself is still bound by its tier.
    let admin = tg.create_key(&[
        "--org",
        "acme",
        "--tier",
        "audit",
        "--scope",
        "admin:keys",
        "--scope",
        "inference:read",
        "--scope",
        "vetted:read",
    ]);
    let (rsp, body) = send_json(
        &client,
        call(&tg, "POST", "/v1/keys", &admin, Some(json!({"scopes": ["inference:read", "vetted:lineage"]}))),
    )
    .await;
    assert_error(&rsp, &body, 403, "forbidden");
    assert_eq!(
        body["error"]["details"],
        json!({"scope": "vetted:lineage", "tier": "audit",
               "allowed_scopes": ["admin:keys", "inference:read", "inference:write", "vetted:read"]})
    );
    assert!(body["error"]["message"].as_str().unwrap().contains("`vetted:lineage`"), "{body}");

    // Created without scopes: default_scopes.
    let (rsp, created) =
        send_json(&client, call(&tg, "POST", "/v1/keys", &admin, Some(json!({"name": "defaults"})))).await;
    assert_eq!(rsp.status(), 201, "{created}");
    assert_eq!(created["scopes"], json!(["inference:read", "vetted:read"]));
    let id = created["id"].as_str().unwrap();

    // Rotate inherits scopes, or takes new ones — within the tier's list.
    let rotate =
        |body: Option<serde_json::Value>| call(&tg, "POST", &format!("/v1/keys/{id}/rotate"), &admin, body);
    let (rsp, body) = send_json(&client, rotate(Some(json!({"scopes": ["vetted:export"]})))).await;
    assert_error(&rsp, &body, 403, "forbidden");
    assert_eq!(body["error"]["details"]["scope"], "vetted:export");
    let (rsp, rotated) = send_json(&client, rotate(Some(json!({"scopes": ["inference:read"]})))).await;
    assert_eq!(rsp.status(), 201, "{rotated}");
    assert_eq!(rotated["scopes"], json!(["inference:read"]));
    let (rsp, rotated) = send_json(&client, rotate(None)).await;
    assert_eq!(rsp.status(), 201, "{rotated}");
    assert_eq!(rotated["scopes"], json!(["inference:read", "vetted:read"]));

    // CLI rotate: the same rule.
    let out = tg.keys(&["rotate", id, "--scope", "vetted:export"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`vetted:export`"));
    let out = tg.keys(&["rotate", id, "--scope", "inference:write", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Revoked keys say until when they can be restored (revoked_at + revocation_retention, 90d).
    let (rsp, revoked) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{id}/revoke"), &admin, None)).await;
    assert_eq!(rsp.status(), 200);
    let at = revoked["revoked_at"].as_str().unwrap();
    let until = revoked["restorable_until"].as_str().unwrap();
    assert!(until > at, "{revoked}");
    let (_, list) = send_json(&client, call(&tg, "GET", "/v1/keys", &admin, None)).await;
    let active = list["data"].as_array().unwrap().iter().find(|k| k["id"] == id_of(&admin)).unwrap().clone();
    assert!(active["restorable_until"].is_null(), "{active}");
}

#[tokio::test]
async fn limits_in_redis_are_read_without_spending_and_a_failure_is_reported() {
    let redis = crate::redis_server::RedisServer::start();
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section("rate_limits", "{ backend: redis, redis: { url_env: TG_TEST_REDIS_URL, timeout: 200ms } }")
        .section(
            "tiers",
            "{ small: { requests_per_second: 2, burst: 5, daily_requests: 20 }, enterprise: {} }",
        )
        .env("TG_TEST_REDIS_URL", &redis.url())
        .start();
    let client = h1();
    let key = tg.create_key(&["--org", "acme", "--tier", "small", "--scope", "inference:read"]);
    let limits = || call(&tg, "GET", "/v1/limits", &key, None);
    let remaining = |v: &serde_json::Value| {
        (
            v["limits"]["requests_per_second"]["remaining"].as_u64(),
            v["limits"]["daily_requests"]["remaining"].as_u64(),
            v["limits"]["daily_requests"]["used"].as_u64(),
        )
    };
    for _ in 0..8 {
        let (rsp, v) = send_json(&client, limits()).await;
        assert_eq!(rsp.status(), 200, "{v}");
        assert_eq!((v["backend"].as_str(), v["state"].as_str()), (Some("redis"), Some("ok")), "{v}");
        assert_eq!(remaining(&v), (Some(5), Some(20), Some(0)), "{v}");
    }
    // Reading wrote nothing: Redis holds no state for the organisation yet (only the
    // replicas' announcement set).
    assert_eq!(redis.cli(&["KEYS", "*acme*"]), "");
    for _ in 0..3 {
        assert_eq!(send(&client, call(&tg, "GET", "/v1/models", &key, None)).await.status(), 200);
    }
    let (_, v) = send_json(&client, limits()).await;
    let (burst_left, day_left, used) = remaining(&v);
    assert_eq!((day_left, used), (Some(17), Some(3)), "{v}");
    assert!(burst_left.is_some_and(|b| (2..=3).contains(&b)), "{v}");

    // Redis gone: still 200, the limits themselves, and why what remains is unknown.
    drop(redis);
    let (rsp, v) = send_json(&client, limits()).await;
    assert_eq!(rsp.status(), 200, "{v}");
    assert_eq!(v["state"], "unavailable", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("Redis")), "{v}");
    assert_eq!(remaining(&v), (None, None, None), "{v}");
    assert_eq!(v["limits"]["requests_per_second"]["limit"], 2);
}

/// Token and concurrency limits (§12) in the report, on both backends: what a completion used
/// (its upstream's usage), what a running stream holds (its reservation, its slot), and that
/// reading them spends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_concurrency_limits_are_reported_on_both_backends() {
    let redis = crate::redis_server::RedisServer::start();
    let up = Upstream::start().await;
    for backend in ["local", "redis"] {
        let mut b = Tollgate::builder(&up.url()).section(
            "tiers",
            "{ llm: { requests_per_second: 100, tokens_per_minute: 6000, daily_tokens: 100000, max_concurrent_requests: 3 }, enterprise: {} }",
        );
        if backend == "redis" {
            b = b
                .section(
                    "rate_limits",
                    "{ backend: redis, redis: { url_env: TG_TEST_REDIS_URL, timeout: 500ms } }",
                )
                .env("TG_TEST_REDIS_URL", &redis.url());
        }
        let tg = b.start();
        let client = h1();
        let key = tg.create_key(&["--org", backend, "--tier", "llm", "--scope", "inference:write"]);
        let report = || async {
            let (rsp, v) = send_json(&client, call(&tg, "GET", "/v1/limits", &key, None)).await;
            assert_eq!(rsp.status(), 200, "{v}");
            assert_eq!(v["backend"], backend, "{v}");
            assert_eq!(rsp.headers()["x-ratelimit-limit-tokens"], "6000");
            v["limits"].clone()
        };
        let l = report().await;
        assert_eq!(
            l["tokens_per_minute"],
            json!({"limit": 6000, "remaining": 6000, "reset_seconds": 0.0}),
            "{l}"
        );
        assert_eq!(
            (l["daily_tokens"]["used"].as_u64(), l["daily_tokens"]["remaining"].as_u64()),
            (Some(0), Some(100_000))
        );
        assert_eq!(l["concurrent_requests"], json!({"limit": 3, "in_flight": 0, "remaining": 3}), "{l}");

        // A completion whose upstream reports 11 tokens: today's use is 11 once it settled.
        let chat = post_json(&tg.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-mock", "openai")
            .body(Full::from(r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#))
            .unwrap();
        let (rsp, _) = send_json(&client, chat).await;
        assert_eq!(rsp.status(), 200);
        let used_today = |l: &serde_json::Value| l["daily_tokens"]["used"].as_u64();
        let settled = |want: u64| {
            let report = &report;
            async move {
                let started = std::time::Instant::now();
                loop {
                    let l = report().await;
                    if used_today(&l) == Some(want) {
                        return l;
                    }
                    assert!(started.elapsed() < Duration::from_secs(5), "{backend}: never {want} used: {l}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        settled(11).await;

        // A stream running holds a slot and its reservation (prompt bytes / 4 + 256).
        let req = crate::tokens::stream(&tg, &key, 100, 100, &[]);
        let estimate = (req.body().clone().collect().await.unwrap().to_bytes().len() / 4 + 256) as u64;
        let mut rsp = send(&client, req).await;
        assert_eq!(rsp.status(), 200);
        let _first = rsp.body_mut().frame().await.unwrap().unwrap();
        for _ in 0..3 {
            let l = report().await;
            assert_eq!(
                l["concurrent_requests"],
                json!({"limit": 3, "in_flight": 1, "remaining": 2}),
                "{backend}: {l}"
            );
            assert_eq!(used_today(&l), Some(11 + estimate), "{backend}: {l}");
            let left = l["tokens_per_minute"]["remaining"].as_u64().unwrap();
            assert!(left < 6000 && l["tokens_per_minute"]["reset_seconds"].as_f64().unwrap() > 0.0, "{l}");
        }
        // The client leaves: the slot is free, the reservation stays charged (no usage came).
        drop(rsp);
        let l = settled(11 + estimate).await;
        let started = std::time::Instant::now();
        let mut l = l;
        while l["concurrent_requests"]["in_flight"] != 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "{backend}: the slot stayed taken: {l}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            l = report().await;
        }
    }
}
