//! Micro-benchmarks of per-request work that does not touch the network: target checks,
//! route lookup and error rendering. Whole-proxy load against peers lives in `benches/load/`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method, Uri, Version};

use tollgate::config::RouteSpec;
use tollgate::error::Error;
use tollgate::proxy::routes::RouteTable;
use tollgate::proxy::target::{check_target, reject_key_in_url};

fn target(c: &mut Criterion) {
    let uri: Uri = "/v1/chat/completions?stream=true".parse().unwrap_or_default();
    let headers = HeaderMap::new();
    c.bench_function("target/check", |b| {
        b.iter(|| {
            let u = black_box(&uri);
            reject_key_in_url(u, "tg").is_ok() && check_target(u, Version::HTTP_11, &headers).is_ok()
        })
    });
}

fn routes(c: &mut Criterion) {
    let table = RouteTable::new(&RouteSpec::OpenAi, None);
    c.bench_function("routes/find_chat_completions", |b| {
        b.iter(|| table.find(black_box(&Method::POST), black_box("/v1/chat/completions")).is_some())
    });
}

fn errors(c: &mut Criterion) {
    c.bench_function("error/render_forbidden", |b| {
        b.iter(|| {
            Error::Forbidden { required: "inference:write".into(), current: vec!["inference:read".into()] }
                .into_response()
        })
    });
}

criterion_group!(benches, target, routes, errors);
criterion_main!(benches);
