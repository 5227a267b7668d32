//! Forwarding (§7): the pooled upstream client, header hygiene in both directions, and the
//! streaming request/response bodies. Last step of the pipeline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{Body, Guarded, Stop, StopFlag};
use crate::config;
use crate::error::Error;

/// The pooled, keep-alive upstream client.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Guarded<Incoming>>;

/// Builds the upstream client. The pool's idle timeout only works with a timer set: without
/// `pool_timer`, idle connections are never reaped.
pub fn client(connect_timeout: Duration) -> Client {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(connect_timeout));
    conn.set_nodelay(true);
    conn.set_keepalive(Some(Duration::from_secs(60)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(conn)
}

/// Where and how requests are sent: one config generation's view of `upstream` and `limits`.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: http::uri::Authority,
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
            scheme: up.url.scheme().cloned().unwrap_or(Scheme::HTTP),
            // Validation guarantees an authority; the fallback is the documented default.
            authority: up
                .url
                .authority()
                .cloned()
                .unwrap_or_else(|| http::uri::Authority::from_static("127.0.0.1:8000")),
            authorization,
            timeout: up.timeout,
            idle: limits.stream_idle_timeout,
            max_body_bytes: limits.max_body_bytes,
        }
    }
}

/// What the connection knows about the client.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Identity headers: set by tollgate, never trusted from the client.
pub const IDENTITY_PREFIX: &str = "x-tollgate-";

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy
/// ones. Removed in both directions.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including every header the `Connection` header nominates.
/// Nominated ones go first, before tollgate adds anything, so a client cannot use `Connection`
/// to erase a header tollgate sets (§7).
fn remove_hop_by_hop(h: &mut HeaderMap) {
    let nominated: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &nominated {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(*name);
    }
}

/// The request id of a request: the client's if it is sane, otherwise a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get("x-request-id") {
        let ok = !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    // 32 hex digits are always a valid header value.
    HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// Identity of the authenticated caller, sent upstream as `x-tollgate-*` headers.
#[derive(Debug, Default, Clone)]
pub struct Identity {
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Rewrites a client request into the upstream request: same method, path and body; cleaned
/// headers; the upstream's authority.
pub fn prepare(
    up: &Upstream,
    req: Request<Incoming>,
    peer: Peer,
    request_id: &HeaderValue,
    identity: &Identity,
) -> Result<(Request<Guarded<Incoming>>, StopFlag), Error> {
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
    remove_hop_by_hop(h);
    // The upstream's Host is its own authority (set by the client from the URI), as nginx does by
    // default; the client's is kept in x-forwarded-host.
    h.remove(header::HOST);
    h.remove(header::AUTHORIZATION);
    let forged: Vec<HeaderName> =
        h.keys().filter(|k| k.as_str().starts_with(IDENTITY_PREFIX)).cloned().collect();
    for k in forged {
        h.remove(k);
    }
    for (k, v) in &identity.headers {
        h.insert(k.clone(), v.clone());
    }
    if let Some(auth) = &up.authorization {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    append_forwarded_for(h, peer.addr);
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if peer.tls { "https" } else { "http" }),
    );
    if let Some(host) = original_host {
        h.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    h.insert(HeaderName::from_static("x-request-id"), request_id.clone());

    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| Error::BadRequest("Invalid request target.".into()))?;
    // The upstream leg is HTTP/1.1 whatever the client spoke.
    parts.version = Version::HTTP_11;

    let flag = StopFlag::default();
    let body = Guarded::new(body, up.idle, Some(up.max_body_bytes), Some(flag.clone()));
    Ok((Request::from_parts(parts, body), flag))
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn append_forwarded_for(h: &mut HeaderMap, addr: SocketAddr) {
    let ip = addr.ip().to_canonical().to_string();
    let value = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
}

/// Upstream failures, recorded as `tollgate_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Reset,
    Timeout,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
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
    req: Request<Guarded<Incoming>>,
    flag: StopFlag,
) -> Result<Sent, (Error, Option<Failure>)> {
    let started = Instant::now();
    let result = tokio::time::timeout(up.timeout, client.request(req)).await;
    let upstream_time = started.elapsed();
    let rsp = match result {
        Err(_) => return Err((Error::UpstreamTimeout { after: up.timeout }, Some(Failure::Timeout))),
        Ok(Err(e)) => {
            return Err(match flag.get() {
                Some(Stop::TooLarge) => (Error::PayloadTooLarge { limit: up.max_body_bytes }, None),
                _ if e.is_connect() => {
                    (Error::UpstreamUnavailable { kind: "connect" }, Some(Failure::Connect))
                }
                _ => (Error::UpstreamUnavailable { kind: "reset" }, Some(Failure::Reset)),
            })
        }
        Ok(Ok(rsp)) => rsp,
    };
    let (mut parts, body) = rsp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    // hyper writes the response's version on the HTTP/1 wire: an HTTP/1.0 upstream must not
    // downgrade the client's connection (HTTP/2 clients ignore it).
    parts.version = Version::HTTP_11;
    let body = Body::stream(Guarded::new(body, up.idle, None, None));
    Ok(Sent { response: Response::from_parts(parts, body), upstream_time })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connection_nominated_headers_are_removed_first() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret, X-Tollgate-Org".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        append_forwarded_for(&mut h, "[::ffff:10.0.0.2]:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", "has space".parse().unwrap());
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, request_id(&HeaderMap::new()));
    }
}
