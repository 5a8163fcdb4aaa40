//! What the data plane needs of a Pod object: its workload identity, its named container
//! ports and its `httpGet` probes. Pure functions over API objects, which are outside
//! input: anything missing or malformed yields "not a workload", never a panic.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Probe as ProbeSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use veil_l7_policy::Labels;

use super::Workload;

/// The ServiceAccount Kubernetes assigns when a pod names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Whether the pod has its own network (not the node's) and may still send or receive.
fn is_live_pod_network(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !host_network && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pod's address, if it has a valid one.
pub(crate) fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// The workload a pod is, or `None` for host-network pods (their address is the node's),
/// finished pods, and pods without an address yet.
pub(crate) fn workload(
    pod: &Pod,
    namespace_labels: &Labels,
    trust_domain: &str,
) -> Option<Workload> {
    if !is_live_pod_network(pod) {
        return None;
    }
    let namespace = pod.metadata.namespace.clone()?;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string());
    Some(Workload {
        spiffe_id: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
        name: pod.metadata.name.clone()?,
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        ip: pod_ip(pod)?,
        service_account,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        namespace_labels: namespace_labels.clone(),
        namespace,
    })
}

/// Every named container port (`name`, `containerPort`) of the pod; invalid numbers are
/// skipped.
pub(crate) fn named_ports(pod: &Pod) -> Vec<(String, u16)> {
    containers(pod)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect()
}

/// Every container port number the pod declares.
pub(crate) fn container_ports(pod: &Pod) -> impl Iterator<Item = u16> + '_ {
    containers(pod)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
}

/// One `httpGet` probe as the kubelet sends it: (port, path).
pub(crate) type ProbeTarget = (u16, String);

/// The pod's `httpGet` probes (liveness, readiness, startup; every container) that the
/// kubelet sends to the pod itself; see [`veil_l7_policy::Probe`] for what is skipped.
pub(crate) fn probes(pod: &Pod) -> Vec<ProbeTarget> {
    let mut out: Vec<ProbeTarget> = probe_specs(pod)
        .filter_map(|(container, spec)| probe_target(spec, container))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The ports of the pod's `tcpSocket` and `grpc` probes that the kubelet sends to the pod
/// itself: the node's connections to them must reach the pod, not the proxy, whose
/// handshake would pass a `tcpSocket` probe with the pod dead (and a gRPC health check is
/// not a declared `httpGet` path the probe exemption could judge).
pub(crate) fn direct_probe_ports(pod: &Pod) -> Vec<u16> {
    let mut out = Vec::new();
    for (container, spec) in probe_specs(pod) {
        if let Some(tcp) = &spec.tcp_socket {
            if tcp.host.as_deref().is_none_or(str::is_empty) {
                out.extend(container_port(&tcp.port, container));
            }
        }
        if let Some(grpc) = &spec.grpc {
            out.extend(u16::try_from(grpc.port).ok());
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A probe's port: a number, or the name of one of the container's ports.
fn container_port(
    port: &IntOrString,
    container: &k8s_openapi::api::core::v1::Container,
) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn probe_target(
    spec: &ProbeSpec,
    container: &k8s_openapi::api::core::v1::Container,
) -> Option<ProbeTarget> {
    let get = spec.http_get.as_ref()?;
    if get.host.as_deref().is_some_and(|h| !h.is_empty()) {
        return None;
    }
    let port = container_port(&get.port, container)?;
    Some((port, get.path.clone().unwrap_or_default()))
}

/// Every probe (liveness, readiness, startup) of every container, with its container.
fn probe_specs(
    pod: &Pod,
) -> impl Iterator<Item = (&k8s_openapi::api::core::v1::Container, &ProbeSpec)> {
    containers(pod).flat_map(|c| {
        [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
            .map(move |spec| (c, spec))
    })
}

fn containers(pod: &Pod) -> impl Iterator<Item = &k8s_openapi::api::core::v1::Container> {
    pod.spec.iter().flat_map(|s| s.containers.iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("test pod")
    }

    #[test]
    fn state_workload_from_pod() {
        let p = pod(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "front", "containers": []},
            "status": {"podIP": "198.19.1.5", "phase": "Running"},
        }));
        let ns: Labels = [("team".to_string(), "a".to_string())].into();
        let w = workload(&p, &ns, "cluster.local").expect("a workload");
        assert_eq!(w.spiffe_id, "spiffe://cluster.local/ns/shop/sa/front");
        assert_eq!(
            (w.namespace.as_str(), w.name.as_str(), w.node.as_str()),
            ("shop", "web", "n1")
        );
        assert_eq!(w.ip, "198.19.1.5".parse::<IpAddr>().expect("ip"));
        assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(w.namespace_labels, ns);
    }

    #[test]
    fn state_no_workload_for_host_network_finished_or_unaddressed_pods() {
        let base = |spec: serde_json::Value, status: serde_json::Value| {
            pod(serde_json::json!({
                "metadata": {"namespace": "shop", "name": "web"},
                "spec": spec, "status": status,
            }))
        };
        let running = serde_json::json!({"podIP": "198.19.1.5", "phase": "Running"});
        let no_labels = Labels::new();
        let host = base(
            serde_json::json!({"containers": [], "hostNetwork": true}),
            running.clone(),
        );
        assert!(workload(&host, &no_labels, "td").is_none());
        let done = base(
            serde_json::json!({"containers": []}),
            serde_json::json!({"podIP": "198.19.1.5", "phase": "Succeeded"}),
        );
        assert!(workload(&done, &no_labels, "td").is_none());
        let pending = base(
            serde_json::json!({"containers": []}),
            serde_json::json!({"phase": "Pending"}),
        );
        assert!(workload(&pending, &no_labels, "td").is_none());
        let garbage = base(
            serde_json::json!({"containers": []}),
            serde_json::json!({"podIP": "not an address"}),
        );
        assert!(workload(&garbage, &no_labels, "td").is_none());
        let default_sa = base(serde_json::json!({"containers": []}), running);
        assert_eq!(
            workload(&default_sa, &no_labels, "td")
                .expect("workload")
                .service_account,
            "default"
        );
    }

    #[test]
    fn state_probes_and_named_ports() {
        let p = pod(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"containers": [{
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}, {"name": "bad", "containerPort": 70000}],
                "livenessProbe": {"httpGet": {"port": "http", "path": "/healthz"}},
                "readinessProbe": {"httpGet": {"port": 9090}},
                "startupProbe": {"httpGet": {"port": 8080, "host": "198.18.0.1", "path": "/elsewhere"}},
            }, {
                "name": "side",
                "livenessProbe": {"httpGet": {"port": "missing"}},
                "readinessProbe": {"tcpSocket": {"port": 1}},
            }]},
        }));
        assert_eq!(named_ports(&p), vec![("http".to_string(), 8080)]);
        assert_eq!(container_ports(&p).collect::<Vec<_>>(), vec![8080, 9090]);
        assert_eq!(
            probes(&p),
            vec![(8080, "/healthz".to_string()), (9090, String::new())]
        );
        assert_eq!(direct_probe_ports(&p), vec![1]);
    }

    #[test]
    fn state_direct_probe_ports_resolve_names_and_skip_other_hosts() {
        let p = pod(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "db"},
            "spec": {"containers": [{
                "name": "db",
                "ports": [{"name": "sql", "containerPort": 5432}, {"name": "huge", "containerPort": 70000}],
                "livenessProbe": {"tcpSocket": {"port": "sql"}},
                "readinessProbe": {"grpc": {"port": 9000}},
                "startupProbe": {"tcpSocket": {"port": 6000, "host": "198.18.0.1"}},
            }, {
                "name": "side",
                "livenessProbe": {"tcpSocket": {"port": "missing"}},
                "readinessProbe": {"tcpSocket": {"port": "huge"}},
                "startupProbe": {"grpc": {"port": -1}},
            }, {
                "name": "again",
                "livenessProbe": {"tcpSocket": {"port": 5432, "host": ""}},
            }]},
        }));
        assert_eq!(direct_probe_ports(&p), vec![5432, 9000]);
    }
}
