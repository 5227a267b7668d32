//! A real upstream for the tests: a small hyper HTTP/1.1 server on `127.0.0.1:0` whose
//! behaviour is chosen per request with the `x-mock` header:
//!
//! - (none) — 200 JSON echo of what it received: method, path, headers, body (after
//!   `x-mock-delay-ms`, if given: a slow model);
//! - `sse` — `x-mock-events` events `x-mock-interval-ms` apart, then `data: [DONE]`;
//! - `hang` — never answers (records `hang_started`, and `hang_cancelled` when dropped);
//! - `stall` — headers and one event, then silence (records `stall_dropped` when dropped);
//! - `close` — headers and one event, then the connection is broken mid-body;
//! - `status` — answers `x-mock-status` with its own JSON error body.
//!
//! Every request is recorded (`requests`), and lifecycle events can be awaited (`wait_for`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Default)]
struct Shared {
    events: Mutex<Vec<String>>,
    requests: Mutex<Vec<Seen>>,
    notify: Notify,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Upstream { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.requests.lock().expect("lock").clone()
    }

    pub fn events(&self) -> Vec<String> {
        self.shared.events.lock().expect("lock").clone()
    }

    /// Waits until `event` has been recorded, up to `within`.
    pub async fn wait_for(&self, event: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.shared.notify.notified();
            if self.events().iter().any(|e| e == event) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.events().iter().any(|e| e == event);
            }
        }
    }
}

fn record(s: &Shared, event: &str) {
    s.events.lock().expect("lock").push(event.to_string());
    s.notify.notify_waiters();
}

/// Records an event when dropped: hyper drops a handler's future or body when the connection
/// to tollgate goes away, which is how cancellation is observed.
struct OnDrop(Arc<Shared>, &'static str);
impl Drop for OnDrop {
    fn drop(&mut self) {
        record(&self.0, self.1);
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn full(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json".parse().expect("static"));
    r
}

fn sse(rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>) -> Response<Body> {
    let stream = tokio_stream_from(rx);
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert("content-type", "text/event-stream".parse().expect("static"));
    r.headers_mut().insert("cache-control", "no-cache".parse().expect("static"));
    r
}

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    s.requests.lock().expect("lock").push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        headers: req.headers().clone(),
    });
    record(&s, "request");
    let mode = header(&req, "x-mock").unwrap_or("json").to_string();
    let events: usize = header(&req, "x-mock-events").and_then(|v| v.parse().ok()).unwrap_or(3);
    let interval =
        Duration::from_millis(header(&req, "x-mock-interval-ms").and_then(|v| v.parse().ok()).unwrap_or(100));
    match mode.as_str() {
        "hang" => {
            let _guard = OnDrop(s.clone(), "hang_cancelled");
            record(&s, "hang_started");
            std::future::pending::<()>().await;
            unreachable!()
        }
        "sse" | "stall" | "close" => {
            let (tx, rx) = mpsc::channel(16);
            let s2 = s.clone();
            tokio::spawn(async move {
                let event = |i: usize| Ok(Frame::data(Bytes::from(format!("data: {{\"n\":{i}}}\n\n"))));
                match mode.as_str() {
                    "sse" => {
                        for i in 0..events {
                            if i > 0 {
                                tokio::time::sleep(interval).await;
                            }
                            if tx.send(event(i)).await.is_err() {
                                record(&s2, "sse_dropped");
                                return;
                            }
                        }
                        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))).await;
                        record(&s2, "sse_done");
                    }
                    "stall" => {
                        let _ = tx.send(event(0)).await;
                        tx.closed().await;
                        record(&s2, "stall_dropped");
                    }
                    _ => {
                        let _ = tx.send(event(0)).await;
                        tokio::time::sleep(interval).await;
                        let _ = tx.send(Err(std::io::Error::other("mock: broken mid-stream"))).await;
                    }
                }
            });
            sse(rx)
        }
        "openai" => openai(req).await,
        "status" => {
            let code: u16 = header(&req, "x-mock-status").and_then(|v| v.parse().ok()).unwrap_or(500);
            full(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                json!({"error": {"message": "upstream says no", "type": "upstream"}}),
            )
        }
        _ => {
            if let Some(ms) = header(&req, "x-mock-delay-ms").and_then(|v| v.parse().ok()) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let method = req.method().to_string();
            let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("<binary>"))))
                .collect();
            let body = match req.into_body().collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(_) => return full(StatusCode::BAD_REQUEST, json!({"error": "body"})),
            };
            full(StatusCode::OK, json!({"method": method, "path": path, "headers": headers, "body": body}))
        }
    }
}

/// Just enough of the OpenAI API for the official SDK: model list, chat completion, streamed
/// chat completion ("hello world").
async fn openai(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let ignore_usage = header(&req, "x-mock-usage") == Some("ignore");
    let events: usize = header(&req, "x-mock-events").and_then(|v| v.parse().ok()).unwrap_or(3);
    let interval =
        Duration::from_millis(header(&req, "x-mock-interval-ms").and_then(|v| v.parse().ok()).unwrap_or(20));
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if path == "/v1/models" {
        return full(
            StatusCode::OK,
            json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "tests"}]}),
        );
    }
    let usage = json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11});
    if path == "/v1/embeddings" {
        return full(
            StatusCode::OK,
            json!({"object": "list", "model": "mock-model", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
                   "usage": {"prompt_tokens": 5, "total_tokens": 5}}),
        );
    }
    // As OpenAI: usage on streams only when asked for, as a last chunk with no choices (and
    // `usage: null` on the others); `x-mock-usage: ignore` plays a server that never reports it.
    let include_usage = body.pointer("/stream_options/include_usage") == Some(&json!(true)) && !ignore_usage;
    let completion = |delta: bool, content: &str, finish: Option<&str>| {
        let message = json!({"role": "assistant", "content": content});
        let choice = if delta {
            json!({"index": 0, "delta": message, "finish_reason": finish})
        } else {
            json!({"index": 0, "message": message, "finish_reason": finish, "logprobs": null})
        };
        let mut c = json!({
            "id": "chatcmpl-mock", "created": 0, "model": "mock-model",
            "object": if delta { "chat.completion.chunk" } else { "chat.completion" },
            "choices": [choice],
        });
        if !delta {
            c["usage"] = usage.clone();
        } else if include_usage {
            c["usage"] = json!(null);
        }
        c
    };
    if body["stream"] == json!(true) {
        let (tx, rx) = mpsc::channel(8);
        let mut last = completion(true, "", None);
        last["choices"] = json!([]);
        last["usage"] = usage.clone();
        let mut parts: Vec<(String, Option<&str>)> = vec![("hello".into(), None)];
        parts.extend((1..events.max(2) - 1).map(|_| (" world".to_string(), None)));
        parts.push((String::new(), Some("stop")));
        let chunks: Vec<serde_json::Value> = parts.iter().map(|(t, f)| completion(true, t, *f)).collect();
        tokio::spawn(async move {
            for chunk in chunks {
                let event = format!("data: {chunk}\n\n");
                if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
            if include_usage {
                let _ = tx.send(Ok(Frame::data(Bytes::from(format!("data: {last}\n\n"))))).await;
            }
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))).await;
        });
        return sse(rx);
    }
    full(StatusCode::OK, completion(false, "hello", Some("stop")))
}

/// An `mpsc::Receiver` as a `futures_core::Stream`.
fn tokio_stream_from<T>(rx: mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}
