//! The SPIFFE Workload API on a unix socket (gRPC, as the SPIFFE specification defines
//! it): `FetchX509SVID` and `FetchX509Bundles`, streaming updates. A caller gets the SVID
//! of the pod it runs in and nothing else: the process that connected is bound to the
//! connection on accept (pidfd, start time, network namespace: [`crate::peer`]), every
//! call re-checks that binding, and an [`Attestor`] maps the bound namespace to a pod;
//! [`NetnsAttestor`] maps it to the pod the agent created that namespace for. A
//! connection whose opener has exited gets nothing, whoever holds it now; a stream ends
//! with PermissionDenied when it does. JWT-SVIDs are not offered (`Unimplemented`).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::bundle::TrustBundle;
use crate::manager::{PodKey, SvidManager};
use crate::peer::{BoundCaller, NetnsId, PeerInfo};
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use crate::svid::Svid;

/// The metadata header every Workload API request must carry (the spec's SSRF guard).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The most HTTP/2 streams one Workload API connection may have open: a workload needs
/// two or three (SVID and bundle streams); a bound keeps one caller from holding many.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Who is calling: the process bound to the connection, re-checked for this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerProcess {
    /// Process ID (of the process that connected, still alive and unchanged).
    pub pid: i32,
    /// User ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
    /// Its network namespace, the same now as when it connected.
    pub netns: NetnsId,
}

/// Maps a calling process to the pod it runs in.
pub trait Attestor: Send + Sync + 'static {
    /// The pod `caller` belongs to, or `None` (the caller is refused).
    fn attest(&self, caller: &CallerProcess) -> Option<PodKey>;
}

/// Why a namespace was not registered to a pod.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The namespace file could not be read.
    #[error("stat the network namespace: {0}")]
    Stat(std::io::Error),
    /// It is the node's own namespace.
    #[error("the node's own network namespace is never a pod's")]
    HostNamespace,
    /// Another pod holds it.
    #[error("the network namespace is already registered to pod {holder}")]
    Taken {
        /// `namespace/name` of the pod that holds it.
        holder: String,
    },
}

/// Attests by network namespace: the agent registers each pod's netns (the path CNI ADD
/// got); a PID belongs to the pod whose netns `/proc/<pid>/ns/net` is. Host-network pods
/// share the node's namespace and are never registered, so never attested.
#[derive(Debug, Default)]
pub struct NetnsAttestor {
    by_ns: RwLock<HashMap<(u64, u64), PodKey>>,
}

impl NetnsAttestor {
    /// An empty map.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn ns_id(path: &Path) -> std::io::Result<(u64, u64)> {
        let m = std::fs::metadata(path)?;
        Ok((m.dev(), m.ino()))
    }

    /// Records that the namespace at `netns` (e.g. `/run/netns/x`, `/proc/<pid>/ns/net`)
    /// belongs to `pod`; see [`NetnsAttestor::register_namespace`].
    pub fn register(&self, netns: &Path, pod: PodKey) -> Result<(), RegisterError> {
        let id = Self::ns_id(netns).map_err(RegisterError::Stat)?;
        self.register_namespace(id, pod)
    }

    /// Records that the network namespace with nsfs identity `id` (device, inode)
    /// belongs to `pod`. Refuses the caller's own namespace (the agent runs in the
    /// node's, which is never a pod's) and a namespace already registered to another pod:
    /// an identity never moves silently from one pod to another.
    pub fn register_namespace(&self, id: (u64, u64), pod: PodKey) -> Result<(), RegisterError> {
        let own = Self::ns_id(Path::new("/proc/self/ns/net")).map_err(RegisterError::Stat)?;
        if id == own {
            return Err(RegisterError::HostNamespace);
        }
        let mut by_ns = self
            .by_ns
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match by_ns.get(&id) {
            Some(other) if *other != pod => Err(RegisterError::Taken {
                holder: format!("{}/{}", other.0, other.1),
            }),
            _ => {
                by_ns.insert(id, pod);
                Ok(())
            }
        }
    }

    /// Forgets `pod`.
    pub fn unregister(&self, pod: &PodKey) {
        self.by_ns
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, p| p != pod);
    }
}

impl Attestor for NetnsAttestor {
    fn attest(&self, caller: &CallerProcess) -> Option<PodKey> {
        // A poisoned lock (a panic elsewhere while writing) attests nobody: fail closed.
        self.by_ns.read().ok()?.get(&caller.netns).cloned()
    }
}

/// A request's peer, checked again before anything is sent to it.
struct CheckedPeer {
    peer: PeerInfo,
    attestor: Arc<dyn Attestor>,
}

impl CheckedPeer {
    fn bound(&self) -> Result<&BoundCaller, Status> {
        self.peer.0.as_ref().as_ref().map_err(|e| {
            tracing::warn!(error = %e, "Workload API connection has no attestable peer");
            Status::permission_denied(format!("caller not attested: {e}"))
        })
    }

    /// The pod of the process that connected, if it is still alive, unchanged and in the
    /// namespace it connected from.
    fn attest(&self) -> Result<PodKey, Status> {
        let bound = self.bound()?;
        let netns = bound.check().map_err(|e| {
            tracing::warn!(pid = bound.pid(), error = %e, "Workload API caller refused");
            Status::permission_denied(format!("caller not attested: {e}"))
        })?;
        let caller = CallerProcess {
            pid: bound.pid(),
            uid: bound.uid(),
            gid: bound.gid(),
            netns,
        };
        self.attestor.attest(&caller).ok_or_else(|| {
            tracing::warn!(
                pid = caller.pid,
                uid = caller.uid,
                "Workload API caller not attested to any pod"
            );
            Status::permission_denied("caller is not a pod on this node")
        })
    }

    /// As [`Self::attest`], and the pod must still be `pod`.
    fn attest_as(&self, pod: &PodKey) -> Result<(), Status> {
        let now = self.attest()?;
        if &now != pod {
            return Err(Status::permission_denied(
                "caller's namespace now belongs to another pod",
            ));
        }
        Ok(())
    }

    /// Resolves when the process that connected exits (never, if none was bound).
    async fn exited(&self) {
        match self.peer.0.as_ref() {
            Ok(bound) => bound.exited().await,
            Err(_) => std::future::pending().await,
        }
    }
}

/// The Workload API service.
pub struct WorkloadApi {
    manager: SvidManager,
    attestor: Arc<dyn Attestor>,
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn x509_response(svid: &Svid, bundle: &TrustBundle) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id().to_string(),
            x509_svid: svid
                .chain()
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect(),
            x509_svid_key: svid.key_pkcs8().to_vec(),
            bundle: bundle.concatenated_der(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

fn bundles_response(bundle: &TrustBundle) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(bundle.trust_domain.id_string(), bundle.concatenated_der())]),
    }
}

impl WorkloadApi {
    /// Serves `manager`'s SVIDs to callers `attestor` places in pods.
    pub fn new(manager: SvidManager, attestor: Arc<dyn Attestor>) -> Self {
        WorkloadApi { manager, attestor }
    }

    fn attest<T>(&self, request: &Request<T>) -> Result<(PodKey, Arc<CheckedPeer>), Status> {
        if request
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            return Err(Status::invalid_argument(format!(
                "security header {SECURITY_HEADER}: true is missing"
            )));
        }
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::permission_denied("no bound peer on the connection"))?;
        let checked = Arc::new(CheckedPeer {
            peer: peer.clone(),
            attestor: self.attestor.clone(),
        });
        let pod = checked.attest()?;
        Ok((pod, checked))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Streamed<X509svidResponse>;
    type FetchX509BundlesStream = Streamed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let ((ns, name), peer) = self.attest(&request)?;
        let mut svids = self
            .manager
            .watch(&ns, &name)
            .ok_or_else(|| Status::permission_denied(format!("no identity for pod {ns}/{name}")))?;
        let mut bundles = self.manager.bundle();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent_any = false;
            loop {
                let svid = svids.borrow_and_update().clone();
                let bundle = bundles.borrow_and_update().clone();
                // Every update goes only to the process that connected, still in its pod.
                if let Err(refused) = peer.attest_as(&(ns.clone(), name.clone())) {
                    let _ = tx.send(Err(refused)).await;
                    return;
                }
                match svid {
                    Some(s) if !s.is_expired(SystemTime::now()) => {
                        sent_any = true;
                        if tx.send(Ok(x509_response(&s, &bundle))).await.is_err() {
                            return;
                        }
                    }
                    _ if sent_any => {
                        // The spec: a workload that loses its entitlement gets
                        // PermissionDenied and the stream ends.
                        let _ = tx
                            .send(Err(Status::permission_denied(format!(
                                "identity of pod {ns}/{name} withdrawn"
                            ))))
                            .await;
                        return;
                    }
                    _ => {}
                }
                tokio::select! {
                    r = svids.changed() => if r.is_err() {
                        let _ = tx.send(Err(Status::permission_denied("pod removed"))).await;
                        return;
                    },
                    r = bundles.changed() => if r.is_err() { return; },
                    _ = peer.exited() => {
                        let _ = tx.send(Err(Status::permission_denied(
                            "the process that opened this connection has exited",
                        ))).await;
                        return;
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (pod, peer) = self.attest(&request)?;
        let mut bundles = self.manager.bundle();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let bundle = bundles.borrow_and_update().clone();
                if let Err(refused) = peer.attest_as(&pod) {
                    let _ = tx.send(Err(refused)).await;
                    return;
                }
                if tx.send(Ok(bundles_response(&bundle))).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = bundles.changed() => if r.is_err() { return; },
                    _ = peer.exited() => {
                        let _ = tx.send(Err(Status::permission_denied(
                            "the process that opened this connection has exited",
                        ))).await;
                        return;
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("Veil issues X.509-SVIDs only"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("Veil issues X.509-SVIDs only"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("Veil issues X.509-SVIDs only"))
    }
}

/// Binds the Workload API socket at `path` (replacing a stale one, mode 0666 so any
/// workload can connect: attestation, not file permissions, decides what it gets) and
/// serves until `shutdown` resolves.
pub fn serve(
    path: &Path,
    api: WorkloadApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let incoming = crate::peer::incoming(listener, crate::peer::MAX_CONNECTIONS);
    let socket_path = path.display().to_string();
    Ok(tokio::spawn(async move {
        tracing::info!(socket = %socket_path, "Workload API serving");
        if let Err(e) = tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .add_service(SpiffeWorkloadApiServer::new(api))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(socket = %socket_path, error = %e, "Workload API failed");
        }
    }))
}

#[cfg(test)]
mod register_tests {
    use super::*;

    #[test]
    fn hardening_attestor_refuses_the_host_namespace_and_a_second_pod() {
        let attestor = NetnsAttestor::new();
        let own = NetnsAttestor::ns_id(Path::new("/proc/self/ns/net")).unwrap();
        assert!(matches!(
            attestor.register_namespace(own, ("shop".into(), "a".into())),
            Err(RegisterError::HostNamespace)
        ));
        let pod_ns = (own.0, own.1 + 1);
        attestor
            .register_namespace(pod_ns, ("shop".into(), "a".into()))
            .unwrap();
        // Registering again for the same pod is fine (a restarted agent does it).
        attestor
            .register_namespace(pod_ns, ("shop".into(), "a".into()))
            .unwrap();
        let err = attestor
            .register_namespace(pod_ns, ("shop".into(), "b".into()))
            .unwrap_err();
        assert!(err.to_string().contains("shop/a"), "{err}");
        attestor.unregister(&("shop".into(), "a".into()));
        attestor
            .register_namespace(pod_ns, ("shop".into(), "b".into()))
            .unwrap();
    }
}
