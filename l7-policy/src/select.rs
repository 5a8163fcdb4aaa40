//! Which policies select a pod.

use crate::labels::Selector;
use crate::{L7Policy, Labels};

/// Whether `policy` selects a pod with `labels` in `namespace`. An invalid `podSelector`
/// selects every pod of the policy's namespace, so a broken policy denies rather than allows.
pub fn policy_selects(policy: &L7Policy, namespace: &str, labels: &Labels) -> bool {
    if policy.metadata.namespace.as_deref().unwrap_or("default") != namespace {
        return false;
    }
    let mut errors = Vec::new();
    Selector::compile(&policy.spec.pod_selector, "spec.podSelector", &mut errors)
        .is_none_or(|s| s.matches(labels))
}

/// The policies among `policies` that select a pod with `labels` in `namespace`.
pub fn policies_selecting<'p>(
    namespace: &str,
    labels: &Labels,
    policies: impl IntoIterator<Item = &'p L7Policy>,
) -> Vec<&'p L7Policy> {
    policies
        .into_iter()
        .filter(|p| policy_selects(p, namespace, labels))
        .collect()
}
