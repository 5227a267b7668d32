//! Forwarding (§7), the pipeline's last step: the request rewritten for the upstream, sent on
//! the pooled client (`pool.rs`), and its streaming response, with header hygiene in both
//! directions (`headers.rs`).

mod headers;
pub mod pool;

pub use headers::{request_id, Caller, Identity, IDENTITY_PREFIX, X_REQUEST_ID};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::body::{Body, Guarded, Outgoing, Stop, StopFlag};
use crate::config;
use crate::error::Error;
use crate::net::Peer;
use headers::*;
use pool::{Pooled, SendError};

/// The pooled, keep-alive upstream client (`pool.rs`).
pub type Client = pool::Client<Guarded<Outgoing>>;

/// An upstream response body, holding its connection until read to the end.
pub type UpstreamBody = Pooled<Incoming, Guarded<Outgoing>>;

/// Replaces a request's body with `bytes` (at most `limits.max_body_bytes`; the caller read the
/// original within that limit), with the matching `content-length`.
pub fn rewrite_body(req: &mut Request<Outgoing>, bytes: Bytes) {
    let h = req.headers_mut();
    h.remove(header::TRANSFER_ENCODING);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    *req.body_mut() = Outgoing::Rewritten(Some(bytes));
}

/// How long an unused upstream connection is kept open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds the upstream client for `upstream.url` (validated: `http://host:port`).
pub fn client(up: &config::Upstream) -> Client {
    let authority = up.url.authority().map_or("127.0.0.1:8000", |a| a.as_str());
    let address = if up.url.port_u16().is_some() { authority.to_string() } else { format!("{authority}:80") };
    pool::Client::new(address, up.connect_timeout, POOL_IDLE_TIMEOUT, up.max_connections)
}

/// Where and how requests are sent: one config generation's view of `upstream` and `limits`.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The upstream's authority, sent as its `Host`.
    host: HeaderValue,
    /// `Bearer <upstream.api_key_env>`, sent in place of the client's Authorization.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    idle: Duration,
    max_body_bytes: u64,
}

impl Upstream {
    pub fn new(
        up: &config::Upstream,
        limits: &config::Limits,
        authorization: Option<HeaderValue>,
    ) -> Upstream {
        Upstream {
            // Validation guarantees an authority; the fallback is the documented default.
            host: up
                .url
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or(HeaderValue::from_static("127.0.0.1:8000")),
            authorization,
            timeout: up.timeout,
            idle: limits.stream_idle_timeout,
            max_body_bytes: limits.max_body_bytes,
        }
    }
}

/// Rewrites a client request into the upstream request: same method, path and body; cleaned
/// headers; the upstream's authority.
pub fn prepare(
    up: &Upstream,
    req: Request<impl Into<Outgoing>>,
    peer: &Peer,
    request_id: &HeaderValue,
    caller: Option<Caller<'_>>,
) -> Result<(Request<Guarded<Outgoing>>, StopFlag), Error> {
    let (mut parts, body) = req.into_parts();
    if let Some(len) = content_length(&parts.headers) {
        if len > up.max_body_bytes {
            return Err(Error::PayloadTooLarge { limit: up.max_body_bytes });
        }
    }
    let original_host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));

    let h = &mut parts.headers;
    remove_hop_by_hop(h, true);
    // The upstream's Host is its own authority, as nginx does by default; the client's is kept
    // in x-forwarded-host.
    h.insert(header::HOST, up.host.clone());
    h.remove(header::AUTHORIZATION);
    if let Some(caller) = caller {
        h.reserve(caller.identity.headers.len() + 7);
        // Built per request rather than kept per cached key: ids are short, cached keys many.
        if let Ok(v) = HeaderValue::from_str(caller.key_id) {
            h.insert(X_TOLLGATE_KEY_ID, v);
        }
        for (k, v) in &caller.identity.headers {
            h.insert(k.clone(), v.clone());
        }
    }
    if let Some(auth) = &up.authorization {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    append_forwarded_for(h, peer);
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if peer.tls { "https" } else { "http" }));
    if let Some(host) = original_host {
        h.insert(X_FORWARDED_HOST, host);
    }
    h.insert(X_REQUEST_ID, request_id.clone());

    // Origin form on the upstream wire: `/path?query`.
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(pq);
    // The upstream leg is HTTP/1.1 whatever the client spoke.
    parts.version = Version::HTTP_11;

    let flag = StopFlag::default();
    let body = Guarded::new(body.into(), up.idle, Some(up.max_body_bytes), Some(flag.clone()));
    Ok((Request::from_parts(parts, body), flag))
}

/// Upstream failures, recorded as `tollgate_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Reset,
    Timeout,
    /// Every upstream connection slot in use (`upstream.max_connections`).
    PoolFull,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::PoolFull => "pool_full",
        }
    }
}

/// The upstream's answer, and how long its headers took.
pub struct Sent {
    pub response: Response<Body>,
    pub upstream_time: Duration,
}

/// Sends the prepared request and returns the streaming response. Errors say why no response
/// came: the client's body was too large (413), the upstream was unreachable (502) or silent
/// (504).
pub async fn send(
    client: &Client,
    up: &Upstream,
    req: Request<Guarded<Outgoing>>,
    flag: StopFlag,
) -> Result<Sent, (Error, Option<Failure>)> {
    let started = Instant::now();
    let result = tokio::time::timeout(up.timeout, client.request(req)).await;
    let upstream_time = started.elapsed();
    let rsp = match result {
        Err(_) => return Err((Error::UpstreamTimeout { after: up.timeout }, Some(Failure::Timeout))),
        Ok(Err(e)) => {
            // The request body's own fault, if it failed, is the client's: never counted as an
            // upstream error (any client could otherwise fire the upstream alert).
            return Err(match flag.get() {
                Some(Stop::TooLarge) => (Error::PayloadTooLarge { limit: up.max_body_bytes }, None),
                Some(Stop::Idle) => (Error::RequestTimeout { after: up.idle }, None),
                Some(Stop::Broken) => (
                    Error::BadRequest(
                        "The request body could not be read: its chunked encoding was malformed or the client broke the stream mid-body.".into(),
                    ),
                    None,
                ),
                None => match e {
                    SendError::Connect(reason) => {
                        tracing::debug!(%reason, "cannot connect to the upstream");
                        (Error::UpstreamUnavailable { kind: "connect" }, Some(Failure::Connect))
                    }
                    SendError::PoolFull { max } => {
                        // Counted, not logged per request: a flood would flood the log too.
                        tracing::debug!(max, "all upstream connections in use; request refused");
                        (
                            Error::Unavailable(
                                "All upstream connections are in use (upstream.max_connections); try again shortly.",
                            ),
                            Some(Failure::PoolFull),
                        )
                    }
                    SendError::Failed(e) => {
                        tracing::debug!(error = %e, "upstream request failed");
                        (Error::UpstreamUnavailable { kind: "reset" }, Some(Failure::Reset))
                    }
                },
            });
        }
        Ok(Ok(rsp)) => rsp,
    };
    let (mut parts, body) = rsp.into_parts();
    remove_hop_by_hop(&mut parts.headers, false);
    // hyper writes the response's version on the HTTP/1 wire: an HTTP/1.0 upstream must not
    // downgrade the client's connection (HTTP/2 clients ignore it).
    parts.version = Version::HTTP_11;
    let body = Body::upstream(Guarded::new(body, up.idle, None, None));
    Ok(Sent { response: Response::from_parts(parts, body), upstream_time })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A rewritten body goes upstream whole, with its own `content-length` (the client's
    /// length and chunked framing are gone).
    #[tokio::test]
    async fn a_rewritten_body_is_forwarded_with_its_length() {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let length = req.headers().get(header::CONTENT_LENGTH).cloned();
                let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let seen = format!("{length:?} {chunked} {}", String::from_utf8_lossy(&body));
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from(seen))))
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
        let up_config =
            crate::config::Config::from_yaml(&format!("upstream: {{ url: \"http://{addr}\" }}"), "t")
                .unwrap();
        let up = Upstream::new(&up_config.upstream, &up_config.limits, None);
        let mut req = Request::post("/v1/chat/completions")
            .header(header::CONTENT_LENGTH, "2")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(Outgoing::Rewritten(Some(Bytes::from_static(b"{}"))))
            .unwrap();
        rewrite_body(&mut req, Bytes::from_static(br#"{"stream_options":{"include_usage":true}}"#));
        let peer = Peer::new("127.0.0.1:1".parse().unwrap(), false);
        let (req, flag) = prepare(&up, req, &peer, &HeaderValue::from_static("id"), None).unwrap();
        let sent = send(&client(&up_config.upstream), &up, req, flag).await.map_err(|(e, _)| e).unwrap();
        let body = sent.response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, r#"Some("41") false {"stream_options":{"include_usage":true}}"#);
    }
}
