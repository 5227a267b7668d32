//! THE PIPELINE — read this file first. One request's life, in the order of SPEC §1:
//!
//! 1. `reject_key_in_url`, `check_target`, header size — refuse what must never go further;
//! 2. authenticate — `Authorization: Bearer` → principal (cache → store → Argon2id);
//! 3. route table → scope check (`/v1/keys…` is then served by tollgate itself; `/v1/limits`
//!    needs a valid key only and skips admission; `/dashboard…` needs no key at all);
//! 4. admit — per-second GCRA + daily budget, and for LLM tiers the token reservation
//!    (estimated from the body, read first) and a concurrency slot, all or nothing; never
//!    queued, 429 with `Retry-After`;
//! 5. forward — pooled upstream, streaming both ways; an LLM response settles its usage when
//!    its body ends;
//! 6. response: `x-request-id`, rate-limit headers, then metrics and one access-log line when
//!    the body ends (`access_log.rs`).
//!
//! Each step records what it learned in the request's `Ctx` (`context.rs`). `handle` never
//! fails: every `Err` becomes the JSON response of §5 in one place.

mod access_log;
mod context;
pub mod routes;
pub mod target;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::error::Error;
use crate::keys::api as keys_api;
use crate::limits::redis::Want;
use crate::limits::{Hold, Limiter, Rejection, Resolved};
use crate::metrics::TierMetrics;
use crate::net::Peer;
use crate::state::{Snapshot, State};
use crate::upstream;
use crate::usage;
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
        // x-request-id and up to five rate-limit headers: one growth of the map, not several.
        // Written here, not in `Ctx::answer`: with the body's observers held as one, this
        // measured ~90 instructions fewer per request (`benches/load/profile.sh h1`, through
        // inlining around `handle`; the insert itself is the same call).
        let h = rsp.headers_mut();
        h.reserve(6);
        h.insert(upstream::X_REQUEST_ID, ctx.request_id.clone());
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
        ctx.route = route.map(|r| (r.label.clone(), r.request_duration(&self.state.metrics).clone()));
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
            // Boxed, as the keys API below: a rare route's future would otherwise size the
            // future of every request, which hyper moves by value.
            let (rsp, quota) = Box::pin(crate::limits::report::handle(&self.state, snap, &principal)).await?;
            ctx.quota = quota;
            return Ok(rsp);
        }
        route.check(principal.scopes())?;
        // Resolved once: which limits apply (the decision below uses the same), and whether
        // they hold anything past the request.
        let resolved = snap.limiter.resolve(&principal.key_id, &principal.org, &principal.tier);
        let limits = resolved.as_ref().ok().and_then(Limiter::llm_limits);
        let holds = limits.is_some();
        if route.handler == Handler::Keys {
            self.admit(snap, ctx, resolved, None, holds).await?;
            return Box::pin(keys_api::handle(&self.state, snap, &principal, req)).await;
        }
        // An LLM request of a tier that counts tokens: its body is read for the estimate (and
        // a stream asked for usage) before the decision that reserves it.
        if let Some(tier) = limits.filter(|t| t.counts_tokens() && req.method() == http::Method::POST) {
            let (req, prepared) = usage::prepare(
                req,
                tier.default_output_tokens.unwrap_or(usage::DEFAULT_OUTPUT_TOKENS),
                snap.config.rate_limits.inject_stream_usage,
                snap.config.limits.stream_idle_timeout,
            )
            .await?;
            if let Some(reason) = prepared.unparsed {
                self.state.metrics.usage_unparsed.with_label_values(&[reason]).inc();
            }
            self.admit(snap, ctx, resolved, Some(prepared.estimate), true).await?;
            let tier = principal.tier_metrics(&self.state.metrics);
            return self.forward_holding(snap, req, ctx, route, tier, prepared.injected).await;
        }
        self.admit(snap, ctx, resolved, None, holds).await?;
        self.forward_holding(snap, req, ctx, route, principal.tier_metrics(&self.state.metrics), false).await
    }

    /// Forwards; what the request holds (a concurrency slot, a token reservation) goes with a
    /// successful response's body. Without one — no response, or one that is not 2xx: the
    /// upstream refused the work — it is given back, charged nothing, before the answer leaves,
    /// so that a retry finds it back (a fleet's settlement waited for, within its timeout).
    async fn forward_holding(
        &self,
        snap: &Snapshot,
        req: Request<impl Into<crate::body::Outgoing>>,
        ctx: &mut Ctx,
        route: &Route,
        tier: &Arc<TierMetrics>,
        injected: bool,
    ) -> Result<Response<Body>, Error> {
        let forwarded = self.forward(snap, req, ctx, route).await;
        let Some(hold) = ctx.hold.take() else { return forwarded };
        match forwarded {
            Ok(mut rsp) if rsp.status().is_success() => {
                self.settle_when_done(&mut rsp, hold, tier, injected);
                Ok(rsp)
            }
            other => {
                if let Some(settling) = hold.release() {
                    settling.await;
                }
                other
            }
        }
    }

    /// Hands what the request holds to the response body, which gives it back — settled with
    /// the reported usage — when it ends.
    fn settle_when_done(
        &self,
        rsp: &mut Response<Body>,
        hold: Hold,
        tier: &Arc<TierMetrics>,
        injected: bool,
    ) {
        let counters = usage::settle::Counters {
            tier: tier.clone(),
            unreported: self.state.metrics.usage_unreported.clone(),
        };
        let content_type = rsp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let meter = usage::meter::Meter::new(content_type, injected);
        if meter.strips() {
            // The client did not ask for the usage chunk: it never sees it (nor a length that
            // would count it).
            rsp.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
        if meter.strips() || hold.settles_later() {
            let body = std::mem::replace(rsp.body_mut(), Body::empty());
            *rsp.body_mut() = Body::stream(usage::settle::Metered::new(body, hold, meter, counters));
        } else {
            rsp.body_mut().observe(Box::new(usage::settle::Settle::new(hold, meter, counters)));
        }
    }

    /// The rate-limit decision for the authenticated caller; its quota goes into the response
    /// headers whether it admits or refuses.
    async fn admit(
        &self,
        snap: &Snapshot,
        ctx: &mut Ctx,
        resolved: Result<Resolved<'_>, Box<Rejection>>,
        estimate: Option<u64>,
        holds: bool,
    ) -> Result<(), Error> {
        let Some(p) = ctx.principal.as_deref() else {
            return Ok(());
        };
        let gauge = || p.tier_metrics(&self.state.metrics).concurrent.clone();
        let decided = match &self.state.fleet {
            None => resolved
                .and_then(|r| snap.limiter.admit(r, &p.tier, holds.then(|| (estimate, Some(gauge()))))),
            // Boxed behind a `dyn`, so that the fleet's future (a Redis round trip under a
            // timeout) is neither part of every request's future nor inlined into `pipeline`:
            // sized and inlined, it took `pipeline` out of line in `handle` even where no fleet
            // is configured (`benches/load/profile.sh h1`: ~80 instructions per request). One
            // allocation beside a Redis round trip is nothing.
            Some(fleet) => {
                let want = holds.then(|| Want { estimate, gauge: Some(gauge()) });
                let check: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                    Box::pin(fleet.check(&snap.config, &snap.limiter, &p.key_id, &p.org, &p.tier, want));
                check.await
            }
        };
        match decided {
            Ok((q, hold)) => {
                ctx.quota = Some(q);
                ctx.hold = hold;
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
        req: Request<impl Into<crate::body::Outgoing>>,
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
        route.upstream_duration(&self.state.metrics).observe(sent.upstream_time.as_secs_f64());
        Ok(sent.response)
    }
}
