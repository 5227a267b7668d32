//! The bearer parser (`auth::bearer`) and the key format with its checksum (`keys::parse`,
//! `keys::assemble`).
//!
//! Input: the raw value of an `Authorization` header. A first byte of `0x00` splits the rest at
//! the next `0x00` into two header values (two `Authorization` headers, always refused).
//!
//! Checked, beyond "no panic":
//! - `bearer` only accepts one header, the scheme `Bearer ` (any case), then 1 to
//!   `MAX_TOKEN_LEN` visible ASCII characters, and returns exactly those;
//! - `parse` accepts exactly what `assemble` builds: a parsed token re-assembles to itself, and
//!   any token built from the input's characters round-trips;
//! - the checksum catches every single-character change of a well-formed key.
#![no_main]

use http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::auth::{bearer, Reason};
use tollgate::keys::{self, CHECKSUM_LEN, ID_LEN, MAX_TOKEN_LEN, SECRET_LEN};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn check_parsed(prefix: &str, token: &str) {
    match keys::parse(prefix, token) {
        Ok(p) => {
            assert_eq!(p.id.len(), ID_LEN);
            assert_eq!(p.secret().len(), SECRET_LEN);
            assert!(p.id.bytes().chain(p.secret().bytes()).all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(
                keys::assemble(prefix, p.id, p.secret()),
                token,
                "parse accepted a token assemble would not build"
            );
        }
        Err(_) => {
            // Anything refused must not be something assemble builds from its own parts.
            if let Some(rest) = token.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) {
                if rest.len() == ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN && rest.is_char_boundary(ID_LEN) {
                    let (id, tail) = rest.split_at(ID_LEN);
                    if let Some(tail) = tail.strip_prefix('_') {
                        if tail.is_char_boundary(SECRET_LEN) {
                            let secret = &tail[..SECRET_LEN];
                            let ok = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
                            if ok(id) && ok(secret) {
                                assert_ne!(
                                    keys::assemble(prefix, id, secret),
                                    token,
                                    "a well-formed key was refused"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A well-formed key made of the input's bytes (mapped onto base62), and every one-character
/// change of it.
fn round_trip(prefix: &str, data: &[u8]) {
    let pick = |i: usize| BASE62[usize::from(data.get(i).copied().unwrap_or(0)) % BASE62.len()] as char;
    let id: String = (0..ID_LEN).map(pick).collect();
    let secret: String = (ID_LEN..ID_LEN + SECRET_LEN).map(pick).collect();
    let token = keys::assemble(prefix, &id, &secret);
    let parsed = keys::parse(prefix, &token).expect("an assembled key parses");
    assert_eq!((parsed.id, parsed.secret()), (id.as_str(), secret.as_str()));
    // One changed character anywhere after the prefix: the position and the replacement come
    // from the input too.
    let at = usize::from(data.first().copied().unwrap_or(0)) % (token.len() - prefix.len() - 1);
    let at = prefix.len() + 1 + at;
    let replacement = pick(data.len());
    let mut typo = token.clone().into_bytes();
    if typo[at] != b'_' && typo[at] != replacement as u8 {
        typo[at] = replacement as u8;
        let typo = String::from_utf8(typo).expect("ASCII");
        assert!(keys::parse(prefix, &typo).is_err(), "a one-character typo passed the checksum");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    let values: Vec<&[u8]> = match data.split_first() {
        Some((0, rest)) => rest.splitn(2, |b| *b == 0).collect(),
        _ => vec![data],
    };
    for v in &values {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(header::AUTHORIZATION, v);
        }
    }
    let count = headers.get_all(header::AUTHORIZATION).iter().count();
    match bearer(&headers) {
        Ok(token) => {
            assert_eq!(count, 1, "a token was taken from {count} Authorization headers");
            let raw = headers.get(header::AUTHORIZATION).expect("one header").as_bytes();
            assert!(raw[..7].eq_ignore_ascii_case(b"bearer "));
            assert_eq!(&raw[7..], token.as_bytes());
            assert!(!token.is_empty() && token.len() <= MAX_TOKEN_LEN);
            assert!(token.bytes().all(|b| b.is_ascii_graphic()));
            check_parsed("tg", token);
            // The configured prefix is 1 to 16 letters or digits; take one from the token.
            let cut = token.find('_').unwrap_or(0);
            let prefix = &token[..cut];
            if (1..=16).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_alphanumeric()) {
                check_parsed(prefix, token);
            }
        }
        Err(Reason::Missing) => assert_eq!(count, 0),
        Err(Reason::Malformed) => {}
        Err(other) => panic!("bearer returned {other:?}"),
    }
    if let Ok(s) = std::str::from_utf8(data) {
        check_parsed("tg", s);
    }
    round_trip("tg", data);
    round_trip("sk0123456789ABCD", data);
});
