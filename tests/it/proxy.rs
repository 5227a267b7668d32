//! Pass-through, header hygiene, the errors of §5 and the request limits, end to end.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::harness::*;
use crate::upstream::Upstream;

#[tokio::test]
async fn json_status_and_body_pass_through() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let client = h1();
    let req = tg.post("/v1/chat/completions").body(Full::from(r#"{"model":"m","messages":[]}"#)).unwrap();
    let (rsp, body) = send_json(&client, req).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/v1/chat/completions");
    assert_eq!(body["body"], r#"{"model":"m","messages":[]}"#);
    assert!(rsp.headers().get("x-tollgate-error").is_none());

    // The upstream's own errors pass through untouched (no x-tollgate-error).
    let req = tg.get("/v1/models").header("x-mock", "status").header("x-mock-status", "503");
    let (rsp, body) = send_json(&client, req.body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 503);
    assert_eq!(body["error"]["message"], "upstream says no");
    assert!(rsp.headers().get("x-tollgate-error").is_none());
}

#[tokio::test]
async fn headers_are_cleaned_and_forwarding_headers_set() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let req = tg
        .get("/v1/models")
        .header("connection", "keep-alive, x-drop-me, x-tollgate-org")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-tollgate-org", "forged-org")
        .header("x-tollgate-key-id", "forged-id")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "req-abc-123")
        .header("x-kept", "yes")
        .body(Full::default())
        .unwrap();
    let (rsp, _) = send_json(&h1(), req).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["x-request-id"], "req-abc-123");

    let seen = up.requests().pop().expect("upstream saw the request");
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("GET", "/v1/models"));
    let h = &seen.headers;
    for gone in ["x-drop-me", "keep-alive", "proxy-authorization", "te", "authorization"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(h["x-kept"], "yes");
    // Identity headers are tollgate's, overwriting the forged ones.
    assert_eq!(h["x-tollgate-org"], "acme");
    assert_eq!(h["x-tollgate-tier"], "enterprise");
    assert_eq!(h["x-tollgate-scopes"], "inference:read inference:write");
    assert_eq!(h["x-tollgate-key-id"], tg.key.split('_').nth(1).unwrap());
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http", "overwritten with what the client really used");
    assert_eq!(h["x-request-id"], "req-abc-123");
    assert_eq!(h["host"], up.addr.to_string());
    assert_eq!(h["x-forwarded-host"], tg.addr.to_string());
}

#[tokio::test]
async fn request_ids_are_generated_and_match_upstream() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let (rsp, _) = send_json(&h2c(), tg.get("/v1/models").body(Full::default()).unwrap()).await;
    let id = rsp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(up.requests()[0].headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn upstream_api_key_replaces_the_client_authorization() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section("upstream", &format!("{{ url: \"{}\", api_key_env: TEST_UPSTREAM_KEY }}", up.url()))
        .env("TEST_UPSTREAM_KEY", "upstream-secret")
        .start();
    let (rsp, _) = send_json(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(up.requests()[0].headers["authorization"], "Bearer upstream-secret");
    assert!(!tg.logs().contains("upstream-secret"));
}

#[tokio::test]
async fn refused_upstream_is_502_and_silent_upstream_is_504() {
    // A port that was just closed refuses connections.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let tg = Tollgate::builder(&format!("http://{closed}")).start();
    let (rsp, body) = send_json(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 502, "upstream_unavailable");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(tg.metric("tollgate_upstream_errors_total{kind=\"connect\"}").await, Some(1.0));

    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section("upstream", &format!("{{ url: \"{}\", timeout: 500ms }}", up.url()))
        .start();
    let started = std::time::Instant::now();
    let req = tg.get("/v1/models").header("x-mock", "hang").body(Full::default()).unwrap();
    let (rsp, body) = send_json(&h1(), req).await;
    assert_error(&rsp, &body, 504, "upstream_timeout");
    assert_eq!(body["error"]["details"]["timeout_seconds"], 0.5);
    assert!(started.elapsed() >= Duration::from_millis(450), "answered before the timeout");
    assert_eq!(tg.metric("tollgate_upstream_errors_total{kind=\"timeout\"}").await, Some(1.0));
}

#[tokio::test]
async fn unmatched_routes_and_keys_in_urls_are_refused_before_the_upstream() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let client = h1();
    let (rsp, body) = send_json(&client, tg.get("/v2/other").body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 404, "not_found");
    assert_eq!(body["error"]["message"], "No route matches GET /v2/other.");
    let (rsp, body) = send_json(&client, tg.get("/v1/chat/completions").body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 404, "not_found");

    let (rsp, body) =
        send_json(&client, tg.get("/v1/models?api_key=tg_abc").body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 400, "key_in_url");
    assert_eq!(body["error"]["details"]["parameter"], "api_key");
    assert!(!tg.logs().contains("tg_abc"), "the query string must not be logged");

    // A key in the path (before: forwarded upstream, and echoed in the 404 body).
    let secret = tg.key.rsplit('_').next().unwrap();
    for path in
        [format!("/v1/models/{}", tg.key), format!("/{}/v1/models", tg.key), format!("/v2/{}", tg.key)]
    {
        let (rsp, body) = send_json(&client, tg.get(&path).body(Full::default()).unwrap()).await;
        assert_error(&rsp, &body, 400, "key_in_url");
        assert_eq!(body["error"]["details"]["location"], "path");
        assert!(!body.to_string().contains(secret), "the error echoes the key: {body}");
    }
    // Not key-shaped, yet starting like one: not refused, and not echoed either.
    let (rsp, body) = send_json(&client, tg.get("/v2/tg_abc").body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 404, "not_found");
    assert_eq!(body["error"]["message"], "No route matches GET /v2/<redacted>.");
    assert!(!tg.logs().contains(secret), "a secret reached the logs");
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn path_tricks_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    for path in [
        "/v1/models/../keys",
        "/v1/models/%2e%2e/keys",
        "/v1/models/%2E%2e",
        "/v1/models%2fx",
        "/v1/./models",
        "/v1//models",
        "/v1/%6dodels",
        "/v1/models/..;/keys",
        "/v1/models/..;x/keys",
        "/v1/models/.;/gpt",
        "/v1/models;a=b",
        "/v1/models/..%3B/keys",
    ] {
        // Sent raw over TCP: HTTP client libraries would normalise some of these themselves.
        let raw =
            raw_request(tg.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
                .await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{path}: {raw}");
        assert!(raw.contains("\"code\":\"bad_request\""), "{path}: {raw}");
    }
    let raw = raw_request(
        tg.addr,
        "GET http://elsewhere.example/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(up.requests().is_empty(), "nothing reached the upstream: {:?}", up.requests());
}

pub async fn raw_request(addr: std::net::SocketAddr, text: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_headers_and_bodies_get_431_and_413() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section("limits", "{ max_header_bytes: 4KiB, max_body_bytes: 1KiB }")
        .start();
    let client = h1();
    let big = "a".repeat(5 * 1024);
    let req = tg.get("/v1/models").header("x-big", big.as_str()).body(Full::default()).unwrap();
    let (rsp, body) = send_json(&client, req).await;
    assert_error(&rsp, &body, 431, "headers_too_large");
    assert_eq!(body["error"]["details"]["max_header_bytes"], 4096);

    // A 60 KiB header still gets the JSON answer, not hyper's bare one.
    let huge = "b".repeat(60 * 1024);
    let req =
        get(&tg.url("/v1/models")).header("authorization", format!("Bearer {huge}")).body(Full::default());
    let (rsp, body) = send_json(&client, req.unwrap()).await;
    assert_error(&rsp, &body, 431, "headers_too_large");

    // Declared length over the limit: refused up front.
    let req = tg.post("/v1/embeddings").body(Full::from(vec![b'x'; 2048])).unwrap();
    let (rsp, body) = send_json(&client, req).await;
    assert_error(&rsp, &body, 413, "payload_too_large");

    // Streamed (chunked, no length) over the limit: stopped while streaming.
    let chunks = futures_iter(vec![Bytes::from(vec![b'x'; 800]), Bytes::from(vec![b'y'; 800])]);
    let body = http_body_util::StreamBody::new(chunks);
    let req = Request::post(tg.url("/v1/embeddings"))
        .header("authorization", format!("Bearer {}", tg.key))
        .body(body)
        .unwrap();
    let streaming_client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<Iter>>();
    let rsp = streaming_client.request(req).await.unwrap();
    assert_eq!(rsp.status(), 413);
    assert_eq!(rsp.headers()["x-tollgate-error"], "payload_too_large");
    let _ = rsp.into_body().collect().await;

    // Within the limits everything passes.
    let req = tg.post("/v1/embeddings").body(Full::from(vec![b'x'; 1000])).unwrap();
    let (rsp, _) = send_json(&client, req).await;
    assert_eq!(rsp.status(), 200);
}

/// A malformed chunked body and a body that stalls mid-way are the client's faults: 400 and 408
/// in JSON, and the upstream error counter stays at zero. (Before: 502 `upstream_unavailable` and
/// `tollgate_upstream_errors_total{kind="reset"}`, so any client could fire the upstream alert.)
#[tokio::test]
async fn client_body_faults_are_the_clients_not_the_upstreams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("limits", "{ stream_idle_timeout: 1s }").start();
    let head = |framing: &str| {
        format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{framing}\r\n\r\n",
            tg.key
        )
    };
    let malformed = head("Transfer-Encoding: chunked") + "5\r\nhello\r\nZZ\r\n";
    let raw = raw_request(tg.addr, &malformed).await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(
        raw.contains("\"code\":\"bad_request\"") && raw.contains("request body could not be read"),
        "{raw}"
    );

    // Ten of a hundred bytes, then nothing: the connection stays open, the body stalls.
    let mut s = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
    s.write_all((head("Content-Length: 100") + "0123456789").as_bytes()).await.unwrap();
    let mut out = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut out)).await.expect("answered").unwrap();
    let raw = String::from_utf8_lossy(&out[..n]);
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    assert!(raw.contains("\"code\":\"request_timeout\""), "{raw}");

    assert_eq!(tg.metric("tollgate_upstream_errors_total{kind=\"reset\"}").await, None);
    assert_eq!(tg.metric("tollgate_upstream_errors_total{kind=\"timeout\"}").await, None);
    let series = r#"tollgate_requests_total{code="request_timeout",method="POST",route="/v1/embeddings",status="408"}"#;
    assert_eq!(tg.metric(series).await, Some(1.0));
}

pub struct Iter(std::vec::IntoIter<Bytes>);
impl futures_core::Stream for Iter {
    type Item = Result<hyper::body::Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.next().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}
fn futures_iter(v: Vec<Bytes>) -> Iter {
    Iter(v.into_iter())
}

#[tokio::test]
async fn admin_endpoints_and_metrics() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    assert_eq!(status_of(&tg.admin_url("/healthz")).await, 200);
    assert_eq!(status_of(&tg.admin_url("/readyz")).await, 200);
    assert_eq!(status_of(&tg.admin_url("/nope")).await, 404);
    let (rsp, _) = send_json(&h1(), tg.get("/v1/models").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 200);
    let (rsp, _) = send_json(&h1(), tg.get("/nope").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 404);
    // Metrics are recorded when the body ends, just after the client got it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = get_text(&tg.admin_url("/metrics")).await;
    for want in [
        "tollgate_requests_total{code=\"ok\",method=\"GET\",route=\"/v1/models\",status=\"200\"} 1",
        "tollgate_requests_total{code=\"not_found\",method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
        "tollgate_request_duration_seconds_count{route=\"/v1/models\"} 1",
        "tollgate_upstream_duration_seconds_count{route=\"/v1/models\"} 1",
        "tollgate_inflight_requests 0",
        "tollgate_build_info{version=\"",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    if let Some(promtool) = which("promtool") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "promtool: {}", String::from_utf8_lossy(&out.stderr));
    }
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(bin))
        .find(|p| p.is_file())
}

#[tokio::test]
async fn access_log_has_one_json_line_per_request_without_secrets() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("log", "{ format: json, level: trace }").start();
    let req = tg.get("/v1/models").header("x-request-id", "log-test-1").body(Full::default()).unwrap();
    let (rsp, _) = send_json(&h1(), req).await;
    assert_eq!(rsp.status(), 200);
    assert!(tg.wait_log("log-test-1", Duration::from_secs(5)).await);
    let logs = tg.logs();
    let line =
        logs.lines().find(|l| l.contains("log-test-1") && l.contains("\"access\"")).expect("access line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["route"], "/v1/models");
    assert_eq!(v["status"], 200);
    assert_eq!(v["code"], "ok");
    assert!(v["duration_ms"].as_f64().is_some());
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert!(!logs.contains(&tg.key), "a key reached the logs");
    assert!(!logs.contains(tg.key.rsplit('_').next().unwrap()), "a secret reached the logs");
}

#[tokio::test]
async fn public_routes_need_no_key_and_carry_no_identity() {
    let up = Upstream::start().await;
    let routes = "\n  - { method: GET, path: /health, public: true }\n  - { method: GET, path: /v1/models, scope: inference:read }";
    let tg = Tollgate::builder(&up.url()).section("routes", routes).start();

    // No key at all; a forged identity and a client Authorization go nowhere.
    let req = get(&tg.url("/health"))
        .header("authorization", "Bearer not-a-key")
        .header("x-tollgate-org", "forged-org")
        .body(Full::default())
        .unwrap();
    let (rsp, _) = send_json(&h1(), req).await;
    assert_eq!(rsp.status(), 200);
    assert!(rsp.headers().get("x-ratelimit-limit-requests").is_none(), "no limits apply, none are announced");
    assert!(rsp.headers().get("x-request-id").is_some());
    let seen = up.requests().pop().expect("upstream saw the request");
    assert_eq!(seen.path, "/health");
    for gone in
        ["authorization", "x-tollgate-org", "x-tollgate-key-id", "x-tollgate-tier", "x-tollgate-scopes"]
    {
        assert!(seen.headers.get(gone).is_none(), "{gone} reached the upstream");
    }

    // Only that route is public: the others still need a key, and the method must match.
    let (rsp, body) = send_json(&h1(), get(&tg.url("/v1/models")).body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 401, "unauthorized");
    let req = Request::post(tg.url("/health")).body(Full::default()).unwrap();
    let (rsp, _) = send_json(&h1(), req).await;
    assert_eq!(rsp.status(), 401);
    assert_eq!(up.requests().len(), 1, "nothing else reached the upstream");
}
