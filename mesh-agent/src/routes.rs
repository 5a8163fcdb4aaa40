//! Routes from this node to the other nodes' pod CIDRs, kept equal to the peer set.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::k8s::NodeInfo;
use crate::podnet::PodNetError;

/// Routes to other nodes' pods carry this protocol number (pod routes carry
/// [`crate::podnet::ROUTE_PROTOCOL`]), so the reconciler finds exactly its own after a restart.
pub const PEER_ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(0x77);

/// Where a peer route sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NextHop {
    /// In clear text via the peer's node address (encryption off); an IPv6 node address
    /// is a next hop of another family (RTA_VIA), which Linux routes since 5.2.
    Via(IpAddr),
    /// Into the WireGuard device (interface index).
    Device(u32),
}

/// One route to a peer's pod CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRoute {
    /// The peer's pod CIDR.
    pub dst: Ipv4Net,
    /// Where it goes.
    pub next_hop: NextHop,
}

fn peer_route(msg: &RouteMessage) -> Option<PeerRoute> {
    if msg.header.protocol != PEER_ROUTE_PROTOCOL {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut via = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => via = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let next_hop = match (via, oif) {
        (Some(via), _) => NextHop::Via(via),
        (None, Some(oif)) => NextHop::Device(oif),
        (None, None) => return None,
    };
    Some(PeerRoute {
        dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
        next_hop,
    })
}

/// The peer routes the kernel holds now.
pub async fn installed(handle: &Handle) -> Result<BTreeSet<PeerRoute>, PodNetError> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut found = BTreeSet::new();
    while let Some(msg) = routes
        .try_next()
        .await
        .map_err(|source| PodNetError::Netlink {
            op: "list routes",
            target: "main table".into(),
            source,
        })?
    {
        found.extend(peer_route(&msg));
    }
    Ok(found)
}

fn message(route: &PeerRoute) -> RouteMessage {
    let builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix_len())
        .protocol(PEER_ROUTE_PROTOCOL);
    match route.next_hop {
        NextHop::Via(IpAddr::V4(via)) => builder.gateway(via).build(),
        NextHop::Via(IpAddr::V6(via)) => builder.via(via).build(),
        NextHop::Device(index) => builder.output_interface(index).build(),
    }
}

/// The routes for `peers`: through the WireGuard device when `device` is set (strict: a
/// peer without a key is routed there too, and dropped, never sent in clear), else
/// plainly via the peer's node address. With a device, `drops` (the cluster's pod range,
/// the ranges of nodes that are gone) go into it as well, so pods no peer serves are
/// never sent in clear either.
pub fn desired(peers: &[NodeInfo], device: Option<u32>, drops: &[Ipv4Net]) -> BTreeSet<PeerRoute> {
    let mut want: BTreeSet<PeerRoute> = peers
        .iter()
        .map(|p| PeerRoute {
            dst: p.pod_cidr,
            next_hop: device.map_or(NextHop::Via(p.internal_ip), NextHop::Device),
        })
        .collect();
    if let Some(index) = device {
        // A range that is also a peer's is the same route, which the set holds once.
        want.extend(drops.iter().map(|&dst| PeerRoute {
            dst,
            next_hop: NextHop::Device(index),
        }));
    }
    want
}

/// Makes the kernel's peer routes equal to `want`: deletes the stale, adds (or replaces)
/// the missing. Failures for one route do not stop the others.
pub async fn reconcile(handle: &Handle, want: &BTreeSet<PeerRoute>) -> Result<(), PodNetError> {
    let have = installed(handle).await?;
    let mut first_error = None;
    for stale in have.difference(want) {
        // A route whose next hop changed is replaced below; deleting it first would open
        // a moment without a route, so only delete destinations no longer wanted.
        if want.iter().any(|w| w.dst == stale.dst) {
            continue;
        }
        match handle.route().del(message(stale)).execute().await {
            Ok(()) => {
                tracing::info!(dst = %stale.dst, next_hop = ?stale.next_hop, "removed peer route")
            }
            Err(source) => {
                tracing::warn!(dst = %stale.dst, error = %source, "remove peer route");
                first_error.get_or_insert(PodNetError::Netlink {
                    op: "delete route",
                    target: stale.dst.to_string(),
                    source,
                });
            }
        }
    }
    for route in want.difference(&have) {
        match handle.route().add(message(route)).replace().execute().await {
            Ok(()) => {
                tracing::info!(dst = %route.dst, next_hop = ?route.next_hop, "added peer route")
            }
            Err(source) => {
                tracing::warn!(dst = %route.dst, error = %source, "add peer route");
                first_error.get_or_insert(PodNetError::Netlink {
                    op: "add route",
                    target: route.dst.to_string(),
                    source,
                });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidr: cidr.parse().unwrap(),
            internal_ip: ip.parse().unwrap(),
            wireguard: None,
        }
    }

    #[test]
    fn wireguard_strict_routes_send_every_peer_and_the_catch_all_into_the_device() {
        let peers = [node("a", "198.19.1.0/24", "198.18.0.2")];
        let drops = [
            "198.19.0.0/16".parse().unwrap(),
            "198.19.1.0/24".parse().unwrap(),
        ];
        let want = desired(&peers, Some(9), &drops);
        assert!(want.iter().all(|r| r.next_hop == NextHop::Device(9)));
        assert_eq!(want.len(), 2);
        let plain = desired(&peers, None, &drops);
        assert_eq!(plain.len(), 1, "no catch-all without encryption");
        assert_eq!(
            plain.first().unwrap().next_hop,
            NextHop::Via("198.18.0.2".parse().unwrap())
        );
    }

    #[test]
    fn routes_via_an_ipv6_node_use_rta_via_and_read_back() {
        for ip in ["198.18.0.2", "2001:2::2"] {
            let route = PeerRoute {
                dst: "198.19.1.0/24".parse().unwrap(),
                next_hop: NextHop::Via(ip.parse().unwrap()),
            };
            let mut msg = message(&route);
            msg.header.protocol = PEER_ROUTE_PROTOCOL;
            assert_eq!(peer_route(&msg), Some(route), "{ip}");
        }
    }
}
