//! The authenticator against a real SQLite store: the bearer parser, the cache, changes, failed
//! attempts.
#![allow(clippy::unwrap_used)]

use http::{header, HeaderValue};

use super::bearer::bearer;
use super::*;

fn headers(values: &[&[u8]]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
    }
    h
}

#[test]
fn bearer_is_strict() {
    assert_eq!(bearer(&headers(&[b"Bearer abc"])), Ok("abc"));
    assert_eq!(bearer(&headers(&[b"bearer abc"])), Ok("abc"));
    assert_eq!(bearer(&headers(&[])), Err(Reason::Missing));
    for bad in [
        &b"Basic abc"[..],
        b"Bearer",
        b"Bearer ",
        b"Bearer  abc",
        b"Bearer abc ",
        b"Bearer a\tb",
        b"Bearerabc",
        b"Bearer \xc3\xa9",
    ] {
        assert_eq!(bearer(&headers(&[bad])), Err(Reason::Malformed), "{bad:?}");
    }
    assert_eq!(bearer(&headers(&[b"Bearer a", b"Bearer b"])), Err(Reason::Malformed));
    let long = format!("Bearer {}", "a".repeat(keys::MAX_TOKEN_LEN + 1));
    assert_eq!(bearer(&headers(&[long.as_bytes()])), Err(Reason::Malformed));
}

/// A config from `yaml` (cheap Argon2id parameters added) and a real SQLite store in `dir`.
async fn config_and_store(yaml: &str, dir: &tempfile::TempDir) -> (crate::config::Config, Arc<dyn KeyStore>) {
    let yaml = format!("auth: {{ {yaml}, argon2: {{ memory_kib: 8, iterations: 1, parallelism: 1 }} }}");
    let config = crate::config::Config::from_yaml(&yaml, "test").unwrap();
    let store: Arc<dyn KeyStore> =
        Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
    (config, store)
}

/// Creates a key of org `acme`, tier `audit`, scope `inference:read`.
async fn create_key(store: &Arc<dyn KeyStore>, config: &crate::config::Config) -> keys::Token {
    let spec = crate::keys::lifecycle::NewKeySpec {
        org: "acme".into(),
        tier: "audit".into(),
        scopes: vec!["inference:read".into()],
        name: None,
        workspace: None,
        expires_in: None,
    };
    crate::keys::lifecycle::create(store.as_ref(), config, spec, &crate::keys::lifecycle::Actor::Cli, None)
        .await
        .unwrap()
        .1
}

/// Argon2id verifications so far, whatever their outcome.
fn verifications(metrics: &Metrics) -> u64 {
    ["ok", "mismatch", "error"]
        .iter()
        .map(|r| metrics.argon2_verifications.with_label_values(&[r]).get())
        .sum()
}

/// The cache against a real SQLite store: hits cost no verification, outcomes expire after
/// their TTL (valid and refused alike), and keys of one profile share it.
#[tokio::test]
async fn cached_outcomes_expire_and_profiles_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = config_and_store("cache_ttl: 300ms, negative_cache_ttl: 300ms", &dir).await;
    let one = create_key(&store, &config).await;
    let two = create_key(&store, &config).await;
    let auth = Authenticator::new(store, &config.auth).unwrap();
    let metrics = Metrics::new().unwrap();
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let verified = || verifications(&metrics);
    let bearer = |token: &str| headers(&[format!("Bearer {token}").as_bytes()]);

    let a = auth.authenticate(&config.auth, &bearer(one.expose()), ip, &metrics).await.unwrap();
    let b = auth.authenticate(&config.auth, &bearer(two.expose()), ip, &metrics).await.unwrap();
    assert!(Arc::ptr_eq(&a.profile, &b.profile), "keys of one profile share it");
    auth.authenticate(&config.auth, &bearer(one.expose()), ip, &metrics).await.unwrap();
    assert_eq!(verified(), 2, "a cache hit costs no verification");

    // A wrong secret for a real id: refused, and the refusal is cached too.
    let id = one.expose().split('_').nth(1).unwrap();
    let wrong = keys::assemble("tg", id, &"x".repeat(32));
    for _ in 0..2 {
        let e = auth.authenticate(&config.auth, &bearer(&wrong), ip, &metrics).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    }
    assert_eq!(verified(), 3, "the refusal is remembered");

    tokio::time::sleep(Duration::from_millis(400)).await;
    auth.authenticate(&config.auth, &bearer(one.expose()), ip, &metrics).await.unwrap();
    auth.authenticate(&config.auth, &bearer(&wrong), ip, &metrics).await.unwrap_err();
    assert_eq!(verified(), 5, "both outcomes expired after their TTL");
}

/// A change is applied to the cache once, however many overlapping polls see it: a restored key
/// in use is verified again once, not on every poll, and a new key not at all. (Before: every poll in
/// the 2 s overlap evicted it, up to four verifications in its first seconds.) A later
/// change — even one stamped earlier by a writer with a slower clock — still applies.
#[tokio::test]
async fn each_change_evicts_a_cached_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = config_and_store("cache_ttl: 1h", &dir).await;
    let key = create_key(&store, &config).await;
    let id = key.expose().split('_').nth(1).unwrap().to_string();
    let auth = Authenticator::new(store.clone(), &config.auth).unwrap();
    let metrics = Metrics::new().unwrap();
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let h = headers(&[format!("Bearer {}", key.expose()).as_bytes()]);
    let mut since = Some(auth.poll_changes(None, |_| {}).await.unwrap());
    for _ in 0..4 {
        auth.authenticate(&config.auth, &h, ip, &metrics).await.unwrap();
        since = Some(auth.poll_changes(since, |_| {}).await.unwrap());
    }
    assert_eq!(verifications(&metrics), 1, "its creation evicted nothing, and no poll did");

    // Revoked elsewhere (the CLI): the next poll applies it, and the key is refused.
    crate::keys::lifecycle::revoke(store.as_ref(), &id, &crate::keys::lifecycle::Actor::Cli).await.unwrap();
    since = Some(auth.poll_changes(since, |_| {}).await.unwrap());
    assert!(auth.authenticate(&config.auth, &h, ip, &metrics).await.is_err(), "revocation missed");
    // A restore stamped earlier than the revocation is still a new change.
    let e = crate::keys::AuditEvent {
        key_id: id.clone(),
        org: "acme".into(),
        action: "restore".into(),
        actor: "cli".into(),
        at: clock::now_ms() - 500,
        detail: None,
    };
    store.set_revoked(&id, None, &e).await.unwrap();
    for _ in 0..3 {
        since = Some(auth.poll_changes(since, |_| {}).await.unwrap());
        auth.authenticate(&config.auth, &h, ip, &metrics).await.unwrap();
    }
    assert_eq!(verifications(&metrics), 3, "revoke and restore: one verification each");
}

/// Concurrent misses from one source cannot all slip past the failed-attempt block: they
/// are verified a few at a time, and those that waited see the block the first failures
/// caused. (Before: 40 concurrent wrong secrets, 40 verifications.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_secrets_from_one_source_are_verified_a_few_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = config_and_store("failed_auth: { per_second: 1, burst: 2 }", &dir).await;
    let key = create_key(&store, &config).await;
    let id = key.expose().split('_').nth(1).unwrap().to_string();
    let auth = Arc::new(Authenticator::new(store, &config.auth).unwrap());
    let metrics = Arc::new(Metrics::new().unwrap());
    let ip: IpAddr = "127.0.0.1".parse().unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (auth, metrics, cfg) = (auth.clone(), metrics.clone(), config.auth.clone());
        let wrong = keys::assemble("tg", &id, &format!("{}{i:04}", "x".repeat(28)));
        tasks.spawn(async move {
            let h = headers(&[format!("Bearer {wrong}").as_bytes()]);
            auth.authenticate(&cfg, &h, ip, &metrics).await.map(|_| ()).unwrap_err()
        });
    }
    let errors = tasks.join_all().await;
    let verified = verifications(&metrics);
    let limited = errors
        .iter()
        .filter(|e| matches!(e, Error::RateLimited { limit: crate::error::Limit::FailedAuth, .. }))
        .count();
    assert!(verified >= 2, "the burst is verified: {verified}");
    assert!(
        verified <= 2 + 2 * auth.verifier_threads as u64,
        "{verified} verifications for 40 concurrent wrong secrets (burst 2, {} slots)",
        auth.verifier_threads
    );
    assert!(limited as u64 + verified + 2 >= 40, "the rest are refused with 429: {limited}");
}

/// A key revoked while a request's lookup of it is in flight: the change finds nothing to
/// evict (the slot is a placeholder), so the lookup must not cache what it read before it —
/// or the revoked key would keep working for `cache_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_a_lookup_is_not_undone_by_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "auth: { cache_ttl: 1h, argon2: { memory_kib: 32768, iterations: 2, parallelism: 1 } }";
    let config = crate::config::Config::from_yaml(yaml, "test").unwrap();
    let store: Arc<dyn KeyStore> =
        Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
    let key = create_key(&store, &config).await;
    let id = key.expose().split('_').nth(1).unwrap().to_string();
    let auth = Arc::new(Authenticator::new(store.clone(), &config.auth).unwrap());
    let metrics = Arc::new(Metrics::new().unwrap());
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let h = headers(&[format!("Bearer {}", key.expose()).as_bytes()]);

    let first = {
        let (auth, metrics, cfg, h) = (auth.clone(), metrics.clone(), config.auth.clone(), h.clone());
        tokio::spawn(async move { auth.authenticate(&cfg, &h, ip, &metrics).await.is_ok() })
    };
    // The verification of 32 MiB × 2 passes takes far longer than this.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (_, at) = crate::keys::lifecycle::revoke(store.as_ref(), &id, &crate::keys::lifecycle::Actor::Cli)
        .await
        .unwrap();
    auth.apply_change(&id, at.unwrap());
    assert!(
        verifications(&metrics) == 0,
        "the lookup finished before the revocation: the test proves nothing"
    );
    first.await.unwrap();
    let again = auth.authenticate(&config.auth, &h, ip, &metrics).await;
    assert!(again.is_err(), "the revoked key was served from a cache entry written after the revocation");
}

/// A change evicts the changed key's outcome only, found through its id: another key in use
/// is not verified again; the revoked key is refused at once, and its restore works at once.
/// Index entries of outcomes no longer cached are forgotten.
#[tokio::test]
async fn a_change_evicts_only_the_changed_keys_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = config_and_store("cache_ttl: 1h", &dir).await;
    let (one, two) = (create_key(&store, &config).await, create_key(&store, &config).await);
    let id = one.expose().split('_').nth(1).unwrap().to_string();
    let auth = Authenticator::new(store.clone(), &config.auth).unwrap();
    let metrics = Metrics::new().unwrap();
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let h = |t: &keys::Token| headers(&[format!("Bearer {}", t.expose()).as_bytes()]);
    let use_key = |t| {
        let (auth, metrics, config, h) = (&auth, &metrics, &config, h(t));
        async move { auth.authenticate(&config.auth, &h, ip, metrics).await.is_ok() }
    };
    assert!(use_key(&one).await && use_key(&two).await);
    assert_eq!(verifications(&metrics), 2);

    crate::keys::lifecycle::revoke(store.as_ref(), &id, &crate::keys::lifecycle::Actor::Cli).await.unwrap();
    auth.invalidate(&id);
    assert!(!use_key(&one).await, "revoked");
    assert!(use_key(&two).await);
    assert_eq!(verifications(&metrics), 3, "the revoked key verified again, the other not");

    crate::keys::lifecycle::restore(store.as_ref(), &config, &id, &crate::keys::lifecycle::Actor::Cli)
        .await
        .unwrap();
    auth.invalidate(&id);
    assert!(use_key(&one).await, "restored: its cached refusal was evicted");
    assert_eq!(verifications(&metrics), 4);

    assert_eq!(auth.by_id.lock().unwrap().len(), 2);
    auth.cache.clear();
    auth.forget_uncached_ids();
    assert_eq!(auth.by_id.lock().unwrap().len(), 0, "nothing cached, nothing indexed");
}
