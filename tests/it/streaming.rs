//! Streaming (§7): server-sent events leave tollgate as they arrive, over HTTP/1.1 and HTTP/2;
//! a client that goes away cancels the upstream request; stalled and broken streams end.
//! Timing margins are generous: events are 300 ms apart and only ordering in time is asserted.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};

use crate::harness::*;
use crate::upstream::Upstream;

/// Reads a streaming body frame by frame, timestamping each `data:` event.
async fn event_times(rsp: hyper::Response<hyper::body::Incoming>, start: Instant) -> Vec<(Duration, String)> {
    let mut body = rsp.into_body();
    let mut out = Vec::new();
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("stream frame");
        if let Some(d) = frame.data_ref() {
            buf.push_str(&String::from_utf8_lossy(d));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                out.push((start.elapsed(), event.trim().to_string()));
            }
        }
    }
    out
}

async fn sse_arrives_event_by_event(client: TestClient) {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let req = tg.sse(5, 300);
    let start = Instant::now();
    let rsp = send(&client, req).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["content-type"], "text/event-stream");
    let events = event_times(rsp, start).await;
    let names: Vec<&str> = events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "data: {\"n\":0}",
            "data: {\"n\":1}",
            "data: {\"n\":2}",
            "data: {\"n\":3}",
            "data: {\"n\":4}",
            "data: [DONE]"
        ]
    );
    // Each of events 1..4 was sent 300 ms after the previous one; buffering would bunch them.
    for pair in events[..5].windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_millis(150), "events bunched together: {events:?}");
    }
    assert!(events[0].0 < events[4].0 - Duration::from_millis(900), "first event held back: {events:?}");
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_over_http1() {
    sse_arrives_event_by_event(h1()).await;
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_over_h2c() {
    sse_arrives_event_by_event(h2c()).await;
}

/// Five clients leave before their response headers: each upstream request is cancelled, and
/// each request is still counted and logged once (status 499, `client_gone`), leaving the
/// in-flight gauge at zero. (Before: gauge 5, not counted, not logged.)
#[tokio::test]
async fn clients_that_leave_before_headers_cancel_the_upstream_and_are_counted_and_logged() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("log", "{ format: json, level: info }").start();
    for n in 0..5 {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nx-mock: hang\r\nx-request-id: gone-{n}\r\ncontent-length: 2\r\n\r\n{{}}",
            tg.key
        );
        let mut s = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await.unwrap();
        let started = up.events().iter().filter(|e| *e == "hang_started").count();
        // Generous: on a loaded machine a cold key's first verification alone can take seconds.
        let deadline = Instant::now() + Duration::from_secs(20);
        while up.events().iter().filter(|e| *e == "hang_started").count() == started
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.events().iter().filter(|e| *e == "hang_cancelled").count() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up.events().iter().filter(|e| *e == "hang_cancelled").count(),
        5,
        "upstream requests outlived their clients: {:?}",
        up.events()
    );
    assert!(tg.wait_log("gone-4", Duration::from_secs(5)).await, "no access line for the last request");
    assert_eq!(tg.metric("tollgate_inflight_requests").await, Some(0.0));
    let series = r#"tollgate_requests_total{code="client_gone",method="POST",route="/v1/chat/completions",status="499"}"#;
    assert_eq!(tg.metric(series).await, Some(5.0));
    let logs = tg.logs();
    for n in 0..5 {
        let line = logs
            .lines()
            .find(|l| l.contains("\"access\"") && l.contains(&format!("gone-{n}")))
            .unwrap_or_else(|| panic!("no access line for request {n}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!((v["status"].as_u64(), v["end"].as_str()), (Some(499), Some("client_gone")), "{line}");
    }
}

async fn leaving_mid_stream_cancels(client: TestClient) {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let req = tg.sse(1000, 50);
    let rsp = send(&client, req).await;
    let mut body = rsp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    drop(body);
    drop(client);
    assert!(
        up.wait_for("sse_dropped", Duration::from_secs(5)).await,
        "the upstream stream outlived its client: {:?}",
        up.events()
    );
    assert!(!up.events().contains(&"sse_done".to_string()));
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream_over_http1() {
    leaving_mid_stream_cancels(h1()).await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream_over_h2c() {
    leaving_mid_stream_cancels(h2c()).await;
}

#[tokio::test]
async fn a_stalled_stream_is_ended_after_stream_idle_timeout() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).section("limits", "{ stream_idle_timeout: 500ms }").start();
    let req = tg.post("/v1/chat/completions").header("x-mock", "stall").body(Full::from("{}"));
    let start = Instant::now();
    let rsp = send(&h1(), req.unwrap()).await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    assert!(body.frame().await.unwrap().is_ok(), "the first event arrives");
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(end.is_ok(), "the stalled stream was never ended");
    assert!(start.elapsed() >= Duration::from_millis(450));
    assert!(up.wait_for("stall_dropped", Duration::from_secs(5)).await, "upstream stream not released");
    assert!(tg.wait_log("stream_idle", Duration::from_secs(5)).await);
    assert_eq!(tg.metric("tollgate_upstream_errors_total{kind=\"stream_idle\"}").await, Some(1.0));
}

#[tokio::test]
async fn a_stream_broken_by_the_upstream_is_broken_for_the_client() {
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let req = tg.post("/v1/chat/completions").header("x-mock", "close").body(Full::from("{}"));
    let rsp = send(&h1(), req.unwrap()).await;
    // Headers were already sent: the client sees a 200 whose body ends in an error, never a
    // complete-looking truncated body, and never a 502 after the fact.
    assert_eq!(rsp.status(), 200);
    let result = tokio::time::timeout(Duration::from_secs(10), rsp.into_body().collect()).await.unwrap();
    assert!(result.is_err(), "a broken stream looked complete");
    assert!(tg.wait_log("stream_broken", Duration::from_secs(5)).await);
}
