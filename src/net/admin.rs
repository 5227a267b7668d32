//! The admin listener (§8): `/healthz`, `/readyz`, `/metrics`, over HTTP/1.1 and h2c.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::state::State;

/// The admin listener's routes.
pub fn admin(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" if !state.is_store_ok() => text(StatusCode::SERVICE_UNAVAILABLE, "key store unavailable\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n"),
    }
}

/// Serves one admin connection (HTTP/1.1 and h2c, like the public listener).
pub async fn serve_admin<I>(io: I, state: Arc<State>, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let rsp = admin(&state, &req);
        async move { Ok::<_, Infallible>(rsp) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}
