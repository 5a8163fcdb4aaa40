//! Size limits on what a request may bring to the engine, so that the work per request is
//! bounded before any rule is looked at. A request over a limit is answered with the pod's
//! default verdict and [`crate::Reason::OverLimit`].

use crate::Request;

/// Longest request-target (path and query) the engine judges, in bytes. nginx (one 8 KiB
/// `large_client_header_buffers` for the request line) and Apache (`LimitRequestLine
/// 8190`) refuse longer request lines by default, so legitimate clients stay below it.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Longest `:authority` / `Host` accepted, in bytes: a 253-byte DNS name, one trailing dot
/// and `:65535`. An IPv6 literal with a port (`[` 45 `]:65535`) is shorter.
pub const MAX_AUTHORITY_BYTES: usize = 253 + 1 + 6;

/// Most header fields one request may carry: Envoy's default `max_headers_count` (100),
/// so a request the mesh's own proxies would pass is never refused for its count.
pub const MAX_HEADER_COUNT: usize = 100;

/// Longest header field (name plus value) in bytes: nginx refuses a header line that does
/// not fit one 8 KiB buffer, and a regex header rule then scans at most this much.
pub const MAX_HEADER_FIELD_BYTES: usize = 8 * 1024;

/// Most header bytes (names plus values) in one request: Envoy's default
/// `max_request_headers_kb` (60 KiB).
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Which limit a request went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Limit {
    /// The request-target is longer than [`MAX_TARGET_BYTES`].
    #[error("request-target longer than {MAX_TARGET_BYTES} bytes")]
    Target,
    /// More header fields than [`MAX_HEADER_COUNT`].
    #[error("more than {MAX_HEADER_COUNT} header fields")]
    HeaderCount,
    /// One header field (name and value) longer than [`MAX_HEADER_FIELD_BYTES`].
    #[error("a header field longer than {MAX_HEADER_FIELD_BYTES} bytes")]
    HeaderField,
    /// Header names and values together longer than [`MAX_HEADER_BYTES`].
    #[error("headers longer than {MAX_HEADER_BYTES} bytes in total")]
    HeaderBytes,
}

/// Checks the request-target and headers against the limits above; the first one broken.
///
/// The authority has its own limit ([`MAX_AUTHORITY_BYTES`]), checked when it is parsed.
pub fn check_request(request: &Request<'_>) -> Result<(), Limit> {
    if request.path.len() > MAX_TARGET_BYTES {
        return Err(Limit::Target);
    }
    let mut count = 0usize;
    let mut bytes = 0usize;
    let mut over = None;
    request.headers.any_header(&mut |name, value| {
        let field = name.len().saturating_add(value.len());
        count += 1;
        bytes = bytes.saturating_add(field);
        over = if count > MAX_HEADER_COUNT {
            Some(Limit::HeaderCount)
        } else if field > MAX_HEADER_FIELD_BYTES {
            Some(Limit::HeaderField)
        } else if bytes > MAX_HEADER_BYTES {
            Some(Limit::HeaderBytes)
        } else {
            None
        };
        over.is_some()
    });
    over.map_or(Ok(()), Err)
}
