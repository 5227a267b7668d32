//! The decision script's answer (`decide.lua`) as the local limiter gives it: a quota for the
//! headers, or the same 429 with the same message.

use std::time::Duration;

use super::super::refusal::{message, reject, retry_after};
use super::super::tokens::Left;
use super::super::{Quota, Rejection};
use crate::config::Tier;
use crate::error::Limit;

#[derive(Debug, Clone, Copy)]
pub(super) struct Reply {
    pub(super) admitted: bool,
    refused_by: i64,
    wait_us: i64,
    burst_left: i64,
    daily_left: i64,
    until_midnight_us: i64,
    /// Whole tokens in the bucket (negative: debt), ms until it is full, tokens used today:
    /// read only when the request reserves tokens and nothing refused it before.
    tokens: i64,
    tokens_full_ms: i64,
    tokens_today: i64,
    /// Requests taken: 1, or more for a debited lease (0 when refused).
    pub(super) taken: i64,
}

impl Reply {
    /// The script's reply: eleven integers separated by spaces.
    pub(super) fn parse(s: &[u8]) -> Option<Reply> {
        let mut v = [0i64; 11];
        let mut fields = s.split(|b| *b == b' ');
        for slot in &mut v {
            *slot = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
        }
        if fields.next().is_some() {
            return None;
        }
        Reply::from(&v)
    }

    pub(super) fn from(v: &[i64]) -> Option<Reply> {
        match *v {
            [a, by, wait, burst, daily, midnight, tokens, full, today, _in_flight, taken] => Some(Reply {
                admitted: a == 1,
                refused_by: by,
                wait_us: wait,
                burst_left: burst,
                daily_left: daily,
                until_midnight_us: midnight,
                tokens,
                tokens_full_ms: full,
                tokens_today: today,
                taken,
            }),
            _ => None,
        }
    }

    /// The limit that refused, if any.
    pub(super) fn limit(&self) -> Option<Limit> {
        match (self.admitted, self.refused_by) {
            (true, _) => None,
            (_, 2) => Some(Limit::DailyRequests),
            (_, 3) => Some(Limit::TokensPerMinute),
            (_, 4) => Some(Limit::DailyTokens),
            (_, 5) => Some(Limit::ConcurrentRequests),
            _ => Some(Limit::RequestsPerSecond),
        }
    }

    /// How long a refusal holds.
    pub(super) fn wait(&self) -> Option<Duration> {
        (!self.admitted).then(|| Duration::from_micros(u64::try_from(self.wait_us.max(1)).unwrap_or(1)))
    }

    /// What remains of the token limits, when the script read them.
    pub(super) fn tokens_left(&self, limits: &Tier) -> Option<Left> {
        if self.limit() == Some(Limit::ConcurrentRequests) {
            return None;
        }
        let today = u64::try_from(self.tokens_today.max(0)).unwrap_or(0);
        Some(Left {
            per_minute: limits.tokens_per_minute.map(|m| {
                (m, u64::try_from(self.tokens.max(0)).unwrap_or(0).min(m), self.tokens_full_ms.max(0))
            }),
            daily: limits.daily_tokens.map(|d| (d, d.saturating_sub(today), self.until_midnight_us / 1000)),
            used_today: today,
        })
    }
}

/// The answer as a quota, or a 429; `reserved`: the tokens asked for, if any.
pub(super) fn outcome(
    r: &Reply,
    limits: &Tier,
    tier: &str,
    reserved: Option<u64>,
) -> Result<Quota, Box<Rejection>> {
    let until_midnight_ms = r.until_midnight_us / 1000;
    let mut quota = Quota::default();
    if let Some(rps) = limits.requests_per_second {
        let burst = limits.burst.unwrap_or(rps);
        quota.per_second = Some((burst, u32::try_from(r.burst_left.max(0)).unwrap_or(0), rps));
    }
    if let Some(budget) = limits.daily_requests {
        quota.daily = Some((budget, u64::try_from(r.daily_left.max(0)).unwrap_or(0), until_midnight_ms));
    }
    if reserved.is_some() {
        quota.tokens = r.tokens_left(limits);
    }
    let Some(limit) = r.limit() else {
        return Ok(quota);
    };
    // As the local limiter reports each refusal: only the state of the limit that refused (the
    // others were not consulted, or are unchanged).
    match limit {
        Limit::DailyRequests => quota.per_second = None,
        Limit::TokensPerMinute | Limit::DailyTokens => {
            quota = Quota { tokens: quota.tokens, ..Quota::default() }
        }
        Limit::ConcurrentRequests => quota = Quota::default(),
        _ => {}
    }
    let wait = r.wait().unwrap_or(Duration::from_secs(1));
    Err(reject(limit, tier, message(limit, limits, tier, reserved.unwrap_or(0)), retry_after(wait), quota))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn replies_become_quotas_and_refusals() {
        let t = Tier {
            requests_per_second: Some(50),
            burst: Some(200),
            daily_requests: Some(100_000),
            tokens_per_minute: Some(1000),
            ..Tier::default()
        };
        let ok = Reply::from(&[1, 0, 0, 199, 99_999, 3_600_000_000, 900, 6000, 100, 1, 1]).unwrap();
        let q = outcome(&ok, &t, "audit", Some(100)).unwrap();
        assert_eq!((q.per_second, q.daily), (Some((200, 199, 50)), Some((100_000, 99_999, 3_600_000))));
        assert_eq!(q.tokens.unwrap().per_minute, Some((1000, 900, 6000)));
        assert!(outcome(&ok, &t, "audit", None).unwrap().tokens.is_none(), "nothing reserved, nothing said");
        let slow = Reply::from(&[0, 1, 20_000, 0, 99_000, 3_600_000_000, 0, 0, 0, 0, 0]).unwrap();
        let r = outcome(&slow, &t, "audit", None).unwrap_err();
        assert_eq!(r.limit, Some(Limit::RequestsPerSecond));
        assert!(matches!(r.error, Error::RateLimited { retry_after: 1, exhausted: false, .. }));
        let day = Reply::from(&[0, 2, 3_600_000_000, -1, 0, 3_600_000_000, 0, 0, 0, 0, 0]).unwrap();
        let r = outcome(&day, &t, "audit", None).unwrap_err();
        assert_eq!(r.limit, Some(Limit::DailyRequests));
        assert!(matches!(r.error, Error::RateLimited { retry_after: 3600, exhausted: true, .. }));
        assert_eq!(r.quota.per_second, None);
        let debt = Reply::from(&[0, 3, 2_500_000, -1, -1, 3_600_000_000, -40, 62_400, 0, 0, 0]).unwrap();
        let r = outcome(&debt, &t, "audit", Some(1)).unwrap_err();
        assert_eq!(r.limit, Some(Limit::TokensPerMinute));
        assert!(matches!(r.error, Error::RateLimited { retry_after: 3, .. }));
        assert_eq!(r.quota.tokens.unwrap().per_minute, Some((1000, 0, 62_400)), "debt reads as 0 left");
        assert_eq!(r.quota.per_second, None);
        let full = Reply::from(&[0, 5, 1_000_000, -1, -1, 3_600_000_000, 0, 0, 0, 4, 0]).unwrap();
        let r = outcome(&full, &t, "audit", Some(1)).unwrap_err();
        assert_eq!(r.limit, Some(Limit::ConcurrentRequests));
        assert!(r.quota.tokens.is_none());
        assert!(Reply::from(&[1, 0]).is_none());
        let parsed = Reply::parse(b"0 3 2500000 -1 -1 3600000000 -40 62400 0 0 0").unwrap();
        assert_eq!(
            (parsed.admitted, parsed.limit(), parsed.tokens),
            (false, Some(Limit::TokensPerMinute), -40)
        );
        for bad in [
            &b"1 0 0"[..],
            b"1 0 0 1 1 1 1 1 1 1 1 1",
            b"1 0 0 1 1 1 1 1 1 1 x",
            b"",
            b"1  0 0 1 1 1 1 1 1 1 1",
        ] {
            assert!(Reply::parse(bad).is_none(), "{:?}", std::str::from_utf8(bad));
        }
    }
}
