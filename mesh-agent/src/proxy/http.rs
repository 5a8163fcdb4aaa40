//! HTTP/1.1 and HTTP/2 (h2c) connections: every request (every h2 stream) is judged on its
//! own against the snapshot current when it arrives, then forwarded to the pod with the
//! path the policy judged, or answered with a denial.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION,
    TE, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tracing::{debug, warn, Instrument};
use veil_l7_policy::{normalize_path, Decision, HeaderLookup, Reason};

use super::io::{Activity, ConnIo};
use super::respond::{
    ensure_request_id, is_grpc, own_response, ProxyBody, GRPC_DEADLINE_EXCEEDED,
    GRPC_INVALID_ARGUMENT, GRPC_PERMISSION_DENIED, GRPC_UNAVAILABLE, REQUEST_ID,
};
use super::upstream::H1Slot;
use super::Shared;
use crate::flows::{Endpoint, FlowKind, FlowRecord, FlowVerdict};
use crate::state::{CoveredPod, Dataplane};

/// One downstream connection.
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: SocketAddr,
    pub(crate) orig_dst: SocketAddr,
    pub(crate) activity: Arc<Activity>,
    /// Requests waiting for their response head: the connection is not idle meanwhile.
    in_flight: AtomicUsize,
    /// The tunnel of an upgraded request, which outlives hyper's connection.
    tunnel: std::sync::Mutex<Option<AbortOnDrop>>,
    /// This connection's own HTTP/1.1 upstream connection, between requests.
    upstream_h1: H1Slot,
}

impl Drop for ConnCtx {
    fn drop(&mut self) {
        self.shared
            .upstream
            .release_h1(self.peer.ip(), self.orig_dst, &self.upstream_h1);
    }
}

/// A spawned task that is aborted when its handle is dropped (so a connection cut at the
/// drain deadline takes its tunnel with it).
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ConnCtx {
    pub(crate) fn new(shared: Arc<Shared>, peer: SocketAddr, orig_dst: SocketAddr) -> ConnCtx {
        ConnCtx {
            shared,
            peer,
            orig_dst,
            activity: Arc::new(Activity::new()),
            in_flight: AtomicUsize::new(0),
            tunnel: std::sync::Mutex::new(None),
            upstream_h1: std::sync::Mutex::new(None),
        }
    }

    /// A flow record of `kind` for this connection, its ends named from `snapshot`.
    pub(crate) fn flow(
        &self,
        snapshot: &Dataplane,
        kind: FlowKind,
        verdict: FlowVerdict,
    ) -> FlowRecord {
        let client = snapshot.workload(self.peer.ip());
        let pod = snapshot.covered(self.orig_dst.ip()).map(|p| &*p.workload);
        FlowRecord::new(
            kind,
            verdict,
            Endpoint::new(self.peer.ip(), None, client.map(|w| &**w)),
            Endpoint::new(self.orig_dst.ip(), Some(self.orig_dst.port()), pod),
        )
    }
}

/// Counts a request in flight until dropped.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HTTP on an accepted connection whose first bytes (`prefix`) were sniffed.
pub(crate) async fn serve(ctx: Arc<ConnCtx>, stream: TcpStream, prefix: Vec<u8>) {
    let io = TokioIo::new(ConnIo::new(stream, prefix, Arc::clone(&ctx.activity)));
    let svc_ctx = Arc::clone(&ctx);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&svc_ctx);
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let conn = ctx.shared.server.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut drain = ctx.shared.drain.subscribe();
    let mut draining = *drain.borrow_and_update();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    let idle = ctx.activity.idle(ctx.shared.settings.idle_timeout, || {
        ctx.in_flight.load(Ordering::Relaxed) > 0
    });
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            r = drain.changed(), if !draining => {
                draining = true;
                if r.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = &mut idle => {
                debug!("idle connection closed");
                return;
            }
        }
    };
    // An upgraded request (WebSocket) hands the socket to its tunnel: the connection
    // lives on in it, under the same idle timeout, and ends with this task.
    let tunnel = ctx
        .tunnel
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(mut tunnel) = tunnel {
        let idle = ctx
            .activity
            .idle(ctx.shared.settings.idle_timeout, || false);
        tokio::select! {
            _ = &mut tunnel.0 => {}
            () = idle => debug!("idle tunnel closed"),
        }
        return;
    }
    let Err(e) = result else { return };
    let Some(e) = e.downcast_ref::<hyper::Error>() else {
        debug!(error = %e, "connection ended");
        return;
    };
    let counters = &ctx.shared.counters;
    let snapshot = ctx.shared.dataplane.borrow().clone();
    let (kind, reason) = if e.is_parse_too_large() {
        counters.limit_refusals.fetch_add(1, Ordering::Relaxed);
        (FlowKind::Limit, "request headers too large")
    } else if e.is_parse() {
        counters.not_http.fetch_add(1, Ordering::Relaxed);
        (FlowKind::NotHttp, "not-http")
    } else {
        if e.is_timeout() {
            // Also how idle HTTP/1.1 keep-alive connections end: counted, not recorded.
            counters.header_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        debug!(error = %e, "connection ended");
        return;
    };
    let mut flow = ctx.flow(&snapshot, kind, FlowVerdict::Deny);
    flow.reason = Some(reason.to_owned());
    ctx.shared.flows.record(flow);
}

/// What the engine said about one request, owned (the engine's answer borrows the snapshot).
#[derive(Debug)]
struct Judged {
    decision: Decision,
    /// `<namespace>/<name>`.
    policy: Option<String>,
    rule: Option<usize>,
    reason: String,
    authority: Option<String>,
    /// The normalised path (the raw target when it cannot be normalised), for flows.
    path: String,
    /// What is forwarded: the normalised path and the query, or the raw target.
    target: String,
}

/// Judges, then forwards or answers one request; records its flow.
async fn handle(ctx: &ConnCtx, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    ctx.in_flight.fetch_add(1, Ordering::Relaxed);
    let _busy = Busy(&ctx.in_flight);
    let grpc = is_grpc(req.headers());
    let snapshot = ctx.shared.dataplane.borrow().clone();
    // Judged as the client sent it, before the proxy adds anything.
    let judged = judge(ctx, &snapshot, &req);
    let request_id = ensure_request_id(req.headers_mut());
    let mut flow = ctx.flow(&snapshot, FlowKind::Http, FlowVerdict::Allow);
    drop(snapshot);
    flow.method = Some(req.method().as_str().to_owned());
    flow.request_id = Some(request_id.clone());
    let counters = &ctx.shared.counters;
    let resp = match judged {
        Err(e) => {
            counters.requests_denied.fetch_add(1, Ordering::Relaxed);
            flow.verdict = FlowVerdict::Deny;
            flow.reason = Some(e.to_string());
            let body =
                json!({"error": "bad request", "reason": e.to_string(), "request_id": request_id});
            own_response(
                grpc,
                StatusCode::BAD_REQUEST,
                GRPC_INVALID_ARGUMENT,
                &body,
                &request_id,
            )
        }
        Ok(j) => {
            flow.verdict = j.decision.into();
            flow.authority.clone_from(&j.authority);
            flow.path = Some(j.path.clone());
            flow.policy.clone_from(&j.policy);
            flow.rule = j.rule;
            flow.reason = Some(j.reason.clone());
            let counter = match j.decision {
                Decision::Allow => &counters.requests_allowed,
                Decision::Deny => &counters.requests_denied,
                Decision::AuditDeny => &counters.requests_audit_denied,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if j.decision == Decision::Deny {
                debug!(policy = ?j.policy, reason = %j.reason, path = %j.path, "request denied");
                let body = json!({"error": "denied", "policy": j.policy, "reason": j.reason, "request_id": request_id});
                own_response(
                    grpc,
                    StatusCode::FORBIDDEN,
                    GRPC_PERMISSION_DENIED,
                    &body,
                    &request_id,
                )
            } else {
                forward(ctx, req, &j, grpc, &request_id).await
            }
        }
    };
    flow.status = Some(resp.status().as_u16());
    flow.latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    ctx.shared.flows.record(flow);
    resp
}

/// Asks the engine about `req`, from the latest snapshot.
fn judge(
    ctx: &ConnCtx,
    snapshot: &Dataplane,
    req: &Request<Incoming>,
) -> Result<Judged, HostError> {
    let authority = request_authority(req.uri().authority().map(|a| a.as_str()), req.headers())?;
    let raw = req.uri().path_and_query().map_or("", |p| p.as_str());
    let (path, target) = match normalize_path(raw) {
        Ok(p) => {
            // The engine drops the query; the pod still needs it.
            let target = match req.uri().query() {
                Some(q) => format!("{p}?{q}"),
                None => p.to_string(),
            };
            (p.into_owned(), target)
        }
        Err(_) => (raw.to_owned(), raw.to_owned()),
    };
    let mut judged = Judged {
        decision: Decision::Allow,
        policy: None,
        rule: None,
        reason: "not covered".to_owned(),
        authority: authority.map(str::to_owned),
        path,
        target,
    };
    // A policy removed since the connection was accepted: nothing to enforce any more.
    let Some(pod) = snapshot.covered(ctx.orig_dst.ip()) else {
        return Ok(judged);
    };
    let client = snapshot.workload(ctx.peer.ip());
    let source = client.map(|w| w.source()).unwrap_or_default();
    let headers = Headers(req.headers());
    let request = veil_l7_policy::Request {
        method: req.method().as_str(),
        authority,
        path: raw,
        headers: &headers,
        source_is_local_node: snapshot.is_node_ip(ctx.peer.ip()),
    };
    let verdict = pod.matcher(ctx.orig_dst.port()).evaluate(&source, &request);
    judged.decision = verdict.decision;
    judged.policy = verdict.policy().map(|name| policy_name(pod, name));
    judged.rule = rule_index(&verdict.reason);
    judged.reason = reason_text(&verdict.reason);
    Ok(judged)
}

/// `<namespace>/<name>` of a policy selecting `pod` (policies select in their namespace).
pub(crate) fn policy_name(pod: &CoveredPod, name: &str) -> String {
    format!("{}/{}", pod.workload.namespace, name)
}

/// The index of the rule that allowed, if one did.
pub(crate) fn rule_index(reason: &Reason<'_>) -> Option<usize> {
    match reason {
        Reason::Rule { rule, .. } => Some(*rule),
        _ => None,
    }
}

/// The reason in words, for flows and deny bodies.
pub(crate) fn reason_text(reason: &Reason<'_>) -> String {
    match reason {
        Reason::NotSelected => "not selected".to_owned(),
        Reason::LocalNodeProbe => "local node probe".to_owned(),
        Reason::Rule { rule, .. } => format!("rule {rule}"),
        Reason::NoRuleMatched { .. } => "no rule matched".to_owned(),
        Reason::InvalidPath { error, .. } => format!("invalid path: {error}"),
        Reason::InvalidAuthority { error, .. } => format!("invalid authority: {error}"),
        Reason::OverLimit { limit, .. } => format!("over limit: {limit}"),
    }
}

/// Sends an allowed request to the pod and streams its response back.
async fn forward(
    ctx: &ConnCtx,
    req: Request<Incoming>,
    judged: &Judged,
    grpc: bool,
    request_id: &str,
) -> Response<ProxyBody> {
    let dst = ctx.orig_dst;
    let mut req = req;
    // HTTP/1.1 `Upgrade` (WebSocket): the protocol named is kept for the pod, and the
    // downstream socket is taken over once the pod agrees (101).
    let upgrade = (req.version() != Version::HTTP_2)
        .then(|| upgrade_protocol(req.headers()))
        .flatten();
    let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let h2 = parts.version == Version::HTTP_2;
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        set_upgrade(&mut parts.headers, protocol);
    }
    if !h2 && !parts.headers.contains_key(HOST) {
        // An absolute-form request without `Host`: the origin-form sent on needs it.
        if let Some(v) = judged
            .authority
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            parts.headers.insert(HOST, v);
        }
    }
    let uri = if h2 {
        // HTTP/2 carries the authority in the URI (`:authority`), not in `Host`.
        let authority = judged.authority.clone().unwrap_or_else(|| dst.to_string());
        Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(judged.target.as_str())
            .build()
    } else {
        Uri::builder()
            .path_and_query(judged.target.as_str())
            .build()
    };
    let Ok(uri) = uri else {
        let body = json!({"error": "bad request", "reason": "request-target cannot be forwarded", "request_id": request_id});
        return own_response(
            grpc,
            StatusCode::BAD_REQUEST,
            GRPC_INVALID_ARGUMENT,
            &body,
            request_id,
        );
    };
    parts.uri = uri;
    parts.version = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let send = ctx.shared.upstream.send(
        ctx.peer.ip(),
        dst,
        h2,
        &ctx.upstream_h1,
        Request::from_parts(parts, body),
    );
    let timeout = ctx.shared.settings.request_timeout;
    let (status, grpc_status, error) = match tokio::time::timeout(timeout, send).await {
        Ok(Ok(mut resp)) => {
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let tunnel = match downstream_upgrade {
                Some(down) if switched => Some((down, hyper::upgrade::on(&mut resp))),
                _ => None,
            };
            let (mut parts, body) = resp.into_parts();
            let upgrade = upgrade_protocol(&parts.headers);
            strip_hop_by_hop(&mut parts.headers);
            if let (Some((down, up)), Some(protocol)) = (tunnel, upgrade) {
                set_upgrade(&mut parts.headers, protocol);
                let task = tokio::spawn(
                    async move {
                        match tokio::try_join!(down, up) {
                            Ok((down, up)) => {
                                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                                let r = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                                debug!(result = ?r, "tunnel closed");
                            }
                            Err(e) => debug!(error = %e, "upgrade failed"),
                        }
                    }
                    .instrument(tracing::debug_span!("tunnel", dst = %dst)),
                );
                *ctx.tunnel
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(AbortOnDrop(task));
            }
            if !parts.headers.contains_key(REQUEST_ID) {
                if let Ok(v) = HeaderValue::from_str(request_id) {
                    parts.headers.insert(REQUEST_ID, v);
                }
            }
            return Response::from_parts(parts, body.boxed());
        }
        Ok(Err(e)) => {
            warn!(dst = %dst, error = %e, "upstream request failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                "upstream unavailable",
            )
        }
        Err(_) => {
            warn!(dst = %dst, timeout_ms = timeout.as_millis(), "upstream response timed out");
            (
                StatusCode::GATEWAY_TIMEOUT,
                GRPC_DEADLINE_EXCEEDED,
                "upstream timeout",
            )
        }
    };
    ctx.shared
        .counters
        .upstream_errors
        .fetch_add(1, Ordering::Relaxed);
    let body = json!({"error": error, "destination": dst.to_string(), "request_id": request_id});
    own_response(grpc, status, grpc_status, &body, request_id)
}

/// The protocol a message asks to switch to: its `Upgrade` value, when `Connection` lists
/// `upgrade` (RFC 9110 7.8).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let listed = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    listed.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// Puts back the two fields an upgrade needs, after the hop-by-hop ones were removed.
fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Most names a `Connection` header may list for removal; more are ignored (the standard
/// hop-by-hop fields are removed regardless).
const MAX_CONNECTION_TOKENS: usize = 32;

/// Removes hop-by-hop fields (RFC 9110 7.6.1), those `Connection` names included; keeps
/// `te: trailers`, which gRPC needs end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .take(MAX_CONNECTION_TOKENS)
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let trailers = headers
        .get_all(TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        CONNECTION,
        TE,
        TRANSFER_ENCODING,
        UPGRADE,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Why the request's authority is refused before the engine is asked (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostError {
    /// More than one `Host` field (RFC 9112 3.2).
    #[error("more than one Host header field")]
    Duplicate,
    /// `Host` names another authority than the absolute-form target or `:authority`.
    #[error("Host differs from the request-target's authority")]
    Mismatch,
    /// `Host` is not visible ASCII.
    #[error("Host is not visible ASCII")]
    NotText,
}

/// The request's authority: the target's (absolute-form, or HTTP/2 `:authority`) or the one
/// `Host` field; refuses two `Host` fields or a `Host` that names another authority.
pub(crate) fn request_authority<'a>(
    target: Option<&'a str>,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, HostError> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(HostError::Duplicate),
        (Some(h), None) => Some(h.to_str().map_err(|_| HostError::NotText)?),
        (None, None) => None,
    };
    match (target, host) {
        (Some(t), Some(h)) if !t.eq_ignore_ascii_case(h) => Err(HostError::Mismatch),
        (Some(t), _) => Ok(Some(t)),
        (None, h) => Ok(h),
    }
}

/// The engine's view of hyper's header map, without copying: every field line is its own
/// entry in the map, so a header sent twice is seen twice.
struct Headers<'a>(&'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn any_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self.0.iter().any(|(n, v)| f(n.as_str(), v.as_bytes()))
    }

    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.0.get_all(name).iter().any(|v| f(v.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn map(hosts: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in hosts {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.append(HOST, v);
            }
        }
        h
    }

    #[test]
    fn proxy_request_authority_golden() {
        let none = map(&[]);
        assert_eq!(request_authority(None, &none), Ok(None));
        assert_eq!(request_authority(Some("a:1"), &none), Ok(Some("a:1")));
        let one = map(&[b"Api.example.com"]);
        assert_eq!(request_authority(None, &one), Ok(Some("Api.example.com")));
        assert_eq!(
            request_authority(Some("api.EXAMPLE.com"), &one),
            Ok(Some("api.EXAMPLE.com"))
        );
        assert_eq!(
            request_authority(Some("other"), &one),
            Err(HostError::Mismatch)
        );
        let two = map(&[b"a", b"a"]);
        assert_eq!(request_authority(None, &two), Err(HostError::Duplicate));
        let bin = map(&[b"a\xff"]);
        assert_eq!(request_authority(None, &bin), Err(HostError::NotText));
    }

    #[test]
    fn proxy_header_lookup_sees_every_field_line() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("x-b", HeaderValue::from_static("3"));
        let mut seen = Vec::new();
        Headers(&h).any_header(&mut |n, v| {
            seen.push(format!("{n}={}", String::from_utf8_lossy(v)));
            false
        });
        assert_eq!(seen, ["x-a=1", "x-a=2", "x-b=3"]);
        let mut values = Vec::new();
        Headers(&h).any_value("X-A", &mut |v| {
            values.push(v.to_vec());
            false
        });
        assert_eq!(values, [b"1".to_vec(), b"2".to_vec()]);
        assert!(!Headers(&h).any_value("bad name", &mut |_| true));
    }

    #[test]
    fn proxy_strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("x-secret, keep-alive"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-keep", "te"]);
    }

    proptest! {
        /// Whatever the target and Host fields: no panic; an accepted authority is the
        /// target's or the single Host's; two Host fields are always refused.
        #[test]
        fn proxy_request_authority_never_widens(
            target in proptest::option::of("[a-zA-Z0-9.:-]{0,12}"),
            hosts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..3),
        ) {
            let refs: Vec<&[u8]> = hosts.iter().map(Vec::as_slice).collect();
            let h = map(&refs);
            let count = h.get_all(HOST).iter().count();
            match request_authority(target.as_deref(), &h) {
                Ok(Some(a)) => {
                    prop_assert!(count <= 1);
                    let host = h.get(HOST).and_then(|v| v.to_str().ok());
                    prop_assert!(target.as_deref() == Some(a) || (target.is_none() && host == Some(a)));
                    if let (Some(t), Some(host)) = (target.as_deref(), host) {
                        prop_assert!(t.eq_ignore_ascii_case(host));
                    }
                }
                Ok(None) => prop_assert!(target.is_none() && count == 0),
                Err(HostError::Duplicate) => prop_assert!(count >= 2),
                Err(_) => prop_assert!(count == 1),
            }
        }
    }
}
