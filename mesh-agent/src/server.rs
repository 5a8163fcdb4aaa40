//! The agent's unix socket: one JSON request per connection from `mesh-cni` or `meshctl`,
//! dispatched to address management, pod networking and the eBPF counters.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cni::protocol::{
    decode_request, AgentRequest, AgentResponse, Attachment, AttachmentKey, PodInfo,
};
use crate::cni::spec::{CniError, CniResult, ErrorCode, Interface, IpConfig, Route};
use crate::ipam::{Ipam, IpamError};
use crate::pod_counters::PodCounters;
use crate::podnet::{self, format_mac, PodNetError, POD_GATEWAY};
use veil_identity::workload_api::NetnsAttestor;

/// A request line larger than this is not a CNI request; the cap keeps a broken client
/// from growing the agent's memory.
const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// Everything a request handler needs.
pub struct PodService {
    /// The node's address pool.
    pub ipam: Ipam,
    /// Netlink in the node's namespace.
    pub netlink: Handle,
    /// The eBPF counters.
    pub counters: PodCounters,
    /// MTU for pod interfaces.
    pub pod_mtu: u32,
    /// The WireGuard path, when encryption is on.
    pub wireguard: Option<Arc<crate::wireguard::Wireguard>>,
    /// Asks the agent's rotation task to rotate now; it answers with the new key.
    pub rotate:
        Option<tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<String, String>>>>,
    /// Maps pod network namespaces to pods for the Workload API, when identity is on.
    pub attestor: Option<Arc<NetnsAttestor>>,
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let code = match e {
            IpamError::Exhausted { .. } => ErrorCode::AddressPoolExhausted,
            _ => ErrorCode::IoFailure,
        };
        CniError::new(code, e.to_string(), "")
    }
}

impl From<PodNetError> for CniError {
    fn from(e: PodNetError) -> Self {
        let code = match e {
            PodNetError::Mismatch(_) => ErrorCode::CheckFailed,
            PodNetError::Netns(_) => ErrorCode::InvalidEnvironment,
            PodNetError::Netlink { .. } => ErrorCode::IoFailure,
        };
        CniError::new(code, e.to_string(), "")
    }
}

impl PodService {
    /// Re-attaches counters to the pods that survived an agent restart, and registers
    /// their namespaces with the attestor again.
    pub async fn restore(&self) {
        for (ip, allocation) in self.ipam.allocations() {
            self.reregister(&allocation);
            let ifname = podnet::host_ifname(&allocation.key);
            match podnet::link_by_name(&self.netlink, &ifname).await {
                Ok(Some(link)) => match self.counters.attach(&ifname, link.header.index) {
                    Ok(()) => tracing::info!(%ip, ifname, "restored pod"),
                    Err(e) => {
                        tracing::error!(%ip, ifname, error = %e, "could not re-attach counter")
                    }
                },
                // Its network is gone (the pod was deleted while no agent answered, whose
                // DEL then found no agent; or the node rebooted): nothing uses the address.
                Ok(None) => match self.del(&allocation.key).await {
                    Ok(()) => {
                        tracing::info!(%ip, ifname, container = allocation.key.container_id, "released the address of a pod whose veth is gone")
                    }
                    Err(e) => {
                        tracing::warn!(%ip, ifname, error = %e, "could not release the address of a pod whose veth is gone")
                    }
                },
                Err(e) => tracing::error!(%ip, ifname, error = %e, "look up pod veth"),
            }
        }
    }

    /// Answers one request.
    pub async fn handle(&self, request: AgentRequest) -> AgentResponse {
        let outcome = match request {
            AgentRequest::Add(a) => self.add(&a).await.map(AgentResponse::Added),
            AgentRequest::Del(a) => self.del(&a.key).await.map(|()| AgentResponse::Done),
            AgentRequest::Check(a) => self.check(&a).await.map(|()| AgentResponse::Done),
            AgentRequest::Status => Ok(AgentResponse::Done),
            AgentRequest::Gc { valid } => self.gc(&valid).await.map(|()| AgentResponse::Done),
            AgentRequest::ListPods => Ok(AgentResponse::Pods { pods: self.list() }),
            AgentRequest::WireguardStatus => self.wireguard_status(),
            AgentRequest::RotateKey => self.rotate_key().await,
        };
        outcome.unwrap_or_else(AgentResponse::Failed)
    }

    async fn add(&self, a: &Attachment) -> Result<CniResult, CniError> {
        let netns = a.netns.as_deref().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                "CNI_NETNS is not set",
                "ADD needs the pod's namespace",
            )
        })?;
        // Refused at once when it is no network namespace (a FIFO would block the open)
        // or the node's own: ADD would otherwise move host interfaces.
        let netns_id = crate::netns::pod_netns_id(Path::new(netns)).map_err(PodNetError::Netns)?;
        let pod = match (&a.pod_namespace, &a.pod_name) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        };
        let ip = self
            .ipam
            .allocate_in(&a.key, pod.as_deref(), Some(netns), Some(netns_id))?;
        let attached = match self.attach(a, Path::new(netns), ip).await {
            Ok(attached) => attached,
            Err(e) => {
                // Nothing leaks: the veth is gone (attach cleans up), so free the address.
                if let Err(release) = self.ipam.release(&a.key) {
                    tracing::error!(%ip, error = %release, "release address after failed ADD");
                }
                tracing::warn!(container = a.key.container_id, error = %e, "ADD failed");
                return Err(e);
            }
        };
        tracing::info!(container = a.key.container_id, pod, %ip, host_ifname = attached.host_ifname, "pod attached");
        if let (Some(ns), Some(name)) = (&a.pod_namespace, &a.pod_name) {
            self.register_netns(netns_id, (ns.clone(), name.clone()));
        }
        Ok(CniResult {
            cni_version: a.cni_version.clone(),
            interfaces: vec![
                Interface {
                    name: attached.host_ifname.clone(),
                    mac: format_mac(&attached.host_mac),
                    sandbox: None,
                },
                Interface {
                    name: a.key.ifname.clone(),
                    mac: format_mac(&attached.pod_mac),
                    sandbox: Some(netns.to_string()),
                },
            ],
            ips: vec![IpConfig {
                address: Ipv4Net::new(ip, 32).expect("/32 is valid"),
                gateway: Some(POD_GATEWAY),
                interface: 1,
                version: None,
            }],
            routes: vec![Route {
                dst: Ipv4Net::default(),
                gw: Some(POD_GATEWAY),
            }],
            dns: Default::default(),
        })
    }

    async fn attach(
        &self,
        a: &Attachment,
        netns: &Path,
        ip: Ipv4Addr,
    ) -> Result<podnet::Attached, CniError> {
        let attached = podnet::add(&self.netlink, &a.key, netns, ip, self.pod_mtu).await?;
        if let Err(e) = self
            .counters
            .attach(&attached.host_ifname, attached.host_index)
        {
            let _ = podnet::remove_link(&self.netlink, &attached.host_ifname).await;
            return Err(CniError::new(ErrorCode::IoFailure, e.to_string(), ""));
        }
        Ok(attached)
    }

    /// Tells the attestor (if identity is on) that the namespace `id` is `pod`'s. A
    /// failure costs the pod its identity, never its network, so it is only logged.
    fn register_netns(&self, id: crate::netns::NsId, pod: (String, String)) {
        let Some(attestor) = &self.attestor else {
            return;
        };
        match attestor.register_namespace((id.dev, id.ino), pod.clone()) {
            Ok(()) => {
                tracing::debug!(
                    namespace = pod.0,
                    pod = pod.1,
                    netns_inode = id.ino,
                    "netns registered for attestation"
                )
            }
            Err(e) => {
                tracing::warn!(namespace = pod.0, pod = pod.1, netns_inode = id.ino, error = %e, "cannot register netns for attestation; the pod gets no identity")
            }
        }
    }

    /// Registers a recorded allocation's namespace again (after a restart, or when an
    /// older sandbox of the same pod goes). The recorded path is opened again, and used
    /// only if it still names the namespace recorded at ADD: a path re-used for another
    /// namespace since must not hand this pod's identity to whoever is in it.
    fn reregister(&self, allocation: &crate::ipam::Allocation) {
        let (Some(netns), Some(pod)) = (&allocation.netns, allocation.pod_key()) else {
            return;
        };
        if self.attestor.is_none() {
            return;
        }
        match (
            crate::netns::pod_netns_id(Path::new(netns)),
            allocation.netns_id,
        ) {
            (Ok(now), Some(recorded)) if now == recorded => self.register_netns(now, pod),
            (Ok(_), Some(_)) => {
                tracing::warn!(
                    namespace = pod.0,
                    pod = pod.1,
                    netns,
                    "the recorded netns path now names another namespace; the pod gets no identity"
                )
            }
            // Records from before identities were kept: the path is all there is.
            (Ok(now), None) => self.register_netns(now, pod),
            (Err(e), _) => {
                tracing::warn!(namespace = pod.0, pod = pod.1, netns, error = %e, "recorded netns unusable; the pod gets no identity")
            }
        }
    }

    async fn del(&self, key: &AttachmentKey) -> Result<(), CniError> {
        if let Some(attestor) = &self.attestor {
            if let Some(pod) = self.ipam.allocation(key).and_then(|a| a.pod_key()) {
                attestor.unregister(&pod);
                // A newer sandbox of the same pod (ADD may come before the old one's DEL)
                // keeps its registration.
                for (_, other) in self.ipam.allocations() {
                    if other.key != *key && other.pod_key().as_ref() == Some(&pod) {
                        self.reregister(&other);
                    }
                }
            }
        }
        let ifname = podnet::host_ifname(key);
        self.counters.detach(&ifname);
        podnet::del(&self.netlink, key).await?;
        if let Some(ip) = self.ipam.release(key)? {
            tracing::info!(container = key.container_id, %ip, "pod detached");
        }
        Ok(())
    }

    async fn check(&self, a: &Attachment) -> Result<(), CniError> {
        let ip = self.ipam.lookup(&a.key).ok_or_else(|| {
            CniError::new(
                ErrorCode::UnknownContainer,
                format!(
                    "container {} interface {} has no address on this node",
                    a.key.container_id, a.key.ifname
                ),
                "",
            )
        })?;
        let netns = a.netns.as_deref().unwrap_or_default();
        Ok(podnet::check(&self.netlink, &a.key, Path::new(netns), ip).await?)
    }

    async fn gc(&self, valid: &[AttachmentKey]) -> Result<(), CniError> {
        for (ip, allocation) in self.ipam.allocations() {
            if !valid.contains(&allocation.key) {
                tracing::info!(%ip, container = allocation.key.container_id, "garbage-collecting attachment");
                self.del(&allocation.key).await?;
            }
        }
        Ok(())
    }

    fn wireguard_status(&self) -> Result<AgentResponse, CniError> {
        let wg = self.wireguard.as_ref().ok_or_else(Self::encryption_off)?;
        Ok(AgentResponse::Wireguard {
            public_key: crate::wireguard::keys::encode(&wg.endpoint().public_key),
            peers: wg.status(),
            dropped_no_peer: wg.dropped_no_peer(),
            queues: wg.queues(),
            excluded: wg.excluded(),
        })
    }

    async fn rotate_key(&self) -> Result<AgentResponse, CniError> {
        let rotate = self.rotate.as_ref().ok_or_else(Self::encryption_off)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let failed = |msg: String| CniError::new(ErrorCode::IoFailure, msg, "");
        rotate
            .send(tx)
            .await
            .map_err(|_| failed("the rotation task has stopped".into()))?;
        let public_key = rx
            .await
            .map_err(|_| failed("the rotation task has stopped".into()))?
            .map_err(failed)?;
        Ok(AgentResponse::Rotated { public_key })
    }

    fn encryption_off() -> CniError {
        CniError::new(
            ErrorCode::UnsupportedField,
            "encryption is off on this node (--encryption none)",
            "",
        )
    }

    fn list(&self) -> Vec<PodInfo> {
        self.ipam
            .allocations()
            .into_iter()
            .map(|(ip, allocation)| {
                let host_ifname = podnet::host_ifname(&allocation.key);
                let counts = self.counters.read(&host_ifname).unwrap_or_default();
                PodInfo {
                    key: allocation.key,
                    pod: allocation.pod,
                    ip,
                    host_ifname,
                    tx_packets: counts.packets,
                    tx_bytes: counts.bytes,
                }
            })
            .collect()
    }
}

/// Connections served at once: mesh-cni calls are short and a node runs at most a few
/// hundred pods, so 64 leaves room for bursts while a flood of idle connections cannot
/// exhaust the agent's file descriptors or tasks.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request line: mesh-cni writes it at once, so
/// 10 s only ever ends slow or stalled clients.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds the socket, replacing a stale one from an earlier run. The socket is root-only
/// whatever the umask: it is created under a umask of 0o177 (so it is never reachable by
/// others, not even for a moment), then set to 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // umask is process-wide; bind is only called at start, before any other file is made.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Why a connection was turned away before its request was read.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The peer's credentials could not be read.
    #[error("read the caller's credentials (SO_PEERCRED): {0}")]
    Credentials(std::io::Error),
    /// The peer is not root.
    #[error("caller uid {uid} (pid {pid:?}) is not root")]
    NotRoot {
        /// The caller's uid.
        uid: u32,
        /// The caller's pid, when known.
        pid: Option<i32>,
    },
    /// The request did not arrive in time.
    #[error("no request within {0:?}")]
    Timeout(std::time::Duration),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves connections until the listener fails: root callers only, at most
/// [`MAX_CONNECTIONS`] at once (others wait in the backlog), each with
/// [`REQUEST_TIMEOUT`] to send its request.
pub async fn serve(listener: UnixListener, service: Arc<PodService>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut delay = std::time::Duration::from_millis(10);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                delay = std::time::Duration::from_millis(10);
                let service = service.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = serve_one(stream, &service).await {
                        tracing::warn!(error = %e, "CNI connection refused or failed");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "accept on CNI socket");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

async fn serve_one(stream: UnixStream, service: &PodService) -> Result<(), ConnectionError> {
    let cred = stream.peer_cred().map_err(ConnectionError::Credentials)?;
    if cred.uid() != 0 {
        return Err(ConnectionError::NotRoot {
            uid: cred.uid(),
            pid: cred.pid(),
        });
    }
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| ConnectionError::Timeout(REQUEST_TIMEOUT))??;
    let response = match decode_request(&line) {
        Ok(request) => service.handle(request).await,
        Err(e) => AgentResponse::Failed(e),
    };
    // Plain data always serialises; an empty line would tell the client something broke.
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&out))
        .await
        .map_err(|_| ConnectionError::Timeout(REQUEST_TIMEOUT))??;
    write.shutdown().await?;
    Ok(())
}
