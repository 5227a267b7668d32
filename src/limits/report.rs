//! `GET /v1/limits` (§13): the caller's tier, its limits and what remains now and today, served
//! by tollgate to any valid key. Sits in the pipeline where admission would: it reads the
//! limiter's state (`Limiter::peek`, `Fleet::peek`) and never consumes from it.
//!
//! The JSON keys every limit by its name under `limits`, each with the same fields (`limit`,
//! `remaining`, `reset_seconds`, plus what is particular to it), and `null` for a limit the tier
//! does not set: the request limits (§4), and the token and concurrency limits (§12) beside
//! them (`concurrent_requests` has `in_flight` in place of a reset).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use super::{Peek, Quota};
use crate::auth::Principal;
use crate::body::Body;
use crate::clock::rfc3339;
use crate::config::Tier;
use crate::error::Error;
use crate::state::{Snapshot, State};

/// The report and the rate-limit headers that go with it (they consume nothing either).
pub async fn handle(
    state: &State,
    snap: &Snapshot,
    caller: &Principal,
) -> Result<(Response<Body>, Option<Quota>), Error> {
    let (limits, peek, backend) = match &state.fleet {
        None => {
            let (limits, peek) =
                snap.limiter.peek(&caller.key_id, &caller.org, &caller.tier).map_err(|r| r.error)?;
            (limits, Ok(peek), "local")
        }
        Some(fleet) => {
            let (limits, peek) = fleet
                .peek(&snap.limiter, &caller.key_id, &caller.org, &caller.tier)
                .await
                .map_err(|r| r.error)?;
            (limits, peek, "redis")
        }
    };
    let v = report(caller, &limits, &peek, backend, crate::clock::now_ms());
    let mut rsp = Response::new(Body::full(Bytes::from(v.to_string())));
    *rsp.status_mut() = StatusCode::OK;
    rsp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // What remains changes with every request: never cached.
    rsp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((rsp, peek.ok().map(|p| p.quota())))
}

/// The JSON body. `peek` is `Err` when the shared state could not be read: the limits are
/// still reported, what remains is `null`, and `state` / `message` say why.
pub fn report(
    caller: &Principal,
    limits: &Tier,
    peek: &Result<Peek, String>,
    backend: &str,
    now_ms: i64,
) -> Value {
    let ok = peek.as_ref().ok();
    let per_second = limits.requests_per_second.map(|rps| {
        let burst = limits.burst.unwrap_or(rps);
        let now = ok.and_then(|p| p.per_second);
        json!({
            "limit": rps,
            "burst": burst,
            "remaining": now.map(|(_, remaining, _, _)| remaining),
            // Until the bucket holds `burst` again.
            "reset_seconds": now.map(|(_, _, _, full_in_ms)| full_in_ms as f64 / 1000.0),
        })
    });
    let daily = limits.daily_requests.map(|budget| {
        let today = ok.and_then(|p| p.daily);
        json!({
            "limit": budget,
            "used": today.map(|(_, used, _, _)| used),
            "remaining": today.map(|(_, _, remaining, _)| remaining),
            "reset_seconds": today.map(|(_, _, _, ms)| ms.div_euclid(1000) + i64::from(ms % 1000 != 0)),
            "resets_at": rfc3339((now_ms.div_euclid(crate::clock::DAY_MS) + 1) * crate::clock::DAY_MS),
        })
    });
    let tokens = ok.and_then(|p| p.tokens);
    let tokens_per_minute = limits.tokens_per_minute.map(|limit| {
        let now = tokens.and_then(|t| t.per_minute);
        json!({
            "limit": limit,
            "remaining": now.map(|(_, remaining, _)| remaining),
            // Until the bucket holds `limit` again (refilled continuously).
            "reset_seconds": now.map(|(_, _, full_in_ms)| full_in_ms as f64 / 1000.0),
        })
    });
    let daily_tokens = limits.daily_tokens.map(|budget| {
        let today = tokens.and_then(|t| t.daily);
        json!({
            "limit": budget,
            "used": tokens.filter(|_| today.is_some()).map(|t| t.used_today),
            "remaining": today.map(|(_, remaining, _)| remaining),
            "reset_seconds": today.map(|(_, _, ms)| ms.div_euclid(1000) + i64::from(ms % 1000 != 0)),
            "resets_at": rfc3339((now_ms.div_euclid(crate::clock::DAY_MS) + 1) * crate::clock::DAY_MS),
        })
    });
    let concurrent = limits.max_concurrent_requests.map(|max| {
        let now = ok.and_then(|p| p.concurrent);
        json!({
            "limit": max,
            "in_flight": now.map(|(_, n)| n),
            "remaining": now.map(|(_, n)| max.saturating_sub(n)),
        })
    });
    json!({
        "object": "limits",
        "key_id": &*caller.key_id,
        "org": &*caller.org,
        "workspace": caller.workspace,
        "tier": caller.tier,
        "scopes": caller.scopes,
        "applies_to": ok.map(|p| p.applies_to),
        "backend": backend,
        "state": if ok.is_some() { "ok" } else { "unavailable" },
        "message": peek.as_ref().err(),
        "limits": {
            "requests_per_second": per_second,
            "daily_requests": daily,
            "tokens_per_minute": tokens_per_minute,
            "daily_tokens": daily_tokens,
            "concurrent_requests": concurrent,
        },
    })
}
