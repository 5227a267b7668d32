//! Every failure the request path can produce → status + stable `code` + the JSON body of §5.
//!
//! One enum, one renderer (`Error::into_response`); rendering has no side effects, so the
//! pipeline decides what to count and log, and every step can simply return `Err(..)`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::Body;

/// The header that marks a response as produced by tollgate rather than by the upstream.
pub const ERROR_HEADER: &str = "x-tollgate-error";

/// What refused a request with 429: `details.limit` of the body and the `limit` label of
/// `tollgate_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    RequestsPerSecond,
    DailyRequests,
    /// Failed authentications from one source address (§4).
    FailedAuth,
    TokensPerMinute,
    DailyTokens,
    ConcurrentRequests,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::RequestsPerSecond => "requests_per_second",
            Limit::DailyRequests => "daily_requests",
            Limit::FailedAuth => "failed_auth",
            Limit::TokensPerMinute => "tokens_per_minute",
            Limit::DailyTokens => "daily_tokens",
            Limit::ConcurrentRequests => "concurrent_requests",
        }
    }
}

impl PartialEq<&str> for Limit {
    fn eq(&self, other: &&str) -> bool {
        self.label() == *other
    }
}

/// Whose fault an error is: the client's (downstream), the upstream's, or tollgate's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A key-like query parameter: keys belong in the `Authorization` header.
    #[error("API keys must be sent in the Authorization header, not in the URL (query parameter `{param}`). Remove it from the URL and rotate the key: URLs end up in logs.")]
    KeyInUrl { param: String },

    /// A path segment with the shape of one of our keys.
    #[error("API keys must be sent in the Authorization header, not in the URL (a path segment has the shape of an API key). Remove it from the URL and rotate the key: URLs end up in logs.")]
    KeyInPath,

    /// A request target that could route differently here and upstream (dot segments, encoded
    /// slashes, absolute-form aimed elsewhere…). Rejected, never normalised.
    #[error("{0}")]
    BadRequest(String),

    #[error("{message}")]
    Unauthorized { message: String, reason: &'static str },

    #[error("Your API key does not have permission to perform this action. A key with the `{required}` scope is required.")]
    Forbidden { required: String, current: Vec<String> },

    /// A key-API action that would yield a key of another tier than the caller's.
    #[error("Your API key does not have permission to perform this action. Keys it creates, rotates or restores must be of its own tier `{current}`, not `{tier}`.")]
    TierForbidden { tier: String, current: String },

    /// A key create or rotate asking for a scope its tier does not allow (`tiers.X.scopes`).
    #[error("Keys of tier `{tier}` cannot carry the `{scope}` scope; this tier allows: {}.", allowed.join(", "))]
    ScopeNotAllowed { scope: String, tier: String, allowed: Vec<String> },

    /// A key-API restore of a key that would outlive the caller's own key.
    #[error("Your API key does not have permission to perform this action. It expires, and can only restore keys that expire no later than itself.")]
    ExpiryForbidden,

    #[error("No route matches {method} {path}.")]
    NotFound { method: String, path: String },

    #[error("No API key with id `{0}`.")]
    KeyNotFound(String),

    #[error("The request body exceeds the limit of {limit} bytes.")]
    PayloadTooLarge { limit: u64 },

    #[error("The request headers exceed the limit of {limit} bytes.")]
    HeadersTooLarge { limit: usize },

    #[error("The request has more than {max} header fields.")]
    TooManyHeaders { max: usize },

    #[error("{message}")]
    RateLimited {
        message: String,
        limit: Limit,
        tier: Option<String>,
        retry_after: u64,
        /// `x-should-retry: false` — the daily budget is gone; retrying today is pointless.
        exhausted: bool,
    },

    #[error("The upstream server could not be reached ({kind}).")]
    UpstreamUnavailable { kind: &'static str },

    #[error("{0}")]
    Unavailable(&'static str),

    /// Tollgate's own failure (a configuration that does not fit a key, a failed hash). The
    /// message is written for the client and names nothing secret; details go to the log.
    #[error("{0}")]
    Internal(String),

    #[error("The upstream server sent no response headers within {}s.", .after.as_secs_f64())]
    UpstreamTimeout { after: Duration },

    /// The client stopped sending its request body mid-way for `stream_idle_timeout`: the
    /// client's fault, not the upstream's.
    #[error("The request body stalled: nothing was received for {}s. Send the whole body without pausing.", after.as_secs())]
    RequestTimeout { after: Duration },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::KeyInUrl { .. } | Error::KeyInPath | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Error::Forbidden { .. }
            | Error::TierForbidden { .. }
            | Error::ScopeNotAllowed { .. }
            | Error::ExpiryForbidden => StatusCode::FORBIDDEN,
            Error::NotFound { .. } | Error::KeyNotFound(_) => StatusCode::NOT_FOUND,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::HeadersTooLarge { .. } | Error::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamUnavailable { .. } => StatusCode::BAD_GATEWAY,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The stable snake_case code: the `code` of the body, `x-tollgate-error` and the metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Error::KeyInUrl { .. } | Error::KeyInPath => "key_in_url",
            Error::BadRequest(_) => "bad_request",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Forbidden { .. }
            | Error::TierForbidden { .. }
            | Error::ScopeNotAllowed { .. }
            | Error::ExpiryForbidden => "forbidden",
            Error::NotFound { .. } | Error::KeyNotFound(_) => "not_found",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::HeadersTooLarge { .. } | Error::TooManyHeaders { .. } => "headers_too_large",
            Error::RateLimited { .. } => "rate_limited",
            Error::UpstreamUnavailable { .. } => "upstream_unavailable",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal_error",
            Error::UpstreamTimeout { .. } => "upstream_timeout",
            Error::RequestTimeout { .. } => "request_timeout",
        }
    }

    /// Whose fault it is, for logs and for deciding what to count as an upstream failure.
    pub fn fault(&self) -> Fault {
        match self {
            Error::UpstreamUnavailable { .. } | Error::UpstreamTimeout { .. } => Fault::Upstream,
            Error::Unavailable(_) | Error::Internal(_) => Fault::Internal,
            _ => Fault::Downstream,
        }
    }

    /// OpenAI's error `type`, which OpenAI SDKs and tools key on.
    fn kind(&self) -> &'static str {
        match self {
            Error::KeyInUrl { .. }
            | Error::KeyInPath
            | Error::BadRequest(_)
            | Error::NotFound { .. }
            | Error::KeyNotFound(_)
            | Error::PayloadTooLarge { .. }
            | Error::HeadersTooLarge { .. }
            | Error::TooManyHeaders { .. }
            | Error::RequestTimeout { .. } => "invalid_request_error",
            Error::Unauthorized { .. } => "authentication_error",
            Error::Forbidden { .. }
            | Error::TierForbidden { .. }
            | Error::ScopeNotAllowed { .. }
            | Error::ExpiryForbidden => "permission_error",
            Error::RateLimited { .. } => "rate_limit_error",
            Error::UpstreamUnavailable { .. }
            | Error::Unavailable(_)
            | Error::UpstreamTimeout { .. }
            | Error::Internal(_) => "server_error",
        }
    }

    fn details(&self) -> Value {
        match self {
            Error::KeyInUrl { param } => json!({ "parameter": param }),
            Error::KeyInPath => json!({ "location": "path" }),
            Error::Forbidden { required, current } => {
                json!({ "required_scope": required, "current_scope": current })
            }
            Error::TierForbidden { tier, current } => {
                json!({ "required_tier": tier, "current_tier": current })
            }
            Error::ScopeNotAllowed { scope, tier, allowed } => {
                json!({ "scope": scope, "tier": tier, "allowed_scopes": allowed })
            }
            Error::PayloadTooLarge { limit } => json!({ "max_body_bytes": limit }),
            Error::HeadersTooLarge { limit } => json!({ "max_header_bytes": limit }),
            Error::TooManyHeaders { max } => json!({ "max_header_fields": max }),
            Error::RateLimited { limit, tier, retry_after, .. } => {
                json!({ "limit": limit.label(), "tier": tier, "retry_after_seconds": retry_after })
            }
            Error::UpstreamTimeout { after } | Error::RequestTimeout { after } => {
                json!({ "timeout_seconds": after.as_secs_f64() })
            }
            _ => json!({}),
        }
    }

    /// The JSON body of §5.
    pub fn body(&self) -> Bytes {
        let v = json!({ "error": {
            "code": self.code(),
            "type": self.kind(),
            "message": self.to_string(),
            "details": self.details(),
        }});
        Bytes::from(v.to_string())
    }

    /// Renders the error as a complete response. No side effects.
    pub fn into_response(self) -> Response<Body> {
        let mut rsp = Response::new(Body::full(self.body()));
        *rsp.status_mut() = self.status();
        let h = rsp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        match &self {
            Error::Unauthorized { .. } => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Error::RateLimited { retry_after, exhausted, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
                if *exhausted {
                    h.insert("x-should-retry", HeaderValue::from_static("false"));
                }
            }
            Error::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        rsp
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_body_is_pinned() {
        let e =
            Error::Forbidden { required: "inference:write".into(), current: vec!["inference:read".into()] };
        let v: Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            json!({"error": {
                "code": "forbidden",
                "type": "permission_error",
                "message": "Your API key does not have permission to perform this action. A key with the `inference:write` scope is required.",
                "details": {"required_scope": "inference:write", "current_scope": ["inference:read"]}
            }})
        );
    }

    #[test]
    fn rate_limited_headers() {
        let rsp = Error::RateLimited {
            message: "x".into(),
            limit: Limit::DailyRequests,
            tier: Some("audit".into()),
            retry_after: 7,
            exhausted: true,
        }
        .into_response();
        assert_eq!(rsp.status(), 429);
        assert_eq!(rsp.headers()["retry-after"], "7");
        assert_eq!(rsp.headers()["x-should-retry"], "false");
        assert_eq!(rsp.headers()["x-tollgate-error"], "rate_limited");
    }

    #[test]
    fn internal_errors_are_500_json_and_say_whose_fault() {
        let e = Error::Internal("This key's tier `gold` is not configured on this server.".into());
        assert_eq!(e.fault(), Fault::Internal);
        let rsp = e.clone().into_response();
        assert_eq!(rsp.status(), 500);
        assert_eq!(rsp.headers()["x-tollgate-error"], "internal_error");
        assert_eq!(rsp.headers()["content-type"], "application/json");
        let v: Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "internal_error");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["details"], json!({}));
        assert_eq!(Error::UpstreamTimeout { after: Duration::from_secs(1) }.fault(), Fault::Upstream);
        assert_eq!(Error::BadRequest("x".into()).fault(), Fault::Downstream);
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let rsp =
            Error::Unauthorized { message: "Missing API key.".into(), reason: "missing" }.into_response();
        assert_eq!(rsp.headers()["www-authenticate"], "Bearer");
        assert_eq!(rsp.headers()["content-type"], "application/json");
    }
}
