//! Secret masking (B22): every secret value of a run is replaced by `***` in data lines before
//! anything is written or sent.
//!
//! - Each whole value and each line of a multi-line value is a pattern (a step printing the value
//!   line by line must not reveal it line by line).
//! - Patterns shorter than [`MIN_SECRET_LEN`] bytes are not masked: a one- or two-character value
//!   ("1", "on") would turn every occurrence of common text into `***`, destroying the log while
//!   hiding nothing an observer could not guess.
//! - All occurrences of all patterns, overlapping ones included, are found on the original bytes
//!   and every maximal covered range becomes one `***`, so the result of "longest first" is
//!   reached without depending on match order.
//! - Masking works on complete lines. When a line is too long to keep whole, [`Masker::safe_cut`]
//!   picks a cut point that no occurrence straddles, given at least `longest` bytes of lookahead.

use aho_corasick::{AhoCorasick, MatchKind};

/// Values shorter than this many bytes are not masked (see the module docs).
pub const MIN_SECRET_LEN: usize = 3;

/// What a masked range becomes.
pub const MASK: &[u8] = b"***";

/// A compiled set of secret values.
#[derive(Debug, Clone)]
pub struct Masker {
    matcher: Option<AhoCorasick>,
    /// The same patterns with leftmost-first semantics, for [`Masker::first_match`]: only
    /// leftmost automatons get aho-corasick's SIMD prefilter, which makes scanning a chunk for
    /// the next occurrence several times faster than the standard automaton.
    finder: Option<AhoCorasick>,
    longest: usize,
}

impl Masker {
    /// A masker that changes nothing.
    pub fn none() -> Self {
        Masker { matcher: None, finder: None, longest: 0 }
    }

    /// Compile the values (whole, and line by line), dropping those shorter than
    /// [`MIN_SECRET_LEN`].
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for value in values {
            let value = value.as_ref();
            let mut add = |p: &str| {
                if p.len() >= MIN_SECRET_LEN && !patterns.iter().any(|q| q == p.as_bytes()) {
                    patterns.push(p.as_bytes().to_vec());
                }
            };
            add(value);
            add(value.trim_end_matches(['\r', '\n']));
            for line in value.split('\n') {
                add(line.trim_end_matches('\r'));
            }
        }
        if patterns.is_empty() {
            return Masker::none();
        }
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let longest = patterns.first().map_or(0, Vec::len);
        match AhoCorasick::builder().match_kind(MatchKind::Standard).build(&patterns) {
            Ok(matcher) => {
                let finder =
                    AhoCorasick::builder().match_kind(MatchKind::LeftmostFirst).build(&patterns).ok();
                Masker { matcher: Some(matcher), finder, longest }
            }
            // Building only fails beyond aho-corasick's size limits; fall back to masking whole
            // lines that contain any value would be wrong too, so mask every line completely.
            Err(_) => Masker { matcher: None, finder: None, longest: usize::MAX },
        }
    }

    /// Length of the longest pattern (0 without secrets).
    pub fn longest(&self) -> usize {
        self.longest
    }

    pub fn is_empty(&self) -> bool {
        self.longest == 0
    }

    /// The covered byte ranges of `text`, merged and sorted.
    fn covered(&self, text: &[u8]) -> Vec<(usize, usize)> {
        let Some(matcher) = &self.matcher else {
            if self.longest == usize::MAX && !text.is_empty() {
                return vec![(0, text.len())];
            }
            return Vec::new();
        };
        // Most lines hold no secret: a quick prefiltered search first.
        if !matcher.is_match(text) {
            return Vec::new();
        }
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for m in matcher.find_overlapping_iter(text) {
            let (s, e) = (m.start(), m.end());
            // Overlapping matches come ordered by end; starts can go backwards, so merge fully.
            ranges.push((s, e));
        }
        if ranges.is_empty() {
            return ranges;
        }
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// An occurrence in `text` that starts no later than any other (`None` when there is
    /// none): the leftmost one, or (fallback automaton) the one that ends first, which also
    /// starts before the end of every other. Either way, an occurrence inside a range `[a, b)`
    /// of `text` implies that the returned one starts before `b`, so a caller scanning many
    /// lines at once can skip [`Masker::mask`] for every line that ends at or before the start
    /// of the returned occurrence, searching again from the first line it does not skip. One
    /// search over a whole chunk is much cheaper than one per line.
    pub fn first_match(&self, text: &[u8]) -> Option<(usize, usize)> {
        let Some(matcher) = self.finder.as_ref().or(self.matcher.as_ref()) else {
            // Without a matcher only the mask-everything fallback masks anything.
            return (self.longest == usize::MAX && !text.is_empty()).then_some((0, text.len()));
        };
        matcher.find(text).map(|m| (m.start(), m.end()))
    }

    /// `text` with every occurrence of every value replaced by `***`.
    pub fn mask<'a>(&self, text: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if self.is_empty() {
            return std::borrow::Cow::Borrowed(text);
        }
        let ranges = self.covered(text);
        if ranges.is_empty() {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = Vec::with_capacity(text.len());
        let mut at = 0;
        for (s, e) in ranges {
            out.extend_from_slice(&text[at..s]);
            out.extend_from_slice(MASK);
            at = e;
        }
        out.extend_from_slice(&text[at..]);
        std::borrow::Cow::Owned(out)
    }

    /// Where to cut a line that is too long to keep whole: a point near `cap` that no secret
    /// occurrence straddles. The caller must hold at least `cap + longest` bytes of the line, so
    /// every occurrence starting before `cap` lies entirely inside `text`. The cut moves back to a
    /// UTF-8 character boundary when it can.
    pub fn safe_cut(&self, text: &[u8], cap: usize) -> usize {
        let cap = cap.clamp(1, text.len().max(1));
        let mut cut = cap;
        for (s, e) in self.covered(text) {
            if s < cut && cut < e {
                // Move before the occurrence; if it starts the buffer, take it whole.
                cut = if s > 0 { s } else { e };
                break;
            }
        }
        let mut back = cut;
        for _ in 0..3 {
            if back > 0 && back < text.len() && (text[back] & 0xc0) == 0x80 {
                back -= 1;
            }
        }
        if back > 0 && !(back < text.len() && (text[back] & 0xc0) == 0x80) && !self.inside(text, back) {
            cut = back;
        }
        cut.min(text.len())
    }

    fn inside(&self, text: &[u8], at: usize) -> bool {
        self.covered(text).iter().any(|&(s, e)| s < at && at < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn masked(m: &Masker, s: &str) -> String {
        String::from_utf8(m.mask(s.as_bytes()).into_owned()).expect("utf8")
    }

    #[test]
    fn masks_longest_and_overlapping_values() {
        let m = Masker::new(["abc", "abcdef", "x", "ef12"]);
        assert_eq!(masked(&m, "1abcdef2"), "1***2");
        assert_eq!(masked(&m, "abcdef12 abc x"), "*** *** x", "short values are not masked");
        assert_eq!(masked(&m, "nothing here"), "nothing here");
        assert_eq!(m.longest(), 6);
        assert!(Masker::new(["", "ab"]).is_empty());
    }

    #[test]
    fn masks_each_line_of_multi_line_values() {
        let m = Masker::new(["-----BEGIN KEY-----\r\nc2VjcmV0\n-----END KEY-----\n"]);
        assert_eq!(masked(&m, "c2VjcmV0"), "***");
        assert_eq!(masked(&m, "x -----END KEY----- y"), "x *** y");
    }

    #[test]
    fn safe_cut_never_splits_a_value() {
        let m = Masker::new(["secret"]);
        let text = b"0123456789secret0123456";
        let cut = m.safe_cut(text, 12);
        assert_eq!(cut, 10);
        let m = Masker::new(["0123456789abcdef"]);
        assert_eq!(m.safe_cut(b"0123456789abcdefxyz", 4), 16);
        // UTF-8: never cut inside a character.
        let text = "aaé".as_bytes();
        assert_eq!(Masker::none().safe_cut(text, 3), 2);
    }

    /// Drive the same assembler the follower uses: split into lines (with over-long lines cut
    /// into segments) and mask.
    fn run_pipeline(secrets: &[String], text: &[u8], chunks: &[usize], cap: usize) -> Vec<Vec<Vec<u8>>> {
        let masker = Masker::new(secrets);
        let mut asm = super::super::follower::LineAssembler::new(cap, masker, false);
        let mut lines: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
        let mut at = 0;
        let mut i = 0;
        let mut sink = |seg: super::super::follower::Segment<'_>| {
            lines.last_mut().expect("line").push(seg.content.into_owned());
            if seg.last {
                lines.push(Vec::new());
            }
        };
        while at < text.len() {
            let n = chunks[i % chunks.len()].max(1).min(text.len() - at);
            asm.push(&text[at..at + n], &mut sink);
            at += n;
            i += 1;
        }
        asm.finish(&mut sink);
        lines
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn no_secret_survives_any_chunking(
            secrets in prop::collection::vec("[abc]{3,8}", 1..4),
            pieces in prop::collection::vec(prop_oneof!["[abc\n ]{0,12}", Just("SECRET".to_owned())], 0..30),
            chunks in prop::collection::vec(1usize..17, 1..8),
            cap in 4usize..24,
        ) {
            let mut text = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                if p == "SECRET" {
                    text.extend_from_slice(secrets[i % secrets.len()].as_bytes());
                } else {
                    text.extend_from_slice(p.as_bytes());
                }
            }
            let lines = run_pipeline(&secrets, &text, &chunks, cap);
            for segments in &lines {
                let joined: Vec<u8> = segments.concat();
                for s in &secrets {
                    for seg in segments {
                        prop_assert!(!contains(seg, s.as_bytes()), "segment {:?} has {:?}", String::from_utf8_lossy(seg), s);
                    }
                    prop_assert!(!contains(&joined, s.as_bytes()), "line {:?} has {:?}", String::from_utf8_lossy(&joined), s);
                }
                for seg in segments {
                    prop_assert!(seg.len() <= cap + 8 + 3, "segment of {} bytes with cap {}", seg.len(), cap);
                }
            }
            // Text without secrets passes through unchanged (modulo line splitting).
            let plain: Vec<u8> = text.iter().copied().filter(|b| *b == b'\n' || *b == b' ').collect();
            let lines = run_pipeline(&secrets, &plain, &chunks, cap);
            let rebuilt: Vec<Vec<u8>> = lines.iter().map(|s| s.concat()).collect();
            let expected: Vec<&[u8]> = plain.split(|b| *b == b'\n').collect();
            for (got, want) in rebuilt.iter().zip(expected.iter()) {
                prop_assert_eq!(got.as_slice(), *want);
            }
        }

        #[test]
        fn chunk_search_masks_exactly_like_per_line_masking(
            secrets in prop::collection::vec("[ab\n]{3,8}", 1..4),
            pieces in prop::collection::vec(prop_oneof!["[abc\n ]{0,12}", Just("SECRET".to_owned())], 0..30),
            chunks in prop::collection::vec(1usize..40, 1..8),
        ) {
            let mut text = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                if p == "SECRET" {
                    text.extend_from_slice(secrets[i % secrets.len()].as_bytes());
                } else {
                    text.extend_from_slice(p.as_bytes());
                }
            }
            // No line is cut, so every line is one segment masked on its own.
            let lines = run_pipeline(&secrets, &text, &chunks, 1 << 20);
            let mut got: Vec<Vec<u8>> = lines.iter().map(|s| s.concat()).collect();
            let masker = Masker::new(&secrets);
            let want: Vec<Vec<u8>> = text.split(|b| *b == b'\n').map(|l| masker.mask(l).into_owned()).collect();
            if got.len() == want.len() + 1 && got.last().is_some_and(Vec::is_empty) {
                got.pop();
            }
            prop_assert_eq!(got, want);
        }
    }
}
