//! Request path normalisation, applied before any path is matched.
//!
//! The exact rules (and how they compare with Envoy's `normalize_path` and
//! `merge_slashes`) are in `l7-policy/README.md`. In short: cut the query and fragment,
//! decode percent-escaped unreserved characters, upper-case the other escapes, merge
//! repeated slashes, resolve `.` and `..` segments (RFC 3986 5.2.4), and reject what cannot
//! be normalised safely. Matching stays case-sensitive.

use std::borrow::Cow;

/// Why a request path cannot be normalised (the request is denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/` (or is empty).
    #[error("path does not start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-escape at byte {0}")]
    InvalidEscape(usize),
    /// `%2F`: an encoded `/` would let one segment mean two.
    #[error("encoded '/' (%2F) in path")]
    EncodedSlash,
    /// `%5C` or a raw `\`: some servers treat a backslash as a slash.
    #[error("backslash or encoded backslash (%5C) in path")]
    Backslash,
    /// `%00` or another (encoded or raw) control character, or a space.
    #[error("control character or space in path")]
    Control,
    /// A raw byte outside ASCII (it must be percent-encoded).
    #[error("non-ASCII byte in path")]
    NonAscii,
    /// A `.` or `..` segment with `;` parameters (`/..;/`), which Java servers (Tomcat,
    /// Jetty) resolve as a dot segment after matching would have seen a plain name.
    #[error("'.' or '..' segment with ';' parameters")]
    DotSegmentParameters,
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

/// Checks the escape at `i` (a `%`) and returns the byte it encodes.
fn escape_at(b: &[u8], i: usize) -> Result<u8, PathError> {
    let hi = b.get(i + 1).copied().and_then(hex_val);
    let lo = b.get(i + 2).copied().and_then(hex_val);
    let (Some(hi), Some(lo)) = (hi, lo) else {
        return Err(PathError::InvalidEscape(i));
    };
    let v = hi << 4 | lo;
    match v {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::Backslash),
        0x00..=0x1f | 0x7f => Err(PathError::Control),
        _ => Ok(v),
    }
}

/// Whether `seg` is a `.` or `..` segment; `Err` if it is one with `;` parameters.
fn dot_segment(seg: &[u8]) -> Result<bool, PathError> {
    let name = seg
        .iter()
        .position(|&c| c == b';')
        .map_or(seg, |p| &seg[..p]);
    match (name, name.len() == seg.len()) {
        (b"." | b"..", true) => Ok(true),
        (b"." | b"..", false) => Err(PathError::DotSegmentParameters),
        _ => Ok(false),
    }
}

/// Whether the segment starting at `i` (just after a `/`) is `.` or `..`.
fn is_dot_segment(b: &[u8], i: usize) -> Result<bool, PathError> {
    let seg_end = b[i..]
        .iter()
        .position(|&c| c == b'/')
        .map_or(b.len(), |p| i + p);
    dot_segment(&b[i..seg_end])
}

/// Normalises a request path (the request-target's path, query and fragment allowed).
///
/// Borrows when the path (without its query) is already normal, so the common case does
/// not allocate.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = &raw[..end];
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut rewrite = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let v = escape_at(b, i)?;
                // Unreserved bytes get decoded, other escapes upper-cased.
                if is_unreserved(v) || b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) {
                    rewrite = true;
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            0x00..=0x20 | 0x7f => return Err(PathError::Control),
            0x80..=0xff => return Err(PathError::NonAscii),
            b'/' => {
                // `?` inside the condition still rejects `/..;` segments on the fast path.
                let merge_or_dot =
                    b.get(i + 1) == Some(&b'/') || (i + 1 < b.len() && is_dot_segment(b, i + 1)?);
                rewrite |= merge_or_dot;
            }
            _ => {}
        }
        i += 1;
    }
    if !rewrite {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(rewrite_path(b)?))
}

/// The slow path: decode, then merge slashes and resolve dot segments.
fn rewrite_path(b: &[u8]) -> Result<String, PathError> {
    // 1. Decode unreserved escapes, upper-case the others (input already checked).
    let mut decoded = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = escape_at(b, i)?;
            if is_unreserved(v) {
                decoded.push(char::from(v));
            } else {
                decoded.push('%');
                decoded.push(char::from(b[i + 1].to_ascii_uppercase()));
                decoded.push(char::from(b[i + 2].to_ascii_uppercase()));
            }
            i += 3;
        } else {
            decoded.push(char::from(b[i]));
            i += 1;
        }
    }
    // 2. Segments: empty ones merge, `.` drops, `..` pops (never above the root).
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        trailing_slash = false;
        dot_segment(seg.as_bytes())?;
        match seg {
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if segments.is_empty() || trailing_slash {
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
            ("/admin#frag", "/admin"),
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
            ("/a;x/b;y", "/a;x/b;y"),
            ("/a/...;x", "/a/...;x"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
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
            ("*", PathError::NotAbsolute),
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
            ("/a/..;/b", PathError::DotSegmentParameters),
            ("/a/.;x/b", PathError::DotSegmentParameters),
            ("/a/%2e%2e;/b", PathError::DotSegmentParameters),
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
        for p in ["//a", "/a/./b", "/%61", "/%3f"] {
            assert!(matches!(normalize_path(p), Ok(Cow::Owned(_))), "{p}");
        }
    }

    proptest::proptest! {
        #[test]
        fn policy_normalize_is_idempotent(p in "/[a-c./%2eE5FC0-9?]{0,16}") {
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
