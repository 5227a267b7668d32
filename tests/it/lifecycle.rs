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

#[tokio::test]
async fn sigterm_mid_stream_lets_the_stream_finish_then_exits_zero() {
    let up = Upstream::start().await;
    let mut tg =
        Tollgate::builder(&up.url()).section("shutdown", "{ drain_delay: 1s, timeout: 20s }").start();
    let client = h1();
    let req = tg
        .post("/v1/chat/completions")
        .header("x-mock", "sse")
        .header("x-mock-events", "8")
        .header("x-mock-interval-ms", "400")
        .body(Full::from("{}"))
        .unwrap();
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
