//! What the engine is asked about: the destination pod, the source and the request.
//! All borrowed, so building them per request allocates nothing.

use crate::Labels;

/// The pod a matcher protects.
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's labels.
    pub labels: &'a Labels,
    /// The pod's named container ports (`name`, `containerPort`), for rules that name ports.
    pub named_ports: &'a [(&'a str, u16)],
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
pub trait HeaderLookup {
    /// Calls `f` on each value of header `name` (ASCII case-insensitive) until `f` returns
    /// `true`; returns whether it did.
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

impl<N: AsRef<str>, V: AsRef<[u8]>> HeaderLookup for [(N, V)] {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.iter()
            .any(|(n, v)| n.as_ref().eq_ignore_ascii_case(name) && f(v.as_ref()))
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>, const K: usize> HeaderLookup for [(N, V); K] {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self[..].any_value(name, f)
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> HeaderLookup for Vec<(N, V)> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self[..].any_value(name, f)
    }
}

impl<T: HeaderLookup + ?Sized> HeaderLookup for &T {
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
    /// `:authority` or `Host`, port allowed (`api.example.com:8080`).
    pub authority: Option<&'a str>,
    /// The raw request-target path, query allowed; normalised before matching.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a dyn HeaderLookup,
    /// The source is the pod's own node (kubelet probes come from there).
    pub source_is_local_node_probe: bool,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field(
                "source_is_local_node_probe",
                &self.source_is_local_node_probe,
            )
            .finish_non_exhaustive()
    }
}

/// The host of an authority, without its port or a trailing `.` (case unchanged);
/// `None` if it carries userinfo or is empty.
pub(crate) fn host_of(authority: &str) -> Option<&str> {
    if authority.contains('@') {
        return None;
    }
    let host = if authority.starts_with('[') {
        authority
            .find(']')
            .map_or(authority, |end| &authority[..=end])
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}
