//! THE PIPELINE — read this file first. One request's life, in the order of SPEC §1:
//!
//! 1. `reject_key_in_url`, `check_target`, header size — refuse what must never go further;
//! 2. authenticate — `Authorization: Bearer` → principal (cache → store → Argon2id);
//! 3. route table → scope check (`/v1/keys…` is then served by tollgate itself);
//! 4. rate limit — per-second GCRA + daily budget; never queued, 429 with `Retry-After`;
//! 5. forward — pooled upstream, streaming both ways;
//! 6. response: `x-request-id`, rate-limit headers, then metrics and one access-log line when the body ends.
//!
//! `handle` never fails: every `Err` becomes the JSON response of §5 in one place.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::body::{Body, End, Observer, Outgoing, Stop};
use crate::error::Error;
use crate::forward::{self, Peer};
use crate::keys_api;
use crate::metrics::method_label;
use crate::ratelimit::Quota;
use crate::scope::{Handler, Route, UNMATCHED};
use crate::state::{Snapshot, State};
use crate::target::{check_target, reject_key_in_url};

#[derive(Clone)]
pub struct Proxy {
    state: Arc<State>,
}

impl Proxy {
    pub fn new(state: Arc<State>) -> Proxy {
        Proxy { state }
    }

    /// Answers one request. Infallible: errors are rendered, never propagated to hyper.
    pub async fn handle(&self, req: Request<Incoming>, mut peer: Peer) -> Response<Body> {
        let started = Instant::now();
        let snap = self.state.snapshot();
        peer.client = snap.config.trusted_proxies.client_ip(peer.addr.ip(), req.headers());
        let request_id = forward::request_id(req.headers());
        let method = method_label(req.method());
        let route = snap.routes.find(req.method(), req.uri().path());
        // The access log's copy of the path, keys redacted: not built when that log is off.
        let path = if tracing::enabled!(target: "access", tracing::Level::INFO) {
            redact_keys(req.uri().path(), &snap.config.auth.key_prefix)
        } else {
            String::new()
        };
        self.state.metrics.inflight.inc();
        // Armed before the first await: if the client leaves before the response headers, hyper
        // drops this future, and the guard still counts and logs the request (and releases the
        // in-flight gauge) as `client_gone`.
        let mut record = Unanswered(Some(Box::new(Record {
            state: self.state.clone(),
            started,
            route: route.map(|r| r.label.clone()),
            method,
            path,
            status: CLIENT_GONE_STATUS,
            code: "client_gone",
            request_id: request_id.clone(),
            peer: peer.client,
        })));

        let mut quota = None;
        let (mut rsp, code) = match self.pipeline(&snap, req, &peer, &request_id, route, &mut quota).await {
            Ok(rsp) => (rsp, "ok"),
            Err(e) => {
                let code = e.code();
                (e.into_response(), code)
            }
        };
        // x-request-id and up to five rate-limit headers: one growth of the map, not several.
        rsp.headers_mut().reserve(6);
        rsp.headers_mut().insert(forward::X_REQUEST_ID, request_id);
        if let Some(q) = quota {
            q.write_headers(rsp.headers_mut());
        }
        if let Some(mut r) = record.0.take() {
            r.status = rsp.status().as_u16();
            r.code = code;
            rsp.body_mut().observe(r);
        }
        rsp
    }

    async fn pipeline(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        peer: &Peer,
        request_id: &HeaderValue,
        route: Option<&Route>,
        quota: &mut Option<Quota>,
    ) -> Result<Response<Body>, Error> {
        reject_key_in_url(req.uri(), &snap.config.auth.key_prefix)?;
        check_target(req.uri(), req.version(), req.headers())?;
        check_header_size(req.headers(), snap.config.limits.max_header_bytes)?;

        if let Some(route) = route.filter(|r| r.public) {
            // A public route (config `public: true`): no key, no scope, no limits — and nothing
            // about a caller goes upstream (the client's Authorization and x-tollgate-* never do).
            return self.forward(snap, req, peer, request_id, route, None).await;
        }

        let auth = &snap.config.auth;
        let principal =
            self.state.auth.authenticate(auth, req.headers(), peer.client, &self.state.metrics).await?;
        let route = route.ok_or_else(|| Error::NotFound {
            method: req.method().to_string(),
            // Key-shaped segments were refused above; anything else starting like a key is
            // still not echoed.
            path: redact_keys(req.uri().path(), &auth.key_prefix),
        })?;
        route.check(principal.scopes())?;
        match snap.limiter.check_shared(&principal.key_id, &principal.org, &principal.tier) {
            Ok(q) => *quota = Some(q),
            Err(r) => {
                if let Some(limit) = r.limit {
                    self.state
                        .metrics
                        .rate_limited
                        .with_label_values(&[&principal.tier, limit.label()])
                        .inc();
                }
                *quota = Some(r.quota);
                return Err(r.error);
            }
        }
        if route.handler == Handler::Keys {
            return keys_api::handle(&self.state, snap, &principal, req).await;
        }
        let caller = forward::Caller { key_id: &principal.key_id, identity: &principal.identity };
        self.forward(snap, req, peer, request_id, route, Some(caller)).await
    }

    /// The last step: the upstream's streaming response, or why there is none.
    async fn forward(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        peer: &Peer,
        request_id: &HeaderValue,
        route: &Route,
        caller: Option<forward::Caller<'_>>,
    ) -> Result<Response<Body>, Error> {
        let req = req.map(Outgoing::Client);
        let (upstream_req, flag) = forward::prepare(&snap.upstream, req, peer, request_id, caller)?;
        let sent = forward::send(&snap.client, &snap.upstream, upstream_req, flag).await.map_err(
            |(e, failure)| {
                if let Some(f) = failure {
                    self.state.metrics.upstream_errors.with_label_values(&[f.label()]).inc();
                }
                e
            },
        )?;
        self.state
            .metrics
            .upstream_duration
            .with_label_values(&[&route.label])
            .observe(sent.upstream_time.as_secs_f64());
        Ok(sent.response)
    }
}

/// The path for the access log, with any key-looking segment replaced: a key pasted into a URL
/// must not reach the logs.
fn redact_keys(path: &str, prefix: &str) -> String {
    let looks_like_key = |seg: &str| {
        seg.len() > prefix.len() && seg.starts_with(prefix) && seg.as_bytes()[prefix.len()] == b'_'
    };
    if !path.split('/').any(looks_like_key) {
        return path.to_string();
    }
    path.split('/').map(|s| if looks_like_key(s) { "<redacted>" } else { s }).collect::<Vec<_>>().join("/")
}

/// Header fields a request may carry: hyper's HTTP/1.1 parser refuses more (a bare 431), and
/// HTTP/2 requests get the same limit here, with the JSON 431.
const MAX_HEADER_FIELDS: usize = 100;

/// 431 before anything else reads the headers. Counted as they travel on an HTTP/1.1 wire
/// (`name: value\r\n`), so the limit means the same for HTTP/1.1 and HTTP/2 clients.
fn check_header_size(headers: &HeaderMap, limit: usize) -> Result<(), Error> {
    if headers.len() > MAX_HEADER_FIELDS {
        return Err(Error::TooManyHeaders { max: MAX_HEADER_FIELDS });
    }
    let size: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if size > limit {
        return Err(Error::HeadersTooLarge { limit });
    }
    Ok(())
}

/// The status logged for a request whose client left before its response headers (nginx's
/// "client closed request"): no response was sent, so no real status applies.
const CLIENT_GONE_STATUS: u16 = 499;

/// A request's record until its response exists; dropped unanswered, it reports the request.
struct Unanswered(Option<Box<Record>>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.on_end(0, End::ClientGone);
        }
    }
}

/// Everything the access log and the request metrics need, recorded when the body ends.
struct Record {
    state: Arc<State>,
    started: Instant,
    route: Option<Arc<str>>,
    method: &'static str,
    path: String,
    status: u16,
    code: &'static str,
    request_id: HeaderValue,
    peer: std::net::IpAddr,
}

impl Observer for Record {
    fn on_end(self: Box<Self>, bytes: u64, end: End) {
        let m = &self.state.metrics;
        let route = self.route.as_deref().unwrap_or(UNMATCHED);
        let status = self.status.to_string();
        m.requests.with_label_values(&[route, self.method, &status, self.code]).inc();
        let elapsed = self.started.elapsed();
        m.request_duration(route).observe(elapsed.as_secs_f64());
        m.inflight.dec();
        let end = match end {
            End::Complete => "complete",
            End::ClientGone => "client_gone",
            End::Stopped(Stop::Idle) => {
                m.upstream_errors.with_label_values(&["stream_idle"]).inc();
                "stream_idle"
            }
            End::Stopped(_) => {
                m.upstream_errors.with_label_values(&["stream_broken"]).inc();
                "stream_broken"
            }
        };
        tracing::info!(
            target: "access",
            method = self.method,
            path = %self.path,
            route,
            status = self.status,
            code = self.code,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes,
            end,
            request_id = self.request_id.to_str().unwrap_or("-"),
            peer = %self.peer,
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_size_counts_names_and_values() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("bc")); // 1 + 2 + 4 = 7
        assert!(check_header_size(&h, 7).is_ok());
        assert_eq!(check_header_size(&h, 6).unwrap_err(), Error::HeadersTooLarge { limit: 6 });
    }
}
