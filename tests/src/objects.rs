//! Kubernetes objects tests create in the bed's API server: Pods scheduled to a node
//! (no kubelet runs them; they stay Pending, which is all the agent and issuer look at),
//! or, for workloads the bed runs itself, given a kubelet's Running status; Namespaces;
//! Services and the EndpointSlices a controller manager would write for them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, Namespace, ObjectReference, Pod, PodSpec, Probe,
    Service, ServiceAccount, ServicePort, ServiceSpec, TCPSocketAction,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

/// What a bed pod is as Kubernetes sees it: namespace, ServiceAccount, labels and the
/// named container ports Services may target. Build with [`Workload::new`] and the
/// chained setters.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The pod's namespace.
    pub namespace: String,
    /// Its ServiceAccount (`default` unless set).
    pub service_account: String,
    /// Its labels (what Service selectors and policies match).
    pub labels: BTreeMap<String, String>,
    /// Named TCP container ports.
    pub ports: Vec<(String, u16)>,
    /// An `httpGet` readiness probe: (port, path).
    pub http_probe: Option<(u16, String)>,
    /// A `tcpSocket` liveness probe's port.
    pub tcp_probe: Option<u16>,
}

impl Workload {
    /// A workload in `namespace`, ServiceAccount `default`, no labels, no ports.
    pub fn new(namespace: &str) -> Workload {
        Workload {
            namespace: namespace.into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            ports: Vec::new(),
            http_probe: None,
            tcp_probe: None,
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Workload {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the ServiceAccount.
    pub fn service_account(mut self, sa: &str) -> Workload {
        self.service_account = sa.into();
        self
    }

    /// Adds a named TCP container port.
    pub fn port(mut self, name: &str, port: u16) -> Workload {
        self.ports.push((name.into(), port));
        self
    }

    /// Declares an `httpGet` readiness probe on `port` and `path` (nothing sends it: the
    /// bed has no kubelet; the agent reads it from the Pod).
    pub fn http_probe(mut self, port: u16, path: &str) -> Workload {
        self.http_probe = Some((port, path.into()));
        self
    }

    /// Declares a `tcpSocket` liveness probe on `port`.
    pub fn tcp_probe(mut self, port: u16) -> Workload {
        self.tcp_probe = Some(port);
        self
    }
}

/// The Pod object of a workload `name` scheduled to `node` (no status: see [`running_status`]).
pub fn workload_pod(name: &str, node: &str, w: &Workload) -> Pod {
    let mut p = pod(&w.namespace, name, node, &w.service_account, false);
    p.metadata.labels = Some(w.labels.clone());
    if let Some(spec) = p.spec.as_mut() {
        spec.containers[0].ports = Some(
            w.ports
                .iter()
                .map(|(name, port)| ContainerPort {
                    name: Some(name.clone()),
                    container_port: i32::from(*port),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        );
        spec.containers[0].readiness_probe = w.http_probe.as_ref().map(|(port, path)| Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::Int(i32::from(*port)),
                path: Some(path.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.containers[0].liveness_probe = w.tcp_probe.map(|port| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(port)),
                host: None,
            }),
            ..Default::default()
        });
    }
    p
}

/// The status a kubelet writes for a started pod at `ip` (a merge patch for the status
/// subresource): phase Running, Ready, `podIP`/`podIPs`.
pub fn running_status(ip: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }})
}

/// A Namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut metadata = meta(name, None);
    metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Namespace {
        metadata,
        ..Default::default()
    }
}

/// One port of a Service: `port` → `target` (a container port's name or number).
#[derive(Debug, Clone)]
pub struct ServicePortSpec {
    /// The port's name (EndpointSlice ports carry it).
    pub name: String,
    /// The port on the ClusterIP.
    pub port: u16,
    /// The pods' port: a named container port or a number.
    pub target: IntOrString,
}

impl ServicePortSpec {
    /// `port` → the container port named `target`.
    pub fn named(name: &str, port: u16, target: &str) -> ServicePortSpec {
        ServicePortSpec {
            name: name.into(),
            port,
            target: IntOrString::String(target.into()),
        }
    }

    /// `port` → container port number `target`.
    pub fn number(name: &str, port: u16, target: u16) -> ServicePortSpec {
        ServicePortSpec {
            name: name.into(),
            port,
            target: IntOrString::Int(i32::from(target)),
        }
    }
}

/// A ClusterIP Service `ns/name` selecting pods with `selector` (the API server picks the
/// address from the Service range).
pub fn cluster_ip_service(
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: &[ServicePortSpec],
) -> Service {
    Service {
        metadata: meta(name, Some(ns)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(
                selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(p.name.clone()),
                        port: i32::from(p.port),
                        target_port: Some(p.target.clone()),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Service's ClusterIP, once the API server has given it one.
pub fn cluster_ip(svc: &Service) -> anyhow::Result<Ipv4Addr> {
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .ok_or_else(|| anyhow::anyhow!("Service has no clusterIP"))?;
    Ok(ip.parse()?)
}

/// The `endpointslice.kubernetes.io/managed-by` value of the slices the bed writes (no
/// kube-controller-manager runs in the bed to write them).
pub const ENDPOINT_SLICE_MANAGER: &str = "testbed.veil.dev";

/// The EndpointSlices the EndpointSlice controller would write for `svc` over `pods`: the
/// pods that match its selector and have an address, each of the Service's ports resolved
/// against the pod's named container ports (pods that lack a named port are left out of
/// that port, as the controller does), one slice per distinct port mapping.
pub fn endpoint_slices(svc: &Service, pods: &[Pod]) -> Vec<EndpointSlice> {
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let svc_ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    // Resolved port list → endpoints with that mapping.
    let mut groups: BTreeMap<Vec<(String, i32)>, Vec<Endpoint>> = BTreeMap::new();
    for p in pods {
        let labels = p.metadata.labels.clone().unwrap_or_default();
        if selector.is_empty() || !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let container_ports: Vec<ContainerPort> = p
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.clone().unwrap_or_default())
            .collect();
        let resolved: Vec<(String, i32)> = svc_ports
            .iter()
            .filter_map(|sp| {
                let number = match sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port)) {
                    IntOrString::Int(n) => Some(n),
                    IntOrString::String(name) => container_ports
                        .iter()
                        .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                        .map(|cp| cp.container_port),
                };
                number.map(|n| (sp.name.clone().unwrap_or_default(), n))
            })
            .collect();
        groups.entry(resolved).or_default().push(Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: p.metadata.namespace.clone(),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (ports, endpoints))| {
            let mut metadata = meta(
                &format!("{svc_name}-{i}"),
                svc.metadata.namespace.as_deref(),
            );
            metadata.labels = Some(BTreeMap::from([
                ("kubernetes.io/service-name".to_string(), svc_name.clone()),
                (
                    "endpointslice.kubernetes.io/managed-by".to_string(),
                    ENDPOINT_SLICE_MANAGER.to_string(),
                ),
            ]));
            metadata.owner_references = svc.metadata.uid.clone().map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Service".into(),
                    name: svc_name.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]
            });
            EndpointSlice {
                metadata,
                address_type: "IPv4".into(),
                endpoints,
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, port)| EndpointPort {
                            name: Some(name),
                            port: Some(port),
                            protocol: Some("TCP".into()),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice's endpoint addresses and its (name, port) pairs.
    type SliceSummary = (Vec<String>, Vec<(String, i32)>);

    fn running(name: &str, node: &str, w: &Workload, ip: Option<&str>) -> Pod {
        let mut p = workload_pod(name, node, w);
        p.metadata.uid = Some(format!("uid-{name}"));
        p.status = ip.map(|ip| k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some(ip.into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn slices_resolve_named_ports_per_pod_and_leave_out_what_a_controller_would() {
        let web = Workload::new("demo").label("app", "web");
        let svc = {
            let mut s = cluster_ip_service(
                "demo",
                "web",
                &[("app", "web")],
                &[
                    ServicePortSpec::named("http", 80, "http"),
                    ServicePortSpec::number("admin", 9000, 9090),
                ],
            );
            s.metadata.uid = Some("svc-uid".into());
            s
        };
        let pods = vec![
            running(
                "a",
                "node-0",
                &web.clone().port("http", 8080),
                Some("198.19.0.2"),
            ),
            running(
                "b",
                "node-1",
                &web.clone().port("http", 8080),
                Some("198.19.1.2"),
            ),
            // Another number behind the same name: a slice of its own.
            running(
                "c",
                "node-1",
                &web.clone().port("http", 8081),
                Some("198.19.1.3"),
            ),
            // No address yet, or not selected: not an endpoint.
            running("d", "node-1", &web.clone().port("http", 8080), None),
            running(
                "e",
                "node-1",
                &Workload::new("demo")
                    .label("app", "other")
                    .port("http", 8080),
                Some("198.19.1.4"),
            ),
        ];
        let slices = endpoint_slices(&svc, &pods);
        let summary: Vec<SliceSummary> = slices
            .iter()
            .map(|s| {
                (
                    s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
                    s.ports
                        .iter()
                        .flatten()
                        .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    vec!["198.19.0.2".to_string(), "198.19.1.2".to_string()],
                    vec![("http".to_string(), 8080), ("admin".to_string(), 9090)]
                ),
                (
                    vec!["198.19.1.3".to_string()],
                    vec![("http".to_string(), 8081), ("admin".to_string(), 9090)]
                ),
            ]
        );
        let first = &slices[0];
        let labels = first.metadata.labels.clone().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "web");
        assert_eq!(
            labels["endpointslice.kubernetes.io/managed-by"],
            ENDPOINT_SLICE_MANAGER
        );
        assert_eq!(first.metadata.name.as_deref(), Some("web-0"));
        assert_eq!(
            first.metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid"
        );
        assert_eq!(first.endpoints[0].node_name.as_deref(), Some("node-0"));
        assert_eq!(
            first.endpoints[0]
                .target_ref
                .as_ref()
                .unwrap()
                .uid
                .as_deref(),
            Some("uid-a")
        );
    }

    #[test]
    fn a_pod_without_the_named_port_serves_only_the_numbered_one() {
        let svc = cluster_ip_service(
            "demo",
            "web",
            &[("app", "web")],
            &[
                ServicePortSpec::named("http", 80, "http"),
                ServicePortSpec::number("admin", 9000, 9090),
            ],
        );
        let bare = Workload::new("demo").label("app", "web");
        let slices = endpoint_slices(&svc, &[running("a", "node-0", &bare, Some("198.19.0.2"))]);
        assert_eq!(slices.len(), 1);
        let ports = slices[0].ports.clone().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("admin"));
        // A Service without a selector gets no slices from the bed.
        let mut unselected = svc.clone();
        unselected.spec.as_mut().unwrap().selector = None;
        assert!(endpoint_slices(
            &unselected,
            &[running("a", "node-0", &bare, Some("198.19.0.2"))]
        )
        .is_empty());
    }
}
