//! What the engine is asked about: the destination pod, the source and the request.
//! All borrowed, so building them per request allocates nothing.

use std::borrow::Cow;

use crate::{normalize_path, Labels};

/// The pod a matcher protects.
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's labels.
    pub labels: &'a Labels,
    /// The pod's named container ports (`name`, `containerPort`), for rules that name ports.
    pub named_ports: &'a [(&'a str, u16)],
    /// Every `httpGet` probe (liveness, readiness, startup) of every container in the
    /// pod's spec; the only requests the local-node probe exemption lets through.
    pub probes: &'a [Probe<'a>],
}

/// One `httpGet` probe declared in a pod's spec, as the kubelet will send it.
///
/// The agent builds one per `livenessProbe`, `readinessProbe` and `startupProbe` with an
/// `httpGet` handler, in every container: `port` is `httpGet.port` with a named port
/// resolved through that container's ports, `path` is `httpGet.path` as written (the
/// engine adds the leading `/` the kubelet adds, and normalises it). Skip probes whose
/// `httpGet.host` is set (the kubelet then probes that host, not the pod) and `tcpSocket`,
/// `grpc` and `exec` probes (not HTTP requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Probe<'a> {
    /// The container port the kubelet probes.
    pub port: u16,
    /// `httpGet.path` from the pod spec (empty means `/`).
    pub path: &'a str,
}

impl Probe<'_> {
    /// The normalised path the kubelet requests, or `None` if it cannot be normalised
    /// (such a probe exempts nothing).
    pub fn request_path(&self) -> Option<String> {
        // The kubelet puts the path into a URL with a host, which adds a missing leading
        // `/`; `normalize_path` also drops a query, which is not matched.
        let path = if self.path.starts_with('/') {
            Cow::Borrowed(self.path)
        } else {
            Cow::Owned(format!("/{}", self.path))
        };
        normalize_path(&path).ok().map(Cow::into_owned)
    }
}

/// Who sent a request, as far as the agent knows; `None` means unknown, and a rule that
/// needs an unknown fact does not match.
#[derive(Debug, Clone, Copy, Default)]
pub struct Source<'a> {
    /// The peer's SPIFFE ID (from its SVID, or from the pod's ServiceAccount).
    pub spiffe_id: Option<&'a str>,
    /// The source pod's namespace.
    pub namespace: Option<&'a str>,
    /// Labels of the source pod's namespace.
    pub namespace_labels: Option<&'a Labels>,
    /// Labels of the source pod.
    pub pod_labels: Option<&'a Labels>,
    /// The source pod's ServiceAccount name (in `namespace`).
    pub service_account: Option<&'a str>,
}

/// Header access without copying: implement it for the proxy's header map.
///
/// Every field line counts: a header sent twice is two calls, with its two values as sent
/// (not joined with `,`), so that a rule can demand that every value satisfies it.
pub trait HeaderLookup {
    /// Calls `f` on each header field (`name`, `value`) until `f` returns `true`; returns
    /// whether it did.
    fn any_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool;

    /// Calls `f` on each value of header `name` (ASCII case-insensitive) until `f` returns
    /// `true`; returns whether it did. Override it when the map can look names up.
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.any_header(&mut |n, v| n.eq_ignore_ascii_case(name) && f(v))
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> HeaderLookup for [(N, V)] {
    fn any_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self.iter().any(|(n, v)| f(n.as_ref(), v.as_ref()))
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>, const K: usize> HeaderLookup for [(N, V); K] {
    fn any_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self[..].any_header(f)
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> HeaderLookup for Vec<(N, V)> {
    fn any_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self[..].any_header(f)
    }
}

impl<T: HeaderLookup + ?Sized> HeaderLookup for &T {
    fn any_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        (**self).any_header(f)
    }

    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        (**self).any_value(name, f)
    }
}

/// No headers at all.
pub const NO_HEADERS: &dyn HeaderLookup = &[] as &[(&str, &str); 0];

/// One HTTP request to judge.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The method token, case-sensitive (`GET`).
    pub method: &'a str,
    /// `:authority`, or `Host` for HTTP/1.1 (port allowed: `api.example.com:8080`); parsed
    /// by [`crate::parse_authority`], and an invalid one denies the request. The proxy must
    /// refuse requests with two `Host` fields, or a `Host` that differs from the
    /// absolute-form target's authority, before asking (RFC 9112 3.2).
    pub authority: Option<&'a str>,
    /// The raw request-target in origin-form (path, query allowed); normalised before
    /// matching, see [`crate::normalize_path`].
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a dyn HeaderLookup,
    /// The connection comes from the pod's own node, where the kubelet probes from. Alone
    /// it allows nothing: see [`Probe`] and [`crate::Settings::allow_local_node_probes`].
    pub source_is_local_node: bool,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("source_is_local_node", &self.source_is_local_node)
            .finish_non_exhaustive()
    }
}
