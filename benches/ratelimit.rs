//! The limiter's per-request decision with 1 and with 100,000 tracked organisations, and the
//! memory each tracked organisation costs (RSS growth over 100,000 new organisations, printed).

// Benchmark set-up may panic: a failure there is a broken benchmark, not a served request.
#![allow(clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use tollgate::config::Config;
use tollgate::limits::Limiter;

const ORGS: usize = 100_000;

/// A tier that never refuses, with both limits, so every check does all its work.
fn limiter() -> Limiter {
    let config = Config::from_yaml(
        "tiers: { t: { requests_per_second: 1000000000, burst: 1000000000, daily_requests: 1000000000000 } }",
        "bench",
    )
    .expect("config");
    Limiter::from_config(&config, None)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn ratelimit(c: &mut Criterion) {
    let one = limiter();
    c.bench_function("ratelimit/check_1_org", |b| {
        b.iter(|| one.check(black_box("key1"), black_box("acme"), "t").is_ok())
    });

    let many = limiter();
    let names: Vec<String> = (0..ORGS).map(|i| format!("org-{i:06}")).collect();
    let before = rss_bytes();
    for n in &names {
        assert!(many.check("key", n, "t").is_ok());
    }
    let after = rss_bytes();
    eprintln!(
        "ratelimit/memory: {} organisations tracked, RSS +{} bytes = {} bytes per organisation",
        many.tracked(),
        after.saturating_sub(before),
        after.saturating_sub(before) / ORGS as u64
    );
    let mut i = 0;
    c.bench_function("ratelimit/check_100000_orgs", |b| {
        b.iter(|| {
            i = (i + 7919) % ORGS;
            many.check("key", &names[i], "t").is_ok()
        })
    });
}

criterion_group!(benches, ratelimit);
criterion_main!(benches);
