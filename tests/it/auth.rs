//! Authentication end to end (§2, §3, §5): malformed headers, exact error bodies, bounded Argon2
//! work, revocation through the CLI, expiry, workspaces, the failed-attempt limit.

use std::time::{Duration, Instant};

use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::harness::*;
use crate::upstream::Upstream;

const BAD_HEADER: &str = "Invalid Authorization header: expected exactly one `Authorization: Bearer <key>`.";
const NOT_A_KEY: &str = "Invalid API key: it is not a well-formed key (check it for truncation or typos).";
const INVALID: &str = "Invalid API key. Include a valid Bearer token in the Authorization header.";

fn key_id(key: &str) -> &str {
    key.split('_').nth(1).unwrap()
}

#[tokio::test]
async fn malformed_and_wrong_keys_get_401_and_only_a_wrong_secret_costs_argon2() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let id = key_id(&tg.key);
    let wrong_secret = tollgate::keys::assemble("tg", id, &"A".repeat(tollgate::keys::SECRET_LEN));
    let unknown_id = tollgate::keys::assemble("tg", "ZZZZZZZZZZZZ", &"B".repeat(tollgate::keys::SECRET_LEN));
    let mut typo = tg.key.clone().into_bytes();
    typo[25] = if typo[25] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    let long8k = format!("Bearer {}", "k".repeat(8 * 1024));

    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("absent", vec![], "Missing API key. Send it in the Authorization header as `Bearer <key>`."),
        ("other scheme", vec![format!("Basic {}", tg.key).into_bytes()], BAD_HEADER),
        ("empty", vec![b"".to_vec()], BAD_HEADER),
        ("bearer only", vec![b"Bearer".to_vec()], BAD_HEADER),
        (
            "doubled",
            vec![format!("Bearer {}", tg.key).into_bytes(), format!("Bearer {}", tg.key).into_bytes()],
            BAD_HEADER,
        ),
        ("double space", vec![format!("Bearer  {}", tg.key).into_bytes()], BAD_HEADER),
        ("tab separator", vec![format!("Bearer\t{}", tg.key).into_bytes()], BAD_HEADER),
        ("non-ascii", vec![b"Bearer tg_\xc3\xa9\xc3\xa9".to_vec()], BAD_HEADER),
        ("8 KiB token", vec![long8k.into_bytes()], BAD_HEADER),
        ("not a key", vec![b"Bearer sk-proj-abcdef".to_vec()], NOT_A_KEY),
        ("bad checksum", vec![format!("Bearer {typo}").into_bytes()], NOT_A_KEY),
        ("unknown id", vec![format!("Bearer {unknown_id}").into_bytes()], INVALID),
        ("wrong secret", vec![format!("Bearer {wrong_secret}").into_bytes()], INVALID),
    ];
    let client = h1();
    for (name, values, message) in cases {
        let mut req = Request::get(tg.url("/v1/models"));
        for v in &values {
            req = req.header("authorization", http::HeaderValue::from_bytes(v).unwrap());
        }
        let (rsp, body) = send_json(&client, req.body(Full::default()).unwrap()).await;
        assert_eq!(rsp.status(), 401, "{name}");
        assert_error(&rsp, &body, 401, "unauthorized");
        assert_eq!(rsp.headers()["www-authenticate"], "Bearer", "{name}");
        assert_eq!(
            body,
            json!({"error": {"code": "unauthorized", "type": "authentication_error", "message": message, "details": {}}}),
            "{name}"
        );
    }
    // A 60 KiB token never gets as far as authentication.
    let req = Request::get(tg.url("/v1/models"))
        .header("authorization", format!("Bearer {}", "k".repeat(60 * 1024)))
        .body(Full::default());
    let (rsp, body) = send_json(&client, req.unwrap()).await;
    assert_error(&rsp, &body, 431, "headers_too_large");

    assert!(up.requests().is_empty(), "a refused request reached the upstream");
    assert_eq!(tg.metric("tollgate_argon2_verifications_total{result=\"mismatch\"}").await, Some(1.0));
    assert_eq!(tg.metric("tollgate_argon2_verifications_total{result=\"ok\"}").await, None);
    assert_eq!(tg.metric("tollgate_auth_failures_total{reason=\"missing\"}").await, Some(1.0));
    assert_eq!(tg.metric("tollgate_auth_failures_total{reason=\"checksum\"}").await, Some(1.0));
    assert_eq!(tg.metric("tollgate_auth_failures_total{reason=\"unknown\"}").await, Some(1.0));

    // The same wrong secret again is answered from the negative cache: no new Argon2 work.
    let req = Request::get(tg.url("/v1/models")).header("authorization", format!("Bearer {wrong_secret}"));
    let (rsp, _) = send_json(&client, req.body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 401);
    assert_eq!(tg.metric("tollgate_argon2_verifications_total{result=\"mismatch\"}").await, Some(1.0));
}

#[tokio::test]
async fn two_hundred_concurrent_requests_with_a_cold_key_cost_one_verification() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let cold = tg.create_key(&["--org", "acme", "--tier", "enterprise", "--scope", "inference:read"]);
    let client = h2c();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let client = client.clone();
        let req = get(&tg.url("/v1/models"))
            .header("authorization", format!("Bearer {cold}"))
            .body(Full::default());
        tasks.push(tokio::spawn(async move { send(&client, req.unwrap()).await.status().as_u16() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(tg.metric("tollgate_argon2_verifications_total{result=\"ok\"}").await, Some(1.0));
    assert_eq!(tg.metric("tollgate_auth_cache_misses_total").await.map(|m| m >= 1.0), Some(true));
    assert_eq!(up.requests().len(), 200);
}

#[tokio::test]
async fn cli_revocation_reaches_a_running_server_within_the_poll_and_restore_undoes_it() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("auth", "{ revocation_poll: 200ms }").start();
    let client = h1();
    let models = || tg.get("/v1/models").body(Full::default()).unwrap();
    assert_eq!(send(&client, models()).await.status(), 200);
    let id = key_id(&tg.key).to_string();

    let out = tg.keys(&["revoke", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let start = Instant::now();
    loop {
        let (rsp, body) = send_json(&client, models()).await;
        if rsp.status() == 401 {
            assert_eq!(body["error"]["message"], "This API key has been revoked.");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "revocation not seen within 3 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = tg.keys(&["restore", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let start = Instant::now();
    while send(&client, models()).await.status() != 200 {
        assert!(start.elapsed() < Duration::from_secs(3), "restore not seen within 3 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = tg.keys(&["audit", &id, "--json"]);
    let trail: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let actions: Vec<(&str, &str)> =
        trail.iter().map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap())).collect();
    assert_eq!(actions, [("create", "cli"), ("revoke", "cli"), ("restore", "cli")]);

    // last_used_at is written in batches; the final flush happens at shutdown at the latest.
    tg.signal("TERM");
    let mut tg = tg;
    assert!(tg.wait_exit(Duration::from_secs(10)).await.is_some_and(|s| s.success()));
    let out = tg.keys(&["show", &id]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(shown["last_used_at"].is_string(), "{shown}");
    assert_eq!(shown["status"], "active");
}

#[tokio::test]
async fn scope_errors_are_pinned_exactly() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let reader = tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "inference:read"]);
    let req = post_json(&tg.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {reader}"))
        .body(Full::from("{}"))
        .unwrap();
    let (rsp, body) = send_json(&h1(), req).await;
    assert_eq!(rsp.status(), 403);
    assert_eq!(rsp.headers()["x-tollgate-error"], "forbidden");
    assert_eq!(
        body,
        json!({"error": {
            "code": "forbidden",
            "type": "permission_error",
            "message": "Your API key does not have permission to perform this action. A key with the `inference:write` scope is required.",
            "details": {"required_scope": "inference:write", "current_scope": ["inference:read"]}
        }})
    );
    let (rsp, body) = send_json(&h1(), tg.get("/v1/unknown").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 404);
    assert_eq!(
        body,
        json!({"error": {"code": "not_found", "type": "invalid_request_error",
                         "message": "No route matches GET /v1/unknown.", "details": {}}})
    );
    let (rsp, body) = send_json(&h1(), tg.get("/v1/models?key=x").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 400);
    assert_eq!(
        body,
        json!({"error": {"code": "key_in_url", "type": "invalid_request_error",
                         "message": "API keys must be sent in the Authorization header, not in the URL (query parameter `key`). Remove it from the URL and rotate the key: URLs end up in logs.",
                         "details": {"parameter": "key"}}})
    );
    // An ordinary key cannot reach the key API.
    let (rsp, body) = send_json(&h1(), tg.get("/v1/keys").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 403);
    assert_eq!(body["error"]["details"]["required_scope"], "admin:keys");
    // Unauthenticated requests learn nothing about routes: 401 before 404.
    let (rsp, _) = send_json(&h1(), get(&tg.url("/v1/unknown")).body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 401);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn path_tricks_cannot_reach_a_route_the_scope_does_not_allow() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let reader = tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "inference:read"]);
    for path in [
        "/v1/models/../chat/completions",
        "/v1/models/%2e%2e/chat/completions",
        "/v1/models/..%2fchat/completions",
        "/v1/models%2f..%2fchat%2fcompletions",
        "/v1/models/./../keys",
    ] {
        let raw = crate::proxy::raw_request(
            tg.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {reader}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{path}: {raw}");
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

#[tokio::test]
async fn rest_routes_and_scope_presets() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("routes", "rest").start();
    let ro = tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "read-only"]);
    let rw = tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "read-write"]);
    let call = |method: &str, key: &str| {
        Request::builder()
            .method(method)
            .uri(tg.url("/v1/campaigns"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&h1(), call("GET", &ro)).await.status(), 200);
    let (rsp, body) = send_json(&h1(), call("POST", &ro)).await;
    assert_eq!(rsp.status(), 403);
    assert_eq!(body["error"]["details"], json!({"required_scope": "write", "current_scope": ["read"]}));
    assert_eq!(send(&h1(), call("DELETE", &rw)).await.status(), 200);
}

#[tokio::test]
async fn expired_and_wrong_workspace_keys_are_refused() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("auth", "{ workspace: prod }").start();
    let staging = tg.create_key(&[
        "--org",
        "acme",
        "--tier",
        "audit",
        "--scope",
        "inference:read",
        "--workspace",
        "staging",
    ]);
    let with = |key: &str| {
        get(&tg.url("/v1/models"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::default())
            .unwrap()
    };
    let (rsp, body) = send_json(&h1(), with(&staging)).await;
    assert_eq!(rsp.status(), 401);
    assert_eq!(body["error"]["message"], INVALID);
    // The harness's default key has the workspace of the config (prod): accepted.
    assert_eq!(send(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await.status(), 200);

    // Created just before its first use, with a margin for a loaded machine.
    let created = std::time::Instant::now();
    let short = tg.create_key(&[
        "--org",
        "acme",
        "--tier",
        "audit",
        "--scope",
        "inference:read",
        "--expires-in",
        "3s",
    ]);
    assert_eq!(send(&h1(), with(&short)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(created.elapsed())).await;
    let (rsp, body) = send_json(&h1(), with(&short)).await;
    assert_eq!(rsp.status(), 401, "a cached key outlived its expiry");
    assert_eq!(body["error"]["message"], "This API key has expired.");
}

#[tokio::test]
async fn failed_attempts_are_limited_per_source_address() {
    let up = Upstream::start().await;
    let tg =
        Tollgate::builder(&up.url()).section("auth", "{ failed_auth: { per_second: 1, burst: 3 } }").start();
    // Warm the default key first: cached keys keep working for a blocked source.
    assert_eq!(send(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await.status(), 200);
    let mut statuses = Vec::new();
    let mut last = None;
    for i in 0..6 {
        let id = format!("RANDOM{i:06}");
        let token = tollgate::keys::assemble("tg", &id, &"C".repeat(tollgate::keys::SECRET_LEN));
        let req = get(&tg.url("/v1/models")).header("authorization", format!("Bearer {token}"));
        let (rsp, body) = send_json(&h1(), req.body(Full::default()).unwrap()).await;
        statuses.push(rsp.status().as_u16());
        last = Some((rsp, body));
    }
    assert_eq!(&statuses[..3], [401, 401, 401]);
    assert_eq!(statuses[4..], [429, 429], "{statuses:?}");
    let (rsp, body) = last.unwrap();
    assert_error(&rsp, &body, 429, "rate_limited");
    assert_eq!(body["error"]["details"]["limit"], "failed_auth");
    let retry: u64 = rsp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(send(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await.status(), 200);
}

/// Behind a trusted proxy (an Ingress on 127.0.0.1 here), failed attempts count per client as
/// that proxy recorded it in `x-forwarded-for`: one attacker's failures do not block the other
/// clients' cold keys; the access log names the client. An untrusted peer's header is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_failed_attempts_count_per_forwarded_client() {
    let up = Upstream::start().await;
    let fresh = |tg: &Tollgate, xff: &str, i: usize| {
        let token =
            tollgate::keys::assemble("tg", &format!("RANDOM{i:06}"), &"C".repeat(tollgate::keys::SECRET_LEN));
        get(&tg.url("/v1/models"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-forwarded-for", xff)
            .body(Full::default())
            .unwrap()
    };
    let failed = "{ failed_auth: { per_second: 1, burst: 2 } }";
    let behind = Tollgate::builder(&up.url())
        .section("auth", failed)
        .section("trusted_proxies", "[\"127.0.0.0/8\"]")
        .section("log", "{ format: json, level: info }")
        .start();
    let mut attacker = Vec::new();
    for i in 0..5 {
        // The attacker forges a left part; the proxy appended the real address.
        attacker.push(send(&h1(), fresh(&behind, "9.9.9.9, 198.51.100.1", i)).await.status().as_u16());
    }
    assert_eq!(attacker[3..], [429, 429], "{attacker:?}");
    let other = send(&h1(), fresh(&behind, "198.51.100.2", 10)).await.status().as_u16();
    assert_eq!(other, 401, "another client behind the same proxy was blocked");
    assert!(
        behind.wait_log("\"peer\":\"198.51.100.2\"", Duration::from_secs(5)).await,
        "the access log names the client"
    );
    assert!(!behind.logs().contains("\"peer\":\"9.9.9.9\""), "a forged address was believed");

    // Not configured: every client behind the proxy shares its address (and its block).
    let direct = Tollgate::builder(&up.url()).section("auth", failed).start();
    for i in 0..5 {
        send(&h1(), fresh(&direct, "198.51.100.1", i)).await;
    }
    assert_eq!(send(&h1(), fresh(&direct, "198.51.100.2", 10)).await.status(), 429);
}

#[tokio::test]
async fn trace_logging_never_prints_a_secret() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("log", "{ format: json, level: trace }").start();
    let secret = tg.key.rsplit('_').next().unwrap().to_string();
    let wrong = tollgate::keys::assemble("tg", key_id(&tg.key), &"D".repeat(tollgate::keys::SECRET_LEN));
    for key in [tg.key.as_str(), wrong.as_str()] {
        for client in [h1(), h2c()] {
            let req = get(&tg.url("/v1/models")).header("authorization", format!("Bearer {key}"));
            let rsp = send(&client, req.body(Full::default()).unwrap()).await;
            let _ = rsp.into_body().collect().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = tg.logs();
    assert!(logs.contains("\"access\""), "no access log lines at all");
    for needle in [tg.key.as_str(), secret.as_str(), wrong.as_str(), &wrong[wrong.len() - 20..]] {
        assert!(!logs.contains(needle), "a secret reached the logs");
    }
}
