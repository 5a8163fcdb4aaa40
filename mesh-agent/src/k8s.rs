//! The agent's view of the Kubernetes API: its own Node, and the other nodes as peers.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

use crate::peers::Candidate;

/// Errors of talking to the API server or reading a Node.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The kubeconfig or in-cluster configuration could not be used.
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was requested.
        what: String,
        /// The client's error.
        source: kube::Error,
    },
    /// A Node lacks what the agent needs.
    #[error("node {node}: {reason}")]
    Node {
        /// The Node's name.
        node: String,
        /// What is missing or wrong.
        reason: String,
    },
}

/// Annotation on a Node with its WireGuard public key (base64).
pub const WIREGUARD_KEY_ANNOTATION: &str = "veil.dev/wireguard-public-key";
/// Annotation on a Node with its WireGuard UDP port.
pub const WIREGUARD_PORT_ANNOTATION: &str = "veil.dev/wireguard-port";

/// What the agent needs to know of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name.
    pub name: String,
    /// Its IPv4 pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// Its InternalIP, where other nodes reach it: IPv4 when it has one, else IPv6.
    pub internal_ip: IpAddr,
    /// Its WireGuard public key and port, once its agent has published them.
    pub wireguard: Option<WireguardEndpoint>,
}

/// A node's published WireGuard identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireguardEndpoint {
    /// X25519 public key.
    pub public_key: [u8; 32],
    /// UDP port.
    pub port: u16,
}

fn wireguard_endpoint(node: &Node) -> Option<WireguardEndpoint> {
    let annotations = node.metadata.annotations.as_ref()?;
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let key_text = annotations.get(WIREGUARD_KEY_ANNOTATION)?;
    let Some(public_key) = crate::wireguard::keys::decode(key_text) else {
        tracing::warn!(
            node = name,
            annotation = WIREGUARD_KEY_ANNOTATION,
            "not a base64 32-byte key; node stays unreachable"
        );
        return None;
    };
    let port = match annotations.get(WIREGUARD_PORT_ANNOTATION) {
        None => crate::config::DEFAULT_WIREGUARD_PORT,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                tracing::warn!(
                    node = name,
                    annotation = WIREGUARD_PORT_ANNOTATION,
                    value = text,
                    "not a UDP port; node stays unreachable"
                );
                return None;
            }
        },
    };
    Some(WireguardEndpoint { public_key, port })
}

/// Publishes this node's WireGuard key and port as annotations on its Node.
pub async fn publish_wireguard(
    client: &Client,
    node: &str,
    endpoint: WireguardEndpoint,
) -> Result<(), K8sError> {
    let patch = serde_json::json!({"metadata": {"annotations": {
        WIREGUARD_KEY_ANNOTATION: crate::wireguard::keys::encode(&endpoint.public_key),
        WIREGUARD_PORT_ANNOTATION: endpoint.port.to_string(),
    }}});
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|source| K8sError::Api {
            what: format!("annotate node {node} with its WireGuard key"),
            source,
        })
}

/// Builds a client from a kubeconfig file, or from the environment when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let raw = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| K8sError::Config(format!("read {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(raw, &Default::default())
                .await
                .map_err(|e| K8sError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| K8sError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| K8sError::Config(e.to_string()))
}

/// Reads pod CIDR and InternalIP from a Node.
pub fn node_info(node: &Node) -> Result<NodeInfo, K8sError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let bad = |reason: String| K8sError::Node {
        node: name.clone(),
        reason,
    };
    let spec = node
        .spec
        .as_ref()
        .ok_or_else(|| bad("has no spec".into()))?;
    let cidrs = spec
        .pod_cidrs
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(spec.pod_cidr.clone());
    let mut pod_cidr = None;
    for cidr in cidrs {
        if let Ok(net) = cidr.parse::<Ipv4Net>() {
            pod_cidr = Some(net.trunc());
            break;
        }
    }
    let pod_cidr = pod_cidr.ok_or_else(|| {
        bad(
            "spec.podCIDR has no IPv4 CIDR (is the controller-manager allocating node CIDRs?)"
                .into(),
        )
    })?;
    let internal_ips: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .collect();
    // A dual-stack node is reached over IPv4: its encapsulation costs 20 bytes less.
    let internal_ip = internal_ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(internal_ips.first())
        .copied()
        .ok_or_else(|| bad("status.addresses has no InternalIP".into()))?;
    Ok(NodeInfo {
        name,
        pod_cidr,
        internal_ip,
        wireguard: wireguard_endpoint(node),
    })
}

/// Waits until the agent's own Node exists with a pod CIDR and an InternalIP, saying why
/// it waits; an agent cannot hand out addresses before it knows its pool.
pub async fn wait_for_own_node(client: &Client, name: &str) -> NodeInfo {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut delay = Duration::from_millis(200);
    loop {
        let reason = match nodes.get_opt(name).await {
            Ok(Some(node)) => match node_info(&node) {
                Ok(info) => return info,
                Err(e) => e.to_string(),
            },
            Ok(None) => format!("node {name} does not exist yet"),
            Err(e) => format!("get node {name}: {e}"),
        };
        tracing::info!(
            node = name,
            reason,
            retry_in_ms = delay.as_millis() as u64,
            "waiting for own node"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Every Node as a [`Candidate`] for the peer set (this node's own included; the
/// check skips it).
pub fn candidates(nodes: &[std::sync::Arc<Node>]) -> Vec<Candidate> {
    nodes
        .iter()
        .map(|n| Candidate {
            name: n.metadata.name.clone().unwrap_or_default(),
            created: n
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            info: node_info(n).map_err(|e| e.to_string()),
        })
        .collect()
}
