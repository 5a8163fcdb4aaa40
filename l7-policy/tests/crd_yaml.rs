//! The committed CRD YAML matches the Rust types.

use std::path::PathBuf;

/// Where the chart keeps the generated CRD.
fn crd_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/veil/crds/l7policy.yaml")
}

#[test]
fn policy_crd_yaml_is_up_to_date() {
    let want = veil_l7_policy::crd_yaml();
    let path = crd_path();
    if std::env::var_os("VEIL_UPDATE_CRD").is_some() {
        std::fs::write(&path, &want).expect("write the CRD YAML");
    }
    let got = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "{} differs from the Rust types in l7-policy/src/crd.rs; regenerate it with\n  \
         cargo run -p veil-l7-policy --example gen-crd > charts/veil/crds/l7policy.yaml\nor\n  \
         VEIL_UPDATE_CRD=1 cargo test -p veil-l7-policy --test crd_yaml",
        path.display()
    );
}

#[test]
fn policy_crd_has_identity_and_cel_rules() {
    let yaml = veil_l7_policy::crd_yaml();
    for needle in [
        "name: l7policies.veil.dev",
        "group: veil.dev",
        "name: v1alpha1",
        "scope: Namespaced",
        "kind: L7Policy",
        "x-kubernetes-validations",
        "path must set exactly one of exact, prefix or regex",
        "a rule must set at least one of from, ports or http",
        "x-kubernetes-int-or-string: true",
        "maximum: 65535",
        "status: {}",
    ] {
        assert!(yaml.contains(needle), "CRD lacks {needle:?}");
    }
}
