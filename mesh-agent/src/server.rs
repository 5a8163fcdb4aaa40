//! The agent's CNI socket: one JSON request per connection from `mesh-cni`, dispatched to
//! address management, pod networking and the eBPF counters.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use crate::admin::{AdminResponse, PodInfo};
use crate::cni::protocol::{
    decode_request, AgentRequest, AgentResponse, Attachment, AttachmentKey,
};
use crate::cni::spec::{CniError, CniResult, ErrorCode, Interface, IpConfig, Route};
use crate::ipam::{Ipam, IpamError};
use crate::podnet::{self, format_mac, PodNetError, POD_GATEWAY};
use veil_identity::workload_api::NetnsAttestor;

/// Everything a request handler needs.
pub struct PodService {
    /// The node's address pool.
    pub ipam: Ipam,
    /// Netlink in the node's namespace.
    pub netlink: Handle,
    /// The eBPF datapath on pods' veths: counters, anti-spoofing, proxy steering.
    pub redirect: Arc<crate::redirect::Redirect>,
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
        let mut live = std::collections::BTreeSet::new();
        for (ip, allocation) in self.ipam.allocations() {
            self.reregister(&allocation);
            let ifname = podnet::host_ifname(&allocation.key);
            match podnet::link_by_name(&self.netlink, &ifname).await {
                Ok(Some(link)) => {
                    match self.attach_redirect(&ifname, link.header.index, ip).await {
                        Ok(()) => {
                            live.insert(link.header.index);
                            tracing::info!(%ip, ifname, "restored pod")
                        }
                        Err(e) => {
                            tracing::error!(%ip, ifname, error = %e, "could not re-attach counter")
                        }
                    }
                }
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
        // Entries of pods deleted while no agent ran (pinned maps outlive agents).
        match self.redirect.prune(&live) {
            Ok(0) => {}
            Ok(gone) => tracing::info!(entries = gone, "pruned eBPF entries of pods gone"),
            Err(e) => tracing::warn!(error = %e, "prune eBPF entries"),
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
            .attach_redirect(&attached.host_ifname, attached.host_index, ip)
            .await
        {
            let _ = podnet::remove_link(&self.netlink, &attached.host_ifname).await;
            return Err(CniError::new(ErrorCode::IoFailure, e.to_string(), ""));
        }
        Ok(attached)
    }

    /// Attaches the eBPF program to a pod's host-side veth and lets it accept local
    /// sources (see [`crate::redirect::accept_local`]).
    async fn attach_redirect(
        &self,
        ifname: &str,
        ifindex: u32,
        ip: Ipv4Addr,
    ) -> Result<(), crate::redirect::RedirectError> {
        crate::redirect::accept_local(&self.netlink, ifindex).await?;
        self.redirect.attach_pod(ifname, ifindex, ip)
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
        if let Err(e) = self.redirect.detach_pod(&ifname) {
            tracing::warn!(ifname, error = %e, "detach the pod's eBPF program");
        }
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

    /// The node key, peers and queues, for `meshctl wireguard`.
    pub(crate) fn wireguard_status(&self) -> Result<AdminResponse, String> {
        let wg = self.wireguard.as_ref().ok_or_else(Self::encryption_off)?;
        Ok(AdminResponse::Wireguard {
            public_key: crate::wireguard::keys::encode(&wg.endpoint().public_key),
            peers: wg.status(),
            dropped_no_peer: wg.dropped_no_peer(),
            queues: wg.queues(),
            excluded: wg.excluded(),
        })
    }

    /// Asks the rotation task for a new key now, for `meshctl wireguard rotate`.
    pub(crate) async fn rotate_key(&self) -> Result<AdminResponse, String> {
        let rotate = self.rotate.as_ref().ok_or_else(Self::encryption_off)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = "the rotation task has stopped";
        rotate.send(tx).await.map_err(|_| stopped.to_string())?;
        let public_key = rx.await.map_err(|_| stopped.to_string())??;
        Ok(AdminResponse::Rotated { public_key })
    }

    fn encryption_off() -> String {
        "encryption is off on this node (--encryption none)".to_string()
    }

    /// The attachments with their counters, for `meshctl pods`.
    pub(crate) fn list(&self) -> Vec<PodInfo> {
        self.ipam
            .allocations()
            .into_iter()
            .map(|(ip, allocation)| {
                let host_ifname = podnet::host_ifname(&allocation.key);
                let counts = self.redirect.counters(&host_ifname).unwrap_or_default();
                PodInfo {
                    key: allocation.key,
                    pod: allocation.pod,
                    ip,
                    host_ifname,
                    tx_packets: counts.packets,
                    tx_bytes: counts.bytes,
                    spoofed_packets: counts.spoofed_packets,
                }
            })
            .collect()
    }
}

/// Serves `mesh-cni` on the CNI socket until the listener fails (see
/// [`crate::local_socket::serve`]): one request line, one answer line.
pub async fn serve(listener: UnixListener, service: Arc<PodService>) {
    crate::local_socket::serve(listener, "cni", move |line, mut write| {
        let service = service.clone();
        async move {
            let response = match decode_request(&line) {
                Ok(request) => service.handle(request).await,
                Err(e) => AgentResponse::Failed(e),
            };
            crate::local_socket::write_line(&mut write, &response).await?;
            write.shutdown().await?;
            Ok(())
        }
    })
    .await
}
