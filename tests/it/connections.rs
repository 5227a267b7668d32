//! Client connections: how long they live and what cuts them. The first-request deadline
//! (`limits.header_read_timeout`) closes connections that never send a request, and nothing
//! else: responses and streams that outlast it, on HTTP/1.1 and h2c, complete.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::harness::*;
use crate::upstream::Upstream;

/// A streamed body read to its end: how many `data:` events arrived, and whether `[DONE]` did.
async fn read_events(rsp: hyper::Response<hyper::body::Incoming>, what: &str) -> (usize, bool) {
    let mut body = rsp.into_body();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| panic!("{what}: stream cut after {text:?}: {e}"));
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
        }
    }
    (text.matches("data: {").count(), text.contains("data: [DONE]"))
}

async fn long_stream(client: TestClient, tg: &Tollgate, what: &str) {
    // 31 events one second apart: 30 s, three times the default header_read_timeout.
    let req = tg.sse(31, 1000);
    let rsp = tokio::time::timeout(Duration::from_secs(60), client.request(req)).await.unwrap().unwrap();
    assert_eq!(rsp.status(), 200, "{what}");
    assert_eq!(read_events(rsp, what).await, (31, true), "{what}");
}

async fn slow_response(client: TestClient, tg: &Tollgate, what: &str) {
    let req = tg.get("/v1/models").header("x-mock-delay-ms", "15000").body(Full::default()).unwrap();
    let started = Instant::now();
    let rsp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: no response after {:?}: {e}", started.elapsed()));
    assert_eq!(rsp.status(), 200, "{what}");
    assert!(started.elapsed() >= Duration::from_secs(14), "{what}: the upstream delay was not applied");
}

/// Requests every 500 ms for 25 s on one HTTP/1.1 connection and on one h2c connection: a
/// connection that carries requests is never cut by the first-request deadline.
async fn keep_alive(tg: &Tollgate, h2: bool) {
    let what = if h2 { "h2c keep-alive" } else { "http/1.1 keep-alive" };
    let tcp = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
    let io = TokioIo::new(tcp);
    type ResponseFuture = std::pin::Pin<
        Box<dyn std::future::Future<Output = hyper::Result<hyper::Response<hyper::body::Incoming>>> + Send>,
    >;
    type Sender = Box<dyn FnMut(http::Request<Full<Bytes>>) -> ResponseFuture + Send>;
    let mut send: Sender = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        Box::new(move |r| Box::pin(s.send_request(r)))
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Box::new(move |r| Box::pin(s.send_request(r)))
    };
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(25) {
        // hyper's connection-level client sends the target as given: absolute-form needs Host.
        let req = tg.get("/v1/models").header("host", tg.addr.to_string()).body(Full::default()).unwrap();
        let rsp = send(req).await.unwrap_or_else(|e| panic!("{what}: request {n} failed: {e}"));
        assert_eq!(rsp.status(), 200, "{what}");
        rsp.into_body().collect().await.unwrap_or_else(|e| panic!("{what}: body {n}: {e}"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(n >= 40, "{what}: only {n} requests in 25 s");
}

#[tokio::test]
async fn responses_and_streams_outlive_the_first_request_deadline_on_the_default_config() {
    let up = Upstream::start().await;
    // No `limits` section: header_read_timeout is its default, 10 s.
    let tg = Tollgate::builder(&up.url()).start();
    tokio::join!(
        long_stream(h1(), &tg, "30 s SSE over http/1.1"),
        long_stream(h2c(), &tg, "30 s SSE over h2c"),
        slow_response(h1(), &tg, "15 s response over http/1.1"),
        slow_response(h2c(), &tg, "15 s response over h2c"),
        keep_alive(&tg, false),
        keep_alive(&tg, true),
    );
    assert!(up.events().iter().filter(|e| *e == "sse_done").count() == 2, "{:?}", up.events());
}

#[tokio::test]
async fn connections_that_never_send_a_request_are_still_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("limits", "{ header_read_timeout: 1s }").start();
    // Silent, HTTP/1.1 headers trickling in, and an h2c preface with no request after it.
    let h2_preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for partial in ["", "GET /v1/models HTTP/1.1\r\nHost: x\r\n", h2_preface] {
        let mut s = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
        s.write_all(partial.as_bytes()).await.unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "connection {partial:?} was never closed");
        assert!(start.elapsed() >= Duration::from_millis(800), "closed too early: {partial:?}");
    }
    assert!(up.requests().is_empty());
}

/// The server's first SETTINGS frame on an h2c connection, as (identifier, value) pairs.
async fn h2_settings(addr: std::net::SocketAddr) -> Vec<(u16, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(head[3], 0x4, "the first frame is SETTINGS");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    payload
        .chunks_exact(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect()
}

/// One HTTP/2 connection cannot drive the upstream without bound: 100 streams are advertised,
/// at most `upstream.max_connections` upstream connections are opened (the rest get 503
/// `unavailable` after the connect timeout), and once the client is gone the in-flight gauge is
/// back to zero. (Before: 1024 streams, 1,000 upstream connections, the gauge stuck at 180.)
#[tokio::test]
async fn one_http2_connection_cannot_exhaust_the_upstream() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url())
        .section("upstream", &format!("{{ url: \"{}\", max_connections: 8, connect_timeout: 1s }}", up.url()))
        .start();
    const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
    let settings = h2_settings(tg.addr).await;
    assert!(settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 100)), "{settings:?}");

    let tcp = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let mut sender = sender.clone();
        let req = tg.get("/v1/models").header("x-mock", "hang").body(Full::<Bytes>::default()).unwrap();
        requests.spawn(async move { sender.send_request(req).await.map(|r| r.status().as_u16()) });
    }
    // The ones beyond the 8 connections are refused within the connect timeout.
    let mut refused = 0;
    while refused < 42 {
        let done = tokio::time::timeout(Duration::from_secs(10), requests.join_next()).await;
        let status = done.expect("refusals within 10 s").unwrap().unwrap().unwrap();
        assert_eq!(status, 503);
        refused += 1;
    }
    let hanging = up.events().iter().filter(|e| *e == "hang_started").count();
    assert_eq!(hanging, 8, "upstream requests (one connection each)");
    assert_eq!(tg.metric("tollgate_upstream_errors_total{kind=\"pool_full\"}").await, Some(42.0));
    assert_eq!(tg.metric("tollgate_inflight_requests").await, Some(8.0));

    // The client leaves with 8 streams open: each is cancelled upstream, the gauge is exact.
    requests.abort_all();
    drop(sender);
    conn.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.events().iter().filter(|e| *e == "hang_cancelled").count() < 8 {
        assert!(Instant::now() < deadline, "upstream requests outlived the client: {:?}", up.events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while tg.metric("tollgate_inflight_requests").await != Some(0.0) {
        assert!(Instant::now() < deadline, "the in-flight gauge stayed up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The slots are free again.
    let (rsp, _) = send_json(&h2c(), tg.get("/v1/models").body(Full::default()).unwrap()).await;
    assert_eq!(rsp.status(), 200);
}

/// HTTP/2 header lists get the HTTP/1.1 field limit (100), with the JSON 431.
#[tokio::test]
async fn http2_requests_with_too_many_header_fields_get_431() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let mut req = tg.get("/v1/models");
    for i in 0..150 {
        req = req.header(format!("x-f{i}"), "1");
    }
    let (rsp, body) = send_json(&h2c(), req.body(Full::default()).unwrap()).await;
    assert_error(&rsp, &body, 431, "headers_too_large");
    assert_eq!(body["error"]["details"]["max_header_fields"], 100);
    assert!(up.requests().is_empty());
}

/// Past `limits.max_connections`, a new connection waits (in the listen backlog) until one
/// closes, then is served.
#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("limits", "{ max_connections: 2 }").start();
    let request = |mock: &str| {
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nx-mock: {mock}\r\nConnection: close\r\n\r\n", tg.key)
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
        s.write_all(request("hang").as_bytes()).await.unwrap();
        held.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.events().iter().filter(|e| *e == "hang_started").count() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
    third.write_all(request("json").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(Duration::from_secs(1), third.read_to_end(&mut buf)).await;
    assert!(early.is_err() && buf.is_empty(), "served past the cap: {}", String::from_utf8_lossy(&buf));
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
}
