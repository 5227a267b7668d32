//! Rate-limit arithmetic, exactly, with governor's fake clock and an injected wall clock.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use http::HeaderMap;

use super::*;

/// 2026-11-23T12:00:00Z.
const NOON: i64 = 20_780 * DAY_MS + DAY_MS / 2;

struct Fixture {
    clock: FakeRelativeClock,
    wall: Arc<AtomicI64>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture { clock: FakeRelativeClock::default(), wall: Arc::new(AtomicI64::new(NOON)) }
    }

    fn limiter(&self, yaml: &str) -> Limiter<FakeRelativeClock> {
        self.limiter_from(yaml, None)
    }

    fn limiter_from(
        &self,
        yaml: &str,
        previous: Option<&Limiter<FakeRelativeClock>>,
    ) -> Limiter<FakeRelativeClock> {
        let config = Config::from_yaml(yaml, "t").unwrap();
        let wall = self.wall.clone();
        Limiter::new(&config, previous, self.clock.clone(), Arc::new(move || wall.load(Ordering::SeqCst)))
    }

    /// Advances both clocks.
    fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.wall.fetch_add(i64::try_from(by.as_millis()).unwrap(), Ordering::SeqCst);
    }
}

fn admit_all(l: &Limiter<FakeRelativeClock>, org: &str) -> u64 {
    let mut n = 0;
    while l.check("k1", org, "t").is_ok() {
        n += 1;
        assert!(n < 1_000_000, "never refused");
    }
    n
}

#[test]
fn greedy_admissions_are_burst_plus_floor_rate_times_t_exactly() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 50, burst: 200 } }");
    let mut total = admit_all(&l, "acme");
    assert_eq!(total, 200, "a full bucket admits exactly `burst` at once");
    let step = Duration::from_millis(7);
    let mut elapsed = Duration::ZERO;
    while elapsed < Duration::from_secs(3) {
        f.advance(step);
        elapsed += step;
        total += admit_all(&l, "acme");
        let expected = 200 + u64::try_from(50 * elapsed.as_millis() / 1000).unwrap();
        assert_eq!(total, expected, "at t = {elapsed:?}");
    }
}

#[test]
fn no_window_admits_more_than_burst_plus_rate_times_window() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 10, burst: 5 } }");
    let mut admitted_at = Vec::new();
    let step = Duration::from_millis(3);
    for i in 0..2000u64 {
        // A greedy client that tries twice per step.
        for _ in 0..2 {
            if l.check("k1", "acme", "t").is_ok() {
                admitted_at.push(i * 3);
            }
        }
        f.advance(step);
    }
    for window_ms in [100u64, 500, 1000, 2500] {
        for (i, start) in admitted_at.iter().enumerate() {
            let inside = admitted_at[i..].iter().take_while(|t| **t < start + window_ms).count() as u64;
            assert!(
                inside <= 5 + 10 * window_ms / 1000,
                "{inside} admitted within {window_ms} ms from {start}"
            );
        }
    }
}

#[test]
fn after_a_long_idle_the_bucket_is_full_but_not_more() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 50, burst: 200 } }");
    assert_eq!(admit_all(&l, "acme"), 200);
    f.advance(Duration::from_secs(3600));
    assert_eq!(admit_all(&l, "acme"), 200);
}

#[test]
fn retry_after_is_rounded_up_and_a_retry_then_is_admitted() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 1, burst: 3 } }");
    assert_eq!(admit_all(&l, "acme"), 3);
    let r = l.check("k1", "acme", "t").unwrap_err();
    let Error::RateLimited { retry_after, limit, exhausted, ref tier, .. } = r.error else { panic!() };
    assert_eq!(
        (retry_after, limit.label(), exhausted, tier.as_deref()),
        (1, "requests_per_second", false, Some("t"))
    );
    f.advance(Duration::from_millis(999));
    assert!(l.check("k1", "acme", "t").is_err(), "admitted before the emission interval");
    f.advance(Duration::from_millis(1));
    assert!(l.check("k1", "acme", "t").is_ok(), "refused at the announced moment");

    // A wait under a second is announced as 1 (never 0), and 1 s later the retry passes.
    let l = f.limiter("tiers: { t: { requests_per_second: 50, burst: 1 } }");
    assert!(l.check("k1", "acme", "t").is_ok());
    let Error::RateLimited { retry_after, .. } = l.check("k1", "acme", "t").unwrap_err().error else {
        panic!()
    };
    assert_eq!(retry_after, 1);
    f.advance(Duration::from_secs(retry_after));
    assert!(l.check("k1", "acme", "t").is_ok());
}

#[test]
fn the_daily_budget_resets_at_midnight_utc() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { daily_requests: 3 } }");
    // 23:59:59.250 UTC.
    f.wall.store(NOON + DAY_MS / 2 - 750, Ordering::SeqCst);
    assert_eq!(admit_all(&l, "acme"), 3);
    let r = l.check("k1", "acme", "t").unwrap_err();
    let Error::RateLimited { retry_after, limit, exhausted, .. } = r.error else { panic!() };
    assert_eq!((retry_after, limit.label(), exhausted), (1, "daily_requests", true));
    f.wall.store(NOON + DAY_MS / 2 - 1, Ordering::SeqCst);
    assert!(l.check("k1", "acme", "t").is_err(), "reset before midnight");
    f.wall.store(NOON + DAY_MS / 2, Ordering::SeqCst);
    assert_eq!(admit_all(&l, "acme"), 3, "a full budget at 00:00:00.000 UTC");
}

#[test]
fn a_request_refused_by_one_limit_consumes_nothing_from_the_other() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 1, burst: 1, daily_requests: 5 } }");
    let q = l.check("k1", "acme", "t").unwrap();
    assert_eq!(q.daily.map(|d| d.1), Some(4));
    let r = l.check("k1", "acme", "t").unwrap_err();
    assert_eq!(r.limit.unwrap(), "requests_per_second");
    assert_eq!(r.quota.daily.map(|d| d.1), Some(4), "the per-second refusal used the daily budget");
    f.advance(Duration::from_secs(1));
    assert_eq!(l.check("k1", "acme", "t").unwrap().daily.map(|d| d.1), Some(3));

    // Daily refusals leave the per-second bucket alone.
    let l = f.limiter("tiers: { t: { requests_per_second: 1, burst: 2, daily_requests: 1 } }");
    assert!(l.check("k1", "acme", "t").is_ok());
    assert_eq!(l.check("k1", "acme", "t").unwrap_err().limit.unwrap(), "daily_requests");
    f.wall.fetch_add(DAY_MS, Ordering::SeqCst);
    assert!(l.check("k1", "acme", "t").is_ok(), "the daily refusal consumed a per-second cell");
}

#[test]
fn organisations_share_and_keys_do_not_unless_per_key() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 1, burst: 2 } }");
    assert!(l.check("k1", "acme", "t").is_ok());
    assert!(l.check("k2", "acme", "t").is_ok());
    assert!(l.check("k3", "acme", "t").is_err(), "keys of one organisation share its budget");
    assert!(l.check("k4", "globex", "t").is_ok(), "organisations are independent");

    let l = f.limiter("rate_limits: { per: key }\ntiers: { t: { requests_per_second: 1, burst: 1 } }");
    assert!(l.check("k1", "acme", "t").is_ok());
    assert!(l.check("k2", "acme", "t").is_ok());
    assert!(l.check("k1", "acme", "t").is_err());
}

#[test]
fn overrides_replace_the_tier_limits() {
    let f = Fixture::new();
    let l = f.limiter(
        "tiers: { t: { requests_per_second: 1, burst: 1 } }\n\
         rate_limits: { overrides: { orgs: { big: { requests_per_second: 10, burst: 10 } }, keys: { vip: { daily_requests: 2 } } } }",
    );
    assert_eq!(admit_all(&l, "small"), 1);
    assert_eq!(admit_all(&l, "big"), 10);
    assert!(l.check("vip", "small", "t").is_ok());
    assert!(l.check("vip", "small", "t").is_ok());
    let r = l.check("vip", "small", "t").unwrap_err();
    assert_eq!(r.limit.unwrap(), "daily_requests");
    // An unconfigured tier is not a limit: 500 `internal_error`, not a 429 to retry.
    let r = l.check("k1", "acme", "gone").unwrap_err();
    assert_eq!(r.limit, None);
    assert_eq!(r.error.code(), "internal_error");
}

#[test]
fn a_reload_keeps_unchanged_tiers_and_applies_changed_ones_at_once() {
    let f = Fixture::new();
    let l1 = f.limiter(
        "tiers: { a: { requests_per_second: 1, burst: 2 }, b: { requests_per_second: 1, burst: 2 } }",
    );
    for tier in ["a", "b"] {
        assert!(l1.check("k", "acme", tier).is_ok());
        assert!(l1.check("k", "acme", tier).is_ok());
        assert!(l1.check("k", "acme", tier).is_err());
    }
    let l2 = f.limiter_from(
        "tiers: { a: { requests_per_second: 1, burst: 2 }, b: { requests_per_second: 1, burst: 5 }, c: { requests_per_second: 1 } }",
        Some(&l1),
    );
    assert!(l2.check("k", "acme", "a").is_err(), "tier a lost its state");
    assert_eq!(admit_all_tier(&l2, "b"), 5, "tier b did not take its new burst");
    assert_eq!(admit_all_tier(&l2, "c"), 1, "a new tier applies at once");
}

fn admit_all_tier(l: &Limiter<FakeRelativeClock>, tier: &str) -> u64 {
    let mut n = 0;
    while l.check("k", "acme", tier).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn idle_state_is_forgotten() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 100, burst: 100, daily_requests: 1000 } }");
    for i in 0..1000 {
        assert!(l.check("k", &format!("org{i}"), "t").is_ok());
    }
    assert_eq!(l.tracked(), 1000);
    f.advance(Duration::from_secs(2));
    f.wall.fetch_add(DAY_MS, Ordering::SeqCst);
    l.forget_idle();
    assert_eq!(l.tracked(), 0);
}

#[test]
fn headers_carry_both_limits() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 50, burst: 200, daily_requests: 100000 } }");
    let q = l.check("k1", "acme", "t").unwrap();
    let mut h = HeaderMap::new();
    q.write_headers(&mut h);
    assert_eq!(h["x-ratelimit-limit-requests"], "100000");
    assert_eq!(h["x-ratelimit-remaining-requests"], "99999");
    assert_eq!(h["x-ratelimit-reset-requests"], "12h0m0s");
    assert_eq!(
        h["ratelimit-policy"],
        "\"requests_per_second\";q=200;w=4, \"daily_requests\";q=100000;w=86400"
    );
    assert_eq!(h["ratelimit"], "\"requests_per_second\";r=199;t=1, \"daily_requests\";r=99999;t=43200");

    let l = f.limiter("tiers: { t: { requests_per_second: 50, burst: 200 } }");
    let mut h = HeaderMap::new();
    l.check("k1", "acme", "t").unwrap().write_headers(&mut h);
    assert_eq!(h["x-ratelimit-limit-requests"], "200");
    assert_eq!(h["x-ratelimit-remaining-requests"], "199");
    assert_eq!(h["x-ratelimit-reset-requests"], "20ms");

    // A refusal formats its own values (admitted requests share the bucket's): same policy.
    let l = f.limiter("tiers: { t: { requests_per_second: 1, burst: 1 } }");
    let mut admitted = HeaderMap::new();
    l.check("k1", "acme", "t").unwrap().write_headers(&mut admitted);
    let mut refused = HeaderMap::new();
    l.check("k1", "acme", "t").unwrap_err().quota.write_headers(&mut refused);
    assert_eq!(admitted["ratelimit-policy"], "\"requests_per_second\";q=1;w=1");
    assert_eq!(refused["ratelimit-policy"], admitted["ratelimit-policy"]);
    assert_eq!(refused["x-ratelimit-limit-requests"], "1");
    assert_eq!(refused["x-ratelimit-remaining-requests"], "0");
    assert_eq!(refused["ratelimit"], "\"requests_per_second\";r=0;t=1");
    let openai_duration = |ms| {
        let mut buf = bytes::BytesMut::new();
        put_openai_duration(&mut buf, ms);
        String::from_utf8(buf.to_vec()).unwrap()
    };
    assert_eq!(openai_duration(360_000), "6m0s");
    assert_eq!(openai_duration(1_500), "2s");
    assert_eq!(openai_duration(47_102_000), "13h5m2s");
    assert_eq!(openai_duration(20), "20ms");
}

fn llm(
    l: &Limiter<FakeRelativeClock>,
    org: &str,
    estimate: Option<u64>,
) -> Result<(Quota, Hold), Box<Rejection>> {
    l.check_llm(&"k1".into(), &org.into(), "t", estimate, None)
}

fn refused_by(r: Result<(Quota, Hold), Box<Rejection>>) -> &'static str {
    match r {
        Ok(_) => "admitted",
        Err(r) => r.limit.map_or("none", Limit::label),
    }
}

/// §12's example: five concurrent requests of 175 tokens on a 100-a-minute tier: one passes
/// (reserving the clamped 100), the others are refused while it is in flight.
#[test]
fn five_concurrent_175_token_requests_on_100_a_minute_admit_one() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 1000, tokens_per_minute: 100 } }");
    let held: Vec<_> = (0..5).map(|_| llm(&l, "acme", Some(175))).collect();
    assert_eq!(held.iter().filter(|r| r.is_ok()).count(), 1);
    let refusal = held.into_iter().find_map(Result::err).unwrap();
    assert_eq!(refusal.limit, Some(Limit::TokensPerMinute));
    assert!(matches!(refusal.error, Error::RateLimited { retry_after: 60, exhausted: false, .. }));
}

/// One decision: a refusal by the request limits gives the tokens and the slot back; a
/// refusal by the tokens consumes nothing of the request limits; the reported usage replaces
/// the reservation (debt allowed); a dropped hold is a refund.
#[test]
fn tokens_and_requests_are_one_all_or_nothing_decision() {
    let f = Fixture::new();
    let l = f.limiter(
        "tiers: { t: { requests_per_second: 1, burst: 2, daily_requests: 100, tokens_per_minute: 600, daily_tokens: 1000, max_concurrent_requests: 3 } }",
    );
    let (q, a) = llm(&l, "acme", Some(100)).unwrap();
    let mut h = HeaderMap::new();
    q.write_headers(&mut h);
    assert_eq!(h["x-ratelimit-limit-tokens"], "600");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "500");
    assert_eq!(h["x-ratelimit-reset-tokens"], "10s");
    assert!(h["ratelimit-policy"]
        .to_str()
        .unwrap()
        .ends_with(r#""tokens_per_minute";q=600;w=60, "daily_tokens";q=1000;w=86400"#));
    let (_, b) = llm(&l, "acme", Some(100)).unwrap();
    // The burst (2) is spent: refused by the per-second limit, the 100 tokens come back.
    assert_eq!(refused_by(llm(&l, "acme", Some(100))), "requests_per_second");
    assert_eq!(l.tokens_left("acme"), Some(400));
    // Usage: a used 350 instead of 100 (debt within the minute), b is refunded (dropped).
    a.settle(350);
    drop(b);
    assert_eq!(l.tokens_left("acme"), Some(250));
    f.advance(Duration::from_secs(1)); // +10 tokens, +1 request
                                       // 300 > 260: refused by tokens, and the request cell stays for the next one.
    assert_eq!(refused_by(llm(&l, "acme", Some(300))), "tokens_per_minute");
    let (_, c) = llm(&l, "acme", Some(200)).unwrap();
    c.settle(200);
    // The daily tokens: 350 + 200 used of 1000; a request of 500 is refused for the day.
    f.advance(Duration::from_secs(60));
    let r = llm(&l, "acme", Some(500)).err().unwrap();
    assert_eq!(r.limit, Some(Limit::DailyTokens));
    assert!(matches!(r.error, Error::RateLimited { exhausted: true, .. }), "x-should-retry: false");
    // Requests without tokens (listing models) pass whatever the token state.
    assert!(llm(&l, "acme", None).is_ok());
}

/// `max_concurrent_requests`: a slot per request in flight, given back when the hold goes
/// (the response ended, the client left, the upstream failed) — once.
#[test]
fn concurrency_slots_are_held_until_the_hold_goes() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 1000, max_concurrent_requests: 2 } }");
    let a = llm(&l, "acme", None).unwrap().1;
    let b = llm(&l, "acme", None).unwrap().1;
    let r = llm(&l, "acme", None).err().unwrap();
    assert_eq!(r.limit, Some(Limit::ConcurrentRequests));
    assert!(matches!(r.error, Error::RateLimited { retry_after: 1, exhausted: false, .. }));
    assert!(llm(&l, "globex", None).is_ok(), "per organisation");
    drop(a);
    let c = llm(&l, "acme", None).unwrap().1;
    b.settle(0);
    drop(c);
    assert_eq!(l.in_flight("acme"), 0);
}

#[test]
fn peek_reads_what_remains_without_consuming_it() {
    let f = Fixture::new();
    let l = f.limiter("tiers: { t: { requests_per_second: 10, burst: 4, daily_requests: 6 } }");
    let (k, o): (Arc<str>, Arc<str>) = ("k1".into(), "acme".into());
    // Nothing known yet: a full bucket, the whole budget, and no state created by looking.
    let (limits, p) = l.peek(&k, &o, "t").unwrap();
    assert_eq!(limits.burst, Some(4));
    assert_eq!(p.per_second, Some((4, 4, 10, 0)));
    assert_eq!(p.daily, Some((6, 0, 6, DAY_MS / 2)));
    assert_eq!(l.tracked(), 0);

    for _ in 0..3 {
        l.check("k1", "acme", "t").unwrap();
    }
    // Peeking any number of times changes nothing: the next check still admits exactly one.
    for _ in 0..10 {
        let (_, p) = l.peek(&k, &o, "t").unwrap();
        assert_eq!(p.per_second, Some((4, 1, 10, 300)));
        assert_eq!(p.daily, Some((6, 3, 3, DAY_MS / 2)));
    }
    l.check("k1", "acme", "t").unwrap();
    assert!(l.check("k1", "acme", "t").is_err());
    assert_eq!(l.peek(&k, &o, "t").unwrap().1.per_second, Some((4, 0, 10, 400)));

    // 100 ms refill one cell, exactly as the GCRA admits it.
    f.advance(Duration::from_millis(100));
    assert_eq!(l.peek(&k, &o, "t").unwrap().1.per_second, Some((4, 1, 10, 300)));
    l.check("k1", "acme", "t").unwrap();
    assert_eq!(l.peek(&k, &o, "t").unwrap().1.daily, Some((6, 5, 1, DAY_MS / 2 - 100)));
    // A tier that is not configured is the same 500 as for a request.
    assert!(l.peek(&k, &o, "nope").is_err());
}
