//! Config loading and validation: defaults, every problem with its path, units.
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn an_empty_file_is_an_error_not_the_defaults() {
    for text in ["", "\n  \n", "# only a comment\n"] {
        let e = Config::from_yaml(text, "t").unwrap_err();
        assert!(e.to_string().contains("the file is empty"), "{text:?}: {e}");
    }
}

#[test]
fn defaults_are_valid_and_match_the_contract() {
    let c = Config::from_yaml("{}", "t").unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(c.upstream.url.to_string(), "http://127.0.0.1:8000/");
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.upstream.timeout, Duration::from_secs(600));
    assert_eq!(c.limits.max_header_bytes, 16 * 1024);
    assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
    assert_eq!(c.shutdown.drain_delay, Duration::from_secs(5));
    assert_eq!(c.store, Store::Sqlite(PathBuf::from("./tollgate.db")));
    assert_eq!(c.auth.key_prefix, "tg");
    assert_eq!(c.auth.cache_capacity, 100_000);
    assert_eq!(c.routes, RouteSpec::OpenAi);
    assert_eq!(c.tiers["audit"].requests_per_second, Some(50));
    assert_eq!(c.tiers["audit"].burst, Some(200));
    assert_eq!(c.tiers["audit"].daily_requests, Some(100_000));
    assert_eq!(c.tiers["audit-plus"].burst, Some(800));
    assert_eq!(c.tiers["enterprise"].daily_requests, None);
    assert_eq!(Config::default(), c);
}

#[test]
fn overrides_are_validated_like_tiers() {
    let c = Config::from_yaml(
        "rate_limits:\n  overrides:\n    orgs: { acme: { requests_per_second: 500, burst: 2000 } }\n    keys: { abc: { daily_requests: 10 } }\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.rate_limits.org_overrides["acme"].burst, Some(2000));
    assert_eq!(c.rate_limits.key_overrides["abc"].daily_requests, Some(10));
    let e =
        Config::from_yaml("rate_limits: { overrides: { orgs: { acme: { burst: 5 } } } }\n", "t").unwrap_err();
    assert_eq!(e.problems[0].path, "rate_limits.overrides.orgs.acme.burst");
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let yaml = "
listen: nowhere
upstream:
  url: https://x
  timeout: 10 parsecs
  bogus: 1
limits:
  max_body_bytes: lots
tiers:
  gold: { requests_per_second: 0, burst: 5, extra: true }
log: { format: xml }
";
    let e = Config::from_yaml(yaml, "t.yaml").unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "listen",
        "upstream.url",
        "upstream.timeout",
        "upstream.bogus",
        "limits.max_body_bytes",
        "tiers.gold.requests_per_second",
        "tiers.gold.burst",
        "tiers.gold.extra",
        "log.format",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
    assert_eq!(paths.len(), 9, "{e}");
}

#[test]
fn a_given_tiers_map_replaces_the_defaults() {
    let c = Config::from_yaml("tiers:\n  free: { requests_per_second: 2 }\n", "t").unwrap();
    assert_eq!(c.tiers.len(), 1);
    assert_eq!(
        c.tiers["free"],
        Tier { requests_per_second: Some(2), burst: Some(2), daily_requests: None, ..Tier::default() }
    );
}

#[test]
fn routes_forms() {
    let c = Config::from_yaml("routes: rest\n", "t").unwrap();
    assert_eq!(c.routes, RouteSpec::Rest);
    let c = Config::from_yaml(
        "routes:\n  - { method: post, path: /v1/x, scope: w }\n  - { path: \"/v1/y/*\", scope: r }\n",
        "t",
    )
    .unwrap();
    let RouteSpec::List(rules) = c.routes else { panic!("expected a list") };
    assert_eq!(rules[0].method, Some(http::Method::POST));
    assert_eq!(rules[1].method, None);
    let e = Config::from_yaml("routes:\n  - { path: \"/v1/*/x\", scope: r }\n", "t").unwrap_err();
    assert_eq!(e.problems[0].path, "routes[0].path");

    // Public routes: `public: true` instead of a scope, never both, never neither.
    let c = Config::from_yaml("routes:\n  - { method: GET, path: /health, public: true }\n", "t").unwrap();
    let RouteSpec::List(rules) = c.routes else { panic!("expected a list") };
    assert_eq!(rules[0].scope, None);
    let e = Config::from_yaml(
        "routes:\n  - { path: /a, scope: r, public: true }\n  - { path: /b }\n  - { path: /c, public: false }\n",
        "t",
    )
    .unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["routes[0].public", "routes[1].scope", "routes[2].scope"]);
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("90d").unwrap(), Duration::from_secs(90 * 86_400));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("-5s").is_err());
    assert!(parse_duration("5 s").is_err());
    assert_eq!(parse_size("16KiB").unwrap(), 16_384);
    assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
    assert_eq!(parse_size("512").unwrap(), 512);
    assert!(parse_size("1TiB").is_err());
    assert!(parse_size("99999999999999999999GiB").is_err());
}

#[test]
fn type_errors_name_their_field() {
    let e = Config::from_yaml("upstream: { url: [1, 2] }\n", "t").unwrap_err();
    assert!(e.problems[0].message.contains("upstream.url"), "{e}");
}

#[test]
fn durations_past_a_century_are_refused() {
    assert_eq!(parse_duration("36500d").unwrap(), Duration::from_secs(36_500 * 86_400));
    for huge in ["36501d", "18446744073709551615s", "99999999999999h"] {
        assert!(parse_duration(huge).is_err(), "{huge}");
    }
    let e = Config::from_yaml("limits: { stream_idle_timeout: 18446744073709551615s }", "t").unwrap_err();
    assert!(e.to_string().contains("limits.stream_idle_timeout"), "{e}");
}

#[test]
fn store_postgres_takes_the_url_from_the_environment_only() {
    let c = Config::from_yaml(
        "store:\n  postgres: { url_env: TG_PG, pool_size: 3, connect_timeout: 500ms, statement_timeout: 4s }\n",
        "t",
    )
    .unwrap();
    assert_eq!(
        c.store,
        Store::Postgres(Postgres {
            url_env: "TG_PG".into(),
            pool_size: 3,
            connect_timeout: Duration::from_millis(500),
            statement_timeout: Duration::from_secs(4),
        })
    );
    let c = Config::from_yaml("store:\n  postgres: { url_env: TG_PG }\n", "t").unwrap();
    let Store::Postgres(p) = c.store else { panic!("expected postgres") };
    assert_eq!(
        (p.pool_size, p.connect_timeout, p.statement_timeout),
        (8, Duration::from_secs(2), Duration::from_secs(2))
    );
    assert_eq!(c.auth.stale_if_unavailable, Duration::from_secs(3600));

    // Each mistake named by its path: a URL where the variable's name goes (and never echoed
    // back whole), a missing name, both stores, a URL field, zero sizes and timeouts.
    let e = Config::from_yaml(
        "store:\n  sqlite: ./x.db\n  postgres: { url_env: \"postgres://u:secret@h/db\", pool_size: 0, connect_timeout: 0s }\n",
        "t",
    )
    .unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["store", "store.postgres.url_env", "store.postgres.pool_size", "store.postgres.connect_timeout"],
        "{e}"
    );
    assert!(!e.to_string().contains("secret"), "the password is echoed: {e}");
    let e =
        Config::from_yaml("store:\n  postgres: { url: \"postgres://u:secret@h/db\" }\n", "t").unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["store.postgres.url", "store.postgres.url_env"], "{e}");
    assert!(!e.to_string().contains("secret"), "{e}");
}

#[test]
fn rate_limits_redis_takes_the_url_from_the_environment_and_names_each_mistake() {
    let c = Config::from_yaml(
        "rate_limits:\n  backend: redis\n  redis: { url_env: TG_REDIS, key_prefix: \"tg:\", timeout: 5ms, on_error: closed }\ntiers:\n  a: { requests_per_second: 1, on_store_error: open }\n  b: { requests_per_second: 1 }\n",
        "t",
    )
    .unwrap();
    assert_eq!(
        c.rate_limits.backend,
        LimitBackend::Redis(Redis {
            url_env: "TG_REDIS".into(),
            key_prefix: "tg:".into(),
            timeout: Duration::from_millis(5),
            on_error: OnError::Closed,
            ca_file: None,
            concurrency_lease: Duration::from_secs(30),
            debit_requests: 0,
            debit_within: Duration::from_millis(5),
        })
    );
    assert_eq!(c.rate_limits.tier_on_error.get("a"), Some(&OnError::Open));
    assert_eq!(c.rate_limits.tier_on_error.get("b"), None);
    assert_eq!(
        c.tiers["a"],
        Tier { requests_per_second: Some(1), burst: Some(1), daily_requests: None, ..Tier::default() }
    );
    let c = Config::from_yaml("rate_limits: { backend: redis, redis: { url_env: R } }\n", "t").unwrap();
    let LimitBackend::Redis(r) = c.rate_limits.backend else { panic!("expected redis") };
    assert_eq!(
        (r.key_prefix.as_str(), r.timeout, r.on_error),
        ("tollgate:", Duration::from_millis(20), OnError::Local)
    );

    let e = Config::from_yaml(
        "rate_limits:\n  backend: redis\n  redis: { url_env: \"redis://:secret@h\", key_prefix: \"{x}\", timeout: 0ms, on_error: maybe }\n  overrides: { orgs: { acme: { requests_per_second: 1, on_store_error: open } } }\ntiers:\n  a: { on_store_error: sometimes }\n",
        "t",
    )
    .unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "rate_limits.redis.url_env",
            "rate_limits.redis.key_prefix",
            "rate_limits.redis.timeout",
            "rate_limits.redis.on_error",
            "rate_limits.overrides.orgs.acme.on_store_error",
            "tiers.a.on_store_error",
        ],
        "{e}"
    );
    assert!(!e.to_string().contains("secret"), "the password is echoed: {e}");
    let e = Config::from_yaml("rate_limits: { redis: { url_env: R } }\n", "t").unwrap_err();
    assert_eq!(e.problems[0].path, "rate_limits.redis");
    let e = Config::from_yaml("rate_limits: { backend: memcached }\n", "t").unwrap_err();
    assert!(e.to_string().contains("expected `local` or `redis`"), "{e}");
}

#[test]
fn token_and_concurrency_limits_of_a_tier() {
    let c = Config::from_yaml(
        "tiers:\n  a: { requests_per_second: 5, tokens_per_minute: 1000, daily_tokens: 50000, max_concurrent_requests: 3, default_output_tokens: 64 }\nrate_limits: { tokens: { inject_stream_usage: false } }\n",
        "t",
    )
    .unwrap();
    let t = c.tiers["a"];
    assert_eq!(
        (t.tokens_per_minute, t.daily_tokens, t.max_concurrent_requests, t.default_output_tokens),
        (Some(1000), Some(50000), Some(3), Some(64))
    );
    assert!(t.counts_tokens() && !c.rate_limits.inject_stream_usage);
    assert!(Config::from_yaml("{}", "t").unwrap().rate_limits.inject_stream_usage, "on by default");
    let e = Config::from_yaml(
        "tiers:\n  a: { tokens_per_minute: 0, daily_tokens: -1, max_concurrent_requests: lots }\n",
        "t",
    )
    .unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["tiers.a.tokens_per_minute", "tiers.a.daily_tokens", "tiers.a.max_concurrent_requests"],
        "{e}"
    );
}

#[test]
fn tier_scopes_default_scopes_and_dashboard() {
    let c = Config::from_yaml("{}", "t").unwrap();
    assert_eq!(c.default_scopes, ["inference:read", "inference:write"]);
    assert!(c.tier_scopes.is_empty());
    assert!(c.dashboard.enabled);

    let c = Config::from_yaml(
        "dashboard: { enabled: false }\ndefault_scopes: [inference:read, vetted:read]\ntiers:\n  audit: { requests_per_second: 5, scopes: [inference:read, inference:write, vetted:read] }\n  enterprise: { requests_per_second: 9 }\n",
        "t",
    )
    .unwrap();
    assert!(!c.dashboard.enabled);
    assert_eq!(c.default_scopes, ["inference:read", "vetted:read"]);
    assert_eq!(c.tier_scopes["audit"], ["inference:read", "inference:write", "vetted:read"]);
    assert!(!c.tier_scopes.contains_key("enterprise"));
    // The scope list is not a rate limit: the tier's limits are what they were.
    assert_eq!(
        c.tiers["audit"],
        Tier { requests_per_second: Some(5), burst: Some(5), daily_requests: None, ..Tier::default() }
    );

    let e = Config::from_yaml(
        "default_scopes: []\ntiers: { a: { scopes: [\"has space\"] } }\nrate_limits: { overrides: { orgs: { acme: { scopes: [read] } } } }\n",
        "t",
    )
    .unwrap_err();
    let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"default_scopes"), "{paths:?}");
    assert!(paths.contains(&"tiers.a.scopes"), "{paths:?}");
    assert!(paths.contains(&"rate_limits.overrides.orgs.acme.scopes"), "{paths:?}");
}
