//! Builds [`Dataplane`] snapshots from the watched objects, recompiling only what changed:
//! a policy is compiled once per `metadata.generation`, and a covered pod's matchers are
//! rebuilt only when the pod, its namespace's labels or a policy selecting it changed.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use veil_l7_policy::{CompiledPolicy, L7Policy, Labels, PortMatcher, Probe, Settings};

use super::pods;
use super::{CoveredPod, Dataplane, Workload};

/// The objects one snapshot is built from (the reflectors' current contents).
pub(crate) struct Inputs<'a> {
    /// Every Pod in the cluster.
    pub pods: &'a [Arc<Pod>],
    /// Every Namespace.
    pub namespaces: &'a [Arc<Namespace>],
    /// Every L7Policy.
    pub policies: &'a [Arc<L7Policy>],
    /// This node's Node object, once seen.
    pub own_node: Option<&'a Node>,
}

/// What identifies a covered pod's inputs: when it is unchanged, so are its matchers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CoveredKey {
    pod_version: String,
    namespace_labels: Labels,
    policies: Vec<(String, i64)>,
}

/// Turns watched objects into snapshots, keeping compiled policies and matchers between
/// builds.
pub(crate) struct Builder {
    node_name: String,
    trust_domain: String,
    settings: Settings,
    /// By (namespace, name): the generation compiled and the result.
    compiled: HashMap<(String, String), (i64, Arc<CompiledPolicy>)>,
    /// By pod uid.
    covered: HashMap<String, (CoveredKey, Arc<CoveredPod>)>,
    generation: u64,
}

fn policy_generation(policy: &L7Policy) -> i64 {
    policy.metadata.generation.unwrap_or(0)
}

impl Builder {
    /// A builder for the node `node_name`, naming workloads in `trust_domain`.
    pub(crate) fn new(node_name: &str, trust_domain: &str, settings: Settings) -> Builder {
        Builder {
            node_name: node_name.to_string(),
            trust_domain: trust_domain.to_string(),
            settings,
            compiled: HashMap::new(),
            covered: HashMap::new(),
            generation: 0,
        }
    }

    /// The compiled form of every policy, compiling only new generations.
    fn compile(&mut self, policies: &[Arc<L7Policy>]) -> Vec<Arc<CompiledPolicy>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(policies.len());
        for policy in policies {
            let (Some(namespace), Some(name)) = (
                policy.metadata.namespace.clone(),
                policy.metadata.name.clone(),
            ) else {
                continue;
            };
            let generation = policy_generation(policy);
            let key = (namespace, name);
            let compiled = match self.compiled.get(&key) {
                Some((g, c)) if *g == generation => c.clone(),
                _ => {
                    let c = Arc::new(CompiledPolicy::from_resource(policy));
                    if !c.errors().is_empty() {
                        tracing::warn!(
                            namespace = key.0,
                            policy = key.1,
                            generation,
                            errors = c.errors().len(),
                            first = %c.errors()[0],
                            "policy has errors: its invalid parts match nothing"
                        );
                    }
                    self.compiled.insert(key.clone(), (generation, c.clone()));
                    c
                }
            };
            seen.insert(key);
            out.push(compiled);
        }
        self.compiled.retain(|k, _| seen.contains(k));
        out
    }

    /// Builds the next snapshot.
    pub(crate) fn build(&mut self, inputs: &Inputs<'_>) -> Dataplane {
        let policies = self.compile(inputs.policies);
        let namespace_labels: HashMap<&str, &Labels> = inputs
            .namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
            .collect();
        let no_labels = Labels::new();
        let mut workloads: HashMap<IpAddr, Arc<Workload>> = HashMap::new();
        let mut ambiguous: BTreeSet<IpAddr> = BTreeSet::new();
        let mut local: Vec<(&Pod, Arc<Workload>)> = Vec::new();
        for pod in inputs.pods {
            let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
            let labels = namespace_labels.get(ns).copied().unwrap_or(&no_labels);
            let Some(workload) = pods::workload(pod, labels, &self.trust_domain) else {
                continue;
            };
            let workload = Arc::new(workload);
            if workload.node == self.node_name {
                local.push((pod, workload.clone()));
            }
            if workloads.insert(workload.ip, workload.clone()).is_some() {
                ambiguous.insert(workload.ip);
            }
        }
        // Two live pods claiming one address (a pod being replaced): neither identity can
        // be trusted for it, so its requests are judged as from an unknown source.
        for ip in &ambiguous {
            tracing::warn!(ip = %ip, "two pods claim this address; its source identity is unknown");
            workloads.remove(ip);
        }
        let mut covered = HashMap::new();
        let mut live_uids = BTreeSet::new();
        for (pod, workload) in local {
            let selecting: Vec<&Arc<CompiledPolicy>> = policies
                .iter()
                .filter(|p| p.selects(&workload.namespace, &workload.labels))
                .collect();
            if selecting.is_empty() {
                continue;
            }
            let uid = pod
                .metadata
                .uid
                .clone()
                .unwrap_or_else(|| format!("{}/{}", workload.namespace, workload.name));
            let key = CoveredKey {
                pod_version: pod.metadata.resource_version.clone().unwrap_or_default(),
                namespace_labels: workload.namespace_labels.clone(),
                policies: selecting
                    .iter()
                    .map(|p| {
                        let k = (p.namespace().to_string(), p.name().to_string());
                        let generation = self.compiled.get(&k).map_or(0, |(g, _)| *g);
                        (k.1, generation)
                    })
                    .collect(),
            };
            let entry = match self.covered.get(&uid) {
                // Same pod version, namespace labels and policy generations: same matchers.
                Some((k, c)) if *k == key => c.clone(),
                _ => {
                    let c = Arc::new(covered_pod(
                        pod,
                        workload.clone(),
                        &selecting,
                        self.settings,
                    ));
                    self.covered.insert(uid.clone(), (key, c.clone()));
                    c
                }
            };
            live_uids.insert(uid);
            covered.insert(workload.ip, entry);
        }
        self.covered.retain(|uid, _| live_uids.contains(uid));
        self.generation += 1;
        Dataplane {
            workloads,
            covered,
            node_ips: node_ips(inputs.own_node),
            generation: self.generation,
        }
    }
}

/// The node's own addresses, where the kubelet's probes come from.
fn node_ips(node: Option<&Node>) -> Vec<IpAddr> {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Matchers for every port of `pod` that something names (a rule, a container port, a
/// probe), and one for all other ports.
fn covered_pod(
    pod: &Pod,
    workload: Arc<Workload>,
    policies: &[&Arc<CompiledPolicy>],
    settings: Settings,
) -> CoveredPod {
    let named = pods::named_ports(pod);
    let named: Vec<(&str, u16)> = named.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let probe_targets = pods::probes(pod);
    let probes: Vec<Probe<'_>> = probe_targets
        .iter()
        .map(|(port, path)| Probe { port: *port, path })
        .collect();
    let engine_pod = veil_l7_policy::Pod {
        namespace: &workload.namespace,
        labels: &workload.labels,
        named_ports: &named,
        probes: &probes,
    };
    let mut ports: BTreeSet<u16> = policies.iter().flat_map(|p| p.port_numbers()).collect();
    ports.extend(pods::container_ports(pod));
    ports.extend(probe_targets.iter().map(|(port, _)| *port));
    let matcher = |port| {
        Arc::new(PortMatcher::new(
            &engine_pod,
            port,
            policies.iter().copied(),
            settings,
        ))
    };
    CoveredPod {
        ports: ports.iter().map(|&p| (p, matcher(p))).collect(),
        // No rule names port 0, so only rules without `ports` apply here.
        other_ports: matcher(0),
        // The node's probes reach these directly only while probes are exempt at all.
        node_direct_ports: match settings.allow_local_node_probes {
            true => pods::direct_probe_ports(pod),
            false => Vec::new(),
        },
        workload,
    }
}

#[cfg(test)]
mod tests {
    use veil_l7_policy::request::NO_HEADERS;
    use veil_l7_policy::{Decision, Request};

    use super::*;

    fn pod(ns: &str, name: &str, node: &str, ip: &str, sa: &str, app: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"),
                             "resourceVersion": "1", "labels": {"app": app}},
                "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{
                    "name": "c", "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}},
                }]},
                "status": {"podIP": ip, "phase": "Running"},
            }))
            .expect("test pod"),
        )
    }

    fn policy(yaml: &str, generation: i64) -> Arc<L7Policy> {
        let mut p: L7Policy = serde_yaml::from_str(yaml).expect("test policy");
        p.metadata.generation = Some(generation);
        Arc::new(p)
    }

    const API_POLICY: &str = r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: {name: web}}]
      ports: [http]
      http: [{methods: [GET], path: {prefix: /public}}]
"#;

    fn node(name: &str, ip: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }))
        .expect("test node")
    }

    fn get(path: &str, local_node: bool) -> Request<'static> {
        Request {
            method: "GET",
            authority: None,
            path: Box::leak(path.to_string().into_boxed_str()),
            headers: NO_HEADERS,
            source_is_local_node: local_node,
        }
    }

    fn build(builder: &mut Builder, pods: &[Arc<Pod>], policies: &[Arc<L7Policy>]) -> Dataplane {
        let own = node("n1", "198.18.0.1");
        builder.build(&Inputs {
            pods,
            namespaces: &[],
            policies,
            own_node: Some(&own),
        })
    }

    #[test]
    fn state_covers_local_selected_pods_and_judges_with_their_policies() {
        let pods = [
            pod("shop", "api-1", "n1", "198.19.1.2", "api", "api"),
            pod("shop", "api-2", "n2", "198.19.2.2", "api", "api"),
            pod("shop", "web-1", "n2", "198.19.2.3", "web", "web"),
            pod("shop", "other", "n1", "198.19.1.9", "other", "other"),
        ];
        let mut builder = Builder::new("n1", "cluster.local", Settings::default());
        let snap = build(&mut builder, &pods, &[policy(API_POLICY, 1)]);
        assert_eq!(snap.workloads.len(), 4);
        // Only the selected pod on this node is covered; api-2 is another node's business.
        assert_eq!(snap.covered.len(), 1);
        let api = snap
            .covered(IpAddr::from([198, 19, 1, 2]))
            .expect("api-1 covered");
        assert_eq!(api.workload.name, "api-1");
        assert!(snap.is_node_ip(IpAddr::from([198, 18, 0, 1])));
        let web = snap
            .workload(IpAddr::from([198, 19, 2, 3]))
            .expect("web workload");
        let other = snap
            .workload(IpAddr::from([198, 19, 1, 9]))
            .expect("other workload");
        let m = api.matcher(8080);
        assert_eq!(
            m.evaluate(&web.source(), &get("/public/x", false)).decision,
            Decision::Allow
        );
        assert_eq!(
            m.evaluate(&web.source(), &get("/admin", false)).decision,
            Decision::Deny
        );
        assert_eq!(
            m.evaluate(&other.source(), &get("/public", false)).decision,
            Decision::Deny
        );
        // Ports no rule names are still covered, and denied.
        assert_eq!(
            api.matcher(9999)
                .evaluate(&web.source(), &get("/public", false))
                .decision,
            Decision::Deny
        );
        // The kubelet's declared probe (named port resolved) passes from the node.
        let kubelet = veil_l7_policy::Source::default();
        assert_eq!(
            m.evaluate(&kubelet, &get("/ready", true)).decision,
            Decision::Allow
        );
        assert_eq!(
            m.evaluate(&kubelet, &get("/public", true)).decision,
            Decision::Deny
        );
    }

    #[test]
    fn state_rebuilds_only_what_changed() {
        let pods = [pod("shop", "api-1", "n1", "198.19.1.2", "api", "api")];
        let mut builder = Builder::new("n1", "cluster.local", Settings::default());
        let ip = IpAddr::from([198, 19, 1, 2]);
        let first = build(&mut builder, &pods, &[policy(API_POLICY, 1)]);
        let again = build(&mut builder, &pods, &[policy(API_POLICY, 1)]);
        assert!(Arc::ptr_eq(&first.covered[&ip], &again.covered[&ip]));
        assert!(again.generation > first.generation);
        // A new generation of the policy (its spec changed) rebuilds the matchers.
        let edited = build(&mut builder, &pods, &[policy(API_POLICY, 2)]);
        assert!(!Arc::ptr_eq(&again.covered[&ip], &edited.covered[&ip]));
        // The policy gone: the pod is no longer covered.
        assert!(build(&mut builder, &pods, &[]).covered.is_empty());
    }

    #[test]
    fn state_address_claimed_twice_has_no_identity() {
        let pods = [
            pod("shop", "old", "n2", "198.19.2.7", "admin", "x"),
            pod("shop", "new", "n2", "198.19.2.7", "web", "x"),
        ];
        let mut builder = Builder::new("n1", "cluster.local", Settings::default());
        let snap = build(&mut builder, &pods, &[]);
        assert!(snap.workload(IpAddr::from([198, 19, 2, 7])).is_none());
    }

    #[test]
    fn state_invalid_policy_never_widens_access() {
        // An invalid regex: the rule matches nothing, and the pod is still covered.
        let bad = r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - http: [{path: {regex: "("}}]
"#;
        let pods = [
            pod("shop", "api-1", "n1", "198.19.1.2", "api", "api"),
            pod("shop", "web-1", "n1", "198.19.1.3", "web", "web"),
        ];
        let mut builder = Builder::new("n1", "cluster.local", Settings::default());
        let snap = build(&mut builder, &pods, &[policy(bad, 1)]);
        let api = snap
            .covered(IpAddr::from([198, 19, 1, 2]))
            .expect("covered");
        let web = snap.workload(IpAddr::from([198, 19, 1, 3])).expect("web");
        assert_eq!(
            api.matcher(8080)
                .evaluate(&web.source(), &get("/", false))
                .decision,
            Decision::Deny
        );
    }
}
