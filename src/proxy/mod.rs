//! THE PIPELINE — read this file first. One request's life, in the order of SPEC §1:
//!
//! 1. `reject_key_in_url`, `check_target`, header size — refuse what must never go further;
//! 2. authenticate — `Authorization: Bearer` → principal (cache → store → Argon2id);
//! 3. route table → scope check (`/v1/keys…` is then served by tollgate itself; `/v1/limits`
//!    needs a valid key only and skips admission; `/dashboard…` needs no key at all);
//! 4. admit — per-second GCRA + daily budget; never queued, 429 with `Retry-After`;
//! 5. forward — pooled upstream, streaming both ways;
//! 6. response: `x-request-id`, rate-limit headers, then metrics and one access-log line when
//!    the body ends (`access_log.rs`).
//!
//! Each step records what it learned in the request's `Ctx` (`context.rs`). `handle` never
//! fails: every `Err` becomes the JSON response of §5 in one place.

mod access_log;
mod context;
pub mod routes;
pub mod target;

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::error::Error;
use crate::keys::api as keys_api;
use crate::net::Peer;
use crate::state::{Snapshot, State};
use crate::upstream;
use context::Ctx;
use routes::{Handler, Route};
use target::{check_header_size, check_target, reject_key_in_url};

pub(crate) use access_log::redact_keys;

#[derive(Clone)]
pub struct Proxy {
    state: Arc<State>,
}

impl Proxy {
    pub fn new(state: Arc<State>) -> Proxy {
        Proxy { state }
    }

    /// Answers one request. Infallible: errors are rendered, never propagated to hyper.
    pub async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let snap = self.state.snapshot();
        // Armed before the first await: if the client leaves before the response headers,
        // hyper drops this future and the context still reports the request (`client_gone`).
        let mut ctx = Ctx::new(self.state.clone(), &snap, &req, peer);
        let (mut rsp, code) = match self.pipeline(&snap, req, &mut ctx).await {
            Ok(rsp) => (rsp, "ok"),
            Err(e) => {
                let code = e.code();
                (e.into_response(), code)
            }
        };
        ctx.answer(&mut rsp, code);
        rsp
    }

    async fn pipeline(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, Error> {
        // Looked up first so that every outcome, refusals included, is labelled by its route.
        let route = snap.routes.find(req.method(), req.uri().path());
        ctx.route = route.map(|r| r.label.clone());
        reject_key_in_url(req.uri(), &snap.config.auth.key_prefix)?;
        check_target(req.uri(), req.version(), req.headers())?;
        check_header_size(req.headers(), snap.config.limits.max_header_bytes)?;

        if route.is_some_and(|r| r.handler == Handler::Dashboard) {
            // The dashboard's own files: public, never limited, nothing goes upstream. Its only
            // error is a 404, whose path is redacted like any other.
            return crate::dashboard::serve(req.method(), req.uri().path()).map_err(|_| Error::NotFound {
                method: req.method().to_string(),
                path: redact_keys(req.uri().path(), &snap.config.auth.key_prefix),
            });
        }
        if let Some(route) = route.filter(|r| r.public) {
            // A public route (config `public: true`): no key, no scope, no limits — and nothing
            // about a caller goes upstream (the client's Authorization and x-tollgate-* never do).
            return self.forward(snap, req, ctx, route).await;
        }

        let auth = &snap.config.auth;
        let principal =
            self.state.auth.authenticate(auth, req.headers(), ctx.peer.client, &self.state.metrics).await?;
        ctx.principal = Some(principal.clone());
        let route = route.ok_or_else(|| Error::NotFound {
            method: req.method().to_string(),
            // Key-shaped segments were refused above; anything else starting like a key is
            // still not echoed.
            path: redact_keys(req.uri().path(), &auth.key_prefix),
        })?;
        if route.handler == Handler::Limits {
            // Any valid key may read its own limits, and reading them must not spend them:
            // no scope check, no admission.
            if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
                return Err(Error::NotFound {
                    method: req.method().to_string(),
                    path: route.label.to_string(),
                });
            }
            let (rsp, quota) = crate::limits::report::handle(&self.state, snap, &principal).await?;
            ctx.quota = quota;
            return Ok(rsp);
        }
        route.check(principal.scopes())?;
        self.admit(snap, ctx).await?;
        if route.handler == Handler::Keys {
            return keys_api::handle(&self.state, snap, &principal, req).await;
        }
        self.forward(snap, req, ctx, route).await
    }

    /// The rate-limit decision for the authenticated caller; its quota goes into the response
    /// headers whether it admits or refuses.
    async fn admit(&self, snap: &Snapshot, ctx: &mut Ctx) -> Result<(), Error> {
        let Some(p) = ctx.principal.as_deref() else {
            return Ok(());
        };
        let decided = match &self.state.fleet {
            None => snap.limiter.check_shared(&p.key_id, &p.org, &p.tier),
            Some(fleet) => fleet.check(&snap.config, &snap.limiter, &p.key_id, &p.org, &p.tier).await,
        };
        match decided {
            Ok(q) => {
                ctx.quota = Some(q);
                Ok(())
            }
            Err(r) => {
                if let Some(limit) = r.limit {
                    self.state.metrics.rate_limited.with_label_values(&[&p.tier, limit.label()]).inc();
                }
                ctx.quota = Some(r.quota);
                Err(r.error)
            }
        }
    }

    /// The last step: the upstream's streaming response, or why there is none.
    async fn forward(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        ctx: &Ctx,
        route: &Route,
    ) -> Result<Response<Body>, Error> {
        let caller =
            ctx.principal.as_deref().map(|p| upstream::Caller { key_id: &p.key_id, identity: &p.identity });
        let (upstream_req, flag) =
            upstream::prepare(&snap.upstream, req, &ctx.peer, &ctx.request_id, caller)?;
        let sent = upstream::send(&snap.client, &snap.upstream, upstream_req, flag).await.map_err(
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
