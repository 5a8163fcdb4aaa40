//! What the data plane reads: one immutable [`Dataplane`] snapshot, swapped whole through a
//! `watch` channel whenever pods, namespaces, nodes or policies change. Readers clone the
//! `Arc` per connection or request and never hold a lock across I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;
use veil_l7_policy::{Labels, PortMatcher, Source};

/// A pod anywhere in the cluster, as policies and flow records see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its address (`status.podIP`).
    pub ip: IpAddr,
    /// Its ServiceAccount (in `namespace`).
    pub service_account: String,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service_account>`.
    pub spiffe_id: String,
    /// The pod's labels.
    pub labels: Labels,
    /// The labels of its namespace.
    pub namespace_labels: Labels,
}

impl Workload {
    /// The engine's view of this workload as the source of a request.
    pub fn source(&self) -> Source<'_> {
        Source {
            spiffe_id: Some(&self.spiffe_id),
            namespace: Some(&self.namespace),
            namespace_labels: Some(&self.namespace_labels),
            pod_labels: Some(&self.labels),
            service_account: Some(&self.service_account),
        }
    }
}

/// A pod on this node that at least one `L7Policy` selects: every TCP port of it is
/// covered (policies deny by default), so every connection to it goes through the proxy.
#[derive(Debug)]
pub struct CoveredPod {
    /// The pod.
    pub workload: Arc<Workload>,
    /// Matchers for the ports that rules, named ports or probes mention.
    pub ports: HashMap<u16, Arc<PortMatcher>>,
    /// The matcher for any other port: only rules without `ports` can match there.
    pub other_ports: Arc<PortMatcher>,
    /// Ports of the pod's `tcpSocket` and `grpc` probes, which the node's own connections
    /// reach without the proxy (empty when local node probes are not allowed).
    pub node_direct_ports: Vec<u16>,
}

impl CoveredPod {
    /// The matcher that judges connections to `port`.
    pub fn matcher(&self, port: u16) -> &Arc<PortMatcher> {
        self.ports.get(&port).unwrap_or(&self.other_ports)
    }
}

/// One consistent view of the cluster for the data plane.
#[derive(Debug, Default)]
pub struct Dataplane {
    /// Every pod with an address, cluster-wide, by address.
    pub workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The pods on this node that a policy selects, by address.
    pub covered: HashMap<IpAddr, Arc<CoveredPod>>,
    /// This node's own addresses: connections from them are the kubelet's (probes).
    pub node_ips: Vec<IpAddr>,
    /// Bumped on every publication, so readers can tell snapshots apart.
    pub generation: u64,
}

impl Dataplane {
    /// The workload that owns `ip`, if any pod does.
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// The covered local pod at `ip`, if a policy selects it.
    pub fn covered(&self, ip: IpAddr) -> Option<&Arc<CoveredPod>> {
        self.covered.get(&ip)
    }

    /// Whether `ip` is one of this node's own addresses.
    pub fn is_node_ip(&self, ip: IpAddr) -> bool {
        self.node_ips.contains(&ip)
    }
}

/// The receiving end the data plane holds.
pub type DataplaneRx = watch::Receiver<Arc<Dataplane>>;
