//! The compiled engine and the reference evaluator agree on random policies and requests.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

use crate::reference::{self, RefPolicy};
use crate::*;

const NS: &str = "shop";

fn selector() -> impl Strategy<Value = LabelSelector> {
    let label = (
        select(vec!["app", "tier"]),
        select(vec!["api", "web", "db"]),
    );
    let expr = (
        select(vec!["app", "tier"]),
        select(vec!["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]),
        option::of(vec(select(vec!["api", "web", "db"]), 0..3)),
    )
        .prop_map(|(k, op, values)| LabelSelectorRequirement {
            key: k.into(),
            operator: op.into(),
            values: values.map(|v| v.into_iter().map(String::from).collect()),
        });
    (option::of(vec(label, 0..2)), option::of(vec(expr, 0..2))).prop_map(|(ml, me)| LabelSelector {
        match_labels: ml.map(|l| {
            l.into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        match_expressions: me,
    })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        select(vec![
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/db",
            "spiffe://cluster.local/ns/shop/*",
            "spiffe://cluster.local/*",
            "spiffe://other.org/ns/shop/sa/web",
            "spiffe://cluster.local/ns/*/sa/web",
        ])
        .prop_map(|s| Peer {
            spiffe_id: Some(s.into()),
            ..Peer::default()
        }),
        (
            option::of(select(vec!["shop", "ops"])),
            select(vec!["web", "db", "prom"])
        )
            .prop_map(|(ns, name)| Peer {
                service_account: Some(ServiceAccountRef {
                    namespace: ns.map(String::from),
                    name: name.into()
                }),
                ..Peer::default()
            }),
        (
            option::of(vec(
                select(vec!["shop", "ops", "front"]).prop_map(String::from),
                0..3
            )),
            option::of(selector()),
            option::of(selector()),
        )
            .prop_map(|(namespaces, namespace_selector, pod_selector)| Peer {
                namespaces,
                namespace_selector,
                pod_selector,
                ..Peer::default()
            }),
    ]
}

fn path_match() -> impl Strategy<Value = PathMatch> {
    let p = || {
        select(vec![
            "/", "/api", "/api/", "/api/v1", "/admin", "/a/../b", "/login",
        ])
        .prop_map(String::from)
    };
    prop_oneof![
        p().prop_map(|e| PathMatch {
            exact: Some(e),
            ..PathMatch::default()
        }),
        p().prop_map(|e| PathMatch {
            prefix: Some(e),
            ..PathMatch::default()
        }),
        select(vec!["/api/.*", "/items/[0-9]+", "(", "/a|/b", ".*"]).prop_map(|e| PathMatch {
            regex: Some(e.into()),
            ..PathMatch::default()
        }),
        Just(PathMatch {
            exact: Some("/a".into()),
            prefix: Some("/a".into()),
            regex: None
        }),
    ]
}

fn header_match() -> impl Strategy<Value = HeaderMatch> {
    (
        select(vec!["x-a", "X-B"]),
        0..5usize,
        select(vec!["1", "2", "1.*", "["]),
    )
        .prop_map(|(name, kind, v)| {
            let mut h = HeaderMatch {
                name: name.into(),
                ..HeaderMatch::default()
            };
            match kind {
                0 => h.exact = Some(v.into()),
                1 => h.prefix = Some(v.into()),
                2 => h.regex = Some(v.into()),
                3 => h.present = Some(v == "1"),
                _ => {} // none set: invalid
            }
            h
        })
}

fn http_match() -> impl Strategy<Value = HttpMatch> {
    (
        option::of(vec(select(HttpMethod::ALL.to_vec()), 0..3)),
        option::of(path_match()),
        option::of(vec(header_match(), 0..3)),
        option::of(vec(
            select(vec![
                "api.example.com",
                "*.example.com",
                "API.example.com",
                "bad:80",
            ])
            .prop_map(String::from),
            0..2,
        )),
    )
        .prop_map(|(methods, path, headers, hosts)| HttpMatch {
            methods,
            path,
            headers,
            hosts,
        })
}

fn rule() -> impl Strategy<Value = IngressRule> {
    let port = prop_oneof![
        select(vec![80i64, 8080, 0]).prop_map(Port::Number),
        select(vec!["http", "metrics", "BAD"]).prop_map(|s| Port::Name(s.into())),
    ];
    (
        option::of(vec(peer(), 0..3)),
        option::of(vec(port, 0..3)),
        option::of(vec(http_match(), 0..3)),
    )
        .prop_map(|(from, ports, http)| IngressRule { from, ports, http })
}

fn spec() -> impl Strategy<Value = L7PolicySpec> {
    (selector(), any::<bool>(), vec(rule(), 0..4)).prop_map(|(pod_selector, audit, ingress)| {
        L7PolicySpec {
            pod_selector,
            mode: if audit { Mode::Audit } else { Mode::Enforce },
            ingress,
        }
    })
}

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    authority: Option<&'static str>,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    probe: bool,
    spiffe: Option<&'static str>,
    namespace: Option<&'static str>,
    sa: Option<&'static str>,
    ns_labels: Option<BTreeMap<String, String>>,
    pod_labels: Option<BTreeMap<String, String>>,
    port: u16,
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    vec(
        (
            select(vec!["app", "tier"]),
            select(vec!["api", "web", "db"]),
        ),
        0..3,
    )
    .prop_map(|l| {
        l.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn request() -> impl Strategy<Value = Req> {
    (
        (
            select(vec!["GET", "HEAD", "POST", "DELETE", "get", "BREW"]),
            option::of(select(vec![
                "api.example.com",
                "API.EXAMPLE.COM:443",
                "x.example.com",
                "example.com",
                "a@api.example.com",
                "api.example.com.",
                "api.example.com:",
                "[::1]:8080",
                "api%2eexample.com",
                "127.1",
            ])),
            select(vec![
                "/",
                "/api",
                "/api/",
                "/api/v1/x",
                "/apis",
                "/admin",
                "//admin",
                "/%61pi/v1",
                "/b",
                "/a/../b",
                "/items/7",
                "/login?x",
                "/a%2Fb",
                "/..",
                "x",
                "/API",
                "/healthz",
                "/ready",
                "/healthz#x",
                "/api;x",
                "/%2561pi",
                "/api%3F",
                "/caf%C0%AE",
                "http://api/api",
                "*",
            ]),
            vec(
                (
                    select(vec!["x-a", "X-A", "x-b"]),
                    select(vec!["1", "2", "12"]),
                ),
                0..4,
            ),
            any::<bool>(),
        ),
        (
            option::of(select(vec![
                "spiffe://cluster.local/ns/shop/sa/web",
                "spiffe://cluster.local/ns/shop/sa/db",
                "spiffe://cluster.local/ns/ops/sa/prom",
                "spiffe://other.org/ns/shop/sa/web",
                "spiffe://cluster.local/ns/shop",
            ])),
            option::of(select(vec!["shop", "ops", "front"])),
            option::of(select(vec!["web", "db", "prom"])),
            option::of(labels()),
            option::of(labels()),
            select(vec![80u16, 8080, 9090]),
        ),
    )
        .prop_map(
            |(
                (method, authority, path, headers, probe),
                (spiffe, namespace, sa, ns_labels, pod_labels, port),
            )| Req {
                method,
                authority,
                path,
                headers,
                probe,
                spiffe,
                namespace,
                sa,
                ns_labels,
                pod_labels,
                port,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn policy_engine_matches_reference(
        specs in vec(spec(), 0..4),
        pod_labels in labels(),
        reqs in vec(request(), 1..8),
        probes_allowed in any::<bool>(),
        probes in vec(
            (select(vec![80u16, 8080, 9090]), select(vec!["/healthz", "healthz", "//api/../healthz", "/ready?full=1", "/a%2Fb", ""])),
            0..3,
        ),
    ) {
        let names: Vec<String> = (0..specs.len()).map(|i| format!("p{}", (i * 7) % 5)).collect();
        let named = [("http", 8080u16), ("metrics", 9090u16)];
        let probes: Vec<Probe<'_>> = probes.iter().map(|&(port, path)| Probe { port, path }).collect();
        let pod = Pod { namespace: NS, labels: &pod_labels, named_ports: &named, probes: &probes };
        let settings = Settings { allow_local_node_probes: probes_allowed };
        let compiled: Vec<Arc<CompiledPolicy>> =
            specs.iter().zip(&names).map(|(s, n)| Arc::new(CompiledPolicy::compile(NS, n, s))).collect();
        let refs: Vec<RefPolicy<'_>> =
            specs.iter().zip(&names).map(|(s, n)| RefPolicy { namespace: NS, name: n, spec: s }).collect();
        for r in &reqs {
            let matcher = PortMatcher::new(&pod, r.port, &compiled, settings);
            let source = Source {
                spiffe_id: r.spiffe,
                namespace: r.namespace,
                namespace_labels: r.ns_labels.as_ref(),
                pod_labels: r.pod_labels.as_ref(),
                service_account: r.sa,
            };
            let request = Request {
                method: r.method,
                authority: r.authority,
                path: r.path,
                headers: &r.headers,
                source_is_local_node: r.probe,
            };
            prop_assert_eq!(
                matcher.evaluate_connection(&source),
                reference::evaluate_connection(&pod, r.port, &refs, &source),
                "connection {:?}", r
            );
            let got = matcher.evaluate(&source, &request);
            let want = reference::evaluate(&pod, r.port, &refs, settings, &source, &request);
            prop_assert_eq!(got, want, "request {:?}", r);
        }
    }
}
