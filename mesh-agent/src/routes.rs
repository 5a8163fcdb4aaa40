//! Routes from this node to the other nodes' pod CIDRs, kept equal to the peer set, and,
//! with encryption, the routes that send this node's pods' traffic for other nodes' own
//! addresses (API server, host-network pods, NodePorts) through WireGuard too.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::k8s::NodeInfo;
use crate::podnet::PodNetError;

/// Routes to other nodes' pods carry this protocol number (pod routes carry
/// [`crate::podnet::ROUTE_PROTOCOL`]), so the reconciler finds exactly its own after a restart.
pub const PEER_ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(0x77);
/// The main routing table, where routes to pod CIDRs live.
pub const MAIN_TABLE: u32 = 254;
/// The table that the rule "from this node's pod CIDR" consults first: routes to peer
/// nodes' addresses into the WireGuard device. Only pods' packets see it, so the node's
/// own traffic to its peers (WireGuard's UDP among it) keeps the underlay.
pub const PODS_TO_NODES_TABLE: u32 = 0x77;
/// That rule's priority: before the main table (32766).
pub const PODS_TO_NODES_RULE_PRIORITY: u32 = 0x77;
/// The same rule for packets the node itself sends from a pod's address (`iif lo`: the
/// proxy answering, as the pod, a connection another node opened itself). It must come
/// before the redirect rules, whose "iif lo ipproto tcp lookup main" (111) would send
/// those answers to the peer's address along the underlay, in clear. Packets arriving
/// from pods are not `iif lo`, so the proxy still gets the pods' replies to its upstream
/// connections (rule 113).
pub const PODS_TO_NODES_LOCAL_RULE_PRIORITY: u32 = 0x6d;
const _: () = assert!(
    PODS_TO_NODES_LOCAL_RULE_PRIORITY < veil_bpf::consts::NODE_CONNECT_RULE_PRIORITY
        && PODS_TO_NODES_LOCAL_RULE_PRIORITY < veil_bpf::consts::LOCAL_OUT_RULE_PRIORITY
);

/// The rules that look up [`PODS_TO_NODES_TABLE`] for `from <pod CIDR>`: (priority,
/// whether only the node's own packets, `iif lo`).
const PODS_RULES: [(u32, bool); 2] = [
    (PODS_TO_NODES_LOCAL_RULE_PRIORITY, true),
    (PODS_TO_NODES_RULE_PRIORITY, false),
];

/// Where a peer route sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NextHop {
    /// In clear text via the peer's node address (encryption off); an IPv6 node address
    /// is a next hop of another family (RTA_VIA), which Linux routes since 5.2.
    Via(IpAddr),
    /// Into the WireGuard device (interface index).
    Device(u32),
    /// Nowhere: the sender gets "network unreachable" (the Service range, for pods).
    Unreachable,
}

/// One route to a peer: its pod CIDR (main table) or its node address (pods' table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRoute {
    /// The routing table: [`MAIN_TABLE`] or [`PODS_TO_NODES_TABLE`].
    pub table: u32,
    /// The peer's pod CIDR, or its node address as a /32.
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
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => via = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let next_hop = match (via, oif) {
        _ if msg.header.kind == RouteType::Unreachable => NextHop::Unreachable,
        (Some(via), _) => NextHop::Via(via),
        (None, Some(oif)) => NextHop::Device(oif),
        (None, None) => return None,
    };
    Some(PeerRoute {
        table,
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
        .table_id(route.table)
        .protocol(PEER_ROUTE_PROTOCOL);
    match route.next_hop {
        NextHop::Via(IpAddr::V4(via)) => builder.gateway(via).build(),
        NextHop::Via(IpAddr::V6(via)) => builder.via(via).build(),
        NextHop::Device(index) => builder.output_interface(index).build(),
        NextHop::Unreachable => builder.kind(RouteType::Unreachable).build(),
    }
}

/// The routes for `peers`: through the WireGuard device when `device` is set (strict: a
/// peer without a key is routed there too, and dropped, never sent in clear), else
/// plainly via the peer's node address. With a device, `drops` (the cluster's pod range,
/// the ranges of nodes that are gone) go into it as well, so pods no peer serves are
/// never sent in clear either; and every peer's IPv4 node address goes into it from the
/// pods' table, so a pod talking to another node itself (the API server, host-network
/// pods, NodePorts) is encrypted too, and the replies of such a node (routed to the pod
/// CIDR, into its own device) come back the way the requests went.
///
/// `services` (the cluster's Service range) is unreachable for pods: kube-proxy translates
/// a Service address before routing, so what is still addressed to the range has no
/// Service behind it yet (kube-proxy has not caught up) and would otherwise follow the
/// node's default route off the node. The node's own traffic never sees this table.
pub fn desired(
    peers: &[NodeInfo],
    device: Option<u32>,
    drops: &[Ipv4Net],
    services: Option<Ipv4Net>,
) -> BTreeSet<PeerRoute> {
    let mut want: BTreeSet<PeerRoute> = peers
        .iter()
        .map(|p| PeerRoute {
            table: MAIN_TABLE,
            dst: p.pod_cidr,
            next_hop: device.map_or(NextHop::Via(p.internal_ip), NextHop::Device),
        })
        .collect();
    if let Some(index) = device {
        // A range that is also a peer's is the same route, which the set holds once.
        want.extend(drops.iter().map(|&dst| PeerRoute {
            table: MAIN_TABLE,
            dst,
            next_hop: NextHop::Device(index),
        }));
        want.extend(peers.iter().filter_map(|p| match p.internal_ip {
            IpAddr::V4(ip) => Some(PeerRoute {
                table: PODS_TO_NODES_TABLE,
                dst: Ipv4Net::from(ip),
                next_hop: NextHop::Device(index),
            }),
            IpAddr::V6(_) => None,
        }));
    }
    want.extend(services.map(|dst| PeerRoute {
        table: PODS_TO_NODES_TABLE,
        dst,
        next_hop: NextHop::Unreachable,
    }));
    want
}

/// Which of [`PODS_RULES`] `msg` is exactly, for `pods` (`None`: stale or someone else's).
fn pods_rule_kind(
    msg: &rtnetlink::packet_route::rule::RuleMessage,
    src: Option<Ipv4Net>,
    pods: Ipv4Net,
) -> Option<(u32, bool)> {
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
    let priority = msg.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    })?;
    let local_only = msg
        .attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Iifname(name) if name == "lo"));
    let other_selector = msg.attributes.iter().any(|a| match a {
        RuleAttribute::Iifname(name) => name != "lo",
        RuleAttribute::Oifname(_) | RuleAttribute::FwMark(_) | RuleAttribute::IpProtocol(_) => true,
        _ => false,
    });
    let kind = (priority, local_only);
    (src == Some(pods)
        && msg.header.action == RuleAction::ToTable
        && msg.header.dst_len == 0
        && !other_selector
        && PODS_RULES.contains(&kind))
    .then_some(kind)
}

/// Makes the rules that look up [`PODS_TO_NODES_TABLE`] exactly [`PODS_RULES`]: "from
/// `pods` lookup it" at [`PODS_TO_NODES_RULE_PRIORITY`], and the same for `iif lo` at
/// [`PODS_TO_NODES_LOCAL_RULE_PRIORITY`]. A rule left for an earlier pod CIDR of the
/// node, or with another action, selector or priority, is replaced (the right ones are
/// added first, so pods' packets never miss them).
pub async fn ensure_pods_rule(handle: &Handle, pods: Ipv4Net) -> Result<(), PodNetError> {
    let existing = pods_rules(handle).await?;
    let present: Vec<(u32, bool)> = existing
        .iter()
        .filter_map(|(src, msg)| pods_rule_kind(msg, *src, pods))
        .collect();
    for (priority, local_only) in PODS_RULES {
        if !present.contains(&(priority, local_only)) {
            add_pods_rule(handle, pods, priority, local_only).await?;
        }
    }
    let mut kept = Vec::new();
    for (src, msg) in existing {
        match pods_rule_kind(&msg, src, pods) {
            Some(kind) if !kept.contains(&kind) => kept.push(kind),
            _ => {
                tracing::info!(from = ?src, "replacing a stale rule to the pods' table");
                delete_pods_rule(handle, src, msg).await?;
            }
        }
    }
    Ok(())
}

async fn delete_pods_rule(
    handle: &Handle,
    src: Option<Ipv4Net>,
    msg: rtnetlink::packet_route::rule::RuleMessage,
) -> Result<(), PodNetError> {
    handle
        .rule()
        .del(msg)
        .execute()
        .await
        .map_err(|source| PodNetError::Netlink {
            op: "delete rule",
            target: format!("from {src:?} lookup {PODS_TO_NODES_TABLE}"),
            source,
        })
}

async fn add_pods_rule(
    handle: &Handle,
    pods: Ipv4Net,
    priority: u32,
    local_only: bool,
) -> Result<(), PodNetError> {
    let mut request = handle
        .rule()
        .add()
        .v4()
        .source_prefix(pods.network(), pods.prefix_len())
        .table_id(PODS_TO_NODES_TABLE)
        .priority(priority)
        // Unset, the kernel answers every lookup through the rule with EINVAL: pods
        // could send nothing at all.
        .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
    if local_only {
        request = request.input_interface("lo");
    }
    request
        .execute()
        .await
        .map_err(|source| PodNetError::Netlink {
            op: "add rule",
            target: format!("from {pods} lookup {PODS_TO_NODES_TABLE}"),
            source,
        })
}

/// Removes every rule that looks up [`PODS_TO_NODES_TABLE`] (uninstall).
pub async fn remove_pods_rules(handle: &Handle) -> Result<(), PodNetError> {
    for (src, msg) in pods_rules(handle).await? {
        delete_pods_rule(handle, src, msg).await?;
    }
    Ok(())
}

async fn pods_rules(
    handle: &Handle,
) -> Result<Vec<(Option<Ipv4Net>, rtnetlink::packet_route::rule::RuleMessage)>, PodNetError> {
    use rtnetlink::packet_route::rule::RuleAttribute;
    let mut rules = handle.rule().get(rtnetlink::IpVersion::V4).execute();
    let mut found = Vec::new();
    while let Some(msg) = rules
        .try_next()
        .await
        .map_err(|source| PodNetError::Netlink {
            op: "list rules",
            target: "IPv4".into(),
            source,
        })?
    {
        let table = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(msg.header.table));
        if table != PODS_TO_NODES_TABLE {
            continue;
        }
        let src = msg.attributes.iter().find_map(|a| match a {
            RuleAttribute::Source(IpAddr::V4(ip)) => Ipv4Net::new(*ip, msg.header.src_len).ok(),
            _ => None,
        });
        found.push((src, msg));
    }
    Ok(found)
}

/// Makes the kernel's peer routes equal to `want`: deletes the stale, adds (or replaces)
/// the missing. Failures for one route do not stop the others.
pub async fn reconcile(handle: &Handle, want: &BTreeSet<PeerRoute>) -> Result<(), PodNetError> {
    let have = installed(handle).await?;
    let mut first_error = None;
    for stale in have.difference(want) {
        // A route whose next hop changed is replaced below; deleting it first would open
        // a moment without a route, so only delete destinations no longer wanted.
        if want
            .iter()
            .any(|w| w.dst == stale.dst && w.table == stale.table)
        {
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
        let want = desired(&peers, Some(9), &drops, None);
        assert!(want.iter().all(|r| r.next_hop == NextHop::Device(9)));
        assert_eq!(want.len(), 3);
        // The peer's node address, for pods only (their table), not for the node itself.
        let node_route: Vec<_> = want
            .iter()
            .filter(|r| r.table == PODS_TO_NODES_TABLE)
            .collect();
        assert_eq!(node_route.len(), 1);
        assert_eq!(node_route[0].dst, "198.18.0.2/32".parse().unwrap());
        let plain = desired(&peers, None, &drops, None);
        assert_eq!(
            plain.len(),
            1,
            "no catch-all nor node routes without encryption"
        );
        assert_eq!(
            plain.first().unwrap().next_hop,
            NextHop::Via("198.18.0.2".parse().unwrap())
        );
    }

    #[test]
    fn the_service_range_is_unreachable_for_pods_in_both_modes() {
        let peers = [node("a", "198.19.1.0/24", "198.18.0.2")];
        let services: Ipv4Net = "198.19.240.0/24".parse().unwrap();
        for device in [Some(9), None] {
            let want = desired(&peers, device, &[], Some(services));
            let route = want.iter().find(|r| r.dst == services).unwrap();
            assert_eq!(route.table, PODS_TO_NODES_TABLE);
            assert_eq!(route.next_hop, NextHop::Unreachable);
            let mut msg = message(route);
            msg.header.protocol = PEER_ROUTE_PROTOCOL;
            assert_eq!(peer_route(&msg).as_ref(), Some(route));
        }
    }

    #[test]
    fn routes_via_an_ipv6_node_use_rta_via_and_read_back() {
        for ip in ["198.18.0.2", "2001:2::2"] {
            let route = PeerRoute {
                table: MAIN_TABLE,
                dst: "198.19.1.0/24".parse().unwrap(),
                next_hop: NextHop::Via(ip.parse().unwrap()),
            };
            let mut msg = message(&route);
            msg.header.protocol = PEER_ROUTE_PROTOCOL;
            assert_eq!(peer_route(&msg), Some(route), "{ip}");
        }
    }

    /// Runs `work` on a netlink handle inside a fresh network namespace.
    fn in_fresh_netns(
        name: &str,
        work: impl FnOnce(&Handle, &tokio::runtime::Runtime) + Send + 'static,
    ) {
        let ns = format!("veil-rt-{name}-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
        };
        assert!(
            ip(&["netns", "add", &ns]).unwrap_or(false),
            "ip netns add {ns}"
        );
        let path = std::path::PathBuf::from(format!("/run/netns/{ns}"));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let handle = rt
                .block_on(crate::netns::netlink_in(&path))
                .expect("netlink in netns");
            work(&handle, &rt);
        }));
        let _ = ip(&["netns", "del", &ns]);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn wireguard_pods_rule_replaces_stale_rules() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        in_fresh_netns("rule", |handle, rt| {
            let ns_rules =
                |rt: &tokio::runtime::Runtime| rt.block_on(pods_rules(handle)).expect("list rules");
            // An earlier pod CIDR of the node, and a rule with the wrong priority.
            let old: Ipv4Net = "198.19.9.0/24".parse().expect("net");
            let pods: Ipv4Net = "198.19.1.0/24".parse().expect("net");
            rt.block_on(add_pods_rule(
                handle,
                old,
                PODS_TO_NODES_RULE_PRIORITY,
                false,
            ))
            .expect("stale rule");
            rt.block_on(
                handle
                    .rule()
                    .add()
                    .v4()
                    .source_prefix(pods.network(), pods.prefix_len())
                    .table_id(PODS_TO_NODES_TABLE)
                    .priority(PODS_TO_NODES_RULE_PRIORITY + 5)
                    .action(rtnetlink::packet_route::rule::RuleAction::ToTable)
                    .execute(),
            )
            .expect("wrong-priority rule");
            // The node-only rule without its `iif lo`: another selector, so stale.
            rt.block_on(add_pods_rule(
                handle,
                pods,
                PODS_TO_NODES_LOCAL_RULE_PRIORITY,
                false,
            ))
            .expect("rule without iif");
            assert_eq!(ns_rules(rt).len(), 3);
            rt.block_on(ensure_pods_rule(handle, pods)).expect("ensure");
            let left = ns_rules(rt);
            let mut kinds: Vec<_> = left
                .iter()
                .filter_map(|(src, msg)| pods_rule_kind(msg, *src, pods))
                .collect();
            kinds.sort();
            assert_eq!(left.len(), 2, "{left:?}");
            assert_eq!(kinds, PODS_RULES.to_vec());
            // Idempotent.
            rt.block_on(ensure_pods_rule(handle, pods))
                .expect("ensure again");
            assert_eq!(ns_rules(rt).len(), 2);
        });
    }
}
