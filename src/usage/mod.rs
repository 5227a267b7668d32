//! LLM usage (§12): the request's token estimate (and, for a stream whose client did not ask
//! for usage, asking the upstream for it), and the response's reported usage settling the
//! reservation when the body ends (`settle.rs`, read by `meter.rs`).
//!
//! A request body is read before admission only when its tier counts tokens, it is JSON, and
//! it declares a length within `REWRITE_CAP` (every OpenAI SDK sends `content-length`); any
//! other body is forwarded untouched, estimated from its length alone, and counted in
//! `tollgate_usage_unparsed_requests_total{reason}`.

pub mod meter;
mod scan;
pub mod settle;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Request};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use crate::body::Outgoing;
use crate::error::Error;

/// The largest request body read for its estimate (and rewritten).
pub const REWRITE_CAP: u64 = 4 * 1024 * 1024;

/// The output assumed for a request without `max_tokens`, unless the tier says otherwise.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 256;

/// What the request side learned.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Prompt bytes ÷ 4 plus the output allowed (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`, or the tier's `default_output_tokens`).
    pub estimate: u64,
    /// `stream_options.include_usage` was added: the usage-only chunk is tollgate's, and is
    /// stripped from what the client receives.
    pub injected: bool,
    /// Why the body was not read, for the metric.
    pub unparsed: Option<&'static str>,
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.trim_start().as_bytes().get(..16).is_some_and(|p| p.eq_ignore_ascii_case(b"application/json"))
    })
}

/// The members of a request that the estimate and the injection need, found by one scan of
/// its top level (`scan.rs`: a long prompt is skipped by `memchr`, not parsed); `None` if the
/// body is not a JSON object.
struct Probe {
    stream: bool,
    include_usage: bool,
    max_output: Option<u64>,
}

impl Probe {
    fn of(json: &[u8]) -> Option<Probe> {
        let [stream, options, max_tokens, max_completion, max_output] = scan::members(
            json,
            [b"stream", b"stream_options", b"max_tokens", b"max_completion_tokens", b"max_output_tokens"],
        )?;
        let number = |v: Option<&[u8]>| v.and_then(scan::unsigned);
        Some(Probe {
            stream: stream.is_some_and(|v| v.starts_with(b"true")),
            include_usage: options
                .and_then(|o| scan::member(o, b"include_usage"))
                .is_some_and(|v| v.starts_with(b"true")),
            max_output: number(max_tokens).or(number(max_completion)).or(number(max_output)),
        })
    }
}

/// A request body whole, at most `REWRITE_CAP` bytes. A body of one frame (a small request,
/// the usual case) is that frame, not a copy: `Collect` and `Limited` cost ≈ 400 instructions
/// more per token-limited request (`benches/load/profile.sh`).
async fn read_whole(mut body: Incoming) -> Result<Bytes, String> {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else { break };
        let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else { continue };
        if (first.as_ref().map_or(0, Bytes::len) + joined.len() + data.len()) as u64 > REWRITE_CAP {
            return Err("length limit exceeded".into());
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            one => {
                joined.extend_from_slice(&one.unwrap_or_default());
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// Reads (and if need be rewrites) a token-counted request's body for its estimate; the
/// request to forward, with its body as read (or untouched).
pub async fn prepare(
    req: Request<Incoming>,
    default_output: u64,
    inject: bool,
    read_timeout: Duration,
) -> Result<(Request<Outgoing>, Prepared), Error> {
    let (parts, body) = req.into_parts();
    let untouched = |parts, body, p: Prepared| Ok((Request::from_parts(parts, Outgoing::Client(body)), p));
    let length = content_length(&parts.headers);
    let unparsed = |reason, len: Option<u64>| Prepared {
        estimate: len.unwrap_or(0) / 4 + default_output,
        unparsed: Some(reason),
        ..Prepared::default()
    };
    if !is_json(&parts.headers) {
        return untouched(parts, body, unparsed("not_json", length));
    }
    match length {
        None => return untouched(parts, body, unparsed("no_length", None)),
        Some(n) if n > REWRITE_CAP => return untouched(parts, body, unparsed("too_large", Some(n))),
        Some(_) => {}
    }
    let bytes = match tokio::time::timeout(read_timeout, read_whole(body)).await {
        Err(_) => return Err(Error::RequestTimeout { after: read_timeout }),
        Ok(Err(e)) => return Err(Error::BadRequest(format!("The request body could not be read: {e}"))),
        Ok(Ok(bytes)) => bytes,
    };
    let whole = |parts, bytes: Bytes, p: Prepared| {
        let mut req = Request::from_parts(parts, Outgoing::Rewritten(None));
        let as_declared =
            length == Some(bytes.len() as u64) && !req.headers().contains_key(header::TRANSFER_ENCODING);
        if as_declared {
            // Sent as it came, whole: its `content-length` already says so (one header
            // removed, one formatted and inserted fewer per request).
            *req.body_mut() = Outgoing::Rewritten(Some(bytes));
        } else {
            crate::upstream::rewrite_body(&mut req, bytes);
        }
        Ok((req, p))
    };
    // Only the members that matter: most requests are only read.
    let Some(probe) = Probe::of(&bytes) else {
        // Forwarded as it came: the upstream gives the client its own error for it.
        let p = unparsed("not_json", Some(bytes.len() as u64));
        return whole(parts, bytes, p);
    };
    let output = probe.max_output.unwrap_or(default_output);
    let estimate = (bytes.len() as u64) / 4 + output;
    if probe.stream && inject && !probe.include_usage {
        // The rewrite is the one case that builds the whole document.
        let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
            return whole(parts, bytes, Prepared { estimate, injected: false, unparsed: None });
        };
        if let Some(obj) = v.as_object_mut() {
            let options = obj.entry("stream_options").or_insert_with(|| Value::Object(Default::default()));
            if !options.is_object() {
                *options = Value::Object(Default::default());
            }
            if let Some(o) = options.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            if let Ok(rewritten) = serde_json::to_vec(&v) {
                return whole(parts, rewritten.into(), Prepared { estimate, injected: true, unparsed: None });
            }
        }
    }
    whole(parts, bytes, Prepared { estimate, injected: false, unparsed: None })
}
