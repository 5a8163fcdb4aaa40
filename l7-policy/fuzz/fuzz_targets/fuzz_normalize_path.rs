//! Arbitrary request-targets through the normaliser: it never panics, and what it returns
//! is normal (idempotent, no empty or dot segments, nothing it would refuse).
#![no_main]

use std::borrow::Cow;

use veil_l7_policy::normalize_path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    let Ok(out) = normalize_path(&raw) else {
        return;
    };
    assert!(out.starts_with('/'), "{raw:?} -> {out:?}");
    assert!(!out.contains("//"), "{raw:?} -> {out:?}");
    assert!(
        !out.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} -> {out:?}"
    );
    assert!(!out.contains(['?', '#', ';', '\\']), "{raw:?} -> {out:?}");
    assert!(
        out.bytes().all(|b| b.is_ascii_graphic()),
        "{raw:?} -> {out:?}"
    );
    // Nothing the normaliser refuses survives in what it accepts.
    for refused in ["%25", "%2F", "%5C", "%3F", "%23", "%3B"] {
        assert!(!out.contains(refused), "{raw:?} -> {out:?}");
    }
    // Decoding and dot removal only shrink; a trailing '/' replaces a removed segment.
    assert!(out.len() <= raw.len(), "{raw:?} -> {out:?}");
    match normalize_path(&out) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*out, "{raw:?}"),
        other => panic!("{raw:?} -> {out:?} -> {other:?}: not idempotent"),
    }
});
