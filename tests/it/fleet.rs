//! Fleet mode I (§11): replicas sharing one PostgreSQL database, as they run in a pod each —
//! real tollgate processes, a real database of the test's own, the CLI against the same
//! database, and a TCP relay of the test's own for the faults.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;
use crate::pg::TestDb;
use crate::relay::{Mode, Relay};
use crate::upstream::Upstream;

/// The status of `GET /v1/models` with `key`.
async fn models(client: &TestClient, tg: &Tollgate, key: &str) -> u16 {
    send(client, call(tg, "GET", "/v1/models", key, None)).await.status().as_u16()
}

/// Polls `GET /v1/models` on `tg` every 5 ms until it answers `want`; the time that took.
async fn until_status(
    client: &TestClient,
    tg: &Tollgate,
    key: &str,
    want: u16,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if models(client, tg, key).await == want {
            return start.elapsed();
        }
        if start.elapsed() >= within {
            let logs = tg.logs();
            let tail: Vec<&str> =
                logs.lines().filter(|l| !l.contains("\"target\":\"access\"")).rev().take(40).collect();
            panic!(
                "{} never answered {want} within {within:?}; its last log lines:\n{}",
                tg.addr,
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `pct`th percentile (nearest rank) of sorted durations.
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[((sorted.len() - 1) * pct).div_ceil(100).min(sorted.len() - 1)]
}

/// Three replicas on one database. A key created through A's HTTP API works on B and C; 20
/// times, revoked with the CLI → 401 on all three, the time each took measured; restored →
/// 200 on all three. `revocation_poll` is an hour, so what arrives is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_keys_and_see_each_revocation_within_a_second() {
    let up = Upstream::start().await;
    let db = TestDb::create().await;
    let replica = || {
        Tollgate::builder(&up.url())
            .postgres(&db.url, "")
            .section(
                "auth",
                "{ revocation_poll: 1h, argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }",
            )
            .start()
    };
    let (a, b, c) = (replica(), replica(), replica());
    let client = h1();
    let admin = a.create_key(&[
        "--org",
        "acme",
        "--tier",
        "audit",
        "--scope",
        "admin:keys",
        "--scope",
        "inference:read",
    ]);
    let (rsp, created) = send_json(
        &client,
        call(&a, "POST", "/v1/keys", &admin, Some(json!({"name": "fleet", "scopes": ["inference:read"]}))),
    )
    .await;
    assert_eq!(rsp.status(), 201, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    for tg in [&a, &b, &c] {
        assert_eq!(models(&client, tg, &key).await, 200, "created on A, used on {}", tg.addr);
        // Each replica's own startup key is everyone's.
        assert_eq!(models(&client, tg, &a.key).await, 200);
        assert_eq!(models(&client, tg, &c.key).await, 200);
    }

    let mut lags = Vec::new();
    for round in 0..20 {
        let out = b.keys(&["revoke", &id]);
        assert!(out.status.success(), "revoke: {}", String::from_utf8_lossy(&out.stderr));
        let (la, lb, lc) = tokio::join!(
            until_status(&client, &a, &key, 401, Duration::from_secs(5)),
            until_status(&client, &b, &key, 401, Duration::from_secs(5)),
            until_status(&client, &c, &key, 401, Duration::from_secs(5)),
        );
        lags.extend([la, lb, lc]);
        let out = c.keys(&["restore", &id]);
        assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
        let (ra, rb, rc) = tokio::join!(
            until_status(&client, &a, &key, 200, Duration::from_secs(5)),
            until_status(&client, &b, &key, 200, Duration::from_secs(5)),
            until_status(&client, &c, &key, 200, Duration::from_secs(5)),
        );
        assert!(
            [ra, rb, rc].iter().all(|d| *d < Duration::from_secs(1)),
            "round {round}: restore {ra:?} {rb:?} {rc:?}"
        );
    }
    lags.sort();
    let (p50, max) = (percentile(&lags, 50), lags[lags.len() - 1]);
    eprintln!("revocation → 401, 20 revocations × 3 replicas: p50 {p50:?}, max {max:?}");
    assert!(max < Duration::from_secs(1), "p50 {p50:?}, max {max:?}");
    for tg in [&a, &b, &c] {
        let applied = tg.metric("tollgate_key_change_lag_seconds_count").await.unwrap();
        assert!(applied >= 40.0, "{}: {applied} changes applied", tg.addr);
    }
}

/// PostgreSQL unreachable (the port refused, every connection cut; then black-holed): a key
/// verified before keeps working past `cache_ttl`; a key never seen gets 503 `unavailable`
/// within `connect_timeout` (never 401, never a hang); the key API answers 503; readiness
/// stays 200; the metrics say so. Back: everything recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_serves_cached_keys_and_answers_others_503_within_the_timeout() {
    let up = Upstream::start().await;
    let db = TestDb::create().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let tg = Tollgate::builder(&up.url())
        .postgres(&relay.postgres_url(&db.name), "connect_timeout: 500ms, statement_timeout: 1s")
        .section("auth", "{ cache_ttl: 1s, stale_if_unavailable: 1h, argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }")
        .start();
    let client = h1();
    let admin = tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "admin:keys"]);
    // Keys never used before each outage (each is cached once it is over), and after both.
    let mut cold: Vec<String> = (0..3)
        .map(|_| tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "inference:read"]))
        .collect();
    assert_eq!(models(&client, &tg, &tg.key).await, 200);
    let (rsp, _) = send_json(&client, call(&tg, "GET", "/v1/keys", &admin, None)).await;
    assert_eq!(rsp.status(), 200);

    for fault in [Mode::Refuse, Mode::BlackHole] {
        let cold = cold.pop().unwrap();
        relay.set(fault);
        relay.cut();
        // Past cache_ttl: the cached key is served stale, the first request paying at most
        // the timeout, the others nothing.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for i in 0..20 {
            let started = Instant::now();
            assert_eq!(models(&client, &tg, &tg.key).await, 200, "{fault:?}: cached key, request {i}");
            assert!(started.elapsed() < Duration::from_secs(2), "{fault:?}: {:?}", started.elapsed());
        }
        let started = Instant::now();
        let (rsp, body) = send_json(&client, call(&tg, "GET", "/v1/models", &cold, None)).await;
        let took = started.elapsed();
        assert_error(&rsp, &body, 503, "unavailable");
        assert_eq!(rsp.headers()["retry-after"], "1");
        assert!(took < Duration::from_millis(500 + 1500), "{fault:?}: 503 after {took:?}");
        let (rsp, body) = send_json(&client, call(&tg, "GET", "/v1/keys", &admin, None)).await;
        assert_error(&rsp, &body, 503, "unavailable");
        assert_eq!(status_of(&tg.admin_url("/readyz")).await, 200, "{fault:?}: cached traffic is served");
        assert_eq!(tg.metric("tollgate_store_up").await, Some(0.0), "{fault:?}");
        assert!(tg.metric("tollgate_store_errors_total{op=\"get\"}").await.unwrap() >= 1.0);

        relay.set(Mode::Pass);
        until_status(&client, &tg, &cold, 200, Duration::from_secs(10)).await;
        assert_eq!(tg.metric("tollgate_store_up").await, Some(1.0), "{fault:?}: recovered");
    }
    // A key never used before the outage, after it: the pool reconnected by itself.
    assert_eq!(models(&client, &tg, &cold[0]).await, 200);
    let logs = tg.logs();
    assert!(
        !logs.contains("TG_TEST_PG_URL=") && !logs.contains(&relay.postgres_url(&db.name)),
        "the URL is logged"
    );
}

/// A replica on a database of its own, reached through a relay of the test's own, changes
/// pushed only (`revocation_poll` an hour), cheap hashes.
async fn behind_a_relay() -> (Upstream, TestDb, Relay, Tollgate) {
    let up = Upstream::start().await;
    let db = TestDb::create().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let tg = Tollgate::builder(&up.url())
        .postgres(&relay.postgres_url(&db.name), "connect_timeout: 500ms")
        .section("auth", "{ revocation_poll: 1h, argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }")
        .start();
    (up, db, relay, tg)
}

/// The change feed's connection cut (the database refused meanwhile) while a key is revoked
/// elsewhere: once the relay is back, the replica reconnects, catches up, and refuses the key
/// within a second — with `revocation_poll` an hour, only the feed's catch-up can do it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_missed_while_the_feed_was_cut_applies_within_a_second_of_its_return() {
    let (_up, db, relay, tg) = behind_a_relay().await;
    let client = h1();
    let id = tg.key.split('_').nth(1).unwrap().to_string();
    assert_eq!(models(&client, &tg, &tg.key).await, 200);
    relay.set(Mode::Refuse);
    relay.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The CLI reaches the database directly, not through the relay.
    let direct = vec![("TG_TEST_PG_URL".to_string(), db.url.clone())];
    let out = keys_cli_env(&tg.config, &direct, &["revoke", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(models(&client, &tg, &tg.key).await, 200, "cached, and nothing can tell it yet");
    relay.set(Mode::Pass);
    let took = until_status(&client, &tg, &tg.key, 401, Duration::from_secs(5)).await;
    eprintln!("revocation missed during a cut: refused {took:?} after the database came back");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

/// A half-open feed: its connection silently dead (frozen in the relay, neither end told),
/// new connections fine. Without probing, the listener would wait forever; with it, the
/// replica notices, reconnects, catches up and refuses a key revoked meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_feed_is_probed_and_replaced() {
    let (_up, _db, relay, tg) = behind_a_relay().await;
    let client = h1();
    let id = tg.key.split('_').nth(1).unwrap().to_string();
    assert_eq!(models(&client, &tg, &tg.key).await, 200);
    // The feed's connection must exist to be frozen, and the catch-up poll its start triggers
    // must be over (a poll caught by the freeze fails, and its retry on a new connection would
    // deliver the revocation before the probe has a say).
    assert!(tg.wait_log("listening for key changes", Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.freeze();
    let started = Instant::now();
    let out = tg.keys(&["revoke", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Probed after 3 s of quiet, given 2 s to answer; then reconnected and caught up.
    let took = until_status(&client, &tg, &tg.key, 401, Duration::from_secs(15)).await;
    eprintln!("half-open feed: revocation applied after {:?}", started.elapsed());
    assert!(took > Duration::from_millis(500), "the frozen connection delivered it? {took:?}");
    let logs = tg.logs();
    let tail: Vec<&str> = logs
        .lines()
        .filter(|l| !l.contains("\"target\":\"access\"") && !l.contains("sqlx::query"))
        .rev()
        .take(30)
        .collect();
    assert!(
        tg.wait_log("lost the PostgreSQL change feed", Duration::from_secs(1)).await,
        "the feed was not replaced; last log lines:\n{}",
        tail.join("\n")
    );
}

/// Last-used times of requests served while the database is unreachable are written once it
/// is back: the failed batch (the outage spans a 10 s flush) is retried, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_used_times_from_an_outage_are_written_after_it() {
    let up = Upstream::start().await;
    let db = TestDb::create().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let tg = Tollgate::builder(&up.url())
        .postgres(&relay.postgres_url(&db.name), "connect_timeout: 500ms")
        .section("auth", "{ argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }")
        .start();
    let client = h1();
    assert_eq!(models(&client, &tg, &tg.key).await, 200);
    relay.set(Mode::Refuse);
    relay.cut();
    let outage = Instant::now();
    // Taken before each request: the key's last use is at or after the last of these.
    let mut before_last = String::new();
    while outage.elapsed() < Duration::from_secs(12) {
        before_last = tollgate::clock::rfc3339(tollgate::clock::now_ms());
        assert_eq!(models(&client, &tg, &tg.key).await, 200, "a cached key during the outage");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(tg.logs().contains("cannot write last-used timestamps"), "no flush failed during the outage");
    relay.set(Mode::Pass);
    let direct = vec![("TG_TEST_PG_URL".to_string(), db.url.clone())];
    let id = tg.key.split('_').nth(1).unwrap().to_string();
    let start = Instant::now();
    loop {
        let out = keys_cli_env(&tg.config, &direct, &["list", "--json"]);
        let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let used = keys
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .and_then(|k| k["last_used_at"].as_str().map(str::to_string))
            .unwrap_or_default();
        // RFC 3339 in UTC with fixed digits: text order is time order.
        if used >= before_last {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "last used {used:?}, last request after {before_last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
