//! The access log and the request metrics: one observer of each response body (`Record`),
//! which reports the request once when the body ends — or, through the request context, when
//! the client left before there was a response.

use std::sync::Arc;
use std::time::Instant;

use http::HeaderValue;

use crate::body::{End, Observer, Stop};
use crate::proxy::routes::UNMATCHED;
use crate::state::State;

/// The path for the access log, with any key-looking segment replaced: a key pasted into a URL
/// must not reach the logs.
pub(crate) fn redact_keys(path: &str, prefix: &str) -> String {
    let starts_like_key = |seg: &str| {
        seg.len() > prefix.len() && seg.starts_with(prefix) && seg.as_bytes()[prefix.len()] == b'_'
    };
    // Percent-encoded too (`tg%5F…`, `%74g_…`): such a path is refused, but still logged.
    let looks_like_key = |seg: &str| {
        starts_like_key(seg) || (seg.contains('%') && starts_like_key(&super::target::decode_component(seg)))
    };
    if !path.split('/').any(looks_like_key) {
        return path.to_string();
    }
    path.split('/').map(|s| if looks_like_key(s) { "<redacted>" } else { s }).collect::<Vec<_>>().join("/")
}

/// The status logged for a request whose client left before its response headers (nginx's
/// "client closed request"): no response was sent, so no real status applies.
pub(crate) const CLIENT_GONE_STATUS: u16 = 499;

/// Everything the access log and the request metrics need, recorded when the body ends.
pub(crate) struct Record {
    pub state: Arc<State>,
    pub started: Instant,
    /// The route's label and duration histogram (`None`: unmatched).
    pub route: Option<(Arc<str>, prometheus::Histogram)>,
    pub method: &'static str,
    pub path: String,
    pub status: u16,
    pub code: &'static str,
    pub request_id: HeaderValue,
    pub peer: std::net::IpAddr,
}

impl Observer for Record {
    fn on_end(self: Box<Self>, bytes: u64, end: End) {
        let m = &self.state.metrics;
        let route = self.route.as_ref().map_or(UNMATCHED, |r| &*r.0);
        // `as_str` reads a table of every code: no number formatted, nothing allocated.
        // Every status here is one of a response (or 499): valid, so the fallback is never used.
        let code = http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let status = code.as_str();
        m.requests.with_label_values(&[route, self.method, status, self.code]).inc();
        let elapsed = self.started.elapsed();
        match &self.route {
            Some((_, histogram)) => histogram.observe(elapsed.as_secs_f64()),
            None => m.request_duration(route).observe(elapsed.as_secs_f64()),
        }
        m.inflight.dec();
        let end = match end {
            End::Complete => "complete",
            End::ClientGone => "client_gone",
            End::Stopped(Stop::Idle) => {
                m.upstream_errors.with_label_values(&["stream_idle"]).inc();
                "stream_idle"
            }
            End::Stopped(_) => {
                m.upstream_errors.with_label_values(&["stream_broken"]).inc();
                "stream_broken"
            }
        };
        tracing::info!(
            target: "access",
            method = self.method,
            path = %self.path,
            route,
            status = self.status,
            code = self.code,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes,
            end,
            request_id = self.request_id.to_str().unwrap_or("-"),
            peer = %self.peer,
        );
    }
}
