//! SPIFFE identities for the node's pods (on only with `--issuer-address`): the agent
//! reads the trust bundle the issuer publishes, keeps an SVID for every pod scheduled on
//! its node (the state layer's pods with `spec.nodeName=<node>`), and serves them on the SPIFFE
//! Workload API socket. A caller is attested by its network namespace, which the CNI
//! server registers on ADD ([`crate::server::PodService`]).
//!
//! Nothing here can stop pod networking: an unreachable API server or issuer is logged
//! and retried (the [`SvidManager`] backs off per pod), and the CNI socket serves
//! regardless.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};

use crate::state::LocalPods;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use veil_identity::client::{ClientError, IssuerClient, PodRef, TokenSource};
use veil_identity::manager::{PodKey, SvidManager, SvidSource};
use veil_identity::tls::CertificateDer;
use veil_identity::workload_api::{self, NetnsAttestor, WorkloadApi};
use veil_identity::{k8s, SpiffeId, Svid, TrustBundle};

use crate::config::{Config, DEFAULT_ISSUER_SERVICE_ACCOUNT};

/// First delay before reading the trust bundle again; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest delay between attempts to read the bundle or bind the socket.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long one connection attempt to the issuer may take: a black-holed address must
/// not hold every pod's fetch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity side of the agent, built before the CNI server so ADD can register
/// namespaces from the first pod on.
pub struct Identity {
    /// Maps pod network namespaces to pods; the CNI server fills it.
    pub attestor: Arc<NetnsAttestor>,
    address: String,
    issuer_id: Option<SpiffeId>,
    token_file: PathBuf,
    bundle_namespace: String,
    bundle_configmap: String,
    socket: PathBuf,
}

impl Identity {
    /// `None` when identity is off (no `--issuer-address`). Expects a validated config.
    pub fn new(config: &Config) -> Option<Self> {
        let address = config.identity.issuer_address.clone()?;
        Some(Identity {
            attestor: NetnsAttestor::new(),
            address,
            issuer_id: config
                .identity
                .issuer_id
                .as_deref()
                .map(|id| veil_identity::parse_id(id).expect("validated by Config::validate")),
            token_file: config
                .identity
                .issuer_token_file
                .clone()
                .expect("validated by Config::validate"),
            bundle_namespace: config.identity.trust_bundle_namespace.clone(),
            bundle_configmap: config.identity.trust_bundle_configmap.clone(),
            socket: config.identity.workload_api_socket.clone(),
        })
    }

    /// The Workload API socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Runs until aborted: bundle, SVID manager, Workload API, Pod and bundle watches.
    /// Aborting the task also stops the Workload API server.
    pub async fn run(self, client: kube::Client, pods: watch::Receiver<Option<LocalPods>>) {
        let bundle = self.read_bundle_until_done(&client).await;
        let issuer_id = match self.issuer_id.clone() {
            Some(id) => id,
            None => veil_identity::workload_id(
                &bundle.trust_domain,
                &self.bundle_namespace,
                DEFAULT_ISSUER_SERVICE_ACCOUNT,
            )
            .expect("namespace and ServiceAccount names are valid path segments"),
        };
        tracing::info!(issuer = %self.address, issuer_id = %issuer_id, trust_domain = %bundle.trust_domain, roots = bundle.roots.len(), "identity on");
        let (bundle_tx, bundle_rx) = watch::channel(bundle.clone());
        let source = Arc::new(LazyIssuer {
            address: self.address.clone(),
            issuer_id,
            token: TokenSource::File(self.token_file.clone()),
            state: tokio::sync::Mutex::new((None, bundle_rx)),
        });
        let manager = SvidManager::new(source, bundle);

        // Dropping `_stop` (this task ends or is aborted) shuts the server down.
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let _server = self.serve_until_bound(&manager, stopped).await;

        tokio::join!(
            follow_pods(pods, manager.clone()),
            self.watch_bundle(client, manager, bundle_tx),
        );
    }

    async fn read_bundle_until_done(&self, client: &kube::Client) -> TrustBundle {
        let mut delay = FIRST_RETRY;
        loop {
            match k8s::read_bundle(client, &self.bundle_namespace, &self.bundle_configmap).await {
                Ok(bundle) => return bundle,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot read the trust bundle; pods get no identity yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        }
    }

    async fn serve_until_bound(
        &self,
        manager: &SvidManager,
        stopped: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<()> {
        let shutdown = async move {
            let _ = stopped.await;
        };
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        let mut delay = FIRST_RETRY;
        loop {
            if let Some(dir) = self.socket.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let api = WorkloadApi::new(manager.clone(), self.attestor.clone());
            match workload_api::serve(&self.socket, api, shutdown.clone()) {
                Ok(server) => return server,
                Err(e) => {
                    tracing::error!(socket = %self.socket.display(), error = %e, retry_in = ?delay, "cannot bind the Workload API socket");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Follows the bundle ConfigMap (CA rotation adds and later drops roots).
    async fn watch_bundle(
        &self,
        client: kube::Client,
        manager: SvidManager,
        tx: watch::Sender<TrustBundle>,
    ) {
        let api = Api::<ConfigMap>::namespaced(client.clone(), &self.bundle_namespace);
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.bundle_configmap));
        let stream = watcher(api, config).default_backoff().applied_objects();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "trust bundle watch");
                continue;
            }
            match k8s::read_bundle(&client, &self.bundle_namespace, &self.bundle_configmap).await {
                Ok(bundle) => {
                    tx.send_if_modified(|b| {
                        let changed = *b != bundle;
                        *b = bundle.clone();
                        changed
                    });
                    manager.set_bundle(bundle);
                }
                Err(e) => tracing::warn!(error = %e, "trust bundle changed but cannot be read"),
            }
        }
    }
}

/// What the SVID manager should do about a Pod object.
fn pod_ref(pod: &Pod) -> Option<PodRef> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        // Shares the node's namespace: it can never be attested, so needs no SVID.
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodRef {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
    })
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

/// Keeps the manager's pods equal to the node's pods, as the state layer lists them
/// (one Pod watch for the whole agent). Pods deleted while the API server was away are
/// dropped once it lists again.
async fn follow_pods(mut pods: watch::Receiver<Option<LocalPods>>, manager: SvidManager) {
    let mut known: HashSet<PodKey> = HashSet::new();
    let mut listed = false;
    loop {
        let current = pods.borrow_and_update().clone();
        if let Some(list) = current {
            let mut now = HashSet::new();
            for pod in list.iter() {
                if let (Some(key), Some(r)) = (pod_key(pod), pod_ref(pod)) {
                    manager.pod_added(r);
                    now.insert(key);
                }
            }
            for (ns, name) in known.difference(&now) {
                manager.pod_removed(ns, name);
            }
            known = now;
            if !listed {
                listed = true;
                tracing::info!(pods = known.len(), "pods on this node listed");
            }
        }
        if pods.changed().await.is_err() {
            return;
        }
    }
}

/// The issuer, connected on first use and again after the trust bundle changes; until
/// it answers, fetches fail and the manager retries each pod with backoff.
struct LazyIssuer {
    address: String,
    issuer_id: SpiffeId,
    token: TokenSource,
    state: tokio::sync::Mutex<(Option<IssuerClient>, watch::Receiver<TrustBundle>)>,
}

impl LazyIssuer {
    async fn client(&self) -> Result<IssuerClient, ClientError> {
        let mut state = self.state.lock().await;
        let (client, bundle) = &mut *state;
        if bundle.has_changed().unwrap_or(false) {
            *client = None;
        }
        if let Some(c) = client {
            return Ok(c.clone());
        }
        let current = bundle.borrow_and_update().clone();
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            IssuerClient::connect(
                self.address.clone(),
                &current,
                self.issuer_id.clone(),
                self.token.clone(),
            ),
        )
        .await
        .map_err(|_| {
            ClientError::Token(format!(
                "connect to issuer {}: timed out after {CONNECT_TIMEOUT:?}",
                self.address
            ))
        })??;
        tracing::info!(issuer = %self.address, "connected to the issuer");
        *client = Some(connected.clone());
        Ok(connected)
    }
}

#[veil_identity::async_trait]
impl SvidSource for LazyIssuer {
    async fn fetch(
        &self,
        pod: &PodRef,
    ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError> {
        self.client().await?.fetch(pod).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn identity_pod_ref_skips_host_network_and_finished_pods() {
        let p = pod(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web", "uid": "u1"},
            "spec": {"containers": [], "serviceAccountName": "web"},
        }));
        let r = pod_ref(&p).unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("shop", "web"));
        assert_eq!((r.uid.as_str(), r.service_account.as_str()), ("u1", "web"));
        let default_sa = pod(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"containers": []},
        }));
        assert_eq!(pod_ref(&default_sa).unwrap().service_account, "default");
        let host = pod(serde_json::json!({
            "metadata": {"namespace": "kube-system", "name": "proxy"},
            "spec": {"containers": [], "hostNetwork": true},
        }));
        assert!(pod_ref(&host).is_none());
        let done = pod(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "job"},
            "spec": {"containers": []},
            "status": {"phase": "Succeeded"},
        }));
        assert!(pod_ref(&done).is_none());
    }
}
