//! The cached authentication path: header parse → checksum → keyed BLAKE3 digest → moka hit →
//! expiry/workspace checks. This is what every request with a warm key pays. Also the cold path
//! (one Argon2id verification with the default parameters), for scale.

// Benchmark set-up may panic: a failure there is a broken benchmark, not a served request.
#![allow(clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{header, HeaderMap, HeaderValue};

use tollgate::auth::Authenticator;
use tollgate::config::Config;
use tollgate::keys::lifecycle::{self, NewKeySpec};
use tollgate::metrics::Metrics;
use tollgate::store::sqlite::SqliteStore;

fn auth(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::default();
    let (authn, token) = rt.block_on(async {
        let store = Arc::new(SqliteStore::open(&dir.path().join("b.db")).await.expect("store"));
        let spec = NewKeySpec {
            org: "acme".into(),
            tier: "enterprise".into(),
            scopes: vec!["inference:write".into()],
            name: None,
            workspace: None,
            expires_in: None,
        };
        let (_, token) = lifecycle::create(store.as_ref(), &config, spec, &lifecycle::Actor::Cli, None)
            .await
            .expect("key");
        (Authenticator::new(store, &config.auth).expect("auth"), token)
    });
    let metrics = Metrics::new().expect("metrics");
    let mut headers = HeaderMap::new();
    let value = format!("Bearer {}", token.expose());
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&value).expect("header"));
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    rt.block_on(authn.authenticate(&config.auth, &headers, ip, &metrics)).expect("warm");

    c.bench_function("auth/cached", |b| {
        b.to_async(&rt).iter(|| async {
            authn.authenticate(&config.auth, &headers, ip, &metrics).await.map(|p| p.scopes.len())
        })
    });

    let phc = config.auth.argon2.hash("secret-for-the-bench").expect("hash");
    let mut group = c.benchmark_group("auth/argon2id_default_params");
    group.sample_size(10);
    group.bench_function("verify", |b| b.iter(|| tollgate::keys::verify(&phc, "secret-for-the-bench")));
    group.finish();
}

criterion_group!(benches, auth);
criterion_main!(benches);
