//! Reading the upstream's reported usage from a response as its bytes pass (§12): the `usage`
//! of a JSON completion (chat, completions, embeddings, responses), or the usage carried by an
//! SSE event — a usage-only chunk (`choices: []`), a chunk that also carries the last delta,
//! `/v1/responses`' `response.completed`, or vLLM's cumulative usage on every chunk (the last
//! one counts, once). Nothing is delayed: events are inspected as they complete, and only the
//! usage-only chunk tollgate asked for is held back — and dropped — when stripping.

use bytes::{Bytes, BytesMut};

use super::scan::{last_member, member, members, unsigned};

/// Tokens as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What a document says: its usage, and whether its `choices` is an empty list.
struct Read {
    usage: Option<Usage>,
    no_choices: bool,
}

/// Reads the members that matter — `usage` (or `response.usage`) and `choices` — found by a
/// scan of the top level (`scan.rs`), and the counts in `usage` by a scan of it; the rest is
/// never parsed.
fn read(json: &[u8], choices: bool) -> Option<Read> {
    let object = |v: &&[u8]| v.first() == Some(&b'{');
    let counts = last_member(json, b"usage")
        .filter(object)
        .or_else(|| member(json, b"response").and_then(|r| member(r, b"usage")).filter(object))?;
    // Chat and completions say prompt/completion, responses input/output.
    let [prompt, input, completion, output] =
        members(counts, [b"prompt_tokens", b"input_tokens", b"completion_tokens", b"output_tokens"])?;
    let number = |v: Option<&[u8]>| v.and_then(unsigned);
    let usage = number(prompt)
        .or(number(input))
        .map(|prompt| Usage { prompt, completion: number(completion).or(number(output)).unwrap_or(0) });
    // `"choices": []`: the list's first non-blank byte closes it.
    let no_choices = choices
        && member(json, b"choices").is_some_and(|v| {
            v.first() == Some(&b'[') && v[1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b']')
        });
    Some(Read { usage, no_choices })
}

/// The usage of a completion, event or response (`usage`, or `response.usage`).
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    read(json, false)?.usage
}

/// How much of a JSON body is kept to find its usage: completions are small; a larger body
/// (a huge embedding batch) is forwarded without being read, and its estimate stands.
const JSON_CAP: usize = 4 * 1024 * 1024;
/// The longest SSE event looked at; a longer one passes uninspected.
const EVENT_CAP: usize = 1024 * 1024;

enum Mode {
    Json(Whole),
    Sse(BytesMut),
    Skip,
}

/// A JSON body as it came: a body of one frame (the usual case) kept as it is, without a
/// copy; the frames of a longer one joined.
#[derive(Default)]
struct Whole {
    one: Option<Bytes>,
    joined: BytesMut,
}

impl Whole {
    fn len(&self) -> usize {
        self.one.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    fn push(&mut self, data: &Bytes) {
        if self.one.is_none() && self.joined.is_empty() {
            self.one = Some(data.clone());
            return;
        }
        if let Some(first) = self.one.take() {
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(data);
    }

    fn bytes(&self) -> &[u8] {
        self.one.as_deref().unwrap_or(&self.joined)
    }
}

pub struct Meter {
    mode: Mode,
    /// Drop the usage-only chunk (tollgate asked for it; the client did not).
    strip: bool,
    usage: Option<Usage>,
    /// A JSON body past `JSON_CAP`, or an SSE event past `EVENT_CAP`.
    overflowed: bool,
}

impl Meter {
    /// A meter for a response of this `content-type`.
    pub fn new(content_type: Option<&str>, strip: bool) -> Meter {
        let ct = content_type.unwrap_or("").as_bytes();
        let is =
            |prefix: &str| ct.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()));
        let mode = if is("text/event-stream") {
            Mode::Sse(BytesMut::new())
        } else if is("application/json") || ct.is_empty() {
            Mode::Json(Whole::default())
        } else {
            Mode::Skip
        };
        Meter { mode, strip, usage: None, overflowed: false }
    }

    pub fn strips(&self) -> bool {
        self.strip && matches!(self.mode, Mode::Sse(_))
    }

    /// Looks at one data frame. Returns what goes on to the client when stripping (complete
    /// events but the usage-only one; an incomplete event waits for its end), else `None`
    /// (the frame goes on as it is).
    pub fn feed(&mut self, data: &Bytes) -> Option<Bytes> {
        let strip = self.strips();
        match &mut self.mode {
            Mode::Skip => None,
            Mode::Json(buf) => {
                if buf.len() + data.len() > JSON_CAP {
                    self.overflowed = true;
                    self.mode = Mode::Skip;
                } else {
                    buf.push(data);
                }
                None
            }
            Mode::Sse(pending) => {
                pending.extend_from_slice(data);
                let mut out = BytesMut::new();
                while let Some(end) = event_end(pending) {
                    let event = pending.split_to(end);
                    let keep = inspect(&event, &mut self.usage, strip);
                    if strip && keep {
                        out.extend_from_slice(&event);
                    }
                }
                if pending.len() > EVENT_CAP {
                    // Not an event we can read: pass it on and stop holding it.
                    self.overflowed = true;
                    out.extend_from_slice(&pending.split());
                }
                strip.then(|| out.freeze())
            }
        }
    }

    /// The end of the body: its usage, if it reported any, and (when stripping) what was
    /// still held — an event without its final blank line.
    pub fn finish(&mut self) -> (Option<Usage>, Option<Bytes>) {
        let strip = self.strips();
        match std::mem::replace(&mut self.mode, Mode::Skip) {
            Mode::Json(buf) => {
                self.usage = usage_of(buf.bytes()).or(self.usage);
                (self.usage, None)
            }
            Mode::Sse(rest) => {
                let keep = !rest.is_empty() && inspect(&rest, &mut self.usage, strip);
                (self.usage, (strip && keep).then(|| rest.freeze()))
            }
            Mode::Skip => (self.usage, None),
        }
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed
    }
}

/// The end of the first complete event in `buf` (after its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Reads an event's usage into `usage`; returns whether the event goes on to the client
/// (false only for the usage-only chunk, when stripping).
fn inspect(event: &[u8], usage: &mut Option<Usage>, strip: bool) -> bool {
    // Cheap first: most events carry no usage at all.
    if !event.windows(7).any(|w| w == b"\"usage\"") {
        return true;
    }
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    let Some(r) = read(&data, true) else { return true };
    let Some(u) = r.usage else { return true };
    // Cumulative (vLLM's continuous usage stats) or final: the latest report is the usage.
    *usage = Some(u);
    !(strip && r.no_choices)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sse(events: &[&str]) -> Vec<Bytes> {
        events.iter().map(|e| Bytes::from(format!("data: {e}\n\n"))).collect()
    }

    const DELTA: &str = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    const USAGE_ONLY: &str =
        r#"{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;

    #[test]
    fn a_json_completion_embeddings_and_responses_report_usage() {
        for (body, want) in [
            (
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
                Usage { prompt: 3, completion: 4 },
            ),
            (
                r#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#,
                Usage { prompt: 8, completion: 0 },
            ),
            (
                r#"{"output":[],"usage":{"input_tokens":5,"output_tokens":6}}"#,
                Usage { prompt: 5, completion: 6 },
            ),
        ] {
            let mut m = Meter::new(Some("application/json"), false);
            let (a, b) = body.split_at(10);
            assert_eq!(m.feed(&Bytes::from(a)), None);
            m.feed(&Bytes::from(b));
            assert_eq!(m.finish().0, Some(want), "{body}");
        }
        let mut m = Meter::new(Some("application/json"), false);
        m.feed(&Bytes::from_static(br#"{"error":{"message":"bad"}}"#));
        assert_eq!(m.finish().0, None);
        // A `usage` that is not an object is none; counts that are not integers are not counts.
        assert_eq!(
            usage_of(br#"{"usage":null,"response":{"usage":{"input_tokens":2}}}"#),
            Some(Usage { prompt: 2, completion: 0 })
        );
        assert_eq!(usage_of(br#"{"usage":{"prompt_tokens":1.5,"completion_tokens":2}}"#), None);
        assert_eq!(usage_of(br#"{"usage":{"prompt_tokens":-1}}"#), None);
        assert_eq!(
            usage_of(br#"{"usage":{"total_tokens":3,"completion_tokens":"2","prompt_tokens":4}}"#),
            Some(Usage { prompt: 4, completion: 0 })
        );
    }

    #[test]
    fn the_usage_only_chunk_is_stripped_and_counted_and_nothing_else_changes() {
        let mut m = Meter::new(Some("text/event-stream"), true);
        let mut out = Vec::new();
        for frame in sse(&[DELTA, DELTA, USAGE_ONLY, "[DONE]"]) {
            out.extend_from_slice(&m.feed(&frame).unwrap());
        }
        let (usage, rest) = m.finish();
        assert_eq!(usage, Some(Usage { prompt: 12, completion: 30 }));
        assert_eq!(rest, None);
        let expected: Vec<u8> = sse(&[DELTA, DELTA, "[DONE]"]).concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn events_split_across_frames_pass_whole_and_on_time() {
        let mut m = Meter::new(Some("text/event-stream; charset=utf-8"), true);
        let all: Vec<u8> = sse(&[DELTA, USAGE_ONLY, DELTA]).concat();
        let (a, b) = all.split_at(20);
        assert_eq!(m.feed(&Bytes::copy_from_slice(a)).unwrap(), Bytes::new(), "half an event waits");
        let out = m.feed(&Bytes::copy_from_slice(b)).unwrap();
        assert_eq!(out, Bytes::from(sse(&[DELTA, DELTA]).concat()));
        // The same stream not stripped: passed through as it is (the meter only looks).
        let mut m = Meter::new(Some("text/event-stream"), false);
        assert_eq!(m.feed(&Bytes::copy_from_slice(a)), None);
        assert_eq!(m.feed(&Bytes::copy_from_slice(b)), None);
        assert_eq!(m.finish().0, Some(Usage { prompt: 12, completion: 30 }));
    }

    #[test]
    fn usage_wherever_the_upstream_puts_it_counted_once() {
        // With the last delta and finish_reason; not usage-only, so it is kept even when stripping.
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        // vLLM's continuous usage stats: cumulative on every chunk; the last one is the usage.
        let c1 =
            r#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":7,"completion_tokens":1}}"#;
        let c2 =
            r#"{"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#;
        // /v1/responses: response.completed carries it.
        let done =
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":4,"output_tokens":9}}}"#;
        for (events, want, kept) in [
            (vec![DELTA, last], Usage { prompt: 1, completion: 2 }, 2),
            (vec![c1, c2], Usage { prompt: 7, completion: 2 }, 2),
            (vec![done], Usage { prompt: 4, completion: 9 }, 1),
        ] {
            let mut m = Meter::new(Some("text/event-stream"), true);
            let mut out = Vec::new();
            for f in sse(&events) {
                out.extend_from_slice(&m.feed(&f).unwrap());
            }
            assert_eq!(m.finish().0, Some(want));
            assert_eq!(out, sse(&events[..kept]).concat());
        }
        // CRLF line ends, an event without its final blank line at the end.
        let mut m = Meter::new(Some("text/event-stream"), true);
        let out = m.feed(&Bytes::from(format!("data: {DELTA}\r\n\r\ndata: {USAGE_ONLY}"))).unwrap();
        assert_eq!(out, Bytes::from(format!("data: {DELTA}\r\n\r\n")));
        assert_eq!(m.finish(), (Some(Usage { prompt: 12, completion: 30 }), None));
    }
}
