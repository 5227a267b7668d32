//! The key-management HTTP API (§6) against a running server, and the CLI output contract.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;
use crate::upstream::Upstream;

#[tokio::test]
async fn admin_keys_manage_their_own_organisation_only() {
    let up = Upstream::start().await;
    // A long poll: anything seen at once below is the API's own doing, not the poller's.
    let tg = Tollgate::builder(&up.url()).section("auth", "{ revocation_poll: 1h }").start();
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
        "inference:write",
    ]);
    let admin_id = admin.split('_').nth(1).unwrap().to_string();
    let other = tg.create_key(&["--org", "globex", "--tier", "audit", "--scope", "inference:read"]);
    let other_id = other.split('_').nth(1).unwrap().to_string();
    let client = h1();

    // Create: 201, the plaintext once, same org and tier as the caller.
    let (rsp, created) = send_json(
        &client,
        call(&tg, "POST", "/v1/keys", &admin, Some(json!({"name": "backend", "scopes": ["inference:read"]}))),
    )
    .await;
    assert_eq!(rsp.status(), 201, "{created}");
    assert_eq!(rsp.headers()["cache-control"], "no-store");
    let new_key = created["key"].as_str().unwrap().to_string();
    let new_id = created["id"].as_str().unwrap().to_string();
    assert_eq!((created["org"].as_str(), created["tier"].as_str()), (Some("acme"), Some("audit")));
    assert_eq!(created["scopes"], json!(["inference:read"]));
    assert!(created.get("secret_hash").is_none());
    let models = |key: &str| call(&tg, "GET", "/v1/models", key, None);
    assert_eq!(send(&client, models(&new_key)).await.status(), 200);

    // No escalation: scopes the caller lacks, or another tier.
    let (rsp, body) =
        send_json(&client, call(&tg, "POST", "/v1/keys", &admin, Some(json!({"scopes": ["vetted:export"]}))))
            .await;
    assert_error(&rsp, &body, 403, "forbidden");
    assert_eq!(body["error"]["details"]["required_scope"], "vetted:export");
    let (rsp, body) = send_json(
        &client,
        call(
            &tg,
            "POST",
            "/v1/keys",
            &admin,
            Some(json!({"scopes": ["inference:read"], "tier": "enterprise"})),
        ),
    )
    .await;
    assert_error(&rsp, &body, 403, "forbidden");
    assert_eq!(body["error"]["details"], json!({"required_tier": "enterprise", "current_tier": "audit"}));
    let (rsp, body) =
        send_json(&client, call(&tg, "POST", "/v1/keys", &admin, Some(json!({"scopes": "x"})))).await;
    assert_error(&rsp, &body, 400, "bad_request");

    // List and show: own organisation only; another organisation's key does not exist.
    let (_, list) = send_json(&client, call(&tg, "GET", "/v1/keys", &admin, None)).await;
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&new_id.as_str()) && ids.contains(&admin_id.as_str()));
    assert!(!ids.contains(&other_id.as_str()));
    let (rsp, body) =
        send_json(&client, call(&tg, "GET", &format!("/v1/keys/{other_id}"), &admin, None)).await;
    assert_error(&rsp, &body, 404, "not_found");
    let (rsp, _) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{other_id}/revoke"), &admin, None)).await;
    assert_eq!(rsp.status(), 404);
    assert_eq!(send(&client, models(&other)).await.status(), 200);

    // Revoke through the API: the very next request is refused (no poll involved).
    let (rsp, body) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{new_id}/revoke"), &admin, None)).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(body["status"], "revoked");
    assert_eq!(body["revoked_by"], admin_id.as_str());
    assert_eq!(send(&client, models(&new_key)).await.status(), 401);
    // Restore: accepted again at once.
    let (rsp, _) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{new_id}/restore"), &admin, None)).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(send(&client, models(&new_key)).await.status(), 200);
    let (rsp, body) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{new_id}/restore"), &admin, None)).await;
    assert_error(&rsp, &body, 400, "bad_request");

    // Rotate: a new key with the same org, tier and scopes; the old one keeps working until revoked.
    let (rsp, rotated) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{new_id}/rotate"), &admin, None)).await;
    assert_eq!(rsp.status(), 201);
    assert_eq!(rotated["rotated_from"], new_id.as_str());
    assert_eq!(rotated["scopes"], json!(["inference:read"]));
    let rotated_key = rotated["key"].as_str().unwrap();
    assert_ne!(rotated_key, new_key);
    assert_eq!(send(&client, models(rotated_key)).await.status(), 200);
    assert_eq!(send(&client, models(&new_key)).await.status(), 200);

    // The audit trail names the actor.
    let (_, trail) =
        send_json(&client, call(&tg, "GET", &format!("/v1/keys/{new_id}/audit"), &admin, None)).await;
    let actions: Vec<(&str, &str)> = trail["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("create", admin_id.as_str()),
            ("revoke", admin_id.as_str()),
            ("restore", admin_id.as_str()),
            ("rotate", admin_id.as_str())
        ]
    );
    assert!(tg.wait_log("\"audit\"", Duration::from_secs(5)).await, "no audit log line");
}

fn scope_args<'a>(scopes: &[&'a str]) -> Vec<&'a str> {
    scopes.iter().flat_map(|s| ["--scope", *s]).collect()
}

/// The id part of a plaintext key.
fn id_of(key: &str) -> String {
    key.split('_').nth(1).unwrap().to_string()
}

/// Every action of the key API that yields a working key — create, rotate, restore — yields one
/// no stronger than its caller: for every combination of caller scopes and tiers against every
/// target, it succeeds exactly when the target's scopes are among the caller's and its tier is
/// the caller's; a refusal mints nothing. (Before: rotate copied the target's scopes and tier,
/// so an `admin:keys` key of tier `audit` got a working `enterprise` `inference:write` key.)
#[tokio::test]
async fn create_rotate_and_restore_never_yield_more_than_the_caller_holds() {
    let up = Upstream::start().await;
    let generous = "{ requests_per_second: 100000, burst: 100000 }";
    let tg = Tollgate::builder(&up.url())
        .section("tiers", &format!("{{ audit: {generous}, enterprise: {generous} }}"))
        .start();
    let client = h1();
    let tiers = ["audit", "enterprise"];
    let caller_scopes: [&[&str]; 3] = [
        &["admin:keys"],
        &["admin:keys", "inference:read"],
        &["admin:keys", "inference:read", "inference:write"],
    ];
    let target_scopes: [&[&str]; 4] =
        [&["inference:read"], &["inference:write"], &["inference:read", "inference:write"], &["admin:keys"]];
    let mut targets = Vec::new();
    for tier in tiers {
        for scopes in target_scopes {
            let mut args = vec!["--org", "acme", "--tier", tier];
            args.extend(scope_args(scopes));
            targets.push((tier, scopes, id_of(&tg.create_key(&args))));
        }
    }
    let count = |list: &serde_json::Value| list["data"].as_array().unwrap().len();
    let mut minted = 0;
    for caller_tier in tiers {
        for held in caller_scopes {
            let mut args = vec!["--org", "acme", "--tier", caller_tier];
            args.extend(scope_args(held));
            let caller = tg.create_key(&args);
            let (_, before) = send_json(&client, call(&tg, "GET", "/v1/keys", &caller, None)).await;
            for (tier, scopes, id) in &targets {
                let allowed = *tier == caller_tier && scopes.iter().all(|s| held.contains(s));
                let case = format!("caller {caller_tier} {held:?} → target {tier} {scopes:?}");
                let expect = |rsp: &http::Response<()>, body: &serde_json::Value, ok: u16, action: &str| {
                    if allowed {
                        assert_eq!(rsp.status(), ok, "{action}, {case}: {body}");
                    } else {
                        assert_error(rsp, body, 403, "forbidden");
                        let details = &body["error"]["details"];
                        let named = details["required_scope"].as_str().is_some_and(|s| !held.contains(&s))
                            || details["required_tier"] == *tier;
                        assert!(named, "{action}, {case}: the refusal names nothing missing: {body}");
                    }
                };
                let create = json!({"scopes": scopes, "tier": tier});
                let (rsp, body) =
                    send_json(&client, call(&tg, "POST", "/v1/keys", &caller, Some(create))).await;
                expect(&rsp, &body, 201, "create");
                if allowed {
                    assert_eq!(
                        (body["tier"].as_str(), body["scopes"].as_array().unwrap().len()),
                        (Some(*tier), scopes.len())
                    );
                }
                let (rsp, body) =
                    send_json(&client, call(&tg, "POST", &format!("/v1/keys/{id}/rotate"), &caller, None))
                        .await;
                expect(&rsp, &body, 201, "rotate");
                minted += 2 * usize::from(allowed);
                // Revoking takes privilege away: any key of the organisation may be revoked.
                let (rsp, body) =
                    send_json(&client, call(&tg, "POST", &format!("/v1/keys/{id}/revoke"), &caller, None))
                        .await;
                assert_eq!(rsp.status(), 200, "revoke, {case}: {body}");
                let (rsp, body) =
                    send_json(&client, call(&tg, "POST", &format!("/v1/keys/{id}/restore"), &caller, None))
                        .await;
                expect(&rsp, &body, 200, "restore");
                if !allowed {
                    let (_, shown) =
                        send_json(&client, call(&tg, "GET", &format!("/v1/keys/{id}"), &caller, None)).await;
                    assert_eq!(shown["status"], "revoked", "restore refused, {case}, yet: {shown}");
                }
            }
            let (_, after) = send_json(&client, call(&tg, "GET", "/v1/keys", &caller, None)).await;
            assert_eq!(count(&after), count(&before) + minted, "caller {caller_tier} {held:?}: keys minted");
            minted = 0;
        }
    }
}

/// A key that expires cannot issue one that outlives it, by creating or by rotating.
#[tokio::test]
async fn keys_issued_by_an_expiring_key_expire_with_it() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let client = h1();
    let caller = tg.create_key(&[
        "--org",
        "acme",
        "--tier",
        "enterprise",
        "--scope",
        "admin:keys",
        "--scope",
        "inference:read",
        "--expires-in",
        "1h",
    ]);
    let (_, me) =
        send_json(&client, call(&tg, "GET", &format!("/v1/keys/{}", id_of(&caller)), &caller, None)).await;
    let cap = me["expires_at"].as_str().unwrap().to_string();
    for body in
        [json!({"scopes": ["inference:read"], "expires_in": "90d"}), json!({"scopes": ["inference:read"]})]
    {
        let (rsp, created) =
            send_json(&client, call(&tg, "POST", "/v1/keys", &caller, Some(body.clone()))).await;
        assert_eq!(rsp.status(), 201, "{created}");
        assert_eq!(created["expires_at"], cap.as_str(), "{body}");
    }
    let (rsp, created) = send_json(
        &client,
        call(
            &tg,
            "POST",
            "/v1/keys",
            &caller,
            Some(json!({"scopes": ["inference:read"], "expires_in": "10m"})),
        ),
    )
    .await;
    assert_eq!(rsp.status(), 201);
    assert!(created["expires_at"].as_str().unwrap() < cap.as_str(), "a shorter expiry is kept: {created}");
    // The instance's default key never expires; rotated by the expiring caller, its successor does.
    let forever = tg.create_key(&["--org", "acme", "--tier", "enterprise", "--scope", "inference:read"]);
    let (rsp, rotated) =
        send_json(&client, call(&tg, "POST", &format!("/v1/keys/{}/rotate", id_of(&forever)), &caller, None))
            .await;
    assert_eq!(rsp.status(), 201, "{rotated}");
    assert_eq!(rotated["expires_at"], cap.as_str());
    // Nor can it bring a never-expiring key back: revoking is allowed, restoring is not.
    let path = |action: &str| format!("/v1/keys/{}/{action}", id_of(&forever));
    let (rsp, _) = send_json(&client, call(&tg, "POST", &path("revoke"), &caller, None)).await;
    assert_eq!(rsp.status(), 200);
    let (rsp, body) = send_json(&client, call(&tg, "POST", &path("restore"), &caller, None)).await;
    assert_error(&rsp, &body, 403, "forbidden");
    let (_, shown) =
        send_json(&client, call(&tg, "GET", &format!("/v1/keys/{}", id_of(&forever)), &caller, None)).await;
    assert_eq!(shown["status"], "revoked");
}

#[test]
fn cli_create_prints_the_key_alone_on_the_first_line_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, format!("store: {{ sqlite: \"{}\" }}\n", dir.path().join("k.db").display()))
        .unwrap();
    let out = keys_cli(
        &config,
        &["create", "--org", "acme", "--tier", "audit", "--scope", "admin", "--name", "ops"],
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap();
    let parsed = tollgate::keys::parse("tg", first).expect("first line is exactly a key");
    let out = keys_cli(
        &config,
        &["create", "--org", "acme", "--tier", "audit", "--scope", "inference:read", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["key", "id", "org", "tier", "scopes"] {
        assert!(!v[field].is_null(), "missing {field}: {v}");
    }
    let out = keys_cli(&config, &["list", "--org", "acme", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let admin = list.as_array().unwrap().iter().find(|k| k["id"] == parsed.id).unwrap();
    assert_eq!(admin["scopes"], json!(["admin:keys", "read", "write"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(first), "list shows a secret");

    let bad = keys_cli(&config, &["create", "--org", "acme", "--tier", "platinum", "--scope", "read"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown tier `platinum`"));
    let bad = keys_cli(&config, &["revoke", "nosuchkey123"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no key with id `nosuchkey123`"));
}
