//! The state layer: one reflector per kind (Nodes, Pods cluster-wide, Namespaces,
//! L7Policies) writes it; the data plane reads immutable snapshots of it — the WireGuard
//! peer set as node candidates, the proxy and the eBPF maps as one [`Dataplane`] — and never
//! waits on the API server. When the API server is unreachable, the watches retry with
//! backoff and the last snapshot stays.

mod build;
pub mod dataplane;
mod pods;

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use veil_l7_policy::{L7Policy, Settings};

pub use dataplane::{CoveredPod, Dataplane, DataplaneRx, Workload};

use crate::peers::Candidate;

/// How long a burst of changes is gathered before one snapshot is built: a rollout
/// touches many pods within milliseconds, and a policy edit must still reach new
/// requests well within a second.
const COALESCE: Duration = Duration::from_millis(50);

/// What the state layer needs to know about its node.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// This node's name.
    pub node_name: String,
    /// The SPIFFE trust domain workloads are named in.
    pub trust_domain: String,
    /// The policy engine's settings.
    pub settings: Settings,
}

/// The receiving ends the data plane holds.
#[derive(Clone)]
pub struct State {
    /// The data plane snapshot; generation 0 (empty) until every kind has been listed once.
    pub dataplane: DataplaneRx,
    /// Every Node, unchecked, from the first complete list on (`None` until then).
    pub nodes: watch::Receiver<Option<Vec<Candidate>>>,
    /// Every L7Policy as last seen (for the status writer).
    pub policies: Store<L7Policy>,
    /// Whether `policies` holds a first complete list.
    pub policies_listed: Listed,
    /// The Pods scheduled on this node, from the first complete list on (`None` until
    /// then), for the identity side (one SVID each).
    pub local_pods: watch::Receiver<Option<LocalPods>>,
}

/// The Pods on this node.
pub type LocalPods = Arc<Vec<Arc<Pod>>>;

/// Whether a kind's store holds a first complete list, for any number of waiters. Not
/// kube-runtime's `Store::wait_until_ready`: it polls one futures oneshot receiver, which
/// keeps a single waker, so of two tasks waiting on one store at once the one that polled
/// first may never wake (a policy status writer once waited forever beside the snapshot
/// builder).
pub type Listed = watch::Receiver<bool>;

/// Waits until `listed` says the first complete list is in; false when its reflector is
/// gone first.
pub async fn wait_listed(listed: &mut Listed) -> bool {
    listed.wait_for(|done| *done).await.is_ok()
}

/// The sending ends of [`State`].
struct Senders {
    dataplane: watch::Sender<Arc<Dataplane>>,
    nodes: watch::Sender<Option<Vec<Candidate>>>,
    local_pods: watch::Sender<Option<LocalPods>>,
}

/// Drops what the data plane never reads, so a cluster-wide Pod cache stays small.
fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes = None;
        for c in &mut spec.containers {
            c.env = None;
            c.env_from = None;
            c.volume_mounts = None;
            c.command = None;
            c.args = None;
        }
        spec.init_containers = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
}

fn strip_meta<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    object.meta_mut().annotations = None;
}

fn strip_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    // Nodes keep their annotations: the WireGuard key and port are published there.
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.conditions = None;
    }
}

/// Runs one reflector until the task stops, waking `changed` on every event and telling
/// `listed` once the store holds its first complete list.
async fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    strip: fn(&mut K),
    changed: Arc<Notify>,
    listed: watch::Sender<bool>,
    kind: &'static str,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    // Every event counts, not only touched objects: the initial list is swapped into the
    // store at `InitDone`, which touches none.
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch interrupted; keeping the last known state")
            }
            Ok(event) => {
                // The writer has applied the event when the stream yields it, so at the
                // first `InitDone` the store holds the complete list.
                if matches!(event, watcher::Event::InitDone) {
                    listed.send_if_modified(|done| !std::mem::replace(done, true));
                }
                changed.notify_one();
            }
        }
    }
}

/// Starts the watches. The returned future runs them and the snapshot builder; it never
/// ends on its own (the agent treats its end as a failure).
pub fn start(
    client: Client,
    config: StateConfig,
) -> (
    State,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (dataplane_tx, dataplane) = watch::channel(Arc::new(Dataplane::default()));
    let (nodes_tx, nodes) = watch::channel(None);
    let (policies, policies_w, policies_listed) = listing::<L7Policy>();
    let (local_pods_tx, local_pods) = watch::channel(None);
    let state = State {
        dataplane,
        nodes,
        policies: policies.store.clone(),
        policies_listed: policies.listed.clone(),
        local_pods,
    };
    let senders = Senders {
        dataplane: dataplane_tx,
        nodes: nodes_tx,
        local_pods: local_pods_tx,
    };
    let run = run(
        client,
        config,
        senders,
        (policies, policies_w, policies_listed),
    );
    (state, run)
}

/// A kind's store and whether it holds a first complete list yet.
#[derive(Clone)]
struct Listing<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    listed: Listed,
}

/// A kind's [`Listing`], with the store's writer and the sender of its [`Listed`] flag for
/// its reflector.
fn listing<K: Resource + Clone + 'static>(
) -> (Listing<K>, reflector::store::Writer<K>, watch::Sender<bool>)
where
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store::<K>();
    let (listed_tx, listed) = watch::channel(false);
    (Listing { store, listed }, writer, listed_tx)
}

async fn run(
    client: Client,
    config: StateConfig,
    senders: Senders,
    (policies, policies_w, policies_listed): (
        Listing<L7Policy>,
        reflector::store::Writer<L7Policy>,
        watch::Sender<bool>,
    ),
) {
    let (pods, pods_w, pods_listed) = listing::<Pod>();
    let (namespaces, namespaces_w, namespaces_listed) = listing::<Namespace>();
    let (nodes, nodes_w, nodes_listed) = listing::<Node>();
    let stores = Stores {
        pods,
        namespaces,
        policies,
        nodes,
    };
    let changed = Arc::new(Notify::new());
    let node_changed = Arc::new(Notify::new());
    let watches = futures::future::join5(
        reflect(
            Api::all(client.clone()),
            pods_w,
            strip_pod,
            changed.clone(),
            pods_listed,
            "Pod",
        ),
        reflect(
            Api::all(client.clone()),
            namespaces_w,
            strip_meta::<Namespace>,
            changed.clone(),
            namespaces_listed,
            "Namespace",
        ),
        reflect(
            Api::all(client.clone()),
            policies_w,
            strip_meta::<L7Policy>,
            changed.clone(),
            policies_listed,
            "L7Policy",
        ),
        reflect(
            Api::all(client),
            nodes_w,
            strip_node,
            node_changed.clone(),
            nodes_listed,
            "Node",
        ),
        async {
            tokio::join!(
                publish_nodes(
                    stores.nodes.clone(),
                    &node_changed,
                    &changed,
                    &senders.nodes
                ),
                publish_dataplane(&config, stores.clone(), &changed, &senders),
            );
        },
    );
    watches.await;
}

/// Every kind's [`Listing`], for the snapshot builders.
#[derive(Clone)]
struct Stores {
    pods: Listing<Pod>,
    namespaces: Listing<Namespace>,
    policies: Listing<L7Policy>,
    nodes: Listing<Node>,
}

/// Publishes the Node list for the peer set on every Node event, from the first complete
/// list on, and wakes the data plane builder (it reads the node's addresses).
async fn publish_nodes(
    Listing {
        store: nodes,
        mut listed,
    }: Listing<Node>,
    node_changed: &Notify,
    changed: &Notify,
    tx: &watch::Sender<Option<Vec<Candidate>>>,
) {
    if !wait_listed(&mut listed).await {
        return;
    }
    loop {
        let mut list = crate::k8s::candidates(&nodes.state());
        list.sort_by(|a, b| a.name.cmp(&b.name));
        tx.send_if_modified(|current| {
            let differs = current.as_ref() != Some(&list);
            if differs {
                *current = Some(list);
            }
            differs
        });
        changed.notify_one();
        node_changed.notified().await;
    }
}

/// Builds and publishes a snapshot after every burst of changes, once every kind has
/// been listed.
async fn publish_dataplane(
    config: &StateConfig,
    mut stores: Stores,
    changed: &Notify,
    senders: &Senders,
) {
    for listed in [
        &mut stores.pods.listed,
        &mut stores.namespaces.listed,
        &mut stores.policies.listed,
        &mut stores.nodes.listed,
    ] {
        if !wait_listed(listed).await {
            return;
        }
    }
    let (pods, namespaces, policies, nodes) = (
        stores.pods.store,
        stores.namespaces.store,
        stores.policies.store,
        stores.nodes.store,
    );
    let mut builder = build::Builder::new(&config.node_name, &config.trust_domain, config.settings);
    loop {
        let pods = pods.state();
        let namespaces = namespaces.state();
        let policies = policies.state();
        let own_node = nodes.get(&reflector::ObjectRef::new(&config.node_name));
        let snapshot = builder.build(&build::Inputs {
            pods: &pods,
            namespaces: &namespaces,
            policies: &policies,
            own_node: own_node.as_deref(),
        });
        tracing::debug!(
            generation = snapshot.generation,
            workloads = snapshot.workloads.len(),
            covered = snapshot.covered.len(),
            "data plane snapshot"
        );
        senders.dataplane.send_replace(Arc::new(snapshot));
        let mut local: Vec<Arc<Pod>> = pods
            .iter()
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&config.node_name)
            })
            .cloned()
            .collect();
        local.sort_by(|a, b| a.metadata.uid.cmp(&b.metadata.uid));
        senders.local_pods.send_if_modified(|current| {
            let differs = current.as_deref() != Some(&local);
            if differs {
                *current = Some(Arc::new(std::mem::take(&mut local)));
            }
            differs
        });
        changed.notified().await;
        tokio::time::sleep(COALESCE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every waiter wakes when a kind is listed, however many wait at once: the status
    /// writer and the snapshot builder wait on the same kind.
    #[tokio::test]
    async fn listed_wakes_every_concurrent_waiter() {
        let (tx, rx) = watch::channel(false);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let mut rx = rx.clone();
                tokio::spawn(async move { wait_listed(&mut rx).await })
            })
            .collect();
        tokio::task::yield_now().await;
        tx.send_replace(true);
        for waiter in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(matches!(woke, Ok(Ok(true))), "{woke:?}");
        }
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(
            !wait_listed(&mut rx).await,
            "a gone reflector is not a list"
        );
    }
}
