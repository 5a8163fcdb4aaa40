//! Synthetic policies and requests shared by the criterion bench and the `bench-policy`
//! example. Rules are spread over 10-rule policies that all select the pod `app=api` in
//! `shop`. Rule `i` lets ServiceAccount `ns-{i%50}/sa-{i}` call `GET|POST /api/v1/svc{i}/...`
//! and `GET /status/{i}` with header `x-tenant: t{i}`; every 100th rule is "generic"
//! (namespace selector + path regex), the kind no index can narrow.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use veil_l7_policy::{CompiledPolicy, L7PolicySpec, Pod, PortMatcher, Request, Settings, Source};

/// The protected pod's labels.
pub fn pod_labels() -> BTreeMap<String, String> {
    [("app".to_string(), "api".to_string())].into()
}

/// YAML of rule `i`.
fn rule_yaml(i: usize) -> String {
    if i % 100 == 99 {
        format!(
            "- from: [{{namespaceSelector: {{matchLabels: {{team: t{i}}}}}}}]\n  http: [{{methods: [GET], path: {{regex: '/r{i}/[0-9]+'}}}}]\n"
        )
    } else {
        format!(
            "- from: [{{serviceAccount: {{namespace: ns-{ns}, name: sa-{i}}}}}]\n  ports: [8080]\n  http:\n  \
             - {{methods: [GET, POST], path: {{prefix: /api/v1/svc{i}}}}}\n  \
             - {{methods: [GET], path: {{exact: /status/{i}}}, headers: [{{name: x-tenant, exact: t{i}}}]}}\n",
            ns = i % 50
        )
    }
}

/// `rules` rules in policies of `per_policy` rules each, compiled.
pub fn policies(rules: usize, per_policy: usize) -> Vec<Arc<CompiledPolicy>> {
    specs(rules, per_policy)
        .iter()
        .enumerate()
        .map(|(p, spec)| {
            Arc::new(CompiledPolicy::compile(
                "shop",
                &format!("policy-{p:05}"),
                spec,
            ))
        })
        .collect()
}

/// `rules` rules in policies of `per_policy` rules each, as specs.
pub fn specs(rules: usize, per_policy: usize) -> Vec<L7PolicySpec> {
    (0..rules.div_ceil(per_policy))
        .map(|p| {
            let mut yaml = String::from("podSelector: {matchLabels: {app: api}}\ningress:\n");
            for i in p * per_policy..((p + 1) * per_policy).min(rules) {
                yaml.push_str(&rule_yaml(i));
            }
            serde_yaml::from_str(&yaml).expect("workload spec parses")
        })
        .collect()
}

/// The matcher for port 8080 of the pod.
pub fn matcher(policies: &[Arc<CompiledPolicy>], labels: &BTreeMap<String, String>) -> PortMatcher {
    let pod = Pod {
        namespace: "shop",
        labels,
        named_ports: &[],
        probes: &[],
    };
    PortMatcher::new(&pod, 8080, policies, Settings::default())
}

/// One request: source (namespace, ServiceAccount, SPIFFE ID), method, path, headers.
pub struct Req {
    pub ns: String,
    pub sa: String,
    pub spiffe: String,
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub ns_labels: BTreeMap<String, String>,
}

impl Req {
    /// The source as the engine sees it.
    pub fn source(&self) -> Source<'_> {
        Source {
            spiffe_id: Some(&self.spiffe),
            namespace: Some(&self.ns),
            namespace_labels: Some(&self.ns_labels),
            pod_labels: None,
            service_account: Some(&self.sa),
        }
    }

    /// The request as the engine sees it.
    pub fn request(&self) -> Request<'_> {
        Request {
            method: self.method,
            authority: Some("api.shop.svc"),
            path: &self.path,
            headers: &self.headers,
            source_is_local_node: false,
        }
    }
}

/// `n` requests against `rules` rules: mostly allowed by a random rule, some denied.
pub fn requests(rules: usize, n: usize, seed: u64) -> Vec<Req> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let i = (next() as usize) % rules;
            let kind = next() % 10;
            let ns = format!("ns-{}", i % 50);
            let sa = format!("sa-{i}");
            let spiffe = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
            let (method, path, headers) = match kind {
                0..=5 => (
                    "GET",
                    format!("/api/v1/svc{i}/items/{}", next() % 1000),
                    vec![],
                ),
                6 => (
                    "GET",
                    format!("/status/{i}"),
                    vec![("x-tenant", format!("t{i}"))],
                ),
                7 => (
                    "GET",
                    format!("/status/{i}"),
                    vec![("x-tenant", "nope".to_string())],
                ),
                8 => ("DELETE", format!("/api/v1/svc{i}/items/1"), vec![]),
                _ => ("GET", format!("/api/v1/svc{}/x", (i + 1) % rules), vec![]),
            };
            Req {
                ns,
                sa,
                spiffe,
                method,
                path,
                headers,
                ns_labels: BTreeMap::new(),
            }
        })
        .collect()
}
