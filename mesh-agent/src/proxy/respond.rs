//! The answers the proxy gives itself: denials (JSON, or a gRPC status for gRPC calls) and
//! errors (bad request, pod unreachable), and the request id they carry.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

/// The response body type of the proxy: the pod's streamed body or one of ours.
pub(crate) type ProxyBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// The request id header: kept when the client sent one, added when not.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-sent request id kept; a longer one is replaced (it goes into every flow).
const MAX_REQUEST_ID: usize = 128;

/// gRPC status `PERMISSION_DENIED`.
pub(crate) const GRPC_PERMISSION_DENIED: u32 = 7;
/// gRPC status `UNAVAILABLE`.
pub(crate) const GRPC_UNAVAILABLE: u32 = 14;
/// gRPC status `INVALID_ARGUMENT`.
pub(crate) const GRPC_INVALID_ARGUMENT: u32 = 3;
/// gRPC status `DEADLINE_EXCEEDED`.
pub(crate) const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// The request's id: the client's `x-request-id` if it has a usable one, else a new one,
/// which is then set on the request.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) -> String {
    let mut values = headers.get_all(&REQUEST_ID).iter();
    let existing = match (values.next(), values.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= MAX_REQUEST_ID)
            .map(str::to_owned),
        _ => None,
    };
    if let Some(id) = existing {
        return id;
    }
    let id = new_request_id();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    id
}

/// A process-unique id: a random per-process prefix and a counter.
fn new_request_id() -> String {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{seed:016x}-{n:016x}")
}

/// Whether the request is a gRPC call (`content-type: application/grpc*`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec says: bytes outside
/// 0x20-0x7E, and `%`, become `%XX` (of the UTF-8 bytes).
pub(crate) fn grpc_percent_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response the proxy makes itself. For gRPC calls: HTTP 200, trailers-only, with
/// `grpc_status` and the message; for others: `status` with the JSON body.
pub(crate) fn own_response(
    grpc: bool,
    status: StatusCode,
    grpc_status: u32,
    body: &serde_json::Value,
    request_id: &str,
) -> Response<ProxyBody> {
    let json = body.to_string();
    let mut resp = if grpc {
        let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed());
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(grpc_status));
        if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&json)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from(json)).map_err(|e| match e {}).boxed());
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Decodes `%XX` escapes (test-only inverse of the encoder).
    fn decode(s: &str) -> Option<Vec<u8>> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(&c) = b.get(i) {
            if c == b'%' {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        }
        Some(out)
    }

    proptest! {
        #[test]
        fn proxy_grpc_message_encoding_round_trips(msg in any::<String>()) {
            let enc = grpc_percent_encode(&msg);
            prop_assert!(enc.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            prop_assert!(HeaderValue::from_str(&enc).is_ok());
            prop_assert_eq!(decode(&enc), Some(msg.into_bytes()));
        }

        #[test]
        fn proxy_request_id_is_kept_or_made_valid(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.insert(REQUEST_ID, v);
            }
            let id = ensure_request_id(&mut h);
            prop_assert!(!id.is_empty() && id.len() <= MAX_REQUEST_ID);
            prop_assert_eq!(h.get(REQUEST_ID).and_then(|v| v.to_str().ok()), Some(id.as_str()));
        }
    }

    #[test]
    fn proxy_grpc_message_golden() {
        assert_eq!(grpc_percent_encode("a b%c\n\u{e9}"), "a b%25c%0A%C3%A9");
    }
}
