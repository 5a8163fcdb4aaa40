//! The policy routing of the redirect datapath, over rtnetlink:
//!
//! | priority | selector | table |
//! | --- | --- | --- |
//! | [`consts::NODE_CONNECT_RULE_PRIORITY`] (110) | `fwmark 0x0c00/0x0f00 ipproto tcp` | [`consts::COVERED_TABLE`] (120) |
//! | [`consts::LOCAL_OUT_RULE_PRIORITY`] (111) | `iif lo ipproto tcp` | main |
//! | [`consts::UPSTREAM_RULE_PRIORITY`] (112) | `fwmark 0x0a00/0x0f00` | main |
//! | [`consts::TO_PROXY_RULE_PRIORITY`] (113) | `fwmark 0x0b00/0x0f00` | [`consts::TO_PROXY_TABLE`] (121): `local 0.0.0.0/0 dev lo` |
//! | [`consts::COVERED_RULE_PRIORITY`] (114) | `ipproto tcp` | [`consts::COVERED_TABLE`] (120): `local <covered pod>/32 dev lo src <node IP>` |
//!
//! The `src` of table 120's routes is the source the node's own connections to covered
//! pods take (rule 110): without it the kernel would pick the destination of a local
//! route, the pod's own address, and the proxy would take the node for the pod.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::IpProtocol;
use rtnetlink::{Handle, RouteMessageBuilder};
use veil_bpf::consts;

use super::RedirectError;

/// Our routes in tables 120 and 121 carry this protocol number.
pub const ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(0x78);
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// The main table.
const MAIN_TABLE: u32 = 254;

/// One of our rules, as the kernel should hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Priority.
    pub priority: u32,
    /// `fwmark value/mask`, if the rule selects on it.
    pub fwmark: Option<(u32, u32)>,
    /// `ipproto tcp`, if the rule selects on it.
    pub tcp_only: bool,
    /// `iif lo` (the node's own packets), if the rule selects on it.
    pub local_out: bool,
    /// Table looked up.
    pub table: u32,
}

/// The five rules.
pub fn desired_rules() -> [Rule; 5] {
    [
        Rule {
            priority: consts::NODE_CONNECT_RULE_PRIORITY,
            fwmark: Some((consts::NODE_MARK, consts::MARK_MASK)),
            tcp_only: true,
            local_out: false,
            table: consts::COVERED_TABLE,
        },
        Rule {
            priority: consts::LOCAL_OUT_RULE_PRIORITY,
            fwmark: None,
            tcp_only: true,
            local_out: true,
            table: MAIN_TABLE,
        },
        Rule {
            priority: consts::UPSTREAM_RULE_PRIORITY,
            fwmark: Some((consts::UPSTREAM_MARK, consts::MARK_MASK)),
            tcp_only: false,
            local_out: false,
            table: MAIN_TABLE,
        },
        Rule {
            priority: consts::TO_PROXY_RULE_PRIORITY,
            fwmark: Some((consts::TO_PROXY_MARK, consts::MARK_MASK)),
            tcp_only: false,
            local_out: false,
            table: consts::TO_PROXY_TABLE,
        },
        Rule {
            priority: consts::COVERED_RULE_PRIORITY,
            fwmark: None,
            tcp_only: true,
            local_out: false,
            table: consts::COVERED_TABLE,
        },
    ]
}

/// Reads a kernel rule back as a [`Rule`]; `None` for anything with a selector or an
/// action we never set (so such a rule at our priority counts as stale).
fn parse_rule(msg: &RuleMessage) -> Option<Rule> {
    if msg.header.action != RuleAction::ToTable
        || msg.header.src_len != 0
        || msg.header.dst_len != 0
    {
        return None;
    }
    let mut rule = Rule {
        priority: 0,
        fwmark: None,
        tcp_only: false,
        local_out: false,
        table: u32::from(msg.header.table),
    };
    let (mut mark, mut mask) = (None, None);
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::IpProtocol(IpProtocol::Tcp) => rule.tcp_only = true,
            RuleAttribute::Iifname(name) if name == "lo" => rule.local_out = true,
            // Attributes the kernel reports on every rule.
            RuleAttribute::Protocol(_) | RuleAttribute::SuppressPrefixLen(_) => {}
            _ => return None,
        }
    }
    rule.fwmark = match (mark, mask) {
        (None, _) => None,
        (Some(m), mask) => Some((m, mask.unwrap_or(u32::MAX))),
    };
    Some(rule)
}

async fn rules_at(
    handle: &Handle,
    priorities: &[u32],
) -> Result<Vec<(u32, RuleMessage)>, RedirectError> {
    let mut rules = handle.rule().get(rtnetlink::IpVersion::V4).execute();
    let mut found = Vec::new();
    while let Some(msg) = rules
        .try_next()
        .await
        .map_err(|source| RedirectError::Netlink {
            op: "list rules",
            target: "IPv4".into(),
            source,
        })?
    {
        let priority = msg.attributes.iter().find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        if let Some(p) = priority.filter(|p| priorities.contains(p)) {
            found.push((p, msg));
        }
    }
    Ok(found)
}

/// Makes sure each of the five rules exists exactly once at its priority: a rule at one
/// of our priorities with another selector, table or action (stale, or someone else's) is
/// deleted and ours added. Also installs table 121's `local 0.0.0.0/0 dev lo`. Idempotent.
pub async fn ensure_rules(handle: &Handle) -> Result<(), RedirectError> {
    ensure_to_proxy_route(handle).await?;
    let want = desired_rules();
    let priorities: Vec<u32> = want.iter().map(|r| r.priority).collect();
    let have = rules_at(handle, &priorities).await?;
    for rule in want {
        let mut present = false;
        for (_, msg) in have.iter().filter(|(p, _)| *p == rule.priority) {
            if !present && parse_rule(msg) == Some(rule) {
                present = true;
                continue;
            }
            tracing::warn!(priority = rule.priority, found = ?msg.attributes, "replacing a stale rule");
            delete_rule(handle, msg.clone(), rule.priority).await?;
        }
        if !present {
            add_rule(handle, rule).await?;
            tracing::info!(priority = rule.priority, table = rule.table, "added rule");
        }
    }
    Ok(())
}

async fn add_rule(handle: &Handle, rule: Rule) -> Result<(), RedirectError> {
    let mut request = handle
        .rule()
        .add()
        .v4()
        .priority(rule.priority)
        .table_id(rule.table)
        // Unset, the kernel answers every lookup through the rule with EINVAL.
        .action(RuleAction::ToTable);
    if let Some((mark, mask)) = rule.fwmark {
        request = request.fw_mark(mark);
        request
            .message_mut()
            .attributes
            .push(RuleAttribute::FwMask(mask));
    }
    if rule.local_out {
        request = request.input_interface("lo");
    }
    if rule.tcp_only {
        request
            .message_mut()
            .attributes
            .push(RuleAttribute::IpProtocol(IpProtocol::Tcp));
    }
    request
        .execute()
        .await
        .map_err(|source| RedirectError::Netlink {
            op: "add rule",
            target: format!("{rule:?}"),
            source,
        })
}

fn local_route(table: u32, dst: Ipv4Addr, prefix: u8, src: Option<Ipv4Addr>) -> RouteMessage {
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, prefix)
        .table_id(table)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(LOOPBACK_IFINDEX)
        .protocol(ROUTE_PROTOCOL);
    if let Some(src) = src {
        route = route.pref_source(src);
    }
    route.build()
}

/// One of our routes as the kernel holds it.
struct LocalRoute {
    dst: Ipv4Addr,
    prefix: u8,
    src: Option<Ipv4Addr>,
    /// The message to delete it by.
    msg: RouteMessage,
}

async fn ensure_to_proxy_route(handle: &Handle) -> Result<(), RedirectError> {
    handle
        .route()
        .add(local_route(
            consts::TO_PROXY_TABLE,
            Ipv4Addr::UNSPECIFIED,
            0,
            None,
        ))
        .replace()
        .execute()
        .await
        .map_err(|source| RedirectError::Netlink {
            op: "add route",
            target: format!("local 0.0.0.0/0 dev lo table {}", consts::TO_PROXY_TABLE),
            source,
        })
}

/// Our routes in `table`.
async fn routes_in(handle: &Handle, table: u32) -> Result<Vec<LocalRoute>, RedirectError> {
    let mut filter = RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(table)
        .build();
    filter.header.kind = RouteType::Local;
    let mut routes = handle.route().get(filter).execute();
    let mut found = Vec::new();
    while let Some(msg) = routes
        .try_next()
        .await
        .map_err(|source| RedirectError::Netlink {
            op: "list routes",
            target: format!("table {table}"),
            source,
        })?
    {
        let mut msg_table = u32::from(msg.header.table);
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut src = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => msg_table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
                RouteAttribute::PrefSource(RouteAddress::Inet(a)) => src = Some(*a),
                _ => {}
            }
        }
        // The dump may ignore the table filter; check it ourselves.
        if msg_table == table && msg.header.protocol == ROUTE_PROTOCOL {
            found.push(LocalRoute {
                dst,
                prefix: msg.header.destination_prefix_length,
                src,
                msg,
            });
        }
    }
    Ok(found)
}

/// Makes table 120's `local <ip>/32 dev lo src <src>` routes equal to `covered`; a route
/// with another `src` (an earlier agent's, or the node's address changed) is replaced in
/// place, so the pod is never uncovered meanwhile.
pub async fn reconcile_covered_routes(
    handle: &Handle,
    covered: &BTreeSet<Ipv4Addr>,
    src: Option<Ipv4Addr>,
) -> Result<(), RedirectError> {
    let have = routes_in(handle, consts::COVERED_TABLE).await?;
    let present: BTreeSet<Ipv4Addr> = have
        .iter()
        .filter(|r| r.prefix == 32 && r.src == src)
        .map(|r| r.dst)
        .collect();
    for ip in covered.difference(&present) {
        let target = match src {
            Some(src) => format!(
                "local {ip}/32 dev lo src {src} table {}",
                consts::COVERED_TABLE
            ),
            None => format!("local {ip}/32 dev lo table {}", consts::COVERED_TABLE),
        };
        handle
            .route()
            .add(local_route(consts::COVERED_TABLE, *ip, 32, src))
            .replace()
            .execute()
            .await
            .map_err(|source| RedirectError::Netlink {
                op: "add route",
                target,
                source,
            })?;
    }
    for route in have {
        // A /32 of a covered pod was kept or replaced above, whatever its `src`.
        if route.prefix == 32 && covered.contains(&route.dst) {
            continue;
        }
        let target = format!(
            "local {}/{} table {}",
            route.dst,
            route.prefix,
            consts::COVERED_TABLE
        );
        delete_route(handle, route.msg, target).await?;
    }
    Ok(())
}

async fn delete_rule(
    handle: &Handle,
    msg: RuleMessage,
    priority: u32,
) -> Result<(), RedirectError> {
    handle
        .rule()
        .del(msg)
        .execute()
        .await
        .map_err(|source| RedirectError::Netlink {
            op: "delete rule",
            target: format!("priority {priority}"),
            source,
        })
}

async fn delete_route(
    handle: &Handle,
    msg: RouteMessage,
    target: String,
) -> Result<(), RedirectError> {
    handle
        .route()
        .del(msg)
        .execute()
        .await
        .map_err(|source| RedirectError::Netlink {
            op: "delete route",
            target,
            source,
        })
}

/// Removes our rules (whatever their shape at our priorities) and our routes in both
/// tables (uninstall).
pub async fn remove_all(handle: &Handle) -> Result<(), RedirectError> {
    let priorities: Vec<u32> = desired_rules().iter().map(|r| r.priority).collect();
    for (priority, msg) in rules_at(handle, &priorities).await? {
        if parse_rule(&msg).is_none_or(|r| !desired_rules().contains(&r)) {
            // Not ours: leave someone else's rule alone on uninstall.
            continue;
        }
        delete_rule(handle, msg, priority).await?;
    }
    for table in [consts::COVERED_TABLE, consts::TO_PROXY_TABLE] {
        for route in routes_in(handle, table).await? {
            let target = format!("local {}/{} table {table}", route.dst, route.prefix);
            delete_route(handle, route.msg, target).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_rules_read_back_as_written() {
        for rule in desired_rules() {
            let mut msg = RuleMessage::default();
            msg.header.action = RuleAction::ToTable;
            msg.attributes.push(RuleAttribute::Priority(rule.priority));
            msg.attributes.push(RuleAttribute::Table(rule.table));
            if let Some((m, mask)) = rule.fwmark {
                msg.attributes.push(RuleAttribute::FwMark(m));
                msg.attributes.push(RuleAttribute::FwMask(mask));
            }
            if rule.tcp_only {
                msg.attributes
                    .push(RuleAttribute::IpProtocol(IpProtocol::Tcp));
            }
            if rule.local_out {
                msg.attributes.push(RuleAttribute::Iifname("lo".into()));
            }
            assert_eq!(parse_rule(&msg), Some(rule));
            // A rule at our priority with a source selector is stale.
            msg.header.src_len = 24;
            assert_eq!(parse_rule(&msg), None);
        }
    }
}
