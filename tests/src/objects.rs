//! Kubernetes objects tests create in the bed's API server: Pods scheduled to a node
//! (no kubelet runs them; they stay Pending, which is all the agent and issuer look at).

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

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

/// A token for ServiceAccount `ns/sa` for `audiences` (empty: the API server's own),
/// bound to `pod` (name and UID) when given, valid for `lifetime` (at least 10 minutes:
/// the API server's minimum).
pub async fn service_account_token(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    pod: Option<&Pod>,
    audiences: Vec<String>,
    lifetime: std::time::Duration,
) -> anyhow::Result<String> {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences,
            expiration_seconds: Some(lifetime.as_secs() as i64),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &req)
        .await?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| anyhow::anyhow!("TokenRequest for {ns}/{sa} came back without a status"))
}
