//! Kubernetes objects tests create in the bed's API server: Pods scheduled to a node
//! (no kubelet runs them; they stay Pending, which is all the agent and issuer look at).

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::api::ObjectMeta;

/// Metadata with a name and, for namespaced objects, a namespace.
pub fn meta(name: &str, ns: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        ..Default::default()
    }
}

/// A Pod `ns/name` bound to `node`, running as ServiceAccount `sa`.
pub fn pod(ns: &str, name: &str, node: &str, sa: &str, host_network: bool) -> Pod {
    Pod {
        metadata: meta(name, Some(ns)),
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(sa.into()),
            automount_service_account_token: Some(false),
            host_network: Some(host_network),
            containers: vec![Container {
                name: "main".into(),
                // Never pulled: nothing runs these pods.
                image: Some("registry.invalid/none:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
