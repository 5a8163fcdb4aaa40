//! The request's authority (`:authority` or `Host`), parsed per RFC 3986 3.2 before any
//! host rule sees it.
//!
//! Accepted: a DNS-style name (letters, digits, `-`, `_`; labels of 1-63 bytes), a dotted
//! IPv4 address, or a bracketed IPv6 address, each with an optional port. Refused, rather
//! than guessed at: userinfo (`user@host`), percent-escapes, an empty port, other
//! characters, IPvFuture and zone identifiers, and numeric hosts that are not a plain
//! dotted quad (`127.1`, `0x7f.0.0.1`, `2130706433`: resolvers read them as addresses).
//! The host is lower-cased and loses one trailing dot (`Example.COM.` is `example.com`:
//! the same DNS name), so rules compare it byte for byte.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::limits::MAX_AUTHORITY_BYTES;

/// An authority that passed [`parse_authority`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority<'a> {
    /// Lower-case host without a trailing dot; IPv6 in brackets, canonical (`[::1]`).
    pub host: Cow<'a, str>,
    /// The port, if the authority has one.
    pub port: Option<u16>,
}

/// Why an authority is refused (the request is denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AuthorityError {
    /// The authority (or its host) is empty.
    #[error("empty authority or host")]
    Empty,
    /// The authority is longer than [`MAX_AUTHORITY_BYTES`].
    #[error("authority longer than {MAX_AUTHORITY_BYTES} bytes")]
    TooLong,
    /// Userinfo (`user@host`): HTTP forbids it in `Host`, and parsers disagree on which
    /// side of the `@` is the host.
    #[error("userinfo ('@') in authority")]
    UserInfo,
    /// A `%` in the host: a percent-escaped name could decode to another host.
    #[error("percent-escape in host")]
    PercentEscape,
    /// A character a host name may not contain (space, control, `/`, `,`, ...).
    #[error("invalid character in host")]
    InvalidChar,
    /// A host with an empty label (`a..b`, `.a`, `a..`).
    #[error("empty label in host name")]
    EmptyLabel,
    /// A host label over 63 bytes or a name over 253 bytes (RFC 1035).
    #[error("host label longer than 63 bytes or name longer than 253")]
    LabelTooLong,
    /// A numeric host that is not a dotted-quad IPv4 address (`127.1`, `0x7f.1`,
    /// `2130706433`), which resolvers read as an address the rules cannot name.
    #[error("numeric host that is not a dotted-quad IPv4 address")]
    NumericHost,
    /// A bracketed literal that is not a plain IPv6 address (IPvFuture, zone identifier,
    /// missing `]`), or anything but a port after the `]`.
    #[error("invalid IPv6 literal")]
    InvalidIpv6,
    /// A `:` with nothing after it (`host:`).
    #[error("empty port after ':'")]
    EmptyPort,
    /// A port that is not 1-65535 in decimal without leading zeros, or a second `:`.
    #[error("invalid port")]
    InvalidPort,
}

/// Parses an authority (`host`, `host:port`, `[v6]:port`).
pub fn parse_authority(raw: &str) -> Result<Authority<'_>, AuthorityError> {
    if raw.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if raw.len() > MAX_AUTHORITY_BYTES {
        return Err(AuthorityError::TooLong);
    }
    if raw.contains('@') {
        return Err(AuthorityError::UserInfo);
    }
    if raw.contains('%') {
        return Err(AuthorityError::PercentEscape);
    }
    if let Some(rest) = raw.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or(AuthorityError::InvalidIpv6)?;
        let addr: Ipv6Addr = inner.parse().map_err(|_| AuthorityError::InvalidIpv6)?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after.strip_prefix(':').ok_or(AuthorityError::InvalidIpv6)?,
            )?),
        };
        return Ok(Authority {
            host: Cow::Owned(format!("[{addr}]")),
            port,
        });
    }
    let (host, port) = match raw.split_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (raw, None),
    };
    Ok(Authority {
        host: parse_host(host)?,
        port,
    })
}

/// A port: 1-5 decimal digits, no leading zero, 1-65535.
fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    if p.is_empty() {
        return Err(AuthorityError::EmptyPort);
    }
    if p.len() > 5 || p.starts_with('0') || !p.bytes().all(|c| c.is_ascii_digit()) {
        return Err(AuthorityError::InvalidPort);
    }
    p.parse::<u16>().map_err(|_| AuthorityError::InvalidPort)
}

/// A registered name or IPv4 address, lower-cased, one trailing dot removed.
fn parse_host(host: &str) -> Result<Cow<'_, str>, AuthorityError> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if name.len() > 253 {
        return Err(AuthorityError::LabelTooLong);
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(AuthorityError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(AuthorityError::LabelTooLong);
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(AuthorityError::InvalidChar);
        }
        last = label;
    }
    // WHATWG's "ends in a number": such a host is an address to resolvers, so it must be
    // the one spelling of an IPv4 address that everybody reads the same way.
    let numeric = last.bytes().all(|c| c.is_ascii_digit())
        || last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"));
    if numeric && name.parse::<Ipv4Addr>().is_err() {
        return Err(AuthorityError::NumericHost);
    }
    Ok(if name.bytes().any(|c| c.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use AuthorityError::*;

    fn parse(s: &str) -> Result<(String, Option<u16>), AuthorityError> {
        parse_authority(s).map(|a| (a.host.into_owned(), a.port))
    }

    #[test]
    fn hardening_authority_parses_per_rfc3986() {
        let ok = [
            ("api.example.com", "api.example.com", None),
            ("API.Example.COM:8443", "api.example.com", Some(8443)),
            ("api.example.com.", "api.example.com", None),
            ("api.example.com.:80", "api.example.com", Some(80)),
            ("my_svc.ns", "my_svc.ns", None),
            ("10.0.0.1:8080", "10.0.0.1", Some(8080)),
            ("[::1]:8080", "[::1]", Some(8080)),
            ("[0:0::1]", "[::1]", None),
            ("[FD00::A]", "[fd00::a]", None),
            ("localhost:65535", "localhost", Some(65535)),
        ];
        for (input, host, port) in ok {
            assert_eq!(parse(input), Ok((host.to_owned(), port)), "{input:?}");
        }
        let bad = [
            ("", Empty),
            (".", Empty),
            (":80", Empty),
            ("user@api.example.com", UserInfo),
            ("api.example.com:80@evil.com", UserInfo),
            ("api%2eexample.com", PercentEscape),
            ("[fe80::1%25eth0]", PercentEscape),
            ("api.example.com:", EmptyPort),
            ("api.example.com:0", InvalidPort),
            ("api.example.com:080", InvalidPort),
            ("api.example.com:65536", InvalidPort),
            ("api.example.com:8080:80", InvalidPort),
            ("api.example.com:http", InvalidPort),
            ("::1", InvalidPort),
            ("[::1", InvalidIpv6),
            ("[v1.x]", InvalidIpv6),
            ("[::1]x", InvalidIpv6),
            ("[::1]:", EmptyPort),
            ("[1.2.3.4]", InvalidIpv6),
            ("a b", InvalidChar),
            ("a/b", InvalidChar),
            ("a,b", InvalidChar),
            ("a\tb", InvalidChar),
            ("caf\u{e9}.com", InvalidChar),
            ("a..b", EmptyLabel),
            (".a", EmptyLabel),
            ("a..", EmptyLabel),
            ("127.1", NumericHost),
            ("2130706433", NumericHost),
            ("0x7f.0.0.1", NumericHost),
            ("a.0x7f", NumericHost),
            ("1.2.3.04", NumericHost),
            ("256.1.1.1", NumericHost),
        ];
        for (input, want) in bad {
            assert_eq!(parse(input), Err(want), "{input:?}");
        }
        assert_eq!(parse(&"a".repeat(64)), Err(LabelTooLong));
        assert_eq!(parse(&"a.".repeat(131)), Err(TooLong));
        assert_eq!(parse(&"ab.".repeat(85)), Err(LabelTooLong));
    }
}
