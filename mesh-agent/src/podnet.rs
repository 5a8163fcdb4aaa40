//! A pod's network attachment: the veth pair between the node and the pod's namespace,
//! the pod's address and routes, and the node's route back to the pod. All via netlink.
//!
//! The pod gets its address as a /32 and a default route through a link-local gateway
//! (169.254.1.1) whose neighbour entry is pinned to the host-side veth's MAC, so the
//! node needs no address on the veth and no proxy ARP, and pods never share an L2 domain.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::cni::protocol::AttachmentKey;
use crate::netns::{self, NetnsError};

/// The gateway every pod routes through; link-local, so it never collides with a pod CIDR.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Routes Veil installs carry this protocol number, so the agent can find its own after a
/// restart (values above 4 are free for routing daemons; 0x76 is 'v').
pub const ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(0x76);

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const ESRCH: i32 = 3;

/// Errors of pod network set-up.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// A netlink request failed.
    #[error("{op} {target}: {source}")]
    Netlink {
        /// What was requested.
        op: &'static str,
        /// Which interface, address or route.
        target: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// The pod's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// CHECK found something missing or different.
    #[error("{0}")]
    Mismatch(String),
}

impl PodNetError {
    fn netlink(
        op: &'static str,
        target: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> Self {
        let target = target.into();
        move |source| PodNetError::Netlink { op, target, source }
    }
}

/// What ADD created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Host-side interface name.
    pub host_ifname: String,
    /// Host-side interface index.
    pub host_index: u32,
    /// Host-side MAC.
    pub host_mac: [u8; 6],
    /// Pod-side MAC.
    pub pod_mac: [u8; 6],
}

/// The kernel's error number in a netlink error, if it is one.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The host-side name for an attachment: stable across agent restarts (FNV-1a of the
/// container ID and interface), and 15 characters, the kernel's limit.
pub fn host_ifname(key: &AttachmentKey) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key
        .container_id
        .bytes()
        .chain([b'/'])
        .chain(key.ifname.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("veil{:011x}", hash & 0x0fff_ffff_ffff)
}

/// Formats a MAC the way CNI results print it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_mac(link: &LinkMessage) -> [u8; 6] {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(bytes);
                Some(mac)
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// Looks a link up by name; `Ok(None)` when it does not exist.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, PodNetError> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(PodNetError::netlink("look up link", name)(e)),
    }
}

async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), PodNetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(PodNetError::netlink("set up", name))
}

/// Creates the veth pair, addresses and routes the pod, and routes the node to it.
/// On failure nothing it created is left behind.
pub async fn add(
    node: &Handle,
    key: &AttachmentKey,
    pod_netns: &Path,
    ip: Ipv4Addr,
    mtu: u32,
) -> Result<Attached, PodNetError> {
    let host_ifname = host_ifname(key);
    // A retried ADD, or one whose agent died half-way, finds the old pair: start clean.
    remove_link(node, &host_ifname).await?;
    let ns_file = netns::open(pod_netns)?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(key.ifname.clone())
        .mtu(mtu)
        .setns_by_fd(ns_file.as_raw_fd())
        .build();
    let veth = LinkVeth::new(&host_ifname, &key.ifname)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    node.link()
        .add(veth)
        .execute()
        .await
        .map_err(PodNetError::netlink(
            "create veth",
            format!("{host_ifname} <-> {}", key.ifname),
        ))?;
    match configure(node, key, pod_netns, ip, &host_ifname).await {
        Ok(attached) => Ok(attached),
        Err(e) => {
            if let Err(cleanup) = remove_link(node, &host_ifname).await {
                tracing::warn!(host_ifname, error = %cleanup, "could not remove veth after a failed ADD");
            }
            Err(e)
        }
    }
}

async fn configure(
    node: &Handle,
    key: &AttachmentKey,
    pod_netns: &Path,
    ip: Ipv4Addr,
    host_ifname: &str,
) -> Result<Attached, PodNetError> {
    let host = link_by_name(node, host_ifname).await?.ok_or_else(|| {
        PodNetError::Mismatch(format!("veth {host_ifname} vanished after creation"))
    })?;
    let host_index = host.header.index;
    let host_mac = link_mac(&host);
    set_up(node, host_index, host_ifname).await?;

    let pod = netns::netlink_in(pod_netns).await?;
    let ns = pod_netns.display().to_string();
    if let Some(lo) = link_by_name(&pod, "lo").await? {
        set_up(&pod, lo.header.index, "lo").await?;
    }
    let eth = link_by_name(&pod, &key.ifname).await?.ok_or_else(|| {
        PodNetError::Mismatch(format!("{} missing in {ns} after creation", key.ifname))
    })?;
    let pod_index = eth.header.index;
    let pod_mac = link_mac(&eth);
    set_up(&pod, pod_index, &key.ifname).await?;
    pod.address()
        .add(pod_index, IpAddr::V4(ip), 32)
        .execute()
        .await
        .map_err(PodNetError::netlink(
            "add address",
            format!("{ip}/32 on {} in {ns}", key.ifname),
        ))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(POD_GATEWAY, 32)
                .output_interface(pod_index)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(PodNetError::netlink(
            "add route",
            format!("{POD_GATEWAY}/32 dev {} in {ns}", key.ifname),
        ))?;
    pod.neighbours()
        .add(pod_index, IpAddr::V4(POD_GATEWAY))
        .link_layer_address(&host_mac)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(PodNetError::netlink(
            "add neighbour",
            format!("{POD_GATEWAY} in {ns}"),
        ))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(POD_GATEWAY)
                .output_interface(pod_index)
                .build(),
        )
        .execute()
        .await
        .map_err(PodNetError::netlink(
            "add route",
            format!("default via {POD_GATEWAY} in {ns}"),
        ))?;

    node.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(host_index)
                .scope(RouteScope::Link)
                .protocol(ROUTE_PROTOCOL)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(PodNetError::netlink(
            "add route",
            format!("{ip}/32 dev {host_ifname}"),
        ))?;
    Ok(Attached {
        host_ifname: host_ifname.to_string(),
        host_index,
        host_mac,
        pod_mac,
    })
}

/// Deletes a link by name; a link that is already gone is success.
pub async fn remove_link(handle: &Handle, name: &str) -> Result<(), PodNetError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ESRCH)) => Ok(()),
        Err(e) => Err(PodNetError::netlink("delete link", name)(e)),
    }
}

/// Removes the attachment: deleting the host side takes the pod side and both routes with it.
pub async fn del(node: &Handle, key: &AttachmentKey) -> Result<(), PodNetError> {
    remove_link(node, &host_ifname(key)).await
}

/// Checks that the attachment is as ADD left it.
pub async fn check(
    node: &Handle,
    key: &AttachmentKey,
    pod_netns: &Path,
    ip: Ipv4Addr,
) -> Result<(), PodNetError> {
    let host_ifname = host_ifname(key);
    if link_by_name(node, &host_ifname).await?.is_none() {
        return Err(PodNetError::Mismatch(format!(
            "host-side veth {host_ifname} of container {} is missing",
            key.container_id
        )));
    }
    let pod = netns::netlink_in(pod_netns).await?;
    let ns = pod_netns.display();
    let eth = link_by_name(&pod, &key.ifname).await?.ok_or_else(|| {
        PodNetError::Mismatch(format!("interface {} is missing in {ns}", key.ifname))
    })?;
    let mut addresses = pod
        .address()
        .get()
        .set_link_index_filter(eth.header.index)
        .execute();
    let mut found = false;
    while let Some(msg) = addresses
        .try_next()
        .await
        .map_err(PodNetError::netlink("list addresses", ns.to_string()))?
    {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
        let AddressMessage {
            header, attributes, ..
        } = msg;
        found |= header.prefix_len == 32
            && attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip));
    }
    if !found {
        return Err(PodNetError::Mismatch(format!(
            "address {ip}/32 is missing on {} in {ns}",
            key.ifname
        )));
    }
    Ok(())
}

/// Whether a netlink error means "already exists".
pub fn is_exists(err: &rtnetlink::Error) -> bool {
    errno(err) == Some(EEXIST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_host_ifname_is_stable_and_short() {
        let key = AttachmentKey {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        };
        let name = host_ifname(&key);
        assert_eq!(name.len(), 15);
        assert_eq!(name, host_ifname(&key.clone()));
        let other = AttachmentKey {
            container_id: "abc".into(),
            ifname: "eth1".into(),
        };
        assert_ne!(name, host_ifname(&other));
    }

    #[test]
    fn cni_mac_formatting() {
        assert_eq!(format_mac(&[0x0a, 0, 0xff, 1, 2, 3]), "0a:00:ff:01:02:03");
    }
}
