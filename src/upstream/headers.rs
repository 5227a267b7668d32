//! Header hygiene in both directions (§7): hop-by-hop headers and those the client's
//! `Connection` nominates are removed, identity headers are tollgate's alone to set, and the
//! forwarding headers and the request id are written.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::net::Peer;

/// Identity headers: set by tollgate, never trusted from the client.
pub const IDENTITY_PREFIX: &str = "x-tollgate-";

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy
/// ones. Removed in both directions.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including every header the `Connection` header nominates.
/// Nominated ones go first, before tollgate adds anything, so a client cannot use `Connection`
/// to erase a header tollgate sets (§7).
///
/// `strip_identity` also removes every `x-tollgate-*` header (client requests: identity headers
/// are tollgate's to set). One pass over the names finds out whether anything must go at all —
/// the common case on every request and response, where a lookup per name would cost more.
pub(super) fn remove_hop_by_hop(h: &mut HeaderMap, strip_identity: bool) {
    let is_identity = |k: &HeaderName| strip_identity && k.as_str().starts_with(IDENTITY_PREFIX);
    if !h.keys().any(|k| HOP_BY_HOP.contains(&k.as_str()) || is_identity(k)) {
        return;
    }
    let nominated: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &nominated {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(*name);
    }
    if strip_identity {
        let forged: Vec<HeaderName> = h.keys().filter(|k| is_identity(k)).cloned().collect();
        for k in forged {
            h.remove(k);
        }
    }
}

/// The request id of a request: the client's if it is sane, otherwise a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let ok = !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // A byte at a time (two digits), not a nibble: half the steps, no 128-bit shifts.
    let mut id = [0u8; 32];
    for (pair, byte) in id.chunks_exact_mut(2).zip(fastrand::u128(..).to_le_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // 32 hex digits are always a valid header value.
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// Identity of the authenticated caller, sent upstream as `x-tollgate-*` headers.
#[derive(Debug, Default, Clone)]
pub struct Identity {
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The authenticated caller of a request, as the upstream learns it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub key_id: &'a str,
    pub identity: &'a Identity,
}

pub(super) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

pub(super) fn append_forwarded_for(h: &mut HeaderMap, peer: &Peer) {
    let value = match h.get(X_FORWARDED_FOR) {
        Some(prev) if !prev.as_bytes().trim_ascii().is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.ip.as_bytes());
            match HeaderValue::from_bytes(&v) {
                Ok(v) => v,
                Err(_) => return,
            }
        }
        _ => peer.ip.clone(),
    };
    h.insert(X_FORWARDED_FOR, value);
}

pub(super) const X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connection_nominated_headers_are_removed_first() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret, X-Tollgate-Org".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        remove_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &Peer::new("10.0.0.1:5".parse().unwrap(), false));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        append_forwarded_for(&mut h, &Peer::new("[::ffff:10.0.0.2]:5".parse().unwrap(), false));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", "has space".parse().unwrap());
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, request_id(&HeaderMap::new()));
    }
}
