//! Writes the `L7Policy` CRD YAML generated from the Rust types to stdout.
//!
//! `cargo run -p veil-l7-policy --example gen-crd > charts/veil/crds/l7policy.yaml`

fn main() {
    print!("{}", veil_l7_policy::crd_yaml());
}
