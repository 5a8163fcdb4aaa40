//! Routes from this node to the other nodes' pod CIDRs, kept equal to the peer set.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::k8s::NodeInfo;
use crate::podnet::{PodNetError, ROUTE_PROTOCOL};

/// One route to a peer's pod CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRoute {
    /// The peer's pod CIDR.
    pub dst: Ipv4Net,
    /// The peer's node address.
    pub via: Ipv4Addr,
}

fn peer_route(msg: &RouteMessage) -> Option<PeerRoute> {
    if msg.header.protocol != ROUTE_PROTOCOL {
        return None;
    }
    let mut dst = None;
    let mut via = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(*a),
            _ => {}
        }
    }
    // Pod routes carry our protocol too, but have no gateway.
    Some(PeerRoute {
        dst: Ipv4Net::new(dst?, msg.header.destination_prefix_length).ok()?,
        via: via?,
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
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix_len())
        .gateway(route.via)
        .protocol(ROUTE_PROTOCOL)
        .build()
}

/// Makes the kernel's peer routes equal to `peers`: adds the missing, replaces changed
/// ones, deletes the stale. Failures for one peer do not stop the others.
pub async fn reconcile(handle: &Handle, peers: &[NodeInfo]) -> Result<(), PodNetError> {
    let want: BTreeSet<PeerRoute> = peers
        .iter()
        .map(|p| PeerRoute {
            dst: p.pod_cidr,
            via: p.internal_ip,
        })
        .collect();
    let have = installed(handle).await?;
    let mut first_error = None;
    for stale in have.difference(&want) {
        match handle.route().del(message(stale)).execute().await {
            Ok(()) => tracing::info!(dst = %stale.dst, via = %stale.via, "removed peer route"),
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
            Ok(()) => tracing::info!(dst = %route.dst, via = %route.via, "added peer route"),
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
