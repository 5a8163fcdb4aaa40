//! Arbitrary authorities through the parser: it never panics, and an accepted host is
//! canonical (lower-case, no trailing dot) and parses again to itself.
#![no_main]

use veil_l7_policy::parse_authority;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    let Ok(a) = parse_authority(&raw) else {
        return;
    };
    let host = &*a.host;
    assert!(!host.is_empty(), "{raw:?}");
    assert!(!host.ends_with('.'), "{raw:?} -> {host:?}");
    assert!(
        !host
            .bytes()
            .any(|b| b.is_ascii_uppercase() || !b.is_ascii_graphic()),
        "{raw:?} -> {host:?}"
    );
    assert!(!host.contains(['@', '%', '/']), "{raw:?} -> {host:?}");
    assert!(a.port != Some(0), "{raw:?}");
    let again = match a.port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    assert_eq!(
        parse_authority(&again).as_ref(),
        Ok(&a),
        "{raw:?} -> {again:?}"
    );
});
