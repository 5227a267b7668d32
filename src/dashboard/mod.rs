//! The key dashboard (§13): one page and its two assets, embedded in the binary and served on
//! the public listener at `/dashboard` without a key (the page's API calls carry one). Sits in
//! the pipeline after the target checks, before authentication; never rate-limited, never
//! forwarded.
//!
//! Every response carries a strict Content-Security-Policy: the page runs only its own script
//! and style (no inline code, so an injected `<script>` or `style=` cannot run), talks only to
//! its own origin, and cannot be framed or submit forms anywhere. The admin's key lives in a
//! JavaScript variable of the page only, so nothing here ever sees or stores it.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Response, StatusCode};

use crate::body::Body;
use crate::error::Error;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Everything is 'self' or nothing; `img-src data:` only leaves room for icons written into
/// the stylesheet (none are needed today).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Answers `/dashboard` and `/dashboard/*` (GET and HEAD; anything else is 404).
pub fn serve(method: &Method, path: &str) -> Result<Response<Body>, Error> {
    let not_found = || Error::NotFound { method: method.to_string(), path: path.to_string() };
    if method != Method::GET && method != Method::HEAD {
        return Err(not_found());
    }
    let (body, content_type) = match path {
        "/dashboard" | "/dashboard/" | "/dashboard/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/dashboard/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/app.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return Err(not_found()),
    };
    let mut rsp = Response::new(Body::full(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = StatusCode::OK;
    let h = rsp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The page shows keys once: no copy of it, or of what it showed, may stay in a cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not needed by the page; denied so that nothing injected could use them.
    h.insert(
        HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=()"),
    );
    h.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    Ok(rsp)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_their_types_and_no_inline_code() {
        let types = [
            ("/dashboard", "text/html; charset=utf-8"),
            ("/dashboard/app.js", "text/javascript; charset=utf-8"),
            ("/dashboard/app.css", "text/css; charset=utf-8"),
        ];
        for (path, ty) in types {
            let rsp = serve(&Method::GET, path).unwrap();
            assert_eq!(rsp.headers()["content-type"], ty);
            assert_eq!(rsp.headers()["content-security-policy"], CSP);
        }
        assert!(serve(&Method::GET, "/dashboard/secret").is_err());
        assert!(serve(&Method::POST, "/dashboard").is_err());
        // The CSP would block them anyway; a page that relied on them would be broken.
        for needle in ["<script>", "style=", "onclick", "javascript:", "<style"] {
            assert!(!INDEX.contains(needle), "index.html contains {needle}");
        }
        for banned in ["localStorage", "sessionStorage", "document.cookie", "innerHTML"] {
            assert!(!SCRIPT.contains(banned), "app.js uses {banned}");
        }
    }
}
