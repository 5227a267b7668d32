//! The request-target checks (`target::reject_key_in_url`, `target::check_target`).
//!
//! Input: `<flags byte><request target>[\n<Host header value>]`. The flags pick the HTTP version
//! (bit 0: HTTP/2) and whether a Host header is sent (bit 1); the rest is parsed as `http::Uri`
//! does for hyper.
//!
//! Checked, beyond "no panic": whatever passes `check_target` has a path that starts with `/`
//! and holds no dot segment, empty segment, backslash or malformed/encoded-unreserved `%`; an
//! HTTP/1 absolute-form target passes only with a matching Host; a key-carrying parameter name
//! never passes `reject_key_in_url`; every error renders as a response.
#![no_main]

use http::{header, HeaderMap, HeaderValue, Uri, Version};
use libfuzzer_sys::fuzz_target;
use tollgate::proxy::target::{check_target, reject_key_in_url};

const KEY_PARAMS: &[&str] = &["api_key", "apikey", "api-key", "key", "access_token", "token"];

fn path_is_safe(path: &str) {
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    assert!(!path.contains('\\'), "{path:?}");
    assert!(path.split('/').all(|s| s != "." && s != ".."), "{path:?}");
    let b = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else { panic!("bad escape accepted: {path:?}") };
        let c = u8::try_from(hi * 16 + lo).expect("two hex digits");
        assert!(!c.is_ascii_alphanumeric() && !b"-._~/\\".contains(&c), "{path:?}");
        assert!(c >= 0x20 && c != 0x7f, "{path:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let (target, host) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let Ok(uri) = Uri::try_from(target) else { return };
    let version = if flags & 1 == 1 { Version::HTTP_2 } else { Version::HTTP_11 };
    let mut headers = HeaderMap::new();
    if flags & 2 == 2 {
        if let Some(h) = host.and_then(|h| HeaderValue::from_bytes(h).ok()) {
            headers.insert(header::HOST, h);
        }
    }

    for prefix in ["tg", "sk"] {
        match reject_key_in_url(&uri, prefix) {
            Ok(()) => {
                // No raw parameter name that is literally a key name may pass.
                for pair in uri.query().unwrap_or("").split('&') {
                    let name = pair.split_once('=').map_or(pair, |(n, _)| n);
                    assert!(!KEY_PARAMS.iter().any(|k| k.eq_ignore_ascii_case(name)), "{uri}");
                    let value = pair.split_once('=').map_or("", |(_, v)| v);
                    let ours = value.len() > prefix.len()
                        && value.starts_with(prefix)
                        && value.as_bytes()[prefix.len()] == b'_';
                    assert!(!ours, "a key-like value passed: {uri}");
                }
            }
            Err(e) => {
                assert_eq!(e.code(), "key_in_url");
                let _ = e.into_response();
            }
        }
    }
    match check_target(&uri, version, &headers) {
        Ok(()) => {
            path_is_safe(uri.path());
            if version < Version::HTTP_2 {
                if let Some(a) = uri.authority() {
                    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                    assert_eq!(host, Some(a.as_str()), "absolute-form to another host passed: {uri}");
                }
            }
        }
        Err(e) => {
            assert_eq!(e.code(), "bad_request");
            let _ = e.into_response();
        }
    }
});
