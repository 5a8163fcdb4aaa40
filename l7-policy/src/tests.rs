//! Golden cases for every field and for path-normalisation bypass attempts. Every case is
//! judged by both the compiled engine and the reference evaluator.

use std::sync::Arc;

use crate::reference::{self, RefPolicy};
use crate::request::NO_HEADERS;
use crate::*;

const NS: &str = "shop";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A little world: the pod `app=api` in `shop`, named port `http` = 8080.
struct World {
    specs: Vec<(String, L7PolicySpec)>,
    pod_labels: Labels,
    settings: Settings,
    /// The pod's declared `httpGet` probes (port, path).
    probes: Vec<(u16, &'static str)>,
}

impl World {
    fn new(policies: &[(&str, &str)]) -> World {
        let specs = policies
            .iter()
            .map(|(name, yaml)| {
                (
                    name.to_string(),
                    serde_yaml::from_str(yaml).expect("spec parses"),
                )
            })
            .collect();
        World {
            specs,
            pod_labels: labels(&[("app", "api")]),
            settings: Settings::default(),
            probes: vec![(8080, "/healthz")],
        }
    }

    /// Builds the pod, the engine's matcher for `port` and the reference policies, and
    /// hands them to `f`.
    fn with_matcher<R>(
        &self,
        port: u16,
        f: impl FnOnce(&Pod<'_>, &PortMatcher, &[RefPolicy<'_>]) -> R,
    ) -> R {
        let named = [("http", 8080u16)];
        let probes: Vec<Probe<'_>> = self
            .probes
            .iter()
            .map(|&(port, path)| Probe { port, path })
            .collect();
        let pod = Pod {
            namespace: NS,
            labels: &self.pod_labels,
            named_ports: &named,
            probes: &probes,
        };
        let compiled: Vec<Arc<CompiledPolicy>> = self
            .specs
            .iter()
            .map(|(n, s)| Arc::new(CompiledPolicy::compile(NS, n, s)))
            .collect();
        let m = PortMatcher::new(&pod, port, &compiled, self.settings);
        let refs: Vec<RefPolicy<'_>> = self
            .specs
            .iter()
            .map(|(n, s)| RefPolicy {
                namespace: NS,
                name: n,
                spec: s,
            })
            .collect();
        f(&pod, &m, &refs)
    }

    /// Judges with both evaluators, asserts they agree, and returns an owned summary.
    fn judge(
        &self,
        port: u16,
        src: &Source<'_>,
        req: &Request<'_>,
    ) -> (Decision, Option<String>, Option<usize>) {
        self.with_matcher(port, |pod, m, refs| {
            let got = m.evaluate(src, req);
            let want = reference::evaluate(pod, port, refs, self.settings, src, req);
            assert_eq!(got, want, "engine and reference disagree on {req:?}");
            let rule = match got.reason {
                Reason::Rule { rule, .. } => Some(rule),
                _ => None,
            };
            (got.decision, got.policy().map(str::to_owned), rule)
        })
    }

    /// Judges a connection with both evaluators: `None` if HTTP must be parsed, else the
    /// allowing policy and rule (`None` and `None` for a pod no policy selects).
    fn connection(&self, port: u16, src: &Source<'_>) -> Option<(Option<String>, Option<usize>)> {
        self.with_matcher(port, |pod, m, refs| {
            let got = m.evaluate_connection(src);
            let want = reference::evaluate_connection(pod, port, refs, src);
            assert_eq!(got, want, "engine and reference disagree on a connection");
            got.map(|v| {
                assert_eq!(v.decision, Allow);
                let rule = match v.reason {
                    Reason::Rule { rule, .. } => Some(rule),
                    _ => None,
                };
                (v.policy().map(str::to_owned), rule)
            })
        })
    }

    fn decide(
        &self,
        src: &Source<'_>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Decision {
        self.decide_full(8080, src, method, Some("api.shop.svc"), path, headers)
    }

    fn decide_full(
        &self,
        port: u16,
        src: &Source<'_>,
        method: &str,
        authority: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Decision {
        let headers = headers.to_vec();
        let req = Request {
            method,
            authority,
            path,
            headers: &headers,
            source_is_local_node: false,
        };
        self.judge(port, src, &req).0
    }
}

fn src_sa<'a>(ns: &'a str, sa: &'a str, id: &'a str) -> Source<'a> {
    Source {
        spiffe_id: Some(id),
        namespace: Some(ns),
        service_account: Some(sa),
        ..Source::default()
    }
}

const ANY: Source<'static> = Source {
    spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/web"),
    namespace: Some("shop"),
    namespace_labels: None,
    pod_labels: None,
    service_account: Some("web"),
};

use Decision::{Allow, AuditDeny, Deny};

#[test]
fn policy_golden_not_selected_allows() {
    let w = World::new(&[("p", "podSelector: {matchLabels: {app: other}}\n")]);
    assert_eq!(w.decide(&ANY, "GET", "/x", &[]), Allow);
}

#[test]
fn policy_golden_default_deny_and_deny_all() {
    let w = World::new(&[("deny-all", "podSelector: {}\n")]);
    assert_eq!(w.decide(&ANY, "GET", "/", &[]), Deny);
    let (_, policy, _) = w.judge(
        8080,
        &ANY,
        &Request {
            method: "GET",
            authority: None,
            path: "/",
            headers: NO_HEADERS,
            source_is_local_node: false,
        },
    );
    assert_eq!(policy.as_deref(), Some("deny-all"));
}

#[test]
fn policy_golden_audit_mode() {
    let w = World::new(&[(
        "a",
        "podSelector: {}\nmode: audit\ningress:\n- http: [{path: {exact: /ok}}]\n",
    )]);
    assert_eq!(w.decide(&ANY, "GET", "/ok", &[]), Allow);
    assert_eq!(w.decide(&ANY, "GET", "/nope", &[]), AuditDeny);
    // An enforce policy beside it makes denials real, and audit rules still allow.
    let w = World::new(&[
        (
            "a",
            "podSelector: {}\nmode: audit\ningress:\n- http: [{path: {exact: /ok}}]\n",
        ),
        (
            "b",
            "podSelector: {}\ningress:\n- http: [{path: {exact: /other}}]\n",
        ),
    ]);
    assert_eq!(w.decide(&ANY, "GET", "/ok", &[]), Allow);
    assert_eq!(w.decide(&ANY, "GET", "/other", &[]), Allow);
    assert_eq!(w.decide(&ANY, "GET", "/nope", &[]), Deny);
}

#[test]
fn policy_golden_verdict_names_policy_and_rule() {
    let w = World::new(&[
        ("zeta", "podSelector: {}\ningress:\n- http: [{path: {prefix: /}}]\n"),
        ("alpha", "podSelector: {}\ningress:\n- http: [{methods: [POST]}]\n- http: [{path: {prefix: /a}}]\n"),
    ]);
    let req = Request {
        method: "GET",
        authority: None,
        path: "/a/b",
        headers: NO_HEADERS,
        source_is_local_node: false,
    };
    assert_eq!(
        w.judge(8080, &ANY, &req),
        (Allow, Some("alpha".into()), Some(1))
    );
    let req = Request { path: "/z", ..req };
    assert_eq!(
        w.judge(8080, &ANY, &req),
        (Allow, Some("zeta".into()), Some(0))
    );
}

#[test]
fn policy_golden_local_node_probe() {
    let mut w = World::new(&[("deny-all", "podSelector: {}\n")]);
    let req = Request {
        method: "GET",
        authority: None,
        path: "/healthz",
        headers: NO_HEADERS,
        source_is_local_node: true,
    };
    assert_eq!(w.judge(8080, &Source::default(), &req).0, Allow);
    w.settings.allow_local_node_probes = false;
    assert_eq!(w.judge(8080, &Source::default(), &req).0, Deny);
}

#[test]
fn policy_golden_from_spiffe_ids() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- from:\n  - spiffeId: spiffe://cluster.local/ns/shop/sa/web\n  - spiffeId: spiffe://cluster.local/ns/batch/*\n",
    )]);
    assert_eq!(w.decide(&ANY, "GET", "/", &[]), Allow);
    let other = src_sa("shop", "db", "spiffe://cluster.local/ns/shop/sa/db");
    assert_eq!(w.decide(&other, "GET", "/", &[]), Deny);
    let batch = src_sa("batch", "x", "spiffe://cluster.local/ns/batch/sa/x");
    assert_eq!(w.decide(&batch, "GET", "/", &[]), Allow);
    let batchy = src_sa("batchy", "x", "spiffe://cluster.local/ns/batchy/sa/x");
    assert_eq!(w.decide(&batchy, "GET", "/", &[]), Deny);
    let bare = Source {
        spiffe_id: Some("spiffe://cluster.local/ns/batch"),
        ..Source::default()
    };
    assert_eq!(w.decide(&bare, "GET", "/", &[]), Deny);
    assert_eq!(w.decide(&Source::default(), "GET", "/", &[]), Deny);
}

#[test]
fn policy_golden_from_service_accounts() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- from:\n  - serviceAccount: {name: web}\n  - serviceAccount: {namespace: ops, name: prom}\n",
    )]);
    assert_eq!(
        w.decide(&src_sa("shop", "web", "x"), "GET", "/", &[]),
        Allow
    );
    assert_eq!(
        w.decide(&src_sa("other", "web", "x"), "GET", "/", &[]),
        Deny
    );
    assert_eq!(
        w.decide(&src_sa("ops", "prom", "x"), "GET", "/", &[]),
        Allow
    );
    assert_eq!(w.decide(&src_sa("ops", "web", "x"), "GET", "/", &[]), Deny);
}

#[test]
fn policy_golden_from_namespaces_and_pods() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n\
         - from: [{namespaces: [front, edge]}]\n\
         - from: [{namespaceSelector: {matchLabels: {team: pay}}}]\n\
         - from: [{podSelector: {matchLabels: {role: cron}}}]\n\
         - from: [{namespaces: [jobs], podSelector: {matchExpressions: [{key: tier, operator: In, values: [batch]}]}}]\n",
    )]);
    let nl_pay = labels(&[("team", "pay")]);
    let nl_other = labels(&[("team", "x")]);
    let cron = labels(&[("role", "cron")]);
    let batch = labels(&[("tier", "batch")]);
    let mk = |ns: &'static str, nl: Option<&'static Labels>, pl: Option<&'static Labels>| Source {
        namespace: Some(ns),
        namespace_labels: nl,
        pod_labels: pl,
        ..Source::default()
    };
    let leak = |l: Labels| -> &'static Labels { Box::leak(Box::new(l)) };
    let (nl_pay, nl_other, cron, batch) = (leak(nl_pay), leak(nl_other), leak(cron), leak(batch));
    assert_eq!(w.decide(&mk("front", None, None), "GET", "/", &[]), Allow);
    assert_eq!(w.decide(&mk("back", None, None), "GET", "/", &[]), Deny);
    assert_eq!(
        w.decide(&mk("any", Some(nl_pay), None), "GET", "/", &[]),
        Allow
    );
    assert_eq!(
        w.decide(&mk("any", Some(nl_other), None), "GET", "/", &[]),
        Deny
    );
    // podSelector alone: pods of the policy's own namespace.
    assert_eq!(
        w.decide(&mk("shop", None, Some(cron)), "GET", "/", &[]),
        Allow
    );
    assert_eq!(
        w.decide(&mk("else", None, Some(cron)), "GET", "/", &[]),
        Deny
    );
    assert_eq!(
        w.decide(&mk("jobs", None, Some(batch)), "GET", "/", &[]),
        Allow
    );
    assert_eq!(
        w.decide(&mk("jobs", None, Some(cron)), "GET", "/", &[]),
        Deny
    );
    assert_eq!(w.decide(&mk("jobs", None, None), "GET", "/", &[]), Deny);
}

#[test]
fn policy_golden_empty_from_is_any_source() {
    let w = World::new(&[("p", "podSelector: {}\ningress:\n- from: []\n")]);
    assert_eq!(w.decide(&Source::default(), "GET", "/", &[]), Allow);
}

#[test]
fn policy_golden_ports() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- ports: [9090]\n- ports: [http]\n  http: [{methods: [GET]}]\n",
    )]);
    assert_eq!(w.decide_full(9090, &ANY, "POST", None, "/", &[]), Allow);
    assert_eq!(w.decide_full(8080, &ANY, "GET", None, "/", &[]), Allow);
    assert_eq!(w.decide_full(8080, &ANY, "POST", None, "/", &[]), Deny);
    // Default deny covers every port of a selected pod.
    assert_eq!(w.decide_full(7000, &ANY, "GET", None, "/", &[]), Deny);
}

#[test]
fn policy_golden_methods() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{methods: [GET, HEAD]}]\n",
    )]);
    assert_eq!(w.decide(&ANY, "GET", "/", &[]), Allow);
    assert_eq!(w.decide(&ANY, "HEAD", "/", &[]), Allow);
    assert_eq!(w.decide(&ANY, "get", "/", &[]), Deny);
    assert_eq!(w.decide(&ANY, "DELETE", "/", &[]), Deny);
    assert_eq!(w.decide(&ANY, "PROPFIND", "/", &[]), Deny);
}

#[test]
fn policy_golden_path_exact_prefix_regex() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http:\n  - path: {exact: /login}\n  - path: {prefix: /api/}\n  - path: {regex: '/items/[0-9]+'}\n",
    )]);
    for (path, want) in [
        ("/login", Allow),
        ("/login/", Deny),
        ("/login?next=/admin", Allow),
        ("/api", Allow),
        ("/api/", Allow),
        ("/api/v1/x", Allow),
        ("/apis", Deny),
        ("/items/42", Allow),
        ("/items/42/x", Deny),
        ("/x/items/42", Deny),
        ("/items/abc", Deny),
    ] {
        assert_eq!(w.decide(&ANY, "GET", path, &[]), want, "{path}");
    }
}

#[test]
fn policy_golden_path_prefix_root() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{path: {prefix: /}}]\n",
    )]);
    assert_eq!(w.decide(&ANY, "GET", "/anything/at/all", &[]), Allow);
    assert_eq!(w.decide(&ANY, "GET", "not-a-path", &[]), Deny);
}

#[test]
fn policy_golden_normalisation_bypass_attempts() {
    // Only /public is open; /admin must stay closed however it is spelled.
    let w = World::new(&[
        ("p", "podSelector: {}\ningress:\n- http: [{path: {prefix: /public}}]\n"),
        ("q", "podSelector: {}\ningress:\n- http: [{path: {exact: /admin}}]\n  from: [{serviceAccount: {name: root}}]\n"),
    ]);
    for path in [
        "/admin",
        "//admin",
        "/./admin",
        "/a/../admin",
        "/%61dmin",
        "/ADMIN",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public%2F..%2Fadmin",
        "/public%2f..%2fadmin",
        "/public/..%5Cadmin",
        "/public\\..\\admin",
        "/public/..;/admin",
        "/public/%00/../admin",
        "/public/../../admin",
        "/publicadmin",
        "/public%",
        "/public/caf\u{e9}",
    ] {
        assert_ne!(
            w.decide(&ANY, "GET", path, &[]),
            Allow,
            "{path} must not be allowed"
        );
    }
    for path in [
        "/public",
        "//public",
        "/./public/x",
        "/x/../public",
        "/%70ublic/a",
        "/public/a?x=/../admin",
    ] {
        assert_eq!(
            w.decide(&ANY, "GET", path, &[]),
            Allow,
            "{path} should be allowed"
        );
    }
    // The admin rule is reachable by its own ServiceAccount under every spelling.
    let root = src_sa("shop", "root", "spiffe://cluster.local/ns/shop/sa/root");
    for path in [
        "/admin",
        "//admin",
        "/./admin",
        "/a/../admin",
        "/%61dmin",
        "/%61%64%6d%69%6e",
    ] {
        assert_eq!(w.decide(&root, "GET", path, &[]), Allow, "{path}");
    }
    assert_eq!(
        w.decide(&root, "GET", "/ADMIN", &[]),
        Deny,
        "matching is case-sensitive"
    );
    let req = Request {
        method: "GET",
        authority: None,
        path: "/a%2Fb",
        headers: NO_HEADERS,
        source_is_local_node: false,
    };
    let named = [];
    let pod_labels = labels(&[]);
    let pod = Pod {
        namespace: NS,
        labels: &pod_labels,
        named_ports: &named,
        probes: &[],
    };
    let compiled = [Arc::new(CompiledPolicy::compile(NS, "p", &w.specs[0].1))];
    let m = PortMatcher::new(&pod, 80, &compiled, Settings::default());
    assert_eq!(
        m.evaluate(&ANY, &req).reason,
        Reason::InvalidPath {
            policy: "p",
            error: PathError::EncodedSlash
        }
    );
}

#[test]
fn policy_golden_headers() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http:\n  - headers:\n    - {name: X-Tenant, exact: acme}\n    - {name: authorization, prefix: 'Bearer '}\n  - headers: [{name: x-version, regex: 'v[12]'}]\n  - headers: [{name: x-debug, present: true}, {name: x-prod, present: false}]\n",
    )]);
    assert_eq!(
        w.decide(
            &ANY,
            "GET",
            "/",
            &[("x-tenant", "acme"), ("Authorization", "Bearer t")]
        ),
        Allow
    );
    assert_eq!(
        w.decide(
            &ANY,
            "GET",
            "/",
            &[("x-tenant", "ACME"), ("authorization", "Bearer t")]
        ),
        Deny
    );
    assert_eq!(w.decide(&ANY, "GET", "/", &[("x-tenant", "acme")]), Deny);
    // Every value of a repeated header must match (see the hardening tests).
    assert_eq!(
        w.decide(
            &ANY,
            "GET",
            "/",
            &[
                ("x-tenant", "evil"),
                ("x-tenant", "acme"),
                ("authorization", "Bearer t")
            ]
        ),
        Deny
    );
    assert_eq!(w.decide(&ANY, "GET", "/", &[("x-version", "v2")]), Allow);
    assert_eq!(w.decide(&ANY, "GET", "/", &[("x-version", "v22")]), Deny);
    assert_eq!(w.decide(&ANY, "GET", "/", &[("x-debug", "")]), Allow);
    assert_eq!(
        w.decide(&ANY, "GET", "/", &[("x-debug", "1"), ("x-prod", "1")]),
        Deny
    );
}

#[test]
fn policy_golden_hosts() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{hosts: [api.example.com, '*.shop.svc']}]\n",
    )]);
    for (authority, want) in [
        (Some("api.example.com"), Allow),
        (Some("API.Example.com:8443"), Allow),
        (Some("api.example.com."), Allow),
        (Some("x.api.example.com"), Deny),
        (Some("api.shop.svc"), Allow),
        (Some("a.b.shop.svc"), Allow),
        (Some("shop.svc"), Deny),
        (Some("evil@api.example.com"), Deny),
        (None, Deny),
    ] {
        assert_eq!(
            w.decide_full(8080, &ANY, "GET", authority, "/", &[]),
            want,
            "{authority:?}"
        );
    }
}

#[test]
fn policy_golden_invalid_rule_matches_nothing() {
    // Rule 0 has a bad regex: it must not become "any path"; rule 1 stays in force.
    let spec = "podSelector: {}\ningress:\n- http: [{path: {regex: '(unclosed'}}]\n- http: [{path: {exact: /ok}}]\n";
    let w = World::new(&[("p", spec)]);
    assert_eq!(w.decide(&ANY, "GET", "/anything", &[]), Deny);
    assert_eq!(w.decide(&ANY, "GET", "/ok", &[]), Allow);
    let parsed: L7PolicySpec = serde_yaml::from_str(spec).unwrap();
    let errors = validate(NS, "p", &parsed);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with("spec.ingress[0].http[0].path.regex: invalid regex"),
        "{}",
        errors[0]
    );
}

#[test]
fn policy_golden_invalid_selector_selects_everything() {
    let spec = "podSelector: {matchExpressions: [{key: app, operator: Near, values: [x]}]}\ningress:\n- http: [{path: {exact: /ok}}]\n";
    let w = World::new(&[("p", spec)]);
    assert_eq!(w.decide(&ANY, "GET", "/other", &[]), Deny);
    assert_eq!(w.decide(&ANY, "GET", "/ok", &[]), Allow);
}

#[test]
fn policy_golden_validation_messages_name_fields() {
    let cases = [
        ("podSelector: {}\ningress:\n- {}\n", "spec.ingress[0]: a rule must set at least one of"),
        ("podSelector: {}\ningress:\n- ports: [0]\n", "spec.ingress[0].ports[0]: port 0 is out of range"),
        ("podSelector: {}\ningress:\n- ports: [70000]\n", "spec.ingress[0].ports[0]: port 70000"),
        ("podSelector: {}\ningress:\n- ports: [HTTP]\n", "spec.ingress[0].ports[0]: \"HTTP\" is not a valid port name"),
        ("podSelector: {}\ningress:\n- ports: [http--x]\n", "spec.ingress[0].ports[0]"),
        ("podSelector: {}\ningress:\n- ports: [\"8080\"]\n", "spec.ingress[0].ports[0]"),
        ("podSelector: {}\ningress:\n- http: [{path: {exact: /a, prefix: /b}}]\n", "spec.ingress[0].http[0].path: path must set exactly one"),
        ("podSelector: {}\ningress:\n- http: [{}, {path: {regex: 'a(b'}}]\n", "spec.ingress[0].http[0]: an http match must set"),
        ("podSelector: {}\ningress:\n- http: [{methods: [GET]}, {path: {regex: 'a(b'}}]\n", "spec.ingress[0].http[1].path.regex: invalid regex"),
        ("podSelector: {}\ningress:\n- http: [{path: {prefix: /a/../b}}]\n", "spec.ingress[0].http[0].path.prefix: \"/a/../b\" is not in normal form"),
        ("podSelector: {}\ningress:\n- http: [{path: {exact: '/a?b'}}]\n", "spec.ingress[0].http[0].path.exact: must not contain '?'"),
        ("podSelector: {}\ningress:\n- http: [{headers: [{name: x, exact: a, present: true}]}]\n", "spec.ingress[0].http[0].headers[0]: a header match must set exactly one"),
        ("podSelector: {}\ningress:\n- http: [{headers: [{name: 'a b', present: true}]}]\n", "spec.ingress[0].http[0].headers[0].name"),
        ("podSelector: {}\ningress:\n- http: [{headers: [{name: x, regex: '['}]}]\n", "spec.ingress[0].http[0].headers[0].regex: invalid regex"),
        ("podSelector: {}\ningress:\n- http: [{hosts: ['api.example.com:80']}]\n", "spec.ingress[0].http[0].hosts[0]"),
        ("podSelector: {}\ningress:\n- from: [{spiffeId: 'spiffe://td/ns/*/sa/x'}]\n", "spec.ingress[0].from[0].spiffeId"),
        ("podSelector: {}\ningress:\n- from: [{spiffeId: 'http://x'}]\n", "spec.ingress[0].from[0].spiffeId"),
        ("podSelector: {}\ningress:\n- from: [{spiffeId: spiffe://td/a, namespaces: [x]}]\n", "spec.ingress[0].from[0]: a peer must set exactly one"),
        ("podSelector: {}\ningress:\n- from: [{namespaces: [a], namespaceSelector: {}}]\n", "spec.ingress[0].from[0]: namespaces and namespaceSelector"),
        ("podSelector: {}\ningress:\n- from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]\n", "spec.ingress[0].from[0].podSelector.matchExpressions[0].values"),
        ("podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n", "spec.podSelector.matchExpressions[0].values"),
        ("podSelector: {}\ningress:\n- http: [{methods: []}]\n", "spec.ingress[0].http[0].methods"),
    ];
    for (yaml, want) in cases {
        let spec: L7PolicySpec =
            serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let errors = validate(NS, "p", &spec);
        assert!(
            errors.iter().any(|e| e.to_string().contains(want)),
            "{yaml}: want {want:?}, got {errors:?}"
        );
    }
}

#[test]
fn policy_golden_status_condition() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let ok = accepted_status(Some(3), &[], now.clone());
    assert_eq!(ok.observed_generation, Some(3));
    assert_eq!(
        (
            ok.conditions[0].type_.as_str(),
            ok.conditions[0].status.as_str()
        ),
        ("Accepted", "True")
    );
    let bad = accepted_status(
        Some(4),
        &[FieldError::new(
            "spec.ingress[0].ports[0]",
            "port 0 is out of range",
        )],
        now,
    );
    assert_eq!(bad.conditions[0].status, "False");
    assert_eq!(bad.conditions[0].reason, "Invalid");
    assert!(bad.conditions[0]
        .message
        .starts_with("spec.ingress[0].ports[0]: port 0"));
}

#[test]
fn policy_golden_pod_selection() {
    let yaml = |sel: &str| -> L7Policy {
        let mut p = L7Policy::new(
            "p",
            serde_yaml::from_str(&format!("podSelector: {sel}\n")).unwrap(),
        );
        p.metadata.namespace = Some(NS.into());
        p
    };
    let policies = [
        yaml("{matchLabels: {app: api}}"),
        yaml("{matchLabels: {app: web}}"),
        yaml("{}"),
        yaml("{matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}"),
        yaml("{matchExpressions: [{key: app, operator: Bogus}]}"),
    ];
    let got = policies_selecting(NS, &labels(&[("app", "api")]), &policies);
    assert_eq!(
        got.len(),
        4,
        "all but app=web (the invalid selector selects everything)"
    );
    assert!(policies_selecting("other", &labels(&[("app", "api")]), &policies).is_empty());
}

// Issue 11 section 5: each test below fails on the engine before the hardening.

/// The pod's verdict reason for `req` on port 8080, both evaluators agreeing.
fn reason_of(w: &World, req: &Request<'_>) -> String {
    let named = [("http", 8080u16)];
    let probes: Vec<Probe<'_>> = w
        .probes
        .iter()
        .map(|&(port, path)| Probe { port, path })
        .collect();
    let pod = Pod {
        namespace: NS,
        labels: &w.pod_labels,
        named_ports: &named,
        probes: &probes,
    };
    let compiled: Vec<Arc<CompiledPolicy>> = w
        .specs
        .iter()
        .map(|(n, s)| Arc::new(CompiledPolicy::compile(NS, n, s)))
        .collect();
    w.judge(8080, &ANY, req);
    let m = PortMatcher::new(&pod, 8080, &compiled, w.settings);
    format!("{:?}", m.evaluate(&ANY, req).reason)
}

fn get(path: &str) -> Request<'_> {
    Request {
        method: "GET",
        authority: Some("api.shop.svc"),
        path,
        headers: NO_HEADERS,
        source_is_local_node: false,
    }
}

#[test]
fn hardening_duplicate_headers_every_value_must_match() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http:\n  - headers: [{name: x-tenant, exact: acme}]\n    path: {exact: /exact}\n  - headers: [{name: x-tenant, prefix: ac}]\n    path: {exact: /prefix}\n  - headers: [{name: x-tenant, regex: 'a.*'}]\n    path: {exact: /regex}\n  - headers: [{name: x-debug, present: false}]\n    path: {exact: /absent}\n",
    )]);
    for path in ["/exact", "/prefix", "/regex"] {
        let good = [("x-tenant", "acme")];
        assert_eq!(w.decide(&ANY, "GET", path, &good), Allow, "{path}");
        let twice = [("x-tenant", "acme"), ("X-Tenant", "acme")];
        assert_eq!(w.decide(&ANY, "GET", path, &twice), Allow, "{path}");
        // One good and one bad value, in either order: the backend may read either.
        let mixed = [("x-tenant", "acme"), ("x-tenant", "evil")];
        assert_eq!(w.decide(&ANY, "GET", path, &mixed), Deny, "{path}");
        let mixed = [("X-TENANT", "evil"), ("x-tenant", "acme")];
        assert_eq!(w.decide(&ANY, "GET", path, &mixed), Deny, "{path}");
        assert_eq!(w.decide(&ANY, "GET", path, &[]), Deny, "{path}: absent");
    }
    assert_eq!(w.decide(&ANY, "GET", "/absent", &[]), Allow);
    assert_eq!(
        w.decide(&ANY, "GET", "/absent", &[("x-debug", "")]),
        Deny,
        "an empty value is still a value"
    );
}

#[test]
fn hardening_ambiguous_targets_are_refused_not_guessed() {
    // Rules a backend could be tricked around: a suffix regex (Spring/Tomcat strip `;...`)
    // and an open prefix (double decoding, fragments, encoded `?`, overlong UTF-8).
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http:\n  - path: {regex: '.*\\.css'}\n  - path: {prefix: /public}\n",
    )]);
    for (path, error) in [
        ("/admin;x.css", "Parameters"),
        ("/admin;.css", "Parameters"),
        ("/public/x#/../../admin", "Fragment"),
        ("/public#", "Fragment"),
        ("/public?a#b", "Fragment"),
        ("/public/%252e%252e/admin", "DoubleEncoding"),
        ("/public/%25", "DoubleEncoding"),
        ("/public/x%3F/../../admin", "EncodedDelimiter"),
        ("/public/x%23", "EncodedDelimiter"),
        ("/public/x%3b.css", "EncodedDelimiter"),
        ("/public/%C0%AE%C0%AE/admin", "InvalidUtf8"),
        ("/public/%E0%80%AE", "InvalidUtf8"),
        ("/public/%C3", "InvalidUtf8"),
        ("/public/%80", "InvalidUtf8"),
        ("/public/%ED%A0%80", "InvalidUtf8"),
        ("http://api.shop.svc/public", "AbsoluteForm"),
        ("*", "AsteriskForm"),
        ("public", "NotAbsolute"),
    ] {
        let reason = reason_of(&w, &get(path));
        assert!(
            reason.starts_with("InvalidPath") && reason.contains(error),
            "{path}: want InvalidPath {error}, got {reason}"
        );
    }
    // What stays accepted: the normal spellings, and valid UTF-8 escapes.
    for path in [
        "/public/a.css",
        "/public/caf%C3%A9",
        "/public/%c3%a9",
        "//public",
    ] {
        assert_eq!(w.decide(&ANY, "GET", path, &[]), Allow, "{path}");
    }
}

#[test]
fn hardening_regex_cannot_escape_its_anchors() {
    // Wrapped naively, `a)|(.*` becomes `^(?:a)|(.*)$`: "starts with a, or anything".
    for (yaml, field) in [
        (
            "podSelector: {}\ningress:\n- http: [{path: {regex: 'a)|(.*'}}]\n",
            "spec.ingress[0].http[0].path.regex: invalid regex",
        ),
        (
            "podSelector: {}\ningress:\n- http: [{headers: [{name: x, regex: 'a)|(.*'}]}]\n",
            "spec.ingress[0].http[0].headers[0].regex: invalid regex",
        ),
        (
            "podSelector: {}\ningress:\n- http: [{path: {regex: '(?x)/a #'}}]\n",
            "spec.ingress[0].http[0].path.regex: regex cannot be anchored",
        ),
        (
            "podSelector: {}\ningress:\n- http: [{path: {regex: '((((((((((((((((((((((((((((((((((a))))))))))))))))))))))))))))))))))'}}]\n",
            "spec.ingress[0].http[0].path.regex: invalid regex",
        ),
        (
            "podSelector: {}\ningress:\n- http: [{path: {regex: '(?:a{1000}){1000}'}}]\n",
            "spec.ingress[0].http[0].path.regex: invalid regex",
        ),
    ] {
        let spec: L7PolicySpec = serde_yaml::from_str(yaml).expect("spec parses");
        let errors = validate(NS, "p", &spec);
        assert!(
            errors.iter().any(|e| e.to_string().starts_with(field)),
            "{yaml}: want {field:?}, got {errors:?}"
        );
        let w = World::new(&[("p", yaml)]);
        assert_eq!(
            w.decide(&ANY, "GET", "/anything", &[("x", "anything")]),
            Deny
        );
    }
}

#[test]
fn hardening_over_limit_requests_are_denied_with_their_own_reason() {
    use crate::limits::*;
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{path: {prefix: /}}]\n",
    )]);
    let long_path = format!("/{}", "a".repeat(MAX_TARGET_BYTES));
    let long_query = format!("/?{}", "a".repeat(MAX_TARGET_BYTES));
    let max_path = format!("/{}", "a".repeat(MAX_TARGET_BYTES - 1));
    let many: Vec<(String, String)> = (0..=MAX_HEADER_COUNT)
        .map(|i| (format!("x-{i}"), String::new()))
        .collect();
    let big_value = "v".repeat(MAX_HEADER_FIELD_BYTES);
    let big = [("x-big", big_value.as_str())];
    let value = "v".repeat(MAX_HEADER_FIELD_BYTES - 8);
    let bulky: Vec<(String, &str)> = (0..MAX_HEADER_BYTES / MAX_HEADER_FIELD_BYTES + 1)
        .map(|i| (format!("x-{i}"), value.as_str()))
        .collect();
    let cases: [(&str, &dyn HeaderLookup, &str); 5] = [
        (&long_path, NO_HEADERS, "Target"),
        (&long_query, NO_HEADERS, "Target"),
        ("/", &many, "HeaderCount"),
        ("/", &big, "HeaderField"),
        ("/", &bulky, "HeaderBytes"),
    ];
    for (path, headers, limit) in cases {
        let req = Request {
            headers,
            ..get(path)
        };
        let reason = reason_of(&w, &req);
        assert_eq!(
            reason,
            format!("OverLimit {{ policy: \"p\", limit: {limit} }}"),
            "{limit}"
        );
    }
    // At the limits exactly, the request is judged as usual.
    assert_eq!(w.decide(&ANY, "GET", &max_path, &[]), Allow);
    let most: Vec<(String, String)> = many.iter().skip(1).cloned().collect();
    let req = Request {
        headers: &most,
        ..get("/")
    };
    assert_eq!(w.judge(8080, &ANY, &req).0, Allow);
}

#[test]
fn hardening_matching_work_is_linear_in_path_length() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{path: {prefix: /a/b}}, {path: {prefix: /api/v1/items}}]\n",
    )]);
    let named = [];
    let pod = Pod {
        namespace: NS,
        labels: &w.pod_labels,
        named_ports: &named,
        probes: &[],
    };
    let compiled = [Arc::new(CompiledPolicy::compile(NS, "p", &w.specs[0].1))];
    let m = PortMatcher::new(&pod, 8080, &compiled, Settings::default());
    let max = crate::limits::MAX_TARGET_BYTES;
    for unit in ["/a", "/./", "//", "/%2e", "/a/..", "/x/"] {
        let path = unit.repeat(max / unit.len());
        crate::take_work();
        let _ = m.evaluate(&ANY, &get(&path));
        let work = crate::take_work();
        // Each byte is scanned by the validating pass, at most pushed and popped once by
        // the rewrite, and the prefix index hashes only prefixes up to its longest key.
        assert!(
            work >= path.len(),
            "{unit:?}: the validating pass is counted"
        );
        assert!(
            work <= 4 * path.len(),
            "{unit:?}: {work} units for {} bytes",
            path.len()
        );
    }
}

#[test]
fn hardening_authority_is_parsed_before_host_rules() {
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{hosts: [api.example.com, '*.shop.svc'], path: {exact: /host}}]\n- http: [{path: {exact: /open}}]\n",
    )]);
    let at = |authority, path| w.decide_full(8080, &ANY, "GET", Some(authority), path, &[]);
    for authority in [
        "api.example.com",
        "API.Example.COM",
        "api.example.com.",
        "api.example.com:8443",
        "x.shop.svc.:80",
    ] {
        assert_eq!(at(authority, "/host"), Allow, "{authority}");
    }
    // Refused before any rule: even the host-less rule for /open does not apply.
    for authority in [
        "user@api.example.com",
        "api.example.com:80@evil",
        "api%2eexample.com",
        "api.example.com:",
        "api.example.com:80:80",
        "api.example.com:x",
        "api example.com",
        "api..example.com",
        "127.1",
        "[v1.x]",
        "",
    ] {
        assert_eq!(at(authority, "/open"), Deny, "{authority}");
        let req = Request {
            authority: Some(authority),
            ..get("/open")
        };
        assert!(
            reason_of(&w, &req).starts_with("InvalidAuthority"),
            "{authority}"
        );
    }
    assert_eq!(at("[::1]:8080", "/host"), Deny);
    assert_eq!(at("[::1]:8080", "/open"), Allow);
}

#[test]
fn hardening_probe_exemption_covers_only_declared_probes() {
    let mut w = World::new(&[("deny-all", "podSelector: {}\n")]);
    w.probes = vec![
        (8080, "/healthz"),
        (8080, "ready"),
        (9090, "/metrics-probe"),
    ];
    let from_node = |method, path| Request {
        method,
        source_is_local_node: true,
        ..get(path)
    };
    let judge = |w: &World, port, req: &Request<'_>| w.judge(port, &Source::default(), req).0;
    for (method, path) in [
        ("GET", "/healthz"),
        ("HEAD", "/healthz"),
        ("GET", "//healthz"),
        ("GET", "/healthz?verbose=1"),
        ("GET", "/ready"),
    ] {
        assert_eq!(
            judge(&w, 8080, &from_node(method, path)),
            Allow,
            "{method} {path}"
        );
    }
    for (port, method, path) in [
        (8080, "GET", "/admin"),
        (8080, "POST", "/healthz"),
        (8080, "GET", "/healthz/x"),
        (8080, "GET", "/metrics-probe"),
        (9091, "GET", "/healthz"),
        (8080, "GET", "/healthz#x"),
    ] {
        assert_eq!(
            judge(&w, port, &from_node(method, path)),
            Deny,
            "{port} {method} {path}"
        );
    }
    let not_from_node = get("/healthz");
    assert_eq!(judge(&w, 8080, &not_from_node), Deny);
    w.settings.allow_local_node_probes = false;
    assert_eq!(judge(&w, 8080, &from_node("GET", "/healthz")), Deny);
}

#[test]
fn policy_golden_connection_level_rules() {
    // Not selected: the connection is spliced.
    let w = World::new(&[("p", "podSelector: {matchLabels: {app: other}}\n")]);
    assert_eq!(w.connection(8080, &ANY), Some((None, None)));
    // Only HTTP rules: every request is judged.
    let w = World::new(&[(
        "p",
        "podSelector: {}\ningress:\n- http: [{path: {prefix: /}}]\n",
    )]);
    assert_eq!(w.connection(8080, &ANY), None);
    // A rule without `http` allows the connection for the sources and ports it names.
    let w = World::new(&[
        ("b", "podSelector: {}\ningress:\n- http: [{path: {prefix: /}}]\n- from: [{serviceAccount: {name: web}}]\n  ports: [http]\n"),
        ("c", "podSelector: {}\ningress:\n- from: [{serviceAccount: {name: web}}]\n"),
    ]);
    assert_eq!(w.connection(8080, &ANY), Some((Some("b".into()), Some(1))));
    assert_eq!(w.connection(9090, &ANY), Some((Some("c".into()), Some(0))));
    let db = src_sa("shop", "db", "spiffe://cluster.local/ns/shop/sa/db");
    assert_eq!(w.connection(8080, &db), None);
    assert_eq!(w.connection(8080, &Source::default()), None);
}
