//! `LogLine`: one line of a workflow's log file and one text frame on `/logs` (spec §6.3).
//!
//! Encoded by hand rather than through serde because the bytes must match Go's `encoding/json`
//! exactly (key order, omitted empty fields, `\u003c`-style escapes) and because every output
//! line of every step passes through here, so it has to be cheap.

use serde::Deserialize;

/// `data` (output) or `control` (step start/end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineKind {
    Data,
    Control,
}

/// Control-line `step_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Start,
    End,
}

/// One log line. `time` is kept as text so a parsed line re-encodes byte for byte; new lines get
/// Go's format from [`go_time`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LogLine {
    pub kind: LineKind,
    pub content: String,
    #[serde(deserialize_with = "rfc3339_text")]
    pub time: String,
    pub step_id: i64,
    /// `stdout`/`stderr` on data lines; absent on control lines.
    #[serde(default)]
    pub stream: Option<std::borrow::Cow<'static, str>>,
    #[serde(default)]
    pub step_status: Option<StepStatus>,
    /// 0 = system (omitted on the wire), 1 = user.
    #[serde(default)]
    pub step_kind: i64,
    #[serde(default)]
    pub step_command: String,
}

/// Go's `step_kind` for a plan step kind.
pub fn step_kind_code(kind: crate::crd::StepKind) -> i64 {
    match kind {
        crate::crd::StepKind::System => 0,
        crate::crd::StepKind::User => 1,
    }
}

impl LogLine {
    /// A data line of step `step_id`. Kubernetes merges stdout and stderr, so bobbin always says
    /// `stdout` (the appview ignores the field).
    pub fn data(step_id: i64, content: impl Into<String>, time: jiff::Timestamp) -> Self {
        LogLine {
            kind: LineKind::Data,
            content: content.into(),
            time: go_time(time),
            step_id,
            stream: Some(std::borrow::Cow::Borrowed("stdout")),
            step_status: None,
            step_kind: 0,
            step_command: String::new(),
        }
    }

    /// A `start` or `end` control line.
    pub fn control(
        step_id: i64,
        status: StepStatus,
        name: impl Into<String>,
        step_kind: i64,
        command: impl Into<String>,
        time: jiff::Timestamp,
    ) -> Self {
        LogLine {
            kind: LineKind::Control,
            content: name.into(),
            time: go_time(time),
            step_id,
            stream: None,
            step_status: Some(status),
            step_kind,
            step_command: command.into(),
        }
    }

    /// Compact JSON exactly as Go's `json.Marshal` writes it, without a newline.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(96 + self.content.len() + self.step_command.len());
        self.encode_into(&mut out);
        // Only valid UTF-8 and ASCII escapes were written.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Append the JSON encoding (no newline) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(match self.kind {
            LineKind::Data => b"{\"kind\":\"data\",\"content\":",
            LineKind::Control => b"{\"kind\":\"control\",\"content\":",
        });
        write_json_string(out, &self.content);
        out.extend_from_slice(b",\"time\":");
        write_json_string(out, &self.time);
        out.extend_from_slice(b",\"step_id\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.step_id).as_bytes());
        if let Some(stream) = self.stream.as_deref().filter(|s| !s.is_empty()) {
            out.extend_from_slice(b",\"stream\":");
            write_json_string(out, stream);
        }
        match self.step_status {
            Some(StepStatus::Start) => out.extend_from_slice(b",\"step_status\":\"start\""),
            Some(StepStatus::End) => out.extend_from_slice(b",\"step_status\":\"end\""),
            None => {}
        }
        if self.step_kind != 0 {
            out.extend_from_slice(b",\"step_kind\":");
            out.extend_from_slice(itoa::Buffer::new().format(self.step_kind).as_bytes());
        }
        if !self.step_command.is_empty() {
            out.extend_from_slice(b",\"step_command\":");
            write_json_string(out, &self.step_command);
        }
        out.push(b'}');
    }
}

fn rfc3339_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<jiff::Timestamp>()
        .map_err(|e| serde::de::Error::custom(format!("time {s:?} is not RFC 3339: {e}")))?;
    Ok(s)
}

/// Go's `time.Time` JSON form in UTC: RFC 3339 with up to nine fraction digits, trailing zeros
/// dropped, `Z`.
pub fn go_time(t: jiff::Timestamp) -> String {
    // Hand-formatted: this runs once per log line.
    let dt = jiff::tz::Offset::UTC.to_datetime(t);
    let mut s = String::with_capacity(30);
    let year = dt.year();
    if (0..=9999).contains(&year) {
        push_digits(&mut s, year as u32, 4);
    } else {
        s.push_str(&format!("{year:04}"));
    }
    s.push('-');
    push_digits(&mut s, dt.month() as u32, 2);
    s.push('-');
    push_digits(&mut s, dt.day() as u32, 2);
    s.push('T');
    push_digits(&mut s, dt.hour() as u32, 2);
    s.push(':');
    push_digits(&mut s, dt.minute() as u32, 2);
    s.push(':');
    push_digits(&mut s, dt.second() as u32, 2);
    let mut nanos = t.subsec_nanosecond().unsigned_abs();
    if t.subsec_nanosecond() < 0 {
        // Timestamps before the epoch carry a negative fraction; the civil time already
        // borrowed the second.
        nanos = 1_000_000_000 - nanos;
    }
    let (fraction, len) = fraction_bytes(nanos);
    for &b in &fraction[..len] {
        s.push(b as char);
    }
    s.push('Z');
    s
}

/// `.` and the fraction digits of `nanos` without trailing zeros; empty for 0.
fn fraction_bytes(mut nanos: u32) -> ([u8; 10], usize) {
    let mut buf = [b'.'; 10];
    if nanos == 0 {
        return (buf, 0);
    }
    let mut digits = 9;
    while nanos.is_multiple_of(10) {
        nanos /= 10;
        digits -= 1;
    }
    for i in (1..=digits).rev() {
        buf[i] = b'0' + (nanos % 10) as u8;
        nanos /= 10;
    }
    (buf, digits + 1)
}

/// Encodes data lines straight into a buffer: exactly the bytes of
/// `LogLine::data(step_id, content, time).encode_into(out)`, without building the LogLine (two
/// allocations) and formatting each second of `time` once, since consecutive lines of a step
/// mostly share it. The follower encodes every output line through this.
#[derive(Debug, Default)]
pub struct DataLineEncoder {
    /// The last second formatted and its text up to the fraction.
    second: Option<(i64, String)>,
}

impl DataLineEncoder {
    /// `content` need not be UTF-8: what is not is written as Go writes it (see
    /// [`write_json_bytes`]).
    pub fn encode(&mut self, out: &mut Vec<u8>, step_id: i64, content: &[u8], time: jiff::Timestamp) {
        out.extend_from_slice(b"{\"kind\":\"data\",\"content\":");
        write_json_bytes(out, content);
        out.extend_from_slice(b",\"time\":\"");
        self.write_time(out, time);
        out.extend_from_slice(b"\",\"step_id\":");
        out.extend_from_slice(itoa::Buffer::new().format(step_id).as_bytes());
        out.extend_from_slice(b",\"stream\":\"stdout\"}");
    }

    /// [`go_time`] of `t` (its text never needs JSON escaping).
    fn write_time(&mut self, out: &mut Vec<u8>, t: jiff::Timestamp) {
        let nanos = t.subsec_nanosecond();
        let second = t.as_second();
        let whole = match jiff::Timestamp::from_second(second) {
            Ok(w) if nanos >= 0 => w,
            // Before the epoch the fraction is negative and borrows from the civil second.
            _ => return out.extend_from_slice(go_time(t).as_bytes()),
        };
        let prefix = match &self.second {
            Some((s, prefix)) if *s == second => prefix,
            _ => {
                let mut text = go_time(whole);
                text.pop(); // the `Z`
                &self.second.insert((second, text)).1
            }
        };
        out.extend_from_slice(prefix.as_bytes());
        let (fraction, len) = fraction_bytes(nanos.unsigned_abs());
        out.extend_from_slice(&fraction[..len]);
        out.push(b'Z');
    }
}

fn push_digits(s: &mut String, mut v: u32, width: usize) {
    let mut buf = [b'0'; 10];
    for i in (0..width).rev() {
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    for &b in &buf[..width] {
        s.push(b as char);
    }
}

/// Go's zero `time.Time`, as the failed-before-log frames carry it.
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A JSON string as Go escapes it: `"`, `\` and control characters, plus `<`, `>`, `&`, U+2028
/// and U+2029 as `\uXXXX` (HTML-safe encoding, Go's default).
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    write_json_bytes(out, s.as_bytes());
}

/// [`write_json_string`] for bytes that may not be UTF-8, as Go's encoder writes a string holding
/// them: each byte that does not begin a valid UTF-8 sequence becomes `\ufffd`. UTF-8 is checked
/// while escaping, so valid text is read once.
pub fn write_json_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    // Jump from one byte that may need escaping to the next; plain runs are copied whole.
    while let Some(at) = next_special(bytes, i) {
        i = at;
        let b = bytes[i];
        if b >= 0x80 {
            match utf8_len(bytes, i) {
                // U+2028 and U+2029 (E2 80 A8 and E2 80 A9).
                Some(3) if b == 0xe2 && bytes[i + 1] == 0x80 && bytes[i + 2] & 0xfe == 0xa8 => {
                    out.extend_from_slice(&bytes[start..i]);
                    out.extend_from_slice(&[
                        b'\\',
                        b'u',
                        b'2',
                        b'0',
                        b'2',
                        HEX[usize::from(bytes[i + 2] & 0xf)],
                    ]);
                    i += 3;
                    start = i;
                }
                // Valid UTF-8 is part of the plain run.
                Some(len) => i += len,
                None => {
                    out.extend_from_slice(&bytes[start..i]);
                    out.extend_from_slice(b"\\ufffd");
                    i += 1;
                    start = i;
                }
            }
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match SHORT_ESCAPE[usize::from(b)] {
            0 => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
            c => out.extend_from_slice(&[b'\\', c]),
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The escape letter of the ASCII bytes Go writes as `\x`; the others it escapes (other controls,
/// `<`, `>`, `&`) are `\u00XX`.
const SHORT_ESCAPE: [u8; 128] = {
    let mut t = [0u8; 128];
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t[0x08] = b'b';
    t[0x0c] = b'f';
    t
};

/// The length of the well-formed UTF-8 sequence at `bytes[i]` (a non-ASCII byte), or `None` if
/// none starts there (Unicode's table of well-formed byte sequences: no overlong forms, no
/// surrogates, nothing above U+10FFFF; the same set Go and Rust accept).
fn utf8_len(bytes: &[u8], i: usize) -> Option<usize> {
    let at =
        |k: usize, range: std::ops::RangeInclusive<u8>| bytes.get(i + k).is_some_and(|b| range.contains(b));
    let tail = |n: usize| (2..n).all(|k| at(k, 0x80..=0xbf));
    let (second, len) = match bytes[i] {
        0xc2..=0xdf => (0x80..=0xbf, 2),
        0xe0 => (0xa0..=0xbf, 3),
        0xe1..=0xec | 0xee..=0xef => (0x80..=0xbf, 3),
        0xed => (0x80..=0x9f, 3),
        0xf0 => (0x90..=0xbf, 4),
        0xf1..=0xf3 => (0x80..=0xbf, 4),
        0xf4 => (0x80..=0x8f, 4),
        _ => return None,
    };
    (at(1, second) && tail(len)).then_some(len)
}

/// The first index at or after `from` whose byte is in [`SPECIAL`]: eight bytes per step, then
/// straight to the flagged byte (the lowest flag of [`special_flags`] is exact).
fn next_special(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(word) = bytes.get(i..).and_then(|rest| rest.first_chunk::<8>()) {
        let flags = special_flags(u64::from_le_bytes(*word));
        if flags != 0 {
            return Some(i + (flags.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let tail = bytes.get(i..)?;
    tail.iter().position(|&b| SPECIAL[b as usize]).map(|p| i + p)
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// High bit of each byte of `w` that may be in [`SPECIAL`] (SWAR: a byte below `n` or equal to
/// `c` sets its high bit in `less`/`zero`; a non-ASCII byte has it already). Borrows only carry
/// upwards out of a byte that qualifies, so the lowest flag is always exact and the result is
/// zero exactly when no byte qualifies.
fn special_flags(w: u64) -> u64 {
    let less = |n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS;
    let zero = |c: u8| {
        let v = w ^ (ONES * u64::from(c));
        v.wrapping_sub(ONES) & !v & HIGHS
    };
    (w & HIGHS) | less(0x20) | zero(b'"') | zero(b'\\') | zero(b'<') | zero(b'>') | zero(b'&')
}

/// Whether none of the 8 bytes of `w` is in [`SPECIAL`].
#[cfg(test)]
fn plain_word(w: u64) -> bool {
    special_flags(w) == 0
}

/// Bytes that need a closer look: ASCII that is escaped (controls, `"`, `\`, `<`, `>`, `&`) and
/// every non-ASCII byte (UTF-8 is checked, and U+2028/U+2029 escaped).
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i < 0x20 || i >= 0x80;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'&' as usize] = true;
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/../shared/spec/fixtures/logs/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(path).expect("fixture")
    }

    #[test]
    fn fixture_log_round_trips_byte_for_byte() {
        let text = fixture("knot1.tangled.sh-3m734z2gwll22-test.yml.log");
        let mut n = 0;
        for line in text.lines() {
            let parsed: LogLine = serde_json::from_str(line).expect(line);
            assert_eq!(parsed.to_json(), line);
            n += 1;
        }
        assert_eq!(n, 14);
        let frames = fixture("failed-before-log.frames.jsonl");
        for line in frames.lines() {
            let parsed: LogLine = serde_json::from_str(line).expect(line);
            assert_eq!(parsed.to_json(), line);
        }
    }

    #[test]
    fn built_lines_match_the_fixture_shape() {
        let t: jiff::Timestamp = "2025-12-03T09:22:31.006120934Z".parse().expect("ts");
        let start = LogLine::control(2, StepStatus::Start, "Test", 1, "go test ./...", t);
        assert_eq!(
            start.to_json(),
            r#"{"kind":"control","content":"Test","time":"2025-12-03T09:22:31.006120934Z","step_id":2,"step_status":"start","step_kind":1,"step_command":"go test ./..."}"#
        );
        let t: jiff::Timestamp = "2025-12-03T09:21:53.9021Z".parse().expect("ts");
        let data = LogLine::data(0, "a <b> & \"c\"\u{2028}\u{1}é", t);
        assert_eq!(
            data.to_json(),
            r#"{"kind":"data","content":"a \u003cb\u003e \u0026 \"c\"\u2028\u0001é","time":"2025-12-03T09:21:53.9021Z","step_id":0,"stream":"stdout"}"#
        );
        assert!(
            LogLine::data(0, "\u{7f}", t).to_json().contains("\"content\":\"\u{7f}\""),
            "DEL is not escaped"
        );
        // System steps have no step_kind key; a whole second has no fraction.
        let t: jiff::Timestamp = "2025-12-03T09:21:54Z".parse().expect("ts");
        let end = LogLine::control(0, StepStatus::End, "Clone", 0, "git init", t);
        assert_eq!(
            end.to_json(),
            r#"{"kind":"control","content":"Clone","time":"2025-12-03T09:21:54Z","step_id":0,"step_status":"end","step_command":"git init"}"#
        );
    }

    #[test]
    fn go_time_trims_and_handles_year_one() {
        let t: jiff::Timestamp = "2025-12-03T09:21:55.310448120Z".parse().expect("ts");
        assert_eq!(go_time(t), "2025-12-03T09:21:55.31044812Z");
        let zero: jiff::Timestamp = GO_ZERO_TIME.parse().expect("zero");
        assert_eq!(go_time(zero), GO_ZERO_TIME);
        let before_epoch: jiff::Timestamp = "1969-12-31T23:59:59.5Z".parse().expect("ts");
        assert_eq!(go_time(before_epoch), "1969-12-31T23:59:59.5Z");
        let t: jiff::Timestamp = "2026-01-02T03:04:05.000000001Z".parse().expect("ts");
        assert_eq!(go_time(t), "2026-01-02T03:04:05.000000001Z");
        assert!(
            serde_json::from_str::<LogLine>(r#"{"kind":"data","content":"","time":"yesterday","step_id":0}"#)
                .is_err()
        );
    }

    #[test]
    fn data_line_encoder_writes_exactly_what_log_line_writes() {
        let mut enc = DataLineEncoder::default();
        let times = [
            "2026-11-21T12:00:00.123456789Z",
            "2026-11-21T12:00:00.5Z",
            "2026-11-21T12:00:00Z",
            "2026-11-21T12:00:00.000000001Z",
            "2026-11-21T12:00:01.10Z",
            "2026-11-21T12:00:00.9Z",
            "1969-12-31T23:59:59.5Z",
            "1969-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "9999-12-01T23:59:59.999999999Z",
        ];
        let contents = ["", "plain", "a <b> & \"c\"\u{2028}\u{1}é\t\u{1b}[0m", "***"];
        for (i, t) in times.iter().enumerate() {
            let t: jiff::Timestamp = t.parse().expect("ts");
            for (j, c) in contents.iter().enumerate() {
                let step = (i * j) as i64 - 3;
                let mut out = b"prefix".to_vec();
                enc.encode(&mut out, step, c.as_bytes(), t);
                let mut want = b"prefix".to_vec();
                LogLine::data(step, *c, t).encode_into(&mut want);
                assert_eq!(String::from_utf8(out).expect("utf8"), String::from_utf8(want).expect("utf8"));
            }
        }
    }

    /// Go's `encoding/json` string encoding, written plainly: valid text char by char; each byte
    /// of an invalid sequence (Rust's maximal subparts are a lead byte and continuation bytes,
    /// each of which Go decodes as `RuneError` of size 1) as `\ufffd`.
    fn go_reference(bytes: &[u8]) -> String {
        let mut out = String::from("\"");
        for chunk in bytes.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                        out.push_str(&format!("\\u{:04x}", c as u32))
                    }
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            for _ in chunk.invalid() {
                out.push_str("\\ufffd");
            }
        }
        out.push('"');
        out
    }

    /// Bytes rich in what the escaper treats specially: controls, HTML characters, the bytes of
    /// U+2028/U+2029, lead and continuation bytes in any order, and plain runs.
    fn tricky_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            any::<u8>().prop_map(|b| vec![b]),
            prop::sample::select(vec![0xe2u8, 0x80, 0xa8, 0xa9, 0xc3, 0xed, 0xf0, 0xf4, 0xff, 0x7f])
                .prop_map(|b| vec![b]),
            prop::sample::select(vec!["\u{2028}", "\u{2029}", "é", "✓", "😀", "<&>", "\"\\", "\t\u{1b}[0m"])
                .prop_map(|s| s.as_bytes().to_vec()),
            "[a-z ]{1,20}".prop_map(String::into_bytes),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #[test]
        fn bytes_are_escaped_exactly_as_go_does(bytes in tricky_bytes()) {
            let mut out = Vec::new();
            write_json_bytes(&mut out, &bytes);
            let out = String::from_utf8(out).expect("always UTF-8");
            proptest::prop_assert_eq!(&out, &go_reference(&bytes));
            // And it is JSON for the text Go would have held.
            let parsed: String = serde_json::from_str(&out).expect("valid JSON");
            let lossy: String = bytes.utf8_chunks()
                .flat_map(|c| c.valid().chars().chain(std::iter::repeat_n('\u{fffd}', c.invalid().len())))
                .collect();
            proptest::prop_assert_eq!(parsed, lossy);
        }
    }

    #[test]
    fn utf8_sequence_lengths_agree_with_std_for_every_lead_and_second_byte() {
        for b0 in 0x80..=0xffu8 {
            for b1 in 0..=0xffu8 {
                for b2 in [0x41, 0x80, 0xbf, 0xc0] {
                    for b3 in [0x41, 0x80, 0xbf, 0xc0] {
                        for len in 1..=4 {
                            let seq = &[b0, b1, b2, b3][..len];
                            let first = seq.utf8_chunks().next().expect("a chunk");
                            let want = first.valid().chars().next().map(char::len_utf8);
                            assert_eq!(utf8_len(seq, 0), want, "{seq:x?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_becomes_one_replacement_per_byte_like_go() {
        let mut out = Vec::new();
        write_json_bytes(&mut out, b"a\xe2\x82b\xff\xe2\x80\xa8\xed\xa0\x80 ok \xf0\x9f\x98");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#""a\ufffd\ufffdb\ufffd\u2028\ufffd\ufffd\ufffd ok \ufffd\ufffd\ufffd""#
        );
    }

    #[test]
    fn word_skip_agrees_with_the_escape_table() {
        for b in 0..=255u8 {
            for pos in 0..8 {
                let mut word = *b"abcdefgh";
                word[pos] = b;
                assert_eq!(
                    plain_word(u64::from_le_bytes(word)),
                    !SPECIAL[b as usize],
                    "byte {b:#x} at {pos}"
                );
            }
        }
        // The lowest flag names the first byte needing escape, whatever follows it.
        for first in 0..8 {
            for b in (0..=255u8).filter(|b| SPECIAL[*b as usize]) {
                for after in [0u8, b'"', 0xe2, b'a', 0xff] {
                    let mut word = [after; 8];
                    word[..first].fill(b'a');
                    word[first] = b;
                    let flags = special_flags(u64::from_le_bytes(word));
                    assert_eq!(
                        flags.trailing_zeros() / 8,
                        first as u32,
                        "byte {b:#x} at {first}, then {after:#x}"
                    );
                }
            }
        }
        let s = "0123456789abcdef<0123456789abcdef\u{2028}0123456\u{1}\"";
        let mut out = Vec::new();
        write_json_string(&mut out, s);
        assert_eq!(out, br#""0123456789abcdef\u003c0123456789abcdef\u20280123456\u0001\"""#);
    }
}
