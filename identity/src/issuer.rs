//! The cluster issuer: a gRPC service over TLS (rustls) that signs X.509-SVIDs for
//! agents. The caller authenticates with its ServiceAccount token (bearer metadata),
//! which must be an agent's and bound to a node (TokenReview returns the node in
//! `user.extra["authentication.kubernetes.io/node-name"]` for pod- and node-bound tokens).
//! It gets SVIDs only for pods that exist, run on that node, and run as the ServiceAccount
//! it names. Every refusal carries a reason and is logged.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};

use crate::bundle::CaSet;
use crate::id::{workload_id, SpiffeId, TrustDomain};
use crate::proto::issuer::issuer_server::{Issuer, IssuerServer};
use crate::proto::issuer::{SignSvidRequest, SignSvidResponse};
use crate::svid::{new_key_and_csr, Svid};
use crate::tls::{server_config_no_client_auth, SvidCertResolver};

/// The default lifetime of an SVID: short, so a stolen key is useful briefly.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// The audience agents request their tokens for, and the issuer reviews them with.
pub const DEFAULT_AUDIENCE: &str = "veil-issuer";
/// The TokenReview `user.extra` key that names the node a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Who called, as the token review says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The username (`system:serviceaccount:<ns>:<name>`).
    pub username: String,
    /// The node the token is bound to, if any.
    pub node: Option<String>,
}

/// What the issuer needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`, empty while unscheduled.
    pub node: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `status.phase`.
    pub phase: String,
}

/// A refusal: the gRPC status it becomes, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// The gRPC code.
    pub code: tonic::Code,
    /// Why, for the caller and the log.
    pub reason: String,
}

impl Refusal {
    /// A PermissionDenied refusal.
    pub fn denied(reason: impl Into<String>) -> Self {
        Refusal {
            code: tonic::Code::PermissionDenied,
            reason: reason.into(),
        }
    }

    /// An Unauthenticated refusal.
    pub fn unauthenticated(reason: impl Into<String>) -> Self {
        Refusal {
            code: tonic::Code::Unauthenticated,
            reason: reason.into(),
        }
    }

    /// An Unavailable refusal (the API server could not answer).
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Refusal {
            code: tonic::Code::Unavailable,
            reason: reason.into(),
        }
    }
}

/// Turns a bearer token into a [`Caller`] (TokenReview in a cluster).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates `token`.
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal>;
}

/// Looks pods up (the API server in a cluster).
#[tonic::async_trait]
pub trait PodDirectory: Send + Sync + 'static {
    /// The pod `namespace/name`, or `None` if there is none.
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodFacts>, Refusal>;
}

/// The issuer's settings.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Lifetime of the SVIDs it signs.
    pub svid_ttl: Duration,
    /// Usernames allowed to ask (`system:serviceaccount:<ns>:<name>` of the agents).
    pub agents: BTreeSet<String>,
}

/// The issuer's signing state, shared with the task that rotates its CA.
pub type SharedCa = Arc<RwLock<CaSet>>;

/// The gRPC service.
pub struct IssuerService {
    settings: IssuerSettings,
    ca: SharedCa,
    auth: Arc<dyn Authenticator>,
    pods: Arc<dyn PodDirectory>,
}

impl IssuerService {
    /// A service signing with `ca`.
    pub fn new(
        settings: IssuerSettings,
        ca: SharedCa,
        auth: Arc<dyn Authenticator>,
        pods: Arc<dyn PodDirectory>,
    ) -> Self {
        IssuerService {
            settings,
            ca,
            auth,
            pods,
        }
    }

    /// Decides and signs; the error is the refusal.
    pub async fn sign(
        &self,
        token: Option<&str>,
        req: &SignSvidRequest,
    ) -> Result<SignSvidResponse, Refusal> {
        let token = token.ok_or_else(|| Refusal::unauthenticated("no bearer token"))?;
        let caller = self.auth.authenticate(token).await?;
        if !self.settings.agents.contains(&caller.username) {
            return Err(Refusal::denied(format!(
                "{} is not an agent ServiceAccount",
                caller.username
            )));
        }
        let node = caller
            .node
            .as_deref()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Refusal::denied("the token is not bound to a node"))?;
        let pod = self
            .pods
            .pod(&req.namespace, &req.pod)
            .await?
            .ok_or_else(|| {
                Refusal::denied(format!("pod {}/{} does not exist", req.namespace, req.pod))
            })?;
        if pod.node != node {
            return Err(Refusal::denied(format!(
                "pod {}/{} is on node {:?}, not on the caller's node {node}",
                req.namespace, req.pod, pod.node
            )));
        }
        if !req.pod_uid.is_empty() && req.pod_uid != pod.uid {
            return Err(Refusal::denied(format!(
                "pod {}/{} has UID {}, not {}",
                req.namespace, req.pod, pod.uid, req.pod_uid
            )));
        }
        if !req.service_account.is_empty() && req.service_account != pod.service_account {
            return Err(Refusal::denied(format!(
                "pod {}/{} runs as ServiceAccount {}, not {}",
                req.namespace, req.pod, pod.service_account, req.service_account
            )));
        }
        if pod.phase == "Succeeded" || pod.phase == "Failed" {
            return Err(Refusal::denied(format!(
                "pod {}/{} has terminated ({})",
                req.namespace, req.pod, pod.phase
            )));
        }
        let id = workload_id(
            &self.settings.trust_domain,
            &req.namespace,
            &pod.service_account,
        )
        .map_err(|e| Refusal::denied(e.to_string()))?;
        let (cert, bundle) = {
            let ca = self.ca.read().expect("CA lock");
            let cert = ca
                .active
                .sign_csr(&req.csr, &id, self.settings.svid_ttl, SystemTime::now())
                .map_err(|e| Refusal {
                    code: tonic::Code::InvalidArgument,
                    reason: e.to_string(),
                })?;
            (cert, ca.bundle())
        };
        tracing::info!(caller = %caller.username, node, namespace = %req.namespace, pod = %req.pod, id = %id, "signed SVID");
        Ok(SignSvidResponse {
            spiffe_id: id.to_string(),
            cert_chain: vec![cert.to_vec()],
            bundle: bundle.roots.iter().map(|r| r.to_vec()).collect(),
        })
    }
}

fn bearer(meta: &tonic::metadata::MetadataMap) -> Option<&str> {
    meta.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

#[tonic::async_trait]
impl Issuer for IssuerService {
    async fn sign_svid(
        &self,
        request: Request<SignSvidRequest>,
    ) -> Result<Response<SignSvidResponse>, Status> {
        let peer = request.remote_addr();
        let token = bearer(request.metadata()).map(str::to_owned);
        let req = request.into_inner();
        match self.sign(token.as_deref(), &req).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(refusal) => {
                tracing::warn!(peer = ?peer, namespace = %req.namespace, pod = %req.pod, code = ?refusal.code, reason = %refusal.reason, "refused SVID");
                Err(Status::new(refusal.code, refusal.reason))
            }
        }
    }
}

/// A TLS stream as tonic's server takes it.
struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Issues the issuer's own serving SVID from its CA, for `id`.
pub fn self_svid(ca: &SharedCa, id: &SpiffeId, ttl: Duration) -> Result<Svid, crate::ca::CaError> {
    let (key, csr) = new_key_and_csr().map_err(|e| crate::ca::CaError::Parse(e.to_string()))?;
    let cert = ca
        .read()
        .expect("CA lock")
        .active
        .sign_csr(&csr, id, ttl, SystemTime::now())?;
    Svid::new(vec![cert], key.serialize_der()).map_err(|e| crate::ca::CaError::Parse(e.to_string()))
}

/// A running issuer.
pub struct RunningIssuer {
    /// The bound address (bind port 0 in tests and read it here).
    pub addr: SocketAddr,
    /// The issuer's own SPIFFE ID (what agents must see on its certificate).
    pub id: SpiffeId,
    /// Ends when the server stops.
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `listen`, issues the issuer's serving SVID for `id` (renewed at half-life), and
/// serves until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    id: SpiffeId,
    service: IssuerService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<RunningIssuer> {
    let ca = service.ca.clone();
    let ttl = service.settings.svid_ttl;
    let own = self_svid(&ca, &id, ttl).map_err(std::io::Error::other)?;
    let resolver = SvidCertResolver::new(&own).map_err(std::io::Error::other)?;
    let config = server_config_no_client_auth(resolver.clone()).map_err(std::io::Error::other)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsIo>>(64);
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let _ = tx.send(Ok(TlsIo(tls))).await;
                    }
                    Err(e) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    let renew_id = id.clone();
    let renew = tokio::spawn(async move {
        let mut current = own;
        loop {
            let wait = current
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            match self_svid(&ca, &renew_id, ttl).and_then(|s| {
                resolver
                    .update(&s)
                    .map_err(|e| crate::ca::CaError::Parse(e.to_string()))?;
                Ok(s)
            }) {
                Ok(s) => current = s,
                Err(e) => tracing::error!(error = %e, "could not renew the issuer's own SVID"),
            }
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(IssuerServer::new(service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        accept.abort();
        renew.abort();
        if let Err(e) = result {
            tracing::error!(error = %e, "issuer server failed");
        }
    });
    tracing::info!(%addr, id = %id, "issuer serving");
    Ok(RunningIssuer { addr, id, task })
}
