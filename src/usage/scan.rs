//! Finding one member of a JSON object without parsing the rest (§12): the usage of a
//! completion is a few bytes at the end of a body whose other members (choices, messages,
//! embeddings) can be long, and a full parse of every response — even one that skips what it
//! does not keep — was a tenth of a proxied request's instructions (`benches/load/profile.sh`).
//!
//! The scan knows only what it must to stay at the top level: strings (with their escapes,
//! so a quote or brace inside one is never structure) and nesting. The member's value is then
//! parsed for real, so what is reported is exactly what a parser reads.

/// The value of member `key` of the top-level object of `json`, as the slice that starts with
/// it (its end is the parser's business), or `None` if there is no such member or `json` is
/// not an object.
pub fn member<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let [found] = members(json, [key])?;
    found
}

/// `member`, looked for from the end: a completion's `usage` is its last member, after
/// choices that can be long, so this reads only its last bytes (a forward scan of a small
/// completion was ≈ 2,000 instructions, `benches/load/profile.sh` with token limits). Going
/// backwards is exact for JSON: outside strings, the first quote met closes a string, whose
/// opening quote is the previous one preceded by an even number of backslashes; at the top
/// level, a string followed by `:` is a member's name. With a name given twice it finds the
/// last, as a parser that builds a map keeps. `None` if there is no such member or `json` is
/// not an object.
pub fn last_member<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    if json.get(skip_ws(json, 0)) != Some(&b'{') {
        return None;
    }
    let mut i = json.iter().rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    if json[i] != b'}' {
        return None;
    }
    let mut depth = 0u32;
    while i > 0 {
        i -= 1;
        match json[i] {
            b'"' => {
                let start = string_start(json, i)?;
                if depth == 0 && &json[start + 1..i] == key {
                    let colon = skip_ws(json, i + 1);
                    if json.get(colon) == Some(&b':') {
                        return Some(&json[skip_ws(json, colon + 1)..]);
                    }
                }
                i = start;
            }
            b'}' | b']' => depth += 1,
            // The top-level object's own `{`: no such member.
            b'{' | b'[' if depth == 0 => return None,
            b'{' | b'[' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The index of the opening quote of the string whose closing quote is at `end`.
fn string_start(json: &[u8], end: usize) -> Option<usize> {
    let mut j = end;
    loop {
        j = memchr::memrchr(b'"', &json[..j])?;
        // A quote after an odd number of backslashes is part of the string.
        if json[..j].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0 {
            return Some(j);
        }
    }
}

/// `member` for several keys in one pass: the first value of each; `None` if `json` is not an
/// object, or is cut short before every key was found.
pub fn members<'a, const N: usize>(json: &'a [u8], keys: [&[u8]; N]) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    scan(json, |name, value| {
        for (k, slot) in keys.iter().zip(found.iter_mut()) {
            if slot.is_none() && name == *k {
                *slot = Some(value);
            }
        }
        found.iter().any(Option::is_none)
    })?;
    Some(found)
}

/// Calls `each(name, value)` for the top-level members of `json` in order, while it returns
/// true.
fn scan<'a>(json: &'a [u8], mut each: impl FnMut(&[u8], &'a [u8]) -> bool) -> Option<()> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut depth = 1u32;
    // At the top level, a string right after `{` or `,` is a member's name.
    let mut expect_name = true;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let end = string_end(json, i + 1)?;
                if depth == 1 && expect_name {
                    let name = &json[i + 1..end - 1];
                    let colon = skip_ws(json, end);
                    if json.get(colon) != Some(&b':') {
                        return None;
                    }
                    if !each(name, &json[skip_ws(json, colon + 1)..]) {
                        return Some(());
                    }
                    expect_name = false;
                    i = colon + 1;
                    continue;
                }
                i = end;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(());
                }
            }
            b',' if depth == 1 => expect_name = true,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index just past the closing quote of the string whose content starts at `i`. Strings
/// are most of a completion's bytes: skipped with `memchr`'s vectorised search.
fn string_end(json: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[at] == b'"' {
            return Some(at + 1);
        }
        i = at + 2;
    }
}

/// The non-negative integer that `value` (a member's value, as `member` gives it) starts with,
/// as a JSON parser reads it into a `u64`: `None` for anything else — a string, `null`, a
/// negative, fractional or exponent number, leading zeros, or one past `u64::MAX`.
pub fn unsigned(value: &[u8]) -> Option<u64> {
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && value[0] == b'0') {
        return None;
    }
    if value.get(digits).is_some_and(|b| matches!(b, b'.' | b'e' | b'E')) {
        return None;
    }
    value[..digits].iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while json.get(i).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn find<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        member(json.as_bytes(), key.as_bytes()).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn only_top_level_members_are_found() {
        assert_eq!(find(r#"{"a":1,"usage":{"x":2}}"#, "usage"), Some(r#"{"x":2}}"#));
        assert_eq!(find(" { \"usage\" :\n null }", "usage"), Some("null }"));
        // Nested members, strings that look like members, escaped quotes: not the member.
        assert_eq!(find(r#"{"choices":[{"usage":1}],"x":{"usage":2}}"#, "usage"), None);
        assert_eq!(find(r#"{"content":"\"usage\":{\"prompt_tokens\":9}"}"#, "usage"), None);
        assert_eq!(find(r#"{"content":"a\\","usage":3}"#, "usage"), Some("3}"));
        assert_eq!(find(r#"{"content":"}{][","usage":4}"#, "usage"), Some("4}"));
        assert_eq!(find(r#"{"usage_x":1,"xusage":2}"#, "usage"), None);
        assert_eq!(find(r#"["usage",1]"#, "usage"), None);
        assert_eq!(find(r#"{"a":"unterminated"#, "usage"), None);
        assert_eq!(find("", "usage"), None);
    }

    /// Strings short and long (either side of the byte-by-byte start), with an escaped quote
    /// or backslash at every position: the member after them is found, the one inside not.
    #[test]
    fn strings_of_every_length_with_escapes_anywhere_are_skipped() {
        for len in 0..48 {
            for at in 0..=len {
                for escape in [r#"\""#, r"\\"] {
                    let mut content = "x".repeat(len);
                    content.insert_str(at, escape);
                    let json = format!(r#"{{"a":"{content}","in":"\"usage\":1","usage":{len}}}"#);
                    assert_eq!(find(&json, "usage"), Some(&*format!("{len}}}")), "{json}");
                    let cut = format!(r#"{{"a":"{content}"#);
                    assert_eq!(find(&cut, "usage"), None, "{cut}");
                }
            }
        }
    }

    /// From the end, the same member as from the start: every case above, and thousands of
    /// random objects (nested values, strings full of quotes, backslashes, braces and names),
    /// compact and pretty-printed, with unique top-level names.
    fn last<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        last_member(json.as_bytes(), key.as_bytes()).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn the_last_member_is_the_member_found_from_the_start() {
        for (json, key) in [
            (r#"{"a":1,"usage":{"x":2}}"#, "usage"),
            (" { \"usage\" :\n null } \n", "usage"),
            (r#"{"choices":[{"usage":1}],"x":{"usage":2}}"#, "usage"),
            (r#"{"content":"\"usage\":{\"prompt_tokens\":9}"}"#, "usage"),
            (r#"{"content":"a\\","usage":3}"#, "usage"),
            (r#"{"content":"}{][","usage":4}"#, "usage"),
            (r#"{"usage_x":1,"xusage":2}"#, "usage"),
            (r#"["usage",1]"#, "usage"),
            (r#"{"a":"unterminated"#, "usage"),
            ("", "usage"),
            ("}", "usage"),
            (r#"{"usage":"\\\"}"}"#, "usage"),
        ] {
            assert_eq!(last(json, key), find(json, key), "{json}");
        }
        let mut rng = fastrand::Rng::with_seed(7);
        fn string(rng: &mut fastrand::Rng) -> serde_json::Value {
            let pieces = ["\"", "\\", "{", "}", "[", "]", ",", ":", "usage", "\"usage\":", "x", " "];
            serde_json::Value::String(
                (0..rng.usize(0..6)).map(|_| pieces[rng.usize(..pieces.len())]).collect(),
            )
        }
        fn value(rng: &mut fastrand::Rng, depth: u32) -> serde_json::Value {
            match rng.u32(0..if depth > 2 { 3 } else { 5 }) {
                0 => serde_json::Value::from(rng.u32(..1000)),
                1 => string(rng),
                2 => serde_json::Value::Null,
                3 => (0..rng.usize(0..4)).map(|_| value(rng, depth + 1)).collect(),
                _ => serde_json::Value::Object(
                    (0..rng.usize(0..4))
                        .map(|i| {
                            (
                                format!("{}{i}", ["usage", "k", "\"usage\""][rng.usize(..3)]),
                                value(rng, depth + 1),
                            )
                        })
                        .collect(),
                ),
            }
        }
        let mut hits = 0;
        for _ in 0..5000 {
            let names = ["usage", "choices", "id", "model", "x\"usage"];
            let mut object = serde_json::Map::new();
            for _ in 0..rng.usize(0..6) {
                object.insert(names[rng.usize(..names.len())].to_string(), value(&mut rng, 0));
            }
            let object = serde_json::Value::Object(object);
            for json in
                [serde_json::to_string(&object).unwrap(), serde_json::to_string_pretty(&object).unwrap()]
            {
                for key in ["usage", "choices", "x\\\"usage"] {
                    let found = find(&json, key);
                    assert_eq!(last(&json, key), found, "{json} {key}");
                    hits += usize::from(found.is_some());
                }
            }
        }
        assert!(hits > 5000, "the members were found often: {hits}");
    }

    #[test]
    fn unsigned_integers_are_read_as_a_json_parser_reads_them() {
        for (v, n) in
            [("0}", Some(0)), ("42,", Some(42)), ("7", Some(7)), ("18446744073709551615 ", Some(u64::MAX))]
        {
            assert_eq!(unsigned(v.as_bytes()), n, "{v}");
        }
        for v in ["-1,", "1.5,", "1e3}", "2E1", "01,", "\"5\",", "null,", "", "18446744073709551616"] {
            assert_eq!(unsigned(v.as_bytes()), None, "{v}");
        }
    }

    #[test]
    fn several_members_are_found_in_one_pass() {
        let json = br#"{"model":"m","messages":[{"max_tokens":1}],"stream":true,"max_tokens":7}"#;
        let [a, b, c] = members(json, [b"stream", b"max_tokens", b"stream_options"]).unwrap();
        assert_eq!((a, b, c), (Some(&b"true,\"max_tokens\":7}"[..]), Some(&b"7}"[..]), None));
        assert!(members(br#"{"stream":true,"cut"#, [b"stream", b"max_tokens"]).is_none(), "cut short");
        assert!(members(br#"{"stream":true,"max_tokens":1,"cut"#, [b"stream", b"max_tokens"]).is_some());
    }
}
