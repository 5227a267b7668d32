//! The rate-limit headers of a decision (§4): OpenAI's `x-ratelimit-*-requests` and the IETF
//! `RateLimit-Policy` / `RateLimit` fields, written from one buffer.

use std::sync::Arc;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

/// `x-ratelimit-limit-requests`, `x-ratelimit-limit-tokens` and `RateLimit-Policy`: they
/// depend on a bucket's limits alone, so admitted requests share the bucket's values instead of
/// formatting them again.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Fixed {
    limit: Option<HeaderValue>,
    /// The request limits' policy items.
    policy: Option<HeaderValue>,
    limit_tokens: Option<HeaderValue>,
    /// The request limits' items and the token limits' after them, for a response that
    /// reports tokens (one that reserves none, such as listing models, reports `policy`).
    policy_tokens: Option<HeaderValue>,
}

/// What the limiter knows after a decision: rendered into the rate-limit headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quota {
    /// (burst, remaining burst capacity, requests per second).
    pub(super) per_second: Option<(u32, u32, u32)>,
    /// (daily budget, remaining today, milliseconds until 00:00 UTC).
    pub(super) daily: Option<(u64, u64, i64)>,
    /// The bucket's preformatted values (set on admitted requests; a refusal may report fewer
    /// limits, so it formats its own).
    pub(super) fixed: Option<Arc<Fixed>>,
    /// Token limits (§12): what remains per minute and today.
    pub(super) tokens: Option<super::tokens::Left>,
}

impl Quota {
    /// This quota with what remains of the tokens `hold` reserved, for the headers.
    pub fn with_tokens(mut self, hold: &super::Hold) -> Quota {
        self.tokens = hold.left();
        self
    }
}

pub(super) fn seconds_ceil(ms: i64) -> u64 {
    u64::try_from((ms + 999) / 1000).unwrap_or(0).max(1)
}

/// OpenAI's reset format: `20ms`, `1s`, `6m0s`, `13h5m2s`.
pub(super) fn put_openai_duration(buf: &mut BytesMut, ms: i64) {
    let mut n = itoa::Buffer::new();
    if ms < 1000 {
        buf.extend_from_slice(n.format(ms.max(0)).as_bytes());
        buf.extend_from_slice(b"ms");
        return;
    }
    let s = (ms + 999) / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        buf.extend_from_slice(n.format(h).as_bytes());
        buf.extend_from_slice(b"h");
    }
    if h > 0 || m > 0 {
        buf.extend_from_slice(n.format(m).as_bytes());
        buf.extend_from_slice(b"m");
    }
    buf.extend_from_slice(n.format(s).as_bytes());
    buf.extend_from_slice(b"s");
}

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

impl Quota {
    /// Writes `x-ratelimit-*-requests` (OpenAI's names, for the budget that runs out last: the
    /// daily one when there is one), with token limits `x-ratelimit-*-tokens` (the per-minute
    /// bucket, else the daily budget), and the IETF `RateLimit-Policy` / `RateLimit` fields
    /// with an item for every limit.
    ///
    /// Runs on every answered request: the values fixed by the limits are the bucket's own,
    /// the others are written into one buffer and split off it (one allocation, no formatting
    /// machinery).
    pub fn write_headers(&self, h: &mut HeaderMap) {
        let formatted;
        let fixed = match &self.fixed {
            Some(f) => &**f,
            None => match self.format_fixed() {
                Some(f) => {
                    formatted = f;
                    &formatted
                }
                None => return,
            },
        };
        let tokens = self.tokens.as_ref().and_then(|t| t.per_minute.or(t.daily).map(|openai| (t, openai)));
        if let Some(v) = &fixed.limit {
            h.insert(LIMIT_REQUESTS, v.clone());
        }
        let policy = match (&tokens, &fixed.policy_tokens) {
            (Some(_), Some(p)) => Some(p),
            _ => fixed.policy.as_ref(),
        };
        if let Some(v) = policy {
            h.insert(RATELIMIT_POLICY, v.clone());
        }
        let mut buf = BytesMut::with_capacity(192);
        let mut n = itoa::Buffer::new();
        if let Some((_, remaining, reset_ms)) = self.openai() {
            buf.extend_from_slice(n.format(remaining).as_bytes());
            put(h, &mut buf, REMAINING_REQUESTS);
            put_openai_duration(&mut buf, reset_ms);
            put(h, &mut buf, RESET_REQUESTS);
        }
        if let (Some((_, (_, remaining, reset_ms))), Some(v)) = (&tokens, &fixed.limit_tokens) {
            h.insert(LIMIT_TOKENS, v.clone());
            buf.extend_from_slice(n.format(*remaining).as_bytes());
            put(h, &mut buf, REMAINING_TOKENS);
            put_openai_duration(&mut buf, *reset_ms);
            put(h, &mut buf, RESET_TOKENS);
        }
        if let Some((burst, remaining, rps)) = self.per_second {
            let refill = u64::try_from((refill_ms(burst, remaining, rps) + 999) / 1000).unwrap_or(0);
            put_field(&mut buf, "requests_per_second", [remaining.into(), refill], [b";r=", b";t="]);
        }
        if let Some((_, remaining, reset_ms)) = self.daily {
            put_field(&mut buf, "daily_requests", [remaining, seconds_ceil(reset_ms)], [b";r=", b";t="]);
        }
        if let Some((t, _)) = tokens {
            if let Some((_, r, ms)) = t.per_minute {
                let reset = seconds_ceil(ms).min(u64::try_from(ms).unwrap_or(0).div_ceil(1000));
                put_field(&mut buf, "tokens_per_minute", [r, reset], [b";r=", b";t="]);
            }
            if let Some((_, r, ms)) = t.daily {
                put_field(&mut buf, "daily_tokens", [r, seconds_ceil(ms)], [b";r=", b";t="]);
            }
        }
        put(h, &mut buf, RATELIMIT);
    }

    /// OpenAI's (limit, remaining, reset in ms): the budget that runs out last, the daily one
    /// when there is one.
    fn openai(&self) -> Option<(u64, u64, i64)> {
        match (self.daily, self.per_second) {
            (Some(daily), _) => Some(daily),
            (None, Some((burst, remaining, rps))) => {
                Some((u64::from(burst), u64::from(remaining), refill_ms(burst, remaining, rps)))
            }
            (None, None) => None,
        }
    }

    /// The values that depend on the limits alone. A full bucket of `burst` refills in
    /// burst/rps seconds: q/w states both the burst and the sustained rate.
    pub(super) fn format_fixed(&self) -> Option<Fixed> {
        let tokens = self.tokens.as_ref().filter(|t| t.per_minute.or(t.daily).is_some());
        if self.openai().is_none() && tokens.is_none() {
            return None;
        }
        let mut buf = BytesMut::with_capacity(192);
        let mut n = itoa::Buffer::new();
        let limit = self.openai().and_then(|(limit, _, _)| {
            buf.extend_from_slice(n.format(limit).as_bytes());
            value(&mut buf)
        });
        let limit_tokens = tokens.and_then(|t| t.per_minute.or(t.daily)).and_then(|(limit, _, _)| {
            buf.extend_from_slice(n.format(limit).as_bytes());
            value(&mut buf)
        });
        if let Some((burst, _, rps)) = self.per_second {
            let window = burst.div_ceil(rps.max(1));
            put_field(&mut buf, "requests_per_second", [burst.into(), window.into()], [b";q=", b";w="]);
        }
        if let Some((budget, _, _)) = self.daily {
            put_field(&mut buf, "daily_requests", [budget, 86400], [b";q=", b";w="]);
        }
        let requests_items = buf.clone();
        let policy = (!buf.is_empty()).then(|| value(&mut buf)).flatten();
        let policy_tokens = tokens.and_then(|t| {
            buf.extend_from_slice(&requests_items);
            if let Some((l, _, _)) = t.per_minute {
                put_field(&mut buf, "tokens_per_minute", [l, 60], [b";q=", b";w="]);
            }
            if let Some((l, _, _)) = t.daily {
                put_field(&mut buf, "daily_tokens", [l, 86400], [b";q=", b";w="]);
            }
            value(&mut buf)
        });
        Some(Fixed { limit, policy, limit_tokens, policy_tokens })
    }
}

/// The buffer's contents so far as a header value (digits, letters and `";=, ` only: always
/// valid), leaving the buffer empty for the next one.
fn value(buf: &mut BytesMut) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(buf.split().freeze()).ok()
}

fn put(h: &mut HeaderMap, buf: &mut BytesMut, name: HeaderName) {
    if let Some(v) = value(buf) {
        h.insert(name, v);
    }
}

/// One item of a structured-field list: `"name";k1=v1;k2=v2`, after a `, ` if not the first.
fn put_field(buf: &mut BytesMut, name: &str, values: [u64; 2], keys: [&[u8]; 2]) {
    let mut n = itoa::Buffer::new();
    if !buf.is_empty() {
        buf.extend_from_slice(b", ");
    }
    buf.extend_from_slice(b"\"");
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\"");
    for (k, v) in keys.iter().zip(values) {
        buf.extend_from_slice(k);
        buf.extend_from_slice(n.format(v).as_bytes());
    }
}

/// Milliseconds until a bucket of `burst` with `remaining` cells left is full again.
pub(super) fn refill_ms(burst: u32, remaining: u32, rps: u32) -> i64 {
    i64::from(burst - remaining.min(burst)) * 1000 / i64::from(rps.max(1))
}
