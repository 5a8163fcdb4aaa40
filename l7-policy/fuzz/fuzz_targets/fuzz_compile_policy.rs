//! Arbitrary bytes as an L7Policy spec (JSON, else YAML) through validation and
//! compilation, then a matcher and a few requests: nothing may panic, and the engine
//! agrees with the reference evaluator on every request. Input layout:
//! `spec \xff request-path \xff authority \xff header-value`, every part optional.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use veil_l7_policy::reference::{self, RefPolicy};
use veil_l7_policy::{
    CompiledPolicy, L7PolicySpec, Pod, PortMatcher, Probe, Request, Settings, Source,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xff);
    let spec_bytes = parts.next().unwrap_or_default();
    let spec: L7PolicySpec = match serde_json::from_slice(spec_bytes) {
        Ok(spec) => spec,
        Err(_) => match serde_yaml::from_slice(spec_bytes) {
            Ok(spec) => spec,
            Err(_) => return,
        },
    };
    let errors = veil_l7_policy::validate("shop", "p", &spec);
    let compiled = Arc::new(CompiledPolicy::compile("shop", "p", &spec));
    assert_eq!(errors.len(), compiled.errors().len());

    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let fuzzed_path = text(parts.next());
    let fuzzed_authority = text(parts.next());
    let fuzzed_value = text(parts.next());

    let labels: BTreeMap<String, String> = [("app".to_owned(), "api".to_owned())].into();
    let named = [("http", 8080u16)];
    let probes = [Probe {
        port: 8080,
        path: "/healthz",
    }];
    let pod = Pod {
        namespace: "shop",
        labels: &labels,
        named_ports: &named,
        probes: &probes,
    };
    let source = Source {
        spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/web"),
        namespace: Some("shop"),
        namespace_labels: Some(&labels),
        pod_labels: Some(&labels),
        service_account: Some("web"),
    };
    let headers = [
        ("x-tenant", fuzzed_value.as_str()),
        ("x-tenant", "acme"),
        ("authorization", "Bearer t"),
    ];
    for port in [80, 8080] {
        let m = PortMatcher::new(&pod, port, [&compiled], Settings::default());
        for (method, path, authority) in [
            ("GET", "/", Some("api.example.com")),
            ("POST", "/api/v1/items?x=1", None),
            ("GET", "/healthz", Some("10.0.0.1:8080")),
            ("GET", fuzzed_path.as_str(), Some(fuzzed_authority.as_str())),
            ("HEAD", fuzzed_path.as_str(), None),
        ] {
            for source_is_local_node in [false, true] {
                let request = Request {
                    method,
                    authority,
                    path,
                    headers: &headers,
                    source_is_local_node,
                };
                let verdict = m.evaluate(&source, &request);
                let _ = verdict.policy();
                let policies = [RefPolicy {
                    namespace: "shop",
                    name: "p",
                    spec: &spec,
                }];
                let want = reference::evaluate(
                    &pod,
                    port,
                    &policies,
                    Settings::default(),
                    &source,
                    &request,
                );
                assert_eq!(verdict, want, "{spec:?} {request:?}");
            }
        }
    }
});
