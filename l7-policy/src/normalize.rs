//! Request path normalisation, applied before any path is matched.
//!
//! The exact rules (and how they compare with Envoy's `normalize_path` and
//! `merge_slashes`) are in `l7-policy/README.md`. The principle: rewrite what, once the
//! proxy forwards the rewritten path, no backend can read differently (repeated slashes,
//! dot segments, escapes of unreserved characters, lower-case hex); refuse what a backend
//! would still read differently after the rewrite (`;` parameters, `%25`, encoded `/`,
//! `\`, `?`, `#`, invalid UTF-8 escapes, fragments). Matching stays case-sensitive.
//!
//! Work is linear in the input: one validating pass over the bytes, and a rewriting pass
//! in which every output byte is pushed once and removed at most once.

use std::borrow::Cow;

use crate::limits::MAX_TARGET_BYTES;
use crate::work;

/// Why a request-target cannot be normalised (the request is denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PathError {
    /// The target is empty or does not start with `/` (authority-form, a relative path):
    /// only origin-form (`/path?query`) is judged.
    #[error("request-target is not in origin-form (does not start with '/')")]
    NotAbsolute,
    /// An absolute-form target (`http://host/path`); the proxy must turn it into
    /// origin-form plus authority before asking, so that host rules see the host.
    #[error("absolute-form request-target (scheme://...) in place of a path")]
    AbsoluteForm,
    /// The asterisk-form target `*` (`OPTIONS *`), which names no path a rule could allow.
    #[error("asterisk-form request-target '*'")]
    AsteriskForm,
    /// The target is longer than [`MAX_TARGET_BYTES`].
    #[error("request-target longer than {MAX_TARGET_BYTES} bytes")]
    TooLong,
    /// A `#` in the target: clients never send a fragment, and servers disagree on
    /// whether it ends the path.
    #[error("'#' (fragment) in request-target")]
    Fragment,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-escape at byte {0}")]
    InvalidEscape(usize),
    /// `%25`, an encoded `%`: a backend that decodes twice would see a second escape
    /// (`%252e` → `%2e` → `.`) the engine never saw.
    #[error("encoded '%' (%25) in path: double encoding")]
    DoubleEncoding,
    /// `%2F`: an encoded `/` would let one segment mean two.
    #[error("encoded '/' (%2F) in path")]
    EncodedSlash,
    /// `%3F`, `%23` or `%3B`: an encoded `?`, `#` or `;`, which a backend that decodes
    /// before splitting would take as the end of the path or as parameters.
    #[error("encoded '?', '#' or ';' (%3F, %23, %3B) in path")]
    EncodedDelimiter,
    /// `%5C` or a raw `\`: some servers treat a backslash as a slash.
    #[error("backslash or encoded backslash (%5C) in path")]
    Backslash,
    /// `%00` or another (encoded or raw) control character, or a raw space.
    #[error("control character or space in request-target")]
    Control,
    /// A raw byte outside ASCII (it must be percent-encoded).
    #[error("non-ASCII byte in request-target")]
    NonAscii,
    /// Escapes of bytes >= 0x80 that are not UTF-8: overlong forms (`%C0%AE` for `.`),
    /// surrogates, stray continuation bytes. Lenient decoders read them as `.` or `/`.
    #[error("percent-escapes that do not decode to UTF-8 (overlong or truncated sequence)")]
    InvalidUtf8,
    /// A `;` in the path: Tomcat, Jetty and Spring strip `;...` parameters from each
    /// segment (`/admin;x.css` is `/admin` to them) while the engine would match the text.
    #[error("';' (path parameters) in path")]
    Parameters,
    /// A `..` segment that would climb above the root.
    #[error("'..' climbs above the root")]
    AboveRoot,
}

/// `unreserved` of RFC 3986 2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The value of one hex digit.
fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte the escape at `i` (a `%`) encodes, without judging it.
fn escape_value(b: &[u8], i: usize) -> Result<u8, PathError> {
    let hi = b.get(i + 1).copied().and_then(hex_val);
    let lo = b.get(i + 2).copied().and_then(hex_val);
    match (hi, lo) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(PathError::InvalidEscape(i)),
    }
}

/// Checks the escape at `i` (a `%`) and returns the byte it encodes.
fn escape_at(b: &[u8], i: usize) -> Result<u8, PathError> {
    let v = escape_value(b, i)?;
    match v {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::Backslash),
        b'%' => Err(PathError::DoubleEncoding),
        b'?' | b'#' | b';' => Err(PathError::EncodedDelimiter),
        0x00..=0x1f | 0x7f => Err(PathError::Control),
        _ => Ok(v),
    }
}

/// Checks the UTF-8 sequence whose lead byte `lead` is escaped at `i`; returns how many
/// input bytes its escapes take. The sequence must be escaped whole.
fn utf8_escapes(b: &[u8], i: usize, lead: u8) -> Result<usize, PathError> {
    let n = match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return Err(PathError::InvalidUtf8),
    };
    let mut buf = [lead, 0, 0, 0];
    for (k, slot) in buf.iter_mut().enumerate().take(n).skip(1) {
        let j = i + 3 * k;
        if b.get(j) != Some(&b'%') {
            return Err(PathError::InvalidUtf8);
        }
        *slot = escape_value(b, j)?;
    }
    // `from_utf8` refuses overlongs, surrogates and code points past U+10FFFF.
    match buf.get(..n).map(std::str::from_utf8) {
        Some(Ok(_)) => Ok(3 * n),
        _ => Err(PathError::InvalidUtf8),
    }
}

/// Whether the bytes from `i` (just after a `/`) start a `.` or `..` segment.
fn starts_dot_segment(b: &[u8], i: usize) -> bool {
    let end = |j: usize| matches!(b.get(j), None | Some(b'/'));
    b.get(i) == Some(&b'.') && (end(i + 1) || (b.get(i + 1) == Some(&b'.') && end(i + 2)))
}

/// Judges the request's origin-form or refuses the other forms.
fn check_form(raw: &str) -> Result<(), PathError> {
    let b = raw.as_bytes();
    if raw.len() > MAX_TARGET_BYTES {
        return Err(PathError::TooLong);
    }
    match b.first() {
        Some(b'/') => Ok(()),
        Some(b'*') if b.len() == 1 => Err(PathError::AsteriskForm),
        _ => {
            // RFC 3986 3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then "://".
            let scheme = b
                .iter()
                .position(|&c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')))
                .unwrap_or(b.len());
            let absolute = scheme > 0
                && b.first().is_some_and(u8::is_ascii_alphabetic)
                && b.get(scheme..).is_some_and(|rest| rest.starts_with(b"://"));
            Err(if absolute {
                PathError::AbsoluteForm
            } else {
                PathError::NotAbsolute
            })
        }
    }
}

/// Checks the query: it is never matched, but the whole target must be one the backend
/// parses as the engine does (no fragment, no raw controls or non-ASCII).
fn check_query(q: &[u8]) -> Result<(), PathError> {
    work(q.len());
    for &c in q {
        match c {
            b'#' => return Err(PathError::Fragment),
            0x00..=0x20 | 0x7f => return Err(PathError::Control),
            0x80..=0xff => return Err(PathError::NonAscii),
            _ => {}
        }
    }
    Ok(())
}

/// Normalises a request-target (origin-form: path, then an optional query).
///
/// Borrows when the path (without its query) is already normal, so the common case does
/// not allocate. The query is checked (see [`PathError::Fragment`]) but dropped.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    check_form(raw)?;
    let end = raw.find('?').unwrap_or(raw.len());
    let (path, query) = raw.split_at(end);
    check_query(query.as_bytes())?;
    let b = path.as_bytes();
    work(b.len());
    let mut rewrite = false;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let v = escape_at(b, i)?;
                let len = if v >= 0x80 { utf8_escapes(b, i, v)? } else { 3 };
                // Unreserved bytes get decoded, other escapes upper-cased.
                let lower_hex = b
                    .get(i..i + len)
                    .is_some_and(|e| e.iter().any(u8::is_ascii_lowercase));
                rewrite |= is_unreserved(v) || lower_hex;
                i += len;
                continue;
            }
            b'#' => return Err(PathError::Fragment),
            b';' => return Err(PathError::Parameters),
            b'\\' => return Err(PathError::Backslash),
            0x00..=0x20 | 0x7f => return Err(PathError::Control),
            0x80..=0xff => return Err(PathError::NonAscii),
            b'/' => rewrite |= b.get(i + 1) == Some(&b'/') || starts_dot_segment(b, i + 1),
            _ => {}
        }
        i += 1;
    }
    if !rewrite {
        return Ok(Cow::Borrowed(path));
    }
    rewrite_path(b).map(Cow::Owned)
}

/// Appends segment `seg` to `out`, decoding unreserved escapes and upper-casing the others
/// (`seg` was checked by the first pass).
fn push_decoded(seg: &[u8], out: &mut String) -> Result<(), PathError> {
    let mut i = 0;
    while let Some(&c) = seg.get(i) {
        if c == b'%' {
            let v = escape_value(seg, i)?;
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                for d in seg.get(i + 1..i + 3).unwrap_or_default() {
                    out.push(char::from(d.to_ascii_uppercase()));
                }
            }
            i += 3;
        } else {
            out.push(char::from(c));
            i += 1;
        }
    }
    Ok(())
}

/// The slow path: decode, merge slashes and resolve dot segments (RFC 3986 5.2.4) in one
/// pass over the segments. `b` starts with `/`.
fn rewrite_path(b: &[u8]) -> Result<String, PathError> {
    // `out` holds "/seg/seg..." with no trailing `/`; `trailing` remembers one is due.
    let mut out = String::with_capacity(b.len());
    let mut trailing = false;
    for seg in b.get(1..).unwrap_or_default().split(|&c| c == b'/') {
        work(seg.len() + 1);
        let start = out.len();
        out.push('/');
        push_decoded(seg, &mut out)?;
        match out.get(start + 1..) {
            Some("" | ".") => {
                out.truncate(start);
                trailing = true;
            }
            Some("..") => {
                out.truncate(start);
                // Only the previous segment is scanned, and then removed: linear overall.
                let prev = out.rfind('/').ok_or(PathError::AboveRoot)?;
                work(start - prev);
                out.truncate(prev);
                trailing = true;
            }
            _ => trailing = false,
        }
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[test]
    fn policy_normalize_golden() {
        let ok = [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/admin?x=1", "/admin"),
            ("//admin", "/admin"),
            ("///admin//x", "/admin/x"),
            ("/./admin", "/admin"),
            ("/a/../admin", "/admin"),
            ("/a/b/../../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e/admin", "/admin"),
            ("/a/%2E%2E/admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/admin/.", "/admin/"),
            ("/admin/x/..", "/admin/"),
            ("/admin//", "/admin/"),
            ("/..a/b", "/..a/b"),
            ("/a/.../b", "/a/.../b"),
            ("/a%20b", "/a%20b"),
            ("/a%2cb", "/a%2Cb"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/ADMIN", "/ADMIN"),
            ("/a/./", "/a/"),
            ("/.", "/"),
            ("/a/..", "/"),
        ];
        for (input, want) in ok {
            assert_eq!(norm(input).as_deref(), Ok(want), "input {input:?}");
        }
        let bad = [
            ("", PathError::NotAbsolute),
            ("admin", PathError::NotAbsolute),
            ("?x", PathError::NotAbsolute),
            ("*", PathError::AsteriskForm),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5Cb", PathError::Backslash),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::Control),
            ("/a%0a", PathError::Control),
            ("/a%7F", PathError::Control),
            ("/a b", PathError::Control),
            ("/a\tb", PathError::Control),
            ("/a%", PathError::InvalidEscape(2)),
            ("/a%4", PathError::InvalidEscape(2)),
            ("/a%zz", PathError::InvalidEscape(2)),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/a/..;/b", PathError::Parameters),
            ("/a/.;x/b", PathError::Parameters),
            ("/a/%2e%2e;/b", PathError::Parameters),
            ("/%2e%2e/admin", PathError::AboveRoot),
            ("/café", PathError::NonAscii),
        ];
        for (input, want) in bad {
            assert_eq!(norm(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn policy_normalize_borrows_when_normal() {
        for p in ["/", "/admin", "/a/b/c/", "/a%20b", "/x?y=/../z"] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in ["//a", "/a/./b", "/%61", "/%2c", "/%c3%a9"] {
            assert!(matches!(normalize_path(p), Ok(Cow::Owned(_))), "{p}");
        }
    }

    proptest::proptest! {
        #[test]
        fn policy_normalize_is_idempotent(p in "/[a-c./%2eE5FC0-9?;#A3]{0,16}") {
            if let Ok(n) = normalize_path(&p) {
                let again = normalize_path(&n).expect("normal output normalises");
                proptest::prop_assert_eq!(again.as_ref(), n.as_ref());
                proptest::prop_assert!(matches!(again, Cow::Borrowed(_)));
                proptest::prop_assert!(!n.contains("//"));
                proptest::prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
}
