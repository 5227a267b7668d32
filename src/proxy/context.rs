//! The request context (Pingora's `CTX`): what the pipeline learns about one request, step by
//! step — who sent it, its route, the caller, the admission decision — read when the response
//! is written and by the access log.
//!
//! It is also the guard that every request is reported once: `answer` hands its record to the
//! response body, which reports when the body ends; a context dropped unanswered (the client
//! left before the response headers, and hyper dropped the request's future) reports the
//! request itself, as `client_gone`, and releases the in-flight gauge.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use prometheus::Histogram;

use super::access_log::{redact_keys, Record, CLIENT_GONE_STATUS};
use crate::auth::Principal;
use crate::body::{Body, End, Observer};
use crate::limits::Quota;
use crate::metrics::method_label;
use crate::net::Peer;
use crate::state::{Snapshot, State};
use crate::upstream;

pub struct Ctx {
    state: Arc<State>,
    started: Instant,
    pub request_id: HeaderValue,
    /// The connection's peer, and the client's address as trusted proxies report it.
    pub peer: Peer,
    method: &'static str,
    /// The access log's copy of the path, keys redacted; empty when that log is off.
    log_path: String,
    /// The matched route's label and its duration histogram (`None`: unmatched).
    pub route: Option<(Arc<str>, Histogram)>,
    /// The caller, once authenticated.
    pub principal: Option<Arc<Principal>>,
    /// The admission decision, for the rate-limit headers (refusals carry one too).
    pub quota: Option<Quota>,
    /// What an admitted LLM request holds (a concurrency slot, a token reservation) until its
    /// response body takes it; dropped with the context, it is given back.
    pub hold: Option<crate::limits::Hold>,
    answered: bool,
}

impl Ctx {
    /// Starts a request's context; from here on the request is in flight.
    pub fn new(state: Arc<State>, snap: &Snapshot, req: &Request<Incoming>, mut peer: Peer) -> Ctx {
        peer.client = snap.config.trusted_proxies.client_ip(peer.addr.ip(), req.headers());
        let log_path = if tracing::enabled!(target: "access", tracing::Level::INFO) {
            redact_keys(req.uri().path(), &snap.config.auth.key_prefix)
        } else {
            String::new()
        };
        state.metrics.inflight.inc();
        Ctx {
            state,
            started: Instant::now(),
            request_id: upstream::request_id(req.headers()),
            peer,
            method: method_label(req.method()),
            log_path,
            route: None,
            principal: None,
            quota: None,
            hold: None,
            answered: false,
        }
    }

    /// Writes the rate-limit headers from the context and hands the request's record to the
    /// response's body. `x-request-id` is written by the caller, before (see `Proxy::handle`).
    pub fn answer(&mut self, rsp: &mut Response<Body>, code: &'static str) {
        if let Some(q) = self.quota.take() {
            q.write_headers(rsp.headers_mut());
        }
        let record = self.record(rsp.status().as_u16(), code);
        rsp.body_mut().observe(Box::new(record));
    }

    /// The record of this request; the context is answered from then on.
    fn record(&mut self, status: u16, code: &'static str) -> Record {
        self.answered = true;
        Record {
            state: self.state.clone(),
            started: self.started,
            route: self.route.take(),
            method: self.method,
            path: std::mem::take(&mut self.log_path),
            status,
            code,
            // Moved, not cloned: the context is done with it.
            request_id: std::mem::replace(&mut self.request_id, HeaderValue::from_static("")),
            peer: self.peer.client,
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if !self.answered {
            Box::new(self.record(CLIENT_GONE_STATUS, "client_gone")).on_end(0, End::ClientGone);
        }
    }
}
