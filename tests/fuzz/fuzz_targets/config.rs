//! The config loader: YAML text → validated `Config` (`Config::from_yaml`, which `Config::load`
//! calls with a file's text), and what a server derives from a validated config at start and on
//! every reload (`Snapshot::build`: route table, rate limiter, upstream; the connection builder).
//!
//! Input: the config file's bytes. Checked, beyond "no panic": a refusal names at least one
//! problem and renders; a validated config has a prefix and limits within their documented
//! bounds, validates to the same `Config` again from the same text, and builds a snapshot (a
//! failure there may only be the environment: `upstream.api_key_env`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{parse_duration, parse_size, Config};
use tollgate::state::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The value parsers on their own, on every line of the input.
    for line in text.lines().take(16) {
        let _ = parse_duration(line);
        let _ = parse_size(line);
    }
    match Config::from_yaml(text, "fuzz.yaml") {
        Err(e) => {
            assert!(!e.problems.is_empty(), "a refusal without a problem");
            let _ = e.to_string();
        }
        Ok(config) => {
            let a = &config.auth;
            assert!((1..=16).contains(&a.key_prefix.len()));
            assert!(a.key_prefix.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!((1024..=1024 * 1024).contains(&config.limits.max_header_bytes));
            assert!(a.argon2.memory_kib >= 8 * a.argon2.parallelism);
            assert!(config.upstream.url.authority().is_some());
            assert_eq!(
                Config::from_yaml(text, "again").as_ref(),
                Ok(&config),
                "validation is not deterministic"
            );
            let _ = tollgate::net::server::builder(&config.limits);
            let expects_env = config.upstream.api_key_env.is_some();
            match Snapshot::build(config, None) {
                Ok(snap) => {
                    // A reload onto the same config keeps the upstream client and the limits.
                    let again = Snapshot::build(snap.config.clone(), Some(&snap));
                    assert!(again.is_ok() || expects_env);
                }
                Err(e) => assert!(expects_env, "a validated config failed to build: {e}"),
            }
        }
    }
});
