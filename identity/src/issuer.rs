//! The cluster issuer: a gRPC service over TLS (rustls) that signs X.509-SVIDs for
//! agents. The caller authenticates with its ServiceAccount token (bearer metadata),
//! which must be an agent's and bound to a node (TokenReview returns the node in
//! `user.extra["authentication.kubernetes.io/node-name"]` for pod- and node-bound tokens).
//! It gets SVIDs only for pods that exist, run on that node, and run as the ServiceAccount
//! it names. Every refusal carries a reason and is logged.
//!
//! Everything a caller sends is hostile until authenticated: TLS handshakes have a
//! deadline, connections are capped, requests have a deadline and a size bound, a peer
//! address that keeps failing authentication is refused without asking the API server
//! ([`FailureLimiter`], bounded memory), and caller-supplied strings are never logged
//! beyond [`MAX_LOGGED_CHARS`] (tokens never). The issuer's own SPIFFE ID, and any ID
//! outside its trust domain, is never issued.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

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
/// How long a TLS handshake may take: a client that opens TCP and stalls is dropped
/// (a LAN handshake takes milliseconds; 10 s leaves room for a loaded node).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, TokenReview and pod look-up included (kube's own
/// read timeout is longer; an agent retries with backoff anyway).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections at once, handshaking or established: one per agent (HTTP/2
/// multiplexes) plus headroom; a flood waits in the kernel's backlog instead.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// First pause after a failed `accept` (EMFILE and the like); doubles up to
/// [`MAX_ACCEPT_BACKOFF`].
pub const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between failed `accept` calls.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Failed authentications a peer address may have in [`AUTH_FAILURE_WINDOW`] before it
/// is refused without a TokenReview (a healthy agent fails at most once per token
/// rotation).
pub const MAX_AUTH_FAILURES: u32 = 10;
/// The window failed authentications are counted in.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Most peer addresses the failure count is kept for (≈ 100 bytes each).
pub const MAX_TRACKED_PEERS: usize = 4096;
/// Longest caller-supplied string put into a log line or a refusal.
pub const MAX_LOGGED_CHARS: usize = 64;
/// Largest bearer token taken for review (bound ServiceAccount tokens are ~1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest request message (a CSR is a few hundred bytes; names are at most 253).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest header block: the token plus gRPC's own headers.
pub const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;

/// `s` cut to [`MAX_LOGGED_CHARS`] characters (marked when cut), with control
/// characters escaped: safe to put into a log line or a refusal.
pub fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_LOGGED_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(MAX_LOGGED_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Counts failed authentications per peer address in a sliding window, in bounded
/// memory: when full, expired entries go first, then the oldest.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    peers: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailureLimiter {
    /// At most `max_failures` per `window` per address, for at most `capacity` addresses.
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        FailureLimiter {
            max_failures,
            window,
            capacity: capacity.max(1),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `peer` has used up its failures in the current window.
    pub fn blocked(&self, peer: IpAddr, now: Instant) -> bool {
        let Ok(peers) = self.peers.lock() else {
            return false;
        };
        peers.get(&peer).is_some_and(|(n, since)| {
            now.duration_since(*since) < self.window && *n >= self.max_failures
        })
    }

    /// Records a failed authentication from `peer`.
    pub fn failed(&self, peer: IpAddr, now: Instant) {
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        if !peers.contains_key(&peer) && peers.len() >= self.capacity {
            let window = self.window;
            peers.retain(|_, (_, since)| now.duration_since(*since) < window);
            if peers.len() >= self.capacity {
                if let Some(oldest) = peers
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| *k)
                {
                    peers.remove(&oldest);
                }
            }
        }
        let entry = peers.entry(peer).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.peers.lock().map(|p| p.len()).unwrap_or(0)
    }
}

impl Default for FailureLimiter {
    fn default() -> Self {
        FailureLimiter::new(MAX_AUTH_FAILURES, AUTH_FAILURE_WINDOW, MAX_TRACKED_PEERS)
    }
}

/// A DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63), as namespaces are.
fn is_dns_label(s: &str) -> bool {
    is_dns_subdomain(s) && s.len() <= 63 && !s.contains('.')
}

/// A DNS-1123 subdomain (at most 253, dot-separated labels), as pod and
/// ServiceAccount names are.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Checks the shape of a request before anything else looks at it.
fn validate(req: &SignSvidRequest) -> Result<(), Refusal> {
    let bad = |what: &str| Refusal {
        code: tonic::Code::InvalidArgument,
        reason: format!("{what} is not a valid Kubernetes name"),
    };
    if !is_dns_label(&req.namespace) {
        return Err(bad("namespace"));
    }
    if !is_dns_subdomain(&req.pod) {
        return Err(bad("pod"));
    }
    if !req.service_account.is_empty() && !is_dns_subdomain(&req.service_account) {
        return Err(bad("serviceAccount"));
    }
    if req.pod_uid.len() > 64
        || !req
            .pod_uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        return Err(bad("pod UID"));
    }
    Ok(())
}

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
    reserved: BTreeSet<SpiffeId>,
    failures: FailureLimiter,
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
            reserved: BTreeSet::new(),
            failures: FailureLimiter::default(),
        }
    }

    /// Never issues `id` (the issuer's own; [`serve`] reserves it).
    pub fn reserve(&mut self, id: SpiffeId) {
        self.reserved.insert(id);
    }

    /// Decides and signs; the error is the refusal.
    pub async fn sign(
        &self,
        token: Option<&str>,
        req: &SignSvidRequest,
    ) -> Result<SignSvidResponse, Refusal> {
        self.sign_from(None, token, req).await
    }

    /// As [`Self::sign`] for a caller at `peer`: an address with too many failed
    /// authentications is refused (ResourceExhausted) before its token is reviewed.
    pub async fn sign_from(
        &self,
        peer: Option<IpAddr>,
        token: Option<&str>,
        req: &SignSvidRequest,
    ) -> Result<SignSvidResponse, Refusal> {
        if let Some(ip) = peer {
            if self.failures.blocked(ip, Instant::now()) {
                return Err(Refusal {
                    code: tonic::Code::ResourceExhausted,
                    reason: "too many failed authentications from this address; retry later".into(),
                });
            }
        }
        let authenticated = match token {
            None => Err(Refusal::unauthenticated("no bearer token")),
            Some(t) if t.len() > MAX_TOKEN_BYTES => Err(Refusal::unauthenticated(format!(
                "bearer token longer than {MAX_TOKEN_BYTES} bytes"
            ))),
            Some(t) => self.auth.authenticate(t).await,
        };
        let caller = match authenticated {
            Ok(c) => c,
            Err(refusal) => {
                if let (Some(ip), tonic::Code::Unauthenticated) = (peer, refusal.code) {
                    self.failures.failed(ip, Instant::now());
                }
                return Err(refusal);
            }
        };
        if !self.settings.agents.contains(&caller.username) {
            return Err(Refusal::denied(format!(
                "{} is not an agent ServiceAccount",
                clip(&caller.username)
            )));
        }
        validate(req)?;
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
        if self.reserved.contains(&id) {
            return Err(Refusal::denied(format!(
                "{id} is the issuer's own identity; it is never issued to a workload"
            )));
        }
        if !id.is_member_of(&self.settings.trust_domain) {
            return Err(Refusal::denied(format!(
                "{id} is outside trust domain {}",
                self.settings.trust_domain
            )));
        }
        let (cert, bundle) = {
            let ca = self
                .ca
                .read()
                .map_err(|_| Refusal::unavailable("CA state poisoned by an earlier panic"))?;
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

/// A refusal's reason cut to a sane length (it may quote the API server or the caller).
fn clip_reason(reason: &str) -> String {
    const MAX: usize = 512;
    if reason.len() <= MAX {
        return reason.to_string();
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
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
        match self
            .sign_from(peer.map(|p| p.ip()), token.as_deref(), &req)
            .await
        {
            Ok(resp) => Ok(Response::new(resp)),
            Err(refusal) => {
                let reason = clip_reason(&refusal.reason);
                match refusal.code {
                    // Unauthenticated: nothing the caller sent is logged.
                    tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted => {
                        tracing::warn!(peer = ?peer, code = ?refusal.code, reason = %reason, "refused unauthenticated SVID request");
                    }
                    _ => {
                        tracing::warn!(peer = ?peer, namespace = %clip(&req.namespace), pod = %clip(&req.pod), code = ?refusal.code, reason = %reason, "refused SVID");
                    }
                }
                Err(Status::new(refusal.code, reason))
            }
        }
    }
}

/// A TLS stream as tonic's server takes it, holding its place under the connection cap.
struct TlsIo(
    tokio_rustls::server::TlsStream<TcpStream>,
    #[allow(dead_code, reason = "held for its Drop: frees the connection slot")]
    tokio::sync::OwnedSemaphorePermit,
);

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

/// The issuer's protections against slow or numerous clients.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Deadline for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline for one request.
    pub request_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Binds `listen`, issues the issuer's serving SVID for `id` (renewed at half-life), and
/// serves until `shutdown` resolves, with the default [`ServeLimits`].
pub async fn serve(
    listen: SocketAddr,
    id: SpiffeId,
    service: IssuerService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<RunningIssuer> {
    serve_with_limits(listen, id, service, ServeLimits::default(), shutdown).await
}

/// As [`serve`], with `limits`. `id` is reserved: it is never issued to a workload.
pub async fn serve_with_limits(
    listen: SocketAddr,
    id: SpiffeId,
    mut service: IssuerService,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<RunningIssuer> {
    service.reserve(id.clone());
    let ca = service.ca.clone();
    let ttl = service.settings.svid_ttl;
    let own = self_svid(&ca, &id, ttl).map_err(std::io::Error::other)?;
    let resolver = SvidCertResolver::new(&own).map_err(std::io::Error::other)?;
    let config = server_config_no_client_auth(resolver.clone()).map_err(std::io::Error::other)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsIo>>(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let accept = tokio::spawn(async move {
        let mut backoff = FIRST_ACCEPT_BACKOFF;
        loop {
            // At the cap, stop accepting: new clients wait in the kernel's backlog.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = loop {
                match listener.accept().await {
                    Ok(accepted) => {
                        backoff = FIRST_ACCEPT_BACKOFF;
                        break accepted;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "issuer accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    }
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsIo(tls, slot))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, timeout = ?limits.handshake_timeout, "TLS handshake timed out; dropped")
                    }
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
            .timeout(limits.request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(256)
            .add_service(
                IssuerServer::new(service)
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_REQUEST_BYTES),
            )
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::client::{ClientError, IssuerClient, PodRef, TokenSource};

    const AGENT: &str = "system:serviceaccount:veil-system:veil-agent";

    /// One node's agent (token `agent-token`) and its pods; counts reviews.
    #[derive(Default)]
    struct OneNode {
        reviews: AtomicUsize,
    }

    #[tonic::async_trait]
    impl Authenticator for OneNode {
        async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
            self.reviews.fetch_add(1, Ordering::SeqCst);
            if token != "agent-token" {
                return Err(Refusal::unauthenticated("bad token"));
            }
            Ok(Caller {
                username: AGENT.into(),
                node: Some("node-a".into()),
            })
        }
    }

    #[tonic::async_trait]
    impl PodDirectory for OneNode {
        async fn pod(&self, _ns: &str, name: &str) -> Result<Option<PodFacts>, Refusal> {
            Ok(Some(PodFacts {
                uid: "0000".into(),
                node: "node-a".into(),
                // The issuer's own pod runs as the issuer's ServiceAccount.
                service_account: if name == "issuer" {
                    "veil-issuer"
                } else {
                    "web"
                }
                .into(),
                phase: "Running".into(),
            }))
        }
    }

    fn service(
        td: &TrustDomain,
        ca: crate::CertificateAuthority,
        node: Arc<OneNode>,
    ) -> IssuerService {
        IssuerService::new(
            IssuerSettings {
                trust_domain: td.clone(),
                svid_ttl: Duration::from_secs(600),
                agents: BTreeSet::from([AGENT.to_string()]),
            },
            Arc::new(RwLock::new(CaSet::new(ca))),
            node.clone(),
            node,
        )
    }

    fn request(ns: &str, pod: &str) -> SignSvidRequest {
        let (_key, csr) = new_key_and_csr().unwrap();
        SignSvidRequest {
            namespace: ns.into(),
            pod: pod.into(),
            pod_uid: String::new(),
            service_account: String::new(),
            csr,
        }
    }

    #[tokio::test]
    async fn hardening_issuer_never_issues_its_own_id_and_bounds_what_it_echoes() {
        let (td, ca, _) = crate::ca::test_ca();
        let mut svc = service(&td, ca, Arc::default());
        let own = workload_id(&td, "veil-system", "veil-issuer").unwrap();
        svc.reserve(own.clone());
        let ok = svc
            .sign(Some("agent-token"), &request("shop", "web"))
            .await
            .unwrap();
        assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
        let refused = svc
            .sign(Some("agent-token"), &request("veil-system", "issuer"))
            .await
            .unwrap_err();
        assert_eq!(refused.code, tonic::Code::PermissionDenied);
        assert!(
            refused.reason.contains("issuer's own identity"),
            "{}",
            refused.reason
        );

        // A huge or malformed name is refused without being echoed.
        let huge = "a".repeat(100_000);
        for (ns, pod) in [
            (huge.as_str(), "web"),
            ("shop", huge.as_str()),
            ("Shop\n", "web"),
        ] {
            let refused = svc
                .sign(Some("agent-token"), &request(ns, pod))
                .await
                .unwrap_err();
            assert_eq!(refused.code, tonic::Code::InvalidArgument);
            assert!(refused.reason.len() < 100, "{}", refused.reason);
        }
        assert_eq!(clip(&huge).chars().count(), MAX_LOGGED_CHARS + 1);
        assert_eq!(clip("a\nb"), "a\\nb");
    }

    #[tokio::test]
    async fn hardening_issuer_rate_limits_failed_authentications_per_peer() {
        let (td, ca, _) = crate::ca::test_ca();
        let node = Arc::new(OneNode::default());
        let svc = service(&td, ca, node.clone());
        let attacker: IpAddr = "198.18.0.66".parse().unwrap();
        let agent: IpAddr = "198.18.0.2".parse().unwrap();
        for _ in 0..MAX_AUTH_FAILURES {
            let r = svc
                .sign_from(Some(attacker), Some("forged"), &request("shop", "web"))
                .await
                .unwrap_err();
            assert_eq!(r.code, tonic::Code::Unauthenticated);
        }
        let reviews = node.reviews.load(Ordering::SeqCst);
        let r = svc
            .sign_from(Some(attacker), Some("forged"), &request("shop", "web"))
            .await
            .unwrap_err();
        assert_eq!(r.code, tonic::Code::ResourceExhausted);
        assert_eq!(
            node.reviews.load(Ordering::SeqCst),
            reviews,
            "no review once limited"
        );
        // Another address is unaffected.
        svc.sign_from(Some(agent), Some("agent-token"), &request("shop", "web"))
            .await
            .unwrap();

        // Memory stays bounded however many addresses fail.
        let limiter = FailureLimiter::new(3, Duration::from_secs(60), 8);
        let now = Instant::now();
        for i in 0..200u32 {
            limiter.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(limiter.tracked() <= 8);
    }

    /// Before, a client that opened TCP and never finished the TLS handshake held its
    /// task and socket forever, and connections were unbounded. Now the handshake has a
    /// deadline and the cap holds: with both slots taken by stalled clients, an agent
    /// waits, and is served once the stalled ones are dropped.
    #[tokio::test]
    async fn hardening_issuer_stalled_handshakes_are_dropped_and_connections_capped() {
        use tokio::io::AsyncReadExt;
        let (td, ca, bundle) = crate::ca::test_ca();
        let svc = service(&td, ca, Arc::default());
        let id = workload_id(&td, "veil-system", "veil-issuer").unwrap();
        let limits = ServeLimits {
            handshake_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            max_connections: 2,
        };
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = serve_with_limits(
            "127.0.0.1:0".parse().unwrap(),
            id.clone(),
            svc,
            limits,
            async {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
        let started = Instant::now();
        let mut stalled = Vec::new();
        for _ in 0..2 {
            stalled.push(TcpStream::connect(running.addr).await.unwrap());
        }
        let connect = || {
            IssuerClient::connect(
                running.addr.to_string(),
                &bundle,
                id.clone(),
                TokenSource::Static("agent-token".into()),
            )
        };
        // Both slots are held: no handshake for the agent yet.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), connect())
                .await
                .is_err(),
            "served beyond the connection cap"
        );
        // The stalled clients are dropped at the handshake deadline.
        for s in &mut stalled {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("stalled client dropped");
            assert!(matches!(n, Ok(0) | Err(_)), "connection closed");
        }
        assert!(started.elapsed() >= Duration::from_millis(900));
        let agent = tokio::time::timeout(Duration::from_secs(5), connect())
            .await
            .expect("agent served once slots free up")
            .unwrap();
        let pod = PodRef {
            namespace: "shop".into(),
            name: "web".into(),
            uid: String::new(),
            service_account: String::new(),
        };
        let got: Result<_, ClientError> = agent.fetch(&pod).await;
        assert_eq!(
            got.unwrap().0.id().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }
}
