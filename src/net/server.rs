//! HTTP serving of the public listener: the hyper-util auto builder (HTTP/1.1 and h2c/h2 on one
//! port) with its timers and limits, and the per-connection service that hands requests to the
//! pipeline.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::Limits;
use crate::net::Peer;
use crate::proxy::Proxy;

/// hyper's own header buffer must be larger than `max_header_bytes`, so that oversized headers
/// reach the pipeline and get the JSON 431 of §5. Past this hard cap hyper answers a bare 431.
fn hard_header_cap(limits: &Limits) -> usize {
    (limits.max_header_bytes * 4).max(256 * 1024)
}

/// The connection builder for one config generation's limits. Timers are set explicitly:
/// without one, hyper silently ignores `header_read_timeout` and the HTTP/2 keep-alive.
pub fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(hard_header_cap(limits))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hard_header_cap(limits)).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(limits.max_concurrent_streams);
    b
}

/// Serves one accepted connection until it closes, the drain ends it, or it sends no request
/// within `header_read_timeout` (hyper's own header timer only starts once the protocol is
/// known, so a silent connection would otherwise stay open forever).
pub async fn serve_public<I>(io: I, peer: Peer, proxy: Proxy, limits: Limits, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let seen_request = Arc::new(AtomicBool::new(false));
    let seen = seen_request.clone();
    let addr = peer.addr;
    let service = service_fn(move |req: Request<Incoming>| {
        seen.store(true, Ordering::Relaxed);
        let proxy = proxy.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
    });
    let builder = builder(&limits);
    let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
    let conn = watcher.watch(conn);
    tokio::pin!(conn);
    // The deadline applies until the first request only. A `select!` precondition is evaluated
    // once, when the select starts, so the check after it fires is what disarms it: a
    // connection that has carried a request is then served to its end (each later request's
    // headers are hyper's `header_read_timeout` on HTTP/1.1; HTTP/2 pings find dead peers).
    let first_request_deadline = tokio::time::sleep(limits.header_read_timeout);
    let res = tokio::select! {
        res = &mut conn => res,
        _ = first_request_deadline => {
            if !seen_request.load(Ordering::Relaxed) {
                tracing::debug!(peer = %addr, "no request within header_read_timeout; closing");
                return;
            }
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
    }
}
