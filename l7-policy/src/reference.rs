//! A plain evaluator, written for clarity rather than speed, straight from the CRD types.
//! The property tests check that [`crate::PortMatcher`] always agrees with it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use regex::{bytes, Regex};

use crate::limits::{MAX_HEADER_BYTES, MAX_HEADER_COUNT, MAX_HEADER_FIELD_BYTES, MAX_TARGET_BYTES};
use crate::{
    normalize_path, parse_authority, CompiledPolicy, Decision, HeaderMatch, HttpMatch, IngressRule,
    L7PolicySpec, Labels, Limit, Mode, Peer, Pod, Port, Reason, Request, Settings, Source, Verdict,
};

/// A policy as the reference evaluator sees it.
#[derive(Debug, Clone, Copy)]
pub struct RefPolicy<'a> {
    /// Namespace of the policy.
    pub namespace: &'a str,
    /// Name of the policy.
    pub name: &'a str,
    /// Its spec.
    pub spec: &'a L7PolicySpec,
}

/// `None` if the selector is invalid.
fn selector_matches(sel: &LabelSelector, labels: &Labels) -> Option<bool> {
    let mut all = true;
    for (k, v) in sel.match_labels.clone().unwrap_or_default() {
        all &= labels.get(&k) == Some(&v);
    }
    for e in sel.match_expressions.clone().unwrap_or_default() {
        let values = e.values.unwrap_or_default();
        let value = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" if !values.is_empty() => value.is_some() && values.contains(value?),
            "NotIn" if !values.is_empty() => value.is_none() || !values.contains(value?),
            "Exists" if values.is_empty() => value.is_some(),
            "DoesNotExist" if values.is_empty() => value.is_none(),
            _ => return None,
        };
        all &= ok;
    }
    Some(all)
}

fn peer_matches(policy_ns: &str, peer: &Peer, src: &Source<'_>) -> bool {
    if let Some(id) = &peer.spiffe_id {
        return match id.strip_suffix('*') {
            Some(prefix) => src
                .spiffe_id
                .is_some_and(|s| s.starts_with(prefix) && s.len() > prefix.len()),
            None => src.spiffe_id == Some(id.as_str()),
        };
    }
    if let Some(sa) = &peer.service_account {
        let ns = sa.namespace.as_deref().unwrap_or(policy_ns);
        return src.namespace == Some(ns) && src.service_account == Some(sa.name.as_str());
    }
    let ns_ok = if let Some(names) = &peer.namespaces {
        src.namespace
            .is_some_and(|ns| names.iter().any(|n| n == ns))
    } else if let Some(sel) = &peer.namespace_selector {
        src.namespace_labels
            .is_some_and(|l| selector_matches(sel, l) == Some(true))
    } else {
        src.namespace == Some(policy_ns)
    };
    let pod_ok = match &peer.pod_selector {
        None => true,
        Some(sel) => src
            .pod_labels
            .is_some_and(|l| selector_matches(sel, l) == Some(true)),
    };
    ns_ok && pod_ok
}

/// Every header field of the request, in order.
fn all_headers(req: &Request<'_>) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    req.headers.any_header(&mut |n, v| {
        all.push((n.to_owned(), v.to_vec()));
        false
    });
    all
}

fn header_matches(h: &HeaderMatch, req: &Request<'_>) -> bool {
    let values: Vec<Vec<u8>> = all_headers(req)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(&h.name))
        .map(|(_, v)| v)
        .collect();
    if let Some(present) = h.present {
        return values.is_empty() != present;
    }
    // Every value must satisfy the rule, and there must be one.
    !values.is_empty()
        && values.iter().all(|v| {
            if let Some(exact) = &h.exact {
                v == exact.as_bytes()
            } else if let Some(prefix) = &h.prefix {
                v.starts_with(prefix.as_bytes())
            } else {
                let re =
                    bytes::Regex::new(&format!("^(?:{})$", h.regex.as_deref().unwrap_or_default()));
                re.is_ok_and(|re| re.is_match(v))
            }
        })
}

/// Whether the host of an authority (lower-case, no trailing dot) matches `pattern`.
fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => host == pattern,
    }
}

fn http_matches(h: &HttpMatch, req: &Request<'_>, path: &str) -> bool {
    if let Some(methods) = &h.methods {
        if !methods.iter().any(|m| m.as_str() == req.method) {
            return false;
        }
    }
    if let Some(p) = &h.path {
        let ok = if let Some(exact) = &p.exact {
            path == exact
        } else if let Some(prefix) = &p.prefix {
            let prefix = if prefix.len() > 1 {
                prefix.trim_end_matches('/')
            } else {
                prefix.as_str()
            };
            prefix == "/" || path == prefix || path.starts_with(&format!("{prefix}/"))
        } else {
            let re = Regex::new(&format!("^(?:{})$", p.regex.as_deref().unwrap_or_default()));
            re.is_ok_and(|re| re.is_match(path))
        };
        if !ok {
            return false;
        }
    }
    if let Some(headers) = &h.headers {
        if !headers.iter().all(|hm| header_matches(hm, req)) {
            return false;
        }
    }
    if let Some(hosts) = &h.hosts {
        let Some(Ok(authority)) = req.authority.map(parse_authority) else {
            return false;
        };
        if !hosts.iter().any(|p| host_matches(p, &authority.host)) {
            return false;
        }
    }
    true
}

fn rule_matches(
    policy_ns: &str,
    rule: &IngressRule,
    pod: &Pod<'_>,
    port: u16,
    src: &Source<'_>,
    req: &Request<'_>,
    path: &str,
) -> bool {
    let named: BTreeMap<&str, u16> = pod.named_ports.iter().copied().collect();
    let port_ok = rule.ports.as_ref().is_none_or(|ports| {
        ports.iter().any(|p| match p {
            Port::Number(n) => *n == i64::from(port),
            Port::Name(name) => named.get(name.as_str()) == Some(&port),
        })
    });
    let from_ok = match &rule.from {
        None => true,
        Some(from) if from.is_empty() => true,
        Some(from) => from.iter().any(|p| peer_matches(policy_ns, p, src)),
    };
    let http_ok = rule
        .http
        .as_ref()
        .is_none_or(|hs| hs.iter().any(|h| http_matches(h, req, path)));
    port_ok && from_ok && http_ok
}

/// The policies that select `pod`, by name.
fn selected<'a>(pod: &Pod<'_>, policies: &[RefPolicy<'a>]) -> Vec<RefPolicy<'a>> {
    let mut selected: Vec<RefPolicy<'a>> = policies
        .iter()
        .filter(|p| {
            p.namespace == pod.namespace
                && selector_matches(&p.spec.pod_selector, pod.labels) != Some(false)
        })
        .copied()
        .collect();
    selected.sort_by_key(|p| p.name);
    selected
}

/// Judges `request` to `pod`:`port` the slow, obvious way.
pub fn evaluate<'a>(
    pod: &Pod<'_>,
    port: u16,
    policies: &[RefPolicy<'a>],
    settings: Settings,
    source: &Source<'_>,
    request: &Request<'_>,
) -> Verdict<'a> {
    let selected = selected(pod, policies);
    if selected.is_empty() {
        return Verdict {
            decision: Decision::Allow,
            reason: Reason::NotSelected,
        };
    }
    let (default, decision) = match selected.iter().find(|p| p.spec.mode == Mode::Enforce) {
        Some(p) => (p.name, Decision::Deny),
        None => (selected[0].name, Decision::AuditDeny),
    };
    let refuse = |reason| Verdict { decision, reason };
    let headers = all_headers(request);
    let mut total = 0;
    let mut limit = None;
    if request.path.len() > MAX_TARGET_BYTES {
        limit = Some(Limit::Target);
    }
    for (i, (n, v)) in headers.iter().enumerate() {
        total += n.len() + v.len();
        if limit.is_some() {
            break;
        }
        limit = if i >= MAX_HEADER_COUNT {
            Some(Limit::HeaderCount)
        } else if n.len() + v.len() > MAX_HEADER_FIELD_BYTES {
            Some(Limit::HeaderField)
        } else if total > MAX_HEADER_BYTES {
            Some(Limit::HeaderBytes)
        } else {
            None
        };
    }
    if let Some(limit) = limit {
        return refuse(Reason::OverLimit {
            policy: default,
            limit,
        });
    }
    if let Some(Err(error)) = request.authority.map(parse_authority) {
        return refuse(Reason::InvalidAuthority {
            policy: default,
            error,
        });
    }
    let path = match normalize_path(request.path) {
        Ok(p) => p,
        Err(error) => {
            return refuse(Reason::InvalidPath {
                policy: default,
                error,
            })
        }
    };
    let probe = pod.probes.iter().any(|p| {
        let declared = if p.path.starts_with('/') {
            p.path.to_owned()
        } else {
            format!("/{}", p.path)
        };
        p.port == port && normalize_path(&declared).is_ok_and(|d| d == path)
    });
    if request.source_is_local_node
        && settings.allow_local_node_probes
        && (request.method == "GET" || request.method == "HEAD")
        && probe
    {
        return Verdict {
            decision: Decision::Allow,
            reason: Reason::LocalNodeProbe,
        };
    }
    for p in &selected {
        // Validity is the one thing taken from the engine (validation has its own tests).
        let checked = CompiledPolicy::compile(p.namespace, p.name, p.spec);
        for (i, rule) in p.spec.ingress.iter().enumerate() {
            if checked.rule_is_valid(i)
                && rule_matches(p.namespace, rule, pod, port, source, request, &path)
            {
                return Verdict {
                    decision: Decision::Allow,
                    reason: Reason::Rule {
                        policy: p.name,
                        rule: i,
                    },
                };
            }
        }
    }
    Verdict {
        decision,
        reason: Reason::NoRuleMatched { policy: default },
    }
}

/// Judges a connection to `pod`:`port` before any request, the slow, obvious way: the first
/// valid rule without `http` (policies by name, rules in order) whose ports and `from` match.
pub fn evaluate_connection<'a>(
    pod: &Pod<'_>,
    port: u16,
    policies: &[RefPolicy<'a>],
    source: &Source<'_>,
) -> Option<Verdict<'a>> {
    let selected = selected(pod, policies);
    if selected.is_empty() {
        return Some(Verdict {
            decision: Decision::Allow,
            reason: Reason::NotSelected,
        });
    }
    let no_request = Request {
        method: "",
        authority: None,
        path: "/",
        headers: crate::request::NO_HEADERS,
        source_is_local_node: false,
    };
    for p in &selected {
        let checked = CompiledPolicy::compile(p.namespace, p.name, p.spec);
        for (i, rule) in p.spec.ingress.iter().enumerate() {
            if rule.http.is_none()
                && checked.rule_is_valid(i)
                && rule_matches(p.namespace, rule, pod, port, source, &no_request, "/")
            {
                return Some(Verdict {
                    decision: Decision::Allow,
                    reason: Reason::Rule {
                        policy: p.name,
                        rule: i,
                    },
                });
            }
        }
    }
    None
}
