//! One accepted connection: the connection limits, then the connection-level decision
//! (splice, or HTTP), then sniffing the first bytes for HTTP.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;
use veil_l7_policy::{Decision, Request, Source};

use super::http::{self, policy_name, reason_text, rule_index, ConnCtx};
use super::io::{sniff, Sniffed};
use super::{l4, Shared};
use crate::flows::{FlowKind, FlowVerdict};
use crate::state::{CoveredPod, Dataplane};

/// An L4 allow, owned: policy (`<namespace>/<name>`), rule index, reason.
type L4Allow = (Option<String>, Option<usize>, String);

/// Serves one accepted connection; see [`super::ProxyHandle::serve_connection`].
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) {
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    // A response's head and its body (streamed from the pod) are separate writes: with
    // Nagle the body would wait for the client's delayed ACK of the head (milliseconds
    // per request, measured by `make bench-proxy`).
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY");
    }
    let ctx = Arc::new(ConnCtx::new(Arc::clone(&shared), peer, orig_dst));
    let snapshot = shared.dataplane.borrow().clone();
    // Over a limit: closed at once, before reading a byte. The protocol is not known yet
    // (an HTTP error response would be garbage to h2 or to non-HTTP clients), and closing
    // costs the least while under a flood.
    let _permit = match shared.limits.try_acquire(peer.ip()) {
        Ok(p) => p,
        Err(limit) => {
            shared
                .counters
                .limit_refusals
                .fetch_add(1, Ordering::Relaxed);
            debug!(limit = %limit, "connection refused");
            let mut flow = ctx.flow(&snapshot, FlowKind::Limit, FlowVerdict::Deny);
            flow.reason = Some(limit.to_string());
            shared.flows.record(flow);
            return;
        }
    };
    if let Some((policy, rule, reason)) = l4_allow(&snapshot, peer, orig_dst) {
        shared
            .counters
            .connections_l4
            .fetch_add(1, Ordering::Relaxed);
        let mut flow = ctx.flow(&snapshot, FlowKind::L4, FlowVerdict::Allow);
        (flow.policy, flow.rule, flow.reason) = (policy, rule, Some(reason));
        shared.flows.record(flow);
        drop(snapshot);
        l4::splice(ctx, stream, Vec::new()).await;
        return;
    }
    // Not held while waiting for bytes: a slow client must not pin an old snapshot.
    drop(snapshot);
    let sniffed = sniff(&mut stream, shared.settings.header_read_timeout).await;
    match sniffed {
        Ok(Sniffed::Http(prefix)) => http::serve(ctx, stream, prefix).await,
        Ok(Sniffed::NotHttp(prefix)) => {
            shared.counters.not_http.fetch_add(1, Ordering::Relaxed);
            let snapshot = shared.dataplane.borrow().clone();
            let (decision, policy) = snapshot
                .covered(orig_dst.ip())
                .map_or((Decision::Deny, None), |pod| {
                    default_verdict(pod, orig_dst.port())
                });
            let mut flow = ctx.flow(&snapshot, FlowKind::NotHttp, decision.into());
            (flow.policy, flow.reason) = (policy, Some("not-http".to_owned()));
            shared.flows.record(flow);
            drop(snapshot);
            if decision.passes() {
                // An audit policy lets through what it would deny.
                l4::splice(ctx, stream, prefix).await;
            }
        }
        Ok(Sniffed::TimedOut) => {
            shared
                .counters
                .header_timeouts
                .fetch_add(1, Ordering::Relaxed);
            let snapshot = shared.dataplane.borrow().clone();
            let mut flow = ctx.flow(&snapshot, FlowKind::Limit, FlowVerdict::Deny);
            flow.reason = Some("no request within the header read timeout".to_owned());
            shared.flows.record(flow);
        }
        Ok(Sniffed::Closed) => {}
        Err(e) => debug!(error = %e, "reading the first bytes failed"),
    }
}

/// Whether the whole connection is allowed without parsing it: the destination is no
/// longer covered (a policy removed since `sk_lookup` steered it), or a rule without
/// `http` allows the source on this port.
fn l4_allow(snapshot: &Dataplane, peer: SocketAddr, orig_dst: SocketAddr) -> Option<L4Allow> {
    let Some(pod) = snapshot.covered(orig_dst.ip()) else {
        return Some((None, None, "not covered".to_owned()));
    };
    let client = snapshot.workload(peer.ip());
    let source = client.map(|w| w.source()).unwrap_or_default();
    let v = pod.matcher(orig_dst.port()).evaluate_connection(&source)?;
    Some((
        v.policy().map(|n| policy_name(pod, n)),
        rule_index(&v.reason),
        reason_text(&v.reason),
    ))
}

/// What the pod's policies do with what no rule allows (`Deny`, or `AuditDeny` when only
/// audit policies select it), and the policy that says so: the engine's answer to a request
/// that matches nothing.
fn default_verdict(pod: &CoveredPod, port: u16) -> (Decision, Option<String>) {
    let nothing = Request {
        method: "",
        authority: None,
        path: "",
        headers: veil_l7_policy::request::NO_HEADERS,
        source_is_local_node: false,
    };
    let v = pod.matcher(port).evaluate(&Source::default(), &nothing);
    (v.decision, v.policy().map(|n| policy_name(pod, n)))
}
