//! A refused request as both backends answer it (§4, §12): the 429, its `Retry-After`, and the
//! message naming the limit, so that the local limiter and the fleet's in Redis say the same.

use std::time::Duration;

use super::{Quota, Rejection};
use crate::config::Tier;
use crate::error::{Error, Limit};

/// A 429 for `limit`. The daily budgets do not clear before midnight: those tell SDKs not to
/// retry (`x-should-retry: false`).
pub(super) fn reject(
    limit: Limit,
    tier: &str,
    message: String,
    retry_after: u64,
    quota: Quota,
) -> Box<Rejection> {
    let error = Error::RateLimited {
        message,
        limit,
        tier: Some(tier.to_string()),
        retry_after,
        exhausted: matches!(limit, Limit::DailyRequests | Limit::DailyTokens),
    };
    Box::new(Rejection { error, quota, limit: Some(limit) })
}

/// `Retry-After` in whole seconds: rounded up, at least 1, so that a retry at that moment is
/// admitted.
pub(super) fn retry_after(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// What a refusal by `limit` of `limits` (tier `tier`) tells the caller; `reserved`: the tokens
/// the refused request would have reserved.
pub(super) fn message(limit: Limit, limits: &Tier, tier: &str, reserved: u64) -> String {
    match limit {
        Limit::RequestsPerSecond => {
            let rps = limits.requests_per_second.unwrap_or(0);
            let burst = limits.burst.unwrap_or(rps);
            format!("Rate limit of {rps} requests per second (burst {burst}) exceeded for tier `{tier}`.")
        }
        Limit::DailyRequests => format!(
            "Daily request budget of {} exhausted for tier `{tier}`; it resets at 00:00 UTC.",
            limits.daily_requests.unwrap_or(0)
        ),
        Limit::TokensPerMinute => format!(
            "Token rate limit of {} tokens per minute exceeded for tier `{tier}` (this request reserves {reserved}).",
            limits.tokens_per_minute.unwrap_or(0)
        ),
        Limit::DailyTokens => format!(
            "Daily token budget of {} exhausted for tier `{tier}`; it resets at 00:00 UTC.",
            limits.daily_tokens.unwrap_or(0)
        ),
        Limit::FailedAuth => "Too many failed authentications from this address.".to_string(),
        Limit::ConcurrentRequests => format!(
            "Too many requests in flight: tier `{tier}` allows {} at once; retry when one has finished.",
            limits.max_concurrent_requests.unwrap_or(0)
        ),
    }
}
