//! Reload and shutdown (§8), and the header-read timeout, against a running process.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};

use crate::harness::*;
use crate::upstream::Upstream;

#[tokio::test]
async fn a_broken_reload_keeps_the_old_config_and_a_good_one_applies() {
    let up = Upstream::start().await;
    let builder = Tollgate::builder(&up.url());
    let original = builder.yaml();
    let tg = builder.start();
    let client = h1();
    let models = || tg.get("/v1/models").body(Full::default()).unwrap();
    assert_eq!(send(&client, models()).await.status(), 200);

    // Broken file: rejected, counted, logged with the field; the old config keeps serving.
    std::fs::write(&tg.config, format!("{original}default_scope: [not, a, string]\nbogus_field: 1\n"))
        .unwrap();
    assert!(tg.wait_log("config reload rejected", Duration::from_secs(10)).await);
    assert!(tg.logs().contains("bogus_field") || tg.logs().contains("default_scope"), "{}", tg.logs());
    assert_eq!(tg.metric("tollgate_config_reloads_total{result=\"error\"}").await, Some(1.0));
    assert_eq!(send(&client, models()).await.status(), 200);
    assert_eq!(status_of(&tg.admin_url("/readyz")).await, 200);

    // A valid change applies without a restart: a route list without /v1/models.
    let routes = "routes:\n  - { method: POST, path: /v1/chat/completions, scope: inference:write }\n";
    std::fs::write(&tg.config, format!("{original}{routes}")).unwrap();
    assert!(tg.wait_log("config reloaded", Duration::from_secs(10)).await);
    assert_eq!(tg.metric("tollgate_config_reloads_total{result=\"success\"}").await, Some(1.0));
    assert_eq!(send(&client, models()).await.status(), 404);

    // SIGHUP reloads too (the file is unchanged, so only the signal can cause this one).
    tg.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tg.metric("tollgate_config_reloads_total{result=\"success\"}").await != Some(2.0) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An empty file, and a file caught mid-write, are never applied: custom tiers and the upstream
/// stay. (Before: the 1 s poll loaded an empty file as the embedded defaults: the custom tier
/// vanished, its keys got 429, the upstream became 127.0.0.1:8000.)
#[tokio::test]
async fn an_empty_or_half_written_config_file_is_never_applied() {
    let up = Upstream::start().await;
    let builder =
        Tollgate::builder(&up.url()).section("tiers", "{ gold: { requests_per_second: 1000, burst: 1000 }, enterprise: { requests_per_second: 1000, burst: 1000 } }");
    let tg = builder.start();
    let original = std::fs::read_to_string(&tg.config).unwrap();
    let gold = tg.create_key(&["--org", "acme", "--tier", "gold", "--scope", "inference:read"]);
    let client = h1();
    let models = || {
        get(&tg.url("/v1/models"))
            .header("authorization", format!("Bearer {gold}"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&client, models()).await.status(), 200);

    // Requests all along: every one is served by the gold tier and the real upstream.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, client, url, gold) = (stop.clone(), client.clone(), tg.url("/v1/models"), gold.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = get(&url)
                    .header("authorization", format!("Bearer {gold}"))
                    .body(Full::default())
                    .unwrap();
                statuses.push(send(&client, req).await.status().as_u16());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };

    std::fs::write(&tg.config, "").unwrap();
    assert!(tg.wait_log("the file is empty", Duration::from_secs(10)).await, "{}", tg.logs());
    assert_eq!(tg.metric("tollgate_config_reloads_total{result=\"success\"}").await.unwrap_or(0.0), 0.0);

    // Half a file (it still parses: the upstream and tiers are cut off), completed 900 ms later
    // with one change: only the completed file applies. The poll that logged the empty file
    // was just now, so the half file, written 300 ms after it, is read by the next poll; it is
    // never read twice, as polls are 1 s apart.
    let cut = original.find("tiers:").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&tg.config, &original[..cut]).unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    std::fs::write(&tg.config, format!("{original}default_scope: inference:read\n")).unwrap();
    assert!(tg.wait_log("config reloaded", Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(tg.metric("tollgate_config_reloads_total{result=\"success\"}").await, Some(1.0));
    // The completed file's change is in force: an unmatched path now needs inference:read.
    let (rsp, _) = send_json(
        &client,
        get(&tg.url("/v2/anything"))
            .header("authorization", format!("Bearer {gold}"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(rsp.status(), 200);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = prober.await.unwrap();
    assert!(statuses.len() > 20 && statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test]
async fn sigterm_mid_stream_lets_the_stream_finish_then_exits_zero() {
    let up = Upstream::start().await;
    let mut tg =
        Tollgate::builder(&up.url()).section("shutdown", "{ drain_delay: 1s, timeout: 20s }").start();
    let client = h1();
    let req = tg.sse(8, 400);
    let rsp = send(&client, req).await;
    assert_eq!(rsp.status(), 200);
    let reader = tokio::spawn(async move { rsp.into_body().collect().await.map(|b| b.to_bytes()) });
    tokio::time::sleep(Duration::from_millis(300)).await;

    tg.signal("TERM");
    // Readiness turns at once, while requests are still accepted during drain_delay.
    let deadline = Instant::now() + Duration::from_secs(2);
    while status_of(&tg.admin_url("/readyz")).await != 503 {
        assert!(Instant::now() < deadline, "readyz did not turn 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await.status(), 200);

    let body = reader.await.unwrap().expect("the stream finished cleanly");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("data: {").count(), 8, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));

    let status = tg.wait_exit(Duration::from_secs(15)).await.expect("tollgate exited");
    assert!(status.success(), "exit status {status:?}");
    // After exit the port is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(tg.addr).await.is_err());
}

#[tokio::test]
async fn sigterm_waits_no_longer_than_shutdown_timeout() {
    let up = Upstream::start().await;
    let mut tg = Tollgate::builder(&up.url()).section("shutdown", "{ drain_delay: 0s, timeout: 1s }").start();
    let req = tg.post("/v1/chat/completions").header("x-mock", "hang").body(Full::from("{}"));
    let client = h1();
    let pending = tokio::spawn(async move { client.request(req.unwrap()).await });
    assert!(up.wait_for("hang_started", Duration::from_secs(5)).await);
    let start = Instant::now();
    tg.signal("TERM");
    let status = tg.wait_exit(Duration::from_secs(10)).await.expect("tollgate exited");
    assert!(status.success());
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(start.elapsed() >= Duration::from_millis(900), "did not wait for in-flight requests");
    pending.abort();
}

/// The SQLite file replaced or deleted under a running server: it must not go on serving the
/// unlinked file while the CLI writes the new one. Readiness turns 503 with a log line saying
/// what happened, and keys it cannot look up get 503 `unavailable`, not a silent 401. (Before:
/// ready, keys created with the CLI afterwards got 401, CLI revocations never arrived.)
#[tokio::test]
async fn a_replaced_or_deleted_key_store_file_makes_the_server_unready() {
    let up = Upstream::start().await;
    for what in ["replaced", "deleted"] {
        let tg = Tollgate::builder(&up.url()).start();
        let client = h1();
        assert_eq!(send(&client, tg.get("/v1/models").body(Full::default()).unwrap()).await.status(), 200);
        assert_eq!(status_of(&tg.admin_url("/readyz")).await, 200);
        let db = tg.config.parent().unwrap().join("tollgate.db");
        let mut other_key = None;
        if what == "replaced" {
            // A new store with a key of its own, moved over the old file, as a restore from
            // backup would.
            let other = tg.config.parent().unwrap().join("other.yaml");
            let other_db = tg.config.parent().unwrap().join("other.db");
            std::fs::write(&other, format!("store: {{ sqlite: \"{}\" }}\n", other_db.display())).unwrap();
            other_key =
                Some(create_key(&other, &["--org", "acme", "--tier", "audit", "--scope", "inference:read"]));
            std::fs::rename(&other_db, &db).unwrap();
        } else {
            std::fs::remove_file(&db).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while status_of(&tg.admin_url("/readyz")).await != 503 {
            assert!(Instant::now() < deadline, "{what}: still ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(get_text(&tg.admin_url("/readyz")).await, "key store unavailable\n");
        assert!(
            tg.wait_log(&format!("was {what} while tollgate had it open"), Duration::from_secs(5)).await,
            "{what}"
        );
        if let Some(key) = other_key {
            let req = get(&tg.url("/v1/models")).header("authorization", format!("Bearer {key}"));
            let (rsp, body) = send_json(&client, req.body(Full::default()).unwrap()).await;
            assert_error(&rsp, &body, 503, "unavailable");
        }
    }
}
