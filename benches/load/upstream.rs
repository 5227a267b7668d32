//! The load benchmark's upstream: a small, fast OpenAI-shaped server (HTTP/1.1 and h2c).
//!
//!   cargo run --release --example load-upstream -- 127.0.0.1:18000
//!
//! - `GET /v1/models` and any other GET: a small model list;
//! - `POST /v1/chat/completions` (and other POSTs): reads the body, answers a small completion;
//! - header `x-mock: sse` (`x-mock-events`, `x-mock-interval-ms`): a stream of events, each
//!   carrying the time it was sent (`"t":<unix ns>`), so that clients can measure the delay a
//!   proxy adds to every event. When the request body asks for usage
//!   (`"stream_options":{"include_usage":true}`), a usage-only chunk (`"choices":[]`, with
//!   `usage`; completion tokens = the events sent) comes last before `[DONE]`, as OpenAI's does.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

const MODELS: &str =
    r#"{"object":"list","data":[{"id":"bench-model","object":"model","created":0,"owned_by":"bench"}]}"#;
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;

fn json(body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

struct Rx(mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);
impl futures_core::Stream for Rx {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

async fn handle(req: Request<Incoming>) -> Response<Body> {
    let header =
        |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if req.headers().get("x-mock").is_some_and(|v| v == "sse") {
        let events = header("x-mock-events").unwrap_or(20);
        let interval = Duration::from_millis(header("x-mock-interval-ms").unwrap_or(20));
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let include_usage = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.pointer("/stream_options/include_usage").and_then(serde_json::Value::as_bool))
            == Some(true);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..events {
                tokio::time::sleep(interval).await;
                let event = format!("data: {{\"n\":{i},\"t\":{}}}\n\n", now_ns());
                if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                    return;
                }
            }
            if include_usage {
                let usage = format!(
                    "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\
                     \"model\":\"bench-model\",\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\
                     \"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\n",
                    9 + events
                );
                if tx.send(Ok(Frame::data(Bytes::from(usage)))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))).await;
        });
        let mut r = Response::new(StreamBody::new(Rx(rx)).boxed());
        r.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
        return r;
    }
    if req.method() == http::Method::GET {
        return json(MODELS);
    }
    // Drain the request body, as a real server would.
    let _ = req.into_body().collect().await;
    json(COMPLETION)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18000".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("load-upstream listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req| async move { Ok::<_, Infallible>(handle(req).await) });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
