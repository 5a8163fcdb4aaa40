//! The per-(pod, port) matcher: the rules of every policy selecting a pod that apply to one
//! port, indexed so that a request looks at only a few candidate rules.
//!
//! Each rule is split into "alternatives" (one per `http` entry, or one if it has none),
//! numbered in decision order: policies by name, then rule index, then `http` index. The
//! verdict names the rule of the lowest-numbered alternative that matches. Alternatives
//! are indexed twice, by path (exact map, element-prefix map, the rest) and by source
//! identity (SPIFFE ID, SPIFFE prefix, ServiceAccount, namespace name, the rest); a request
//! scans whichever dimension yields fewer candidates. Candidate lists are sorted, so each
//! list stops at its first match. Nothing on this path allocates unless the request path
//! needs rewriting to be normal or the authority lower-casing (or is an IPv6 literal).

use std::collections::HashMap;
use std::sync::Arc;

use crate::compile::{method_bit, CompiledPeer, CompiledPolicy, NamespaceCond, PathCond};
use crate::limits::check_request;
use crate::{
    normalize_path, parse_authority, work, Decision, Mode, Pod, Port, Reason, Request, Source,
    Verdict,
};

/// Setting: allow kubelet probes from the pod's own node.
pub const ALLOW_LOCAL_NODE_PROBES: &str = "allow_local_node_probes";
/// Default on: kubelet probes come from the node, and a policy that forgot them would have
/// the kubelet restart the pod (Kubernetes NetworkPolicy implementations let them through
/// too). The exemption covers only the probes the pod declares (see [`crate::Probe`]).
pub const DEFAULT_ALLOW_LOCAL_NODE_PROBES: bool = true;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Allow a `GET` or `HEAD` from the pod's own node ([`Request::source_is_local_node`])
    /// whose port and normalised path are those of one of the pod's declared `httpGet`
    /// probes ([`Pod::probes`]), whatever the policies say. Nothing else from the node.
    pub allow_local_node_probes: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            allow_local_node_probes: DEFAULT_ALLOW_LOCAL_NODE_PROBES,
        }
    }
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// At most this many candidate lists are gathered per request; deeper paths or SPIFFE IDs
/// fall back to a scan of every alternative (still correct, just slower).
const MAX_LISTS: usize = 40;

/// One alternative: rule `rule` of policy `policy`, `http` entry `http` (`u32::MAX`: none).
#[derive(Debug, Clone, Copy)]
struct Alt {
    policy: u32,
    rule: u32,
    http: u32,
}

/// Compiled matcher for one pod and one port.
#[derive(Debug)]
pub struct PortMatcher {
    port: u16,
    settings: Settings,
    /// Selecting policies, sorted by name.
    policies: Vec<Arc<CompiledPolicy>>,
    /// The policy named by denials: first enforce policy, else first audit policy.
    default_policy: Option<(u32, Decision)>,
    /// Normalised paths of the pod's `httpGet` probes on this port.
    probe_paths: Vec<Box<str>>,
    /// Length of the longest key of `path_prefix`: longer request prefixes are not hashed.
    max_prefix_len: usize,
    /// Length of the longest key of `id_spiffe_prefix`, for the same reason.
    max_spiffe_prefix_len: usize,
    alts: Vec<Alt>,
    path_exact: Map<Box<str>, Vec<u32>>,
    path_prefix: Map<Box<str>, Vec<u32>>,
    path_other: Vec<u32>,
    id_spiffe: Map<Box<str>, Vec<u32>>,
    id_spiffe_prefix: Map<Box<str>, Vec<u32>>,
    id_service_account: Map<Box<str>, Map<Box<str>, Vec<u32>>>,
    id_namespace: Map<Box<str>, Vec<u32>>,
    id_other: Vec<u32>,
}

fn push(list: &mut Vec<u32>, id: u32) {
    if list.last() != Some(&id) {
        list.push(id);
    }
}

impl PortMatcher {
    /// Builds the matcher for `pod` and `port` from the policies that select the pod
    /// (others in `policies` are ignored).
    pub fn new<'p>(
        pod: &Pod<'_>,
        port: u16,
        policies: impl IntoIterator<Item = &'p Arc<CompiledPolicy>>,
        settings: Settings,
    ) -> PortMatcher {
        let mut selected: Vec<Arc<CompiledPolicy>> = policies
            .into_iter()
            .filter(|p| p.selects(pod.namespace, pod.labels))
            .cloned()
            .collect();
        selected.sort_by(|a, b| a.name.cmp(&b.name));
        let default_policy = selected
            .iter()
            .position(|p| p.mode == Mode::Enforce)
            .map(|i| (i as u32, Decision::Deny))
            .or_else(|| (!selected.is_empty()).then_some((0, Decision::AuditDeny)));
        let mut m = PortMatcher {
            port,
            settings,
            policies: Vec::new(),
            default_policy,
            probe_paths: pod
                .probes
                .iter()
                .filter(|p| p.port == port)
                .filter_map(|p| p.request_path())
                .map(String::into_boxed_str)
                .collect(),
            max_prefix_len: 0,
            max_spiffe_prefix_len: 0,
            alts: Vec::new(),
            path_exact: Map::default(),
            path_prefix: Map::default(),
            path_other: Vec::new(),
            id_spiffe: Map::default(),
            id_spiffe_prefix: Map::default(),
            id_service_account: Map::default(),
            id_namespace: Map::default(),
            id_other: Vec::new(),
        };
        for (pi, policy) in selected.iter().enumerate() {
            for (ri, rule) in policy.rules.iter().enumerate() {
                let Some(rule) = rule else { continue };
                if !port_applies(rule.ports.as_deref(), pod, port) {
                    continue;
                }
                let https: Vec<(u32, Option<&PathCond>)> = match &rule.http {
                    None => vec![(u32::MAX, None)],
                    Some(h) => h
                        .iter()
                        .enumerate()
                        .map(|(i, h)| (i as u32, Some(&h.path)))
                        .collect(),
                };
                for (hi, path) in https {
                    let id = m.alts.len() as u32;
                    m.alts.push(Alt {
                        policy: pi as u32,
                        rule: ri as u32,
                        http: hi,
                    });
                    match path {
                        Some(PathCond::Exact(p)) => {
                            push(m.path_exact.entry(p.clone()).or_default(), id)
                        }
                        Some(PathCond::Prefix(p)) => {
                            m.max_prefix_len = m.max_prefix_len.max(p.len());
                            push(m.path_prefix.entry(p.clone()).or_default(), id)
                        }
                        _ => push(&mut m.path_other, id),
                    }
                    match &rule.peers {
                        None => push(&mut m.id_other, id),
                        Some(peers) => {
                            for peer in peers {
                                let list = match peer {
                                    CompiledPeer::SpiffeExact(s) => {
                                        m.id_spiffe.entry(s.clone()).or_default()
                                    }
                                    CompiledPeer::SpiffePrefix(s) => {
                                        m.max_spiffe_prefix_len =
                                            m.max_spiffe_prefix_len.max(s.len());
                                        m.id_spiffe_prefix.entry(s.clone()).or_default()
                                    }
                                    CompiledPeer::ServiceAccount { namespace, name } => m
                                        .id_service_account
                                        .entry(namespace.clone())
                                        .or_default()
                                        .entry(name.clone())
                                        .or_default(),
                                    CompiledPeer::Workload {
                                        namespaces: NamespaceCond::Names(names),
                                        ..
                                    } => {
                                        for n in names {
                                            push(m.id_namespace.entry(n.clone()).or_default(), id);
                                        }
                                        continue;
                                    }
                                    CompiledPeer::Workload { .. } => &mut m.id_other,
                                };
                                push(list, id);
                            }
                        }
                    }
                }
            }
        }
        m.policies = selected;
        m
    }

    /// The port this matcher is for.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether any policy selects the pod (if not, every request is allowed).
    pub fn is_selected(&self) -> bool {
        !self.policies.is_empty()
    }

    /// Number of alternatives (rule × `http` entry) in the index.
    pub fn alternatives(&self) -> usize {
        self.alts.len()
    }

    /// Judges one request from `source`.
    pub fn evaluate(&self, source: &Source<'_>, request: &Request<'_>) -> Verdict<'_> {
        let Some((default_idx, default_decision)) = self.default_policy else {
            return Verdict {
                decision: Decision::Allow,
                reason: Reason::NotSelected,
            };
        };
        let default_name = self.policies[default_idx as usize].name.as_str();
        let refuse = |reason| Verdict {
            decision: default_decision,
            reason,
        };
        // Structural checks come first and apply to probes too: a malformed request is
        // malformed whoever sends it.
        if let Err(limit) = check_request(request) {
            return refuse(Reason::OverLimit {
                policy: default_name,
                limit,
            });
        }
        let authority = match request.authority.map(parse_authority).transpose() {
            Ok(a) => a,
            Err(error) => {
                return refuse(Reason::InvalidAuthority {
                    policy: default_name,
                    error,
                })
            }
        };
        let path = match normalize_path(request.path) {
            Ok(p) => p,
            Err(error) => {
                return refuse(Reason::InvalidPath {
                    policy: default_name,
                    error,
                })
            }
        };
        if self.is_declared_probe(request, &path) {
            return Verdict {
                decision: Decision::Allow,
                reason: Reason::LocalNodeProbe,
            };
        }
        let host = authority.as_ref().map(|a| &*a.host);
        match self.best_match(source, request, host, &path) {
            Some(alt) => Verdict {
                decision: Decision::Allow,
                reason: Reason::Rule {
                    policy: self.policies[alt.policy as usize].name.as_str(),
                    rule: alt.rule as usize,
                },
            },
            None => Verdict {
                decision: default_decision,
                reason: Reason::NoRuleMatched {
                    policy: default_name,
                },
            },
        }
    }

    /// Judges a whole connection from `source` before any byte is read: the verdict of the
    /// first rule (in decision order) without `http` whose `from` matches, which allows
    /// every byte of the connection (an L4 allow, spliced without parsing HTTP); `None`
    /// when no such rule matches and each request must be judged by [`Self::evaluate`].
    /// A pod no policy selects gives `Allow` with [`Reason::NotSelected`].
    ///
    /// Such a rule allows the connection whatever it carries, so the request checks of
    /// `evaluate` (limits, path and authority) do not apply to it: that is what a rule
    /// without `http` means. Probes need no exemption here: they are HTTP requests.
    pub fn evaluate_connection(&self, source: &Source<'_>) -> Option<Verdict<'_>> {
        if self.default_policy.is_none() {
            return Some(Verdict {
                decision: Decision::Allow,
                reason: Reason::NotSelected,
            });
        }
        // Alternatives are numbered in decision order, so the first match is the best.
        self.alts
            .iter()
            .filter(|alt| alt.http == u32::MAX)
            .find(|alt| {
                self.policies[alt.policy as usize].rules[alt.rule as usize]
                    .as_ref()
                    .is_some_and(|rule| {
                        rule.peers
                            .as_ref()
                            .is_none_or(|ps| ps.iter().any(|p| p.matches(source)))
                    })
            })
            .map(|alt| Verdict {
                decision: Decision::Allow,
                reason: Reason::Rule {
                    policy: self.policies[alt.policy as usize].name.as_str(),
                    rule: alt.rule as usize,
                },
            })
    }

    /// Whether the probe exemption covers this request (its path normalised).
    fn is_declared_probe(&self, request: &Request<'_>, path: &str) -> bool {
        request.source_is_local_node
            && self.settings.allow_local_node_probes
            && matches!(request.method, "GET" | "HEAD")
            && self.probe_paths.iter().any(|p| **p == *path)
    }

    /// The lowest-numbered alternative that matches, if any; `host` is the parsed host.
    fn best_match(
        &self,
        source: &Source<'_>,
        request: &Request<'_>,
        host: Option<&str>,
        path: &str,
    ) -> Option<Alt> {
        let method = method_bit(request.method);
        let matches = |id: u32| {
            let alt = self.alts[id as usize];
            let Some(rule) = &self.policies[alt.policy as usize].rules[alt.rule as usize] else {
                return false;
            };
            let peers_ok = rule
                .peers
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p.matches(source)));
            peers_ok
                && (alt.http == u32::MAX
                    || rule.http.as_ref().is_some_and(|h| {
                        h[alt.http as usize].matches(method, host, path, request.headers)
                    }))
        };

        let empty: &[u32] = &[];
        let mut by_path = [empty; MAX_LISTS];
        let mut by_id = [empty; MAX_LISTS];
        let path_lists = self.path_candidates(path, &mut by_path);
        let id_lists = self.identity_candidates(source, &mut by_id);
        let lists = match (path_lists, id_lists) {
            (Some(p), Some(i)) => {
                let count = |l: &[&[u32]]| l.iter().map(|x| x.len()).sum::<usize>();
                if count(&by_path[..p]) <= count(&by_id[..i]) {
                    &by_path[..p]
                } else {
                    &by_id[..i]
                }
            }
            (Some(p), None) => &by_path[..p],
            (None, Some(i)) => &by_id[..i],
            (None, None) => {
                return (0..self.alts.len() as u32)
                    .find(|&id| matches(id))
                    .map(|id| self.alts[id as usize]);
            }
        };
        let mut best = u32::MAX;
        for list in lists {
            for &id in *list {
                if id >= best {
                    break;
                }
                if matches(id) {
                    best = id;
                    break;
                }
            }
        }
        (best != u32::MAX).then(|| self.alts[best as usize])
    }

    /// Fills `out` with the lists of alternatives whose path condition may match; `None` if
    /// there are too many.
    fn path_candidates<'s>(
        &'s self,
        path: &str,
        out: &mut [&'s [u32]; MAX_LISTS],
    ) -> Option<usize> {
        let mut lists = Lists::new(out);
        lists.add(&self.path_other);
        lists.add(get(&self.path_exact, path));
        if !self.path_prefix.is_empty() {
            lists.add(get(&self.path_prefix, "/"));
            // Only prefixes no longer than the longest key can be keys: hashing every
            // prefix of an 8 KiB path of slashes would be quadratic in its length.
            let probe = path.get(..=self.max_prefix_len).unwrap_or(path);
            for (i, b) in probe.bytes().enumerate().skip(1) {
                if b == b'/' {
                    work(i);
                    lists.add(get(&self.path_prefix, path.get(..i).unwrap_or_default()));
                }
            }
            if path.len() > 1 && path.len() <= self.max_prefix_len && !path.ends_with('/') {
                work(path.len());
                lists.add(get(&self.path_prefix, path));
            }
        }
        lists.count()
    }

    /// Fills `out` with the lists of alternatives whose `from` may match the source; `None`
    /// if there are too many.
    fn identity_candidates<'s>(
        &'s self,
        src: &Source<'_>,
        out: &mut [&'s [u32]; MAX_LISTS],
    ) -> Option<usize> {
        let mut lists = Lists::new(out);
        lists.add(&self.id_other);
        if let Some(ns) = src.namespace {
            lists.add(get(&self.id_namespace, ns));
            if let (Some(sa), Some(names)) = (src.service_account, self.id_service_account.get(ns))
            {
                lists.add(get(names, sa));
            }
        }
        if let Some(id) = src.spiffe_id {
            lists.add(get(&self.id_spiffe, id));
            if !self.id_spiffe_prefix.is_empty() {
                let start = "spiffe://".len().min(id.len());
                let probe = id.get(..=self.max_spiffe_prefix_len).unwrap_or(id);
                for (i, b) in probe.bytes().enumerate().skip(start) {
                    if b == b'/' {
                        work(i);
                        lists.add(get(&self.id_spiffe_prefix, id.get(..i).unwrap_or_default()));
                    }
                }
            }
        }
        lists.count()
    }
}

/// The alternatives listed under `key`, or none.
fn get<'s>(map: &'s Map<Box<str>, Vec<u32>>, key: &str) -> &'s [u32] {
    map.get(key).map_or(&[][..], Vec::as_slice)
}

/// Candidate lists gathered into a fixed array, so evaluation allocates nothing; more
/// than [`MAX_LISTS`] non-empty lists make the caller fall back to scanning every rule.
struct Lists<'s, 'o> {
    out: &'o mut [&'s [u32]; MAX_LISTS],
    n: usize,
    overflowed: bool,
}

impl<'s, 'o> Lists<'s, 'o> {
    fn new(out: &'o mut [&'s [u32]; MAX_LISTS]) -> Self {
        Lists {
            out,
            n: 0,
            overflowed: false,
        }
    }

    fn add(&mut self, list: &'s [u32]) {
        if list.is_empty() {
            return;
        }
        if self.n == MAX_LISTS {
            self.overflowed = true;
            return;
        }
        self.out[self.n] = list;
        self.n += 1;
    }

    /// How many lists were gathered; `None` if some did not fit.
    fn count(self) -> Option<usize> {
        (!self.overflowed).then_some(self.n)
    }
}

/// Whether a rule's `ports` cover `port` of `pod` (named ports resolve through the pod).
pub(crate) fn port_applies(ports: Option<&[Port]>, pod: &Pod<'_>, port: u16) -> bool {
    ports.is_none_or(|ports| {
        ports.iter().any(|p| match p {
            Port::Number(n) => *n == i64::from(port),
            Port::Name(name) => pod.named_ports.iter().any(|(n, p)| n == name && *p == port),
        })
    })
}
