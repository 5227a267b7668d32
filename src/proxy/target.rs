//! The request head, checked before anything else (§1, §7): keys in the URL are refused, a
//! path that the upstream could read as a different route than the route table does — dot
//! segments, encoded dots or slashes, empty segments, absolute-form aimed elsewhere — is
//! rejected with 400, never normalised, and headers past the size limits get 431. What passes
//! here is forwarded byte for byte, so the path the scope check evaluates is exactly the path
//! the upstream receives.

use http::{header, HeaderMap, Uri, Version};

use crate::error::Error;

/// Query parameter names that carry keys in the wild (compared case-insensitively, decoded).
const KEY_PARAMS: &[&str] = &["api_key", "apikey", "api-key", "key", "access_token", "token"];

/// Refuses a key in the URL (400 `key_in_url`): a query parameter with a key-carrying name, any
/// parameter whose value starts like one of our keys (`{prefix}_`), or a path segment with the
/// shape of one of our keys (which would otherwise be forwarded, and echoed in a 404).
pub fn reject_key_in_url(uri: &Uri, prefix: &str) -> Result<(), Error> {
    // Cheap first: a key needs `{prefix}_` somewhere in the path.
    let path = uri.path();
    if path.len() > prefix.len() && path.contains(prefix) {
        for segment in path.split('/') {
            if crate::keys::looks_like_key(prefix, segment)
                || (segment.contains('%') && crate::keys::looks_like_key(prefix, &decode_component(segment)))
            {
                return Err(Error::KeyInPath);
            }
        }
    }
    let Some(query) = uri.query() else {
        return Ok(());
    };
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_component(name);
        let value = decode_component(value);
        let ours =
            value.len() > prefix.len() && value.starts_with(prefix) && value.as_bytes()[prefix.len()] == b'_';
        // A key pasted as the parameter's name (`?tg_…`) is a key in the URL too.
        let named_like_ours = crate::keys::looks_like_key(prefix, &name);
        if ours || named_like_ours || KEY_PARAMS.iter().any(|k| k.eq_ignore_ascii_case(&name)) {
            if named_like_ours {
                return Err(Error::KeyInUrl { param: "<redacted>".into() });
            }
            return Err(Error::KeyInUrl { param: name });
        }
    }
    Ok(())
}

/// Refuses targets that could route differently here and upstream (400 `bad_request`).
pub fn check_target(uri: &Uri, version: Version, headers: &HeaderMap) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::BadRequest(format!("Invalid request target: {why}.")));
    // HTTP/2 always carries scheme and authority in the URI; for HTTP/1 they only appear in
    // absolute-form, which a sidecar accepts only when it names the host it was sent to.
    if version < Version::HTTP_2 {
        if let Some(authority) = uri.authority() {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            if host != Some(authority.as_str()) {
                return bad("absolute-form targets must name the same host as the Host header");
            }
        }
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return bad("the path must start with `/`");
    }
    check_path(path).or_else(bad)
}

/// One pass over the path (every request pays for it: a `split` and a `contains("//")` after
/// the character scan cost ≈ 800 instructions per request, `benches/load/profile.sh h1`).
/// Refused characters answer at once, in the order they appear; dot and empty segments are
/// noted on the way and answered after, dot segments first.
fn check_path(path: &str) -> Result<(), &'static str> {
    let bytes = path.as_bytes();
    // First without a branch per byte (so the compiler can take 16 bytes at a time): a path
    // with none of `\`, `;`, `%`, `.` and no `//` — most API paths — has nothing more to check.
    let odd = bytes.iter().fold(false, |acc, &b| acc | matches!(b, b'\\' | b';' | b'%' | b'.'));
    let double = bytes
        .iter()
        .zip(&bytes[1.min(bytes.len())..])
        .fold(false, |acc, (&a, &b)| acc | (a == b'/' && b == b'/'));
    if !odd && !double {
        return Ok(());
    }
    let (mut dots, mut empty) = (false, false);
    // Where the current segment began (just after its `/`); none before the first `/`.
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' => {
                if let Some(s) = start {
                    let segment = &bytes[s..i];
                    dots |= segment == b"." || segment == b"..";
                    empty |= segment.is_empty();
                }
                start = Some(i + 1);
            }
            b'\\' => return Err("backslashes are not allowed in the path"),
            // Servlet containers strip `;params` from segments, so `/v1/models/..;/keys` is
            // `/v1/keys` to them; no OpenAI-style route has path parameters.
            b';' => return Err("path parameters (`;`) are not allowed in the path"),
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                    return Err("malformed percent-encoding in the path");
                };
                let decoded = u8::try_from(hi * 16 + lo).unwrap_or(0);
                if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                    // Decoding these changes nothing for a conforming server but lets a
                    // non-conforming one see another route: `/v1/%63hat/completions`.
                    return Err(
                        "percent-encoded unreserved characters (such as `%2e`) are not allowed in the path",
                    );
                }
                if matches!(decoded, b'/' | b'\\') {
                    return Err("encoded slashes are not allowed in the path");
                }
                if decoded == b';' {
                    return Err("path parameters (`;`) are not allowed in the path");
                }
                if decoded < 0x20 || decoded == 0x7f {
                    return Err("encoded control characters are not allowed in the path");
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(s) = start {
        let last = &bytes[s..];
        dots |= last == b"." || last == b"..";
    }
    if dots {
        return Err("dot segments (`.` or `..`) are not allowed in the path");
    }
    if empty {
        return Err("empty path segments (`//`) are not allowed");
    }
    Ok(())
}

/// Percent-decodes a query component (`+` is a space there), lossily.
pub(crate) fn decode_component(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Header fields a request may carry: hyper's HTTP/1.1 parser refuses more (a bare 431), and
/// HTTP/2 requests get the same limit here, with the JSON 431.
const MAX_HEADER_FIELDS: usize = 100;

/// 431 before anything else reads the headers. Counted as they travel on an HTTP/1.1 wire
/// (`name: value\r\n`), so the limit means the same for HTTP/1.1 and HTTP/2 clients.
pub fn check_header_size(headers: &HeaderMap, limit: usize) -> Result<(), Error> {
    if headers.len() > MAX_HEADER_FIELDS {
        return Err(Error::TooManyHeaders { max: MAX_HEADER_FIELDS });
    }
    let size: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if size > limit {
        return Err(Error::HeadersTooLarge { limit });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target(t: &str) -> Result<(), Error> {
        let uri: Uri = t.parse().unwrap();
        check_target(&uri, Version::HTTP_11, &HeaderMap::new())
    }

    #[test]
    fn keys_in_the_query_are_refused() {
        for q in [
            "/v1/models?api_key=x",
            "/v1/models?a=1&KEY=x",
            "/v1/models?access_token",
            "/v1/models?api%5Fkey=x",
            "/v1/models?Token=",
            "/v1/models?q=tg_abc",
        ] {
            let e = reject_key_in_url(&q.parse().unwrap(), "tg").unwrap_err();
            assert_eq!(e.code(), "key_in_url", "{q}");
        }
        for q in ["/v1/models", "/v1/models?monkey=1", "/v1/models?keys=1&tokens=2&q=tgx"] {
            assert!(reject_key_in_url(&q.parse().unwrap(), "tg").is_ok(), "{q}");
        }
    }

    #[test]
    fn a_key_as_a_query_parameter_name_is_refused_and_not_echoed() {
        let key = crate::keys::assemble("tg", "abcdefABCDEF", &"s".repeat(crate::keys::SECRET_LEN));
        let e = reject_key_in_url(&format!("/v1/models?{key}").parse().unwrap(), "tg").unwrap_err();
        assert_eq!(e.code(), "key_in_url");
        assert!(!String::from_utf8_lossy(&e.body()).contains(&key[3..]), "the error echoes the key");
    }

    #[test]
    fn keys_in_the_path_are_refused() {
        let key = crate::keys::assemble("tg", "abcdefABCDEF", &"s".repeat(crate::keys::SECRET_LEN));
        let mistyped = format!("{}x", &key[..key.len() - 1]);
        let encoded = key.replace('_', "%5F");
        for p in [
            format!("/v1/models/{key}"),
            format!("/{key}/v1/models"),
            format!("/v1/{mistyped}"),
            format!("/v1/{encoded}"),
        ] {
            let e = reject_key_in_url(&p.parse().unwrap(), "tg").unwrap_err();
            assert_eq!(e, Error::KeyInPath, "{p}");
            assert!(!String::from_utf8_lossy(&e.body()).contains(&key[3..]), "the error echoes the key");
        }
        for p in [
            "/v1/models/tg_llama",
            "/v1/models/tg_abcdefABCDEF",
            "/v1/models/tg_abcdefABCDEF_short",
            "/v1/models/xtg",
        ] {
            assert!(reject_key_in_url(&p.parse().unwrap(), "tg").is_ok(), "{p}");
        }
    }

    #[test]
    fn path_tricks_are_rejected() {
        for t in [
            "/v1/../v1/keys",
            "/v1/./models",
            "/v1/%2e%2e/keys",
            "/v1/%2E./keys",
            "/v1/models%2fx",
            "/v1/models%2Fx",
            "/v1/%63hat/completions",
            "/v1//models",
            "/v1/models/..",
            "/v1/models%5c..",
            "/v1/models%00",
            "/v1/models%zz",
            "/v1/models%2",
            "/v1/models/..;/keys",
            "/v1/models/.;/x",
            "/v1/models/..;x/keys",
            "/v1/chat/completions;jsessionid=1",
            "/v1/models/..%3b/keys",
            "/v1/models/..%3B/keys",
        ] {
            let e = target(t).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{t}");
        }
        for t in ["/v1/models", "/v1/models/", "/v1/models/a%20b", "/v1/models/x.y", "/v1/models/..x", "/"] {
            assert!(target(t).is_ok(), "{t}");
        }
    }

    /// The one-pass check answers as the plain one it replaced (character scan, then dot
    /// segments, then `//`; kept here verbatim), message for message, on every path of up to six characters over an
    /// alphabet of what matters.
    #[test]
    fn the_one_pass_path_check_answers_as_the_segment_by_segment_one() {
        fn plain(path: &str) -> Result<(), &'static str> {
            let bytes = path.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => return Err("backslashes are not allowed in the path"),
                    // Servlet containers strip `;params` from segments, so `/v1/models/..;/keys` is
                    // `/v1/keys` to them; no OpenAI-style route has path parameters.
                    b';' => return Err("path parameters (`;`) are not allowed in the path"),
                    b'%' => {
                        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                        let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                            return Err("malformed percent-encoding in the path");
                        };
                        let decoded = u8::try_from(hi * 16 + lo).unwrap_or(0);
                        if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                            // Decoding these changes nothing for a conforming server but lets a
                            // non-conforming one see another route: `/v1/%63hat/completions`.
                            return Err(
                                "percent-encoded unreserved characters (such as `%2e`) are not allowed in the path",
                            );
                        }
                        if matches!(decoded, b'/' | b'\\') {
                            return Err("encoded slashes are not allowed in the path");
                        }
                        if decoded == b';' {
                            return Err("path parameters (`;`) are not allowed in the path");
                        }
                        if decoded < 0x20 || decoded == 0x7f {
                            return Err("encoded control characters are not allowed in the path");
                        }
                        i += 3;
                        continue;
                    }
                    _ => {}
                }
                i += 1;
            }
            for segment in path.split('/').skip(1) {
                if segment == "." || segment == ".." {
                    return Err("dot segments (`.` or `..`) are not allowed in the path");
                }
            }
            if path.contains("//") {
                return Err("empty path segments (`//`) are not allowed");
            }
            Ok(())
        }
        let alphabet = ['/', '.', 'a', '%', '2', 'e', ';', '\\'];
        let mut paths = vec![String::new()];
        let mut checked = 0;
        for _ in 0..6 {
            paths = paths.iter().flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}"))).collect();
            for p in &paths {
                let path = format!("/{p}");
                assert_eq!(check_path(&path), plain(&path), "{path}");
                checked += 1;
            }
        }
        assert_eq!(checked, (1..=6).map(|n| 8usize.pow(n)).sum::<usize>());
    }

    #[test]
    fn absolute_form_must_name_the_host() {
        let uri: Uri = "http://evil.example/v1/models".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "api.local".parse().unwrap());
        assert!(check_target(&uri, Version::HTTP_11, &h).is_err());
        h.insert(header::HOST, "evil.example".parse().unwrap());
        assert!(check_target(&uri, Version::HTTP_11, &h).is_ok());
        // HTTP/2 always has an authority in the URI.
        assert!(check_target(&uri, Version::HTTP_2, &HeaderMap::new()).is_ok());
    }

    #[test]
    fn header_size_counts_names_and_values() {
        let mut h = HeaderMap::new();
        h.insert("a", http::HeaderValue::from_static("bc")); // 1 + 2 + 4 = 7
        assert!(check_header_size(&h, 7).is_ok());
        assert_eq!(check_header_size(&h, 6).unwrap_err(), Error::HeadersTooLarge { limit: 6 });
    }
}
