//! In-process tests: real hyper clients and servers on loopback, the proxy's connection
//! entry point fed by a test listener (there is no `sk_lookup` here), and snapshots built
//! by hand. The covered pod is an echo server on 127.0.0.10; clients bind 127.0.0.x.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use veil_l7_policy::{CompiledPolicy, L7PolicySpec, Pod, PortMatcher, Settings};

use super::*;
use crate::flows::{Filter, FlowKind, FlowRecord, FlowVerdict};
use crate::state::{CoveredPod, Dataplane, Workload};

const POD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const WEB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const DB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
/// The node's own address, where the kubelet probes from.
const NODE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const WAIT: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An HTTP/1.1 + h2c server that answers with what it received, as JSON. `/public/slow`
/// answers after 700 ms, `/public/slower` after 3 s.
async fn echo_server(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                        if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
                            return Ok(upgrade_to_echo(&mut req));
                        }
                        let path = req.uri().path_and_query().map(|p| p.to_string());
                        match req.uri().path() {
                            "/public/slow" => tokio::time::sleep(Duration::from_millis(700)).await,
                            "/public/slower" => tokio::time::sleep(Duration::from_secs(3)).await,
                            _ => {}
                        }
                        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                        for (n, v) in req.headers() {
                            headers
                                .entry(n.to_string())
                                .or_default()
                                .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                        }
                        let body = json!({
                            "method": req.method().as_str(),
                            "path": path,
                            "peer": peer.to_string(),
                            "version": format!("{:?}", req.version()),
                            "headers": headers,
                        });
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v == "application/grpc");
                        Ok::<_, std::convert::Infallible>(echo_response(body, grpc))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Agrees to switch to the `echo` protocol: after the 101, bytes come back as sent.
fn upgrade_to_echo(req: &mut Request<Incoming>) -> Response<EchoBody> {
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        "connection",
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.insert("upgrade", hyper::header::HeaderValue::from_static("echo"));
    resp
}

/// The echo's answer: the JSON as the body; for gRPC calls, as a message with trailers.
fn echo_response(body: Value, grpc: bool) -> Response<EchoBody> {
    let bytes = Bytes::from(body.to_string());
    if !grpc {
        return Response::new(Full::new(bytes).boxed());
    }
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(hyper::body::Frame::data(bytes)),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let mut resp =
        Response::new(http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed());
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    resp
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A TCP server that echoes bytes back.
async fn tcp_echo(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind tcp echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn workload(ip: Ipv4Addr, name: &str, sa: &str) -> Arc<Workload> {
    Arc::new(Workload {
        namespace: "shop".into(),
        name: name.into(),
        node: "node-1".into(),
        ip: IpAddr::V4(ip),
        service_account: sa.into(),
        spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
        labels: [("app".to_string(), name.to_string())]
            .into_iter()
            .collect(),
        namespace_labels: Default::default(),
    })
}

/// A snapshot in which the pod at `pod` (namespace `shop`, `app=api`) is covered by
/// `policies` (name, spec as JSON) and declares an `httpGet` probe of `/healthz`, `web` and
/// `db` are known clients, and [`NODE`] is the node.
fn dataplane(pod: SocketAddr, policies: &[(&str, Value)], generation: u64) -> Arc<Dataplane> {
    let IpAddr::V4(pod_ip) = pod.ip() else {
        panic!("IPv4 pod");
    };
    let server = workload(pod_ip, "api", "api");
    let compiled: Vec<Arc<CompiledPolicy>> = policies
        .iter()
        .map(|(name, spec)| {
            let spec: L7PolicySpec = serde_json::from_value(spec.clone()).expect("spec");
            let p = CompiledPolicy::compile("shop", name, &spec);
            assert!(p.errors().is_empty(), "{:?}", p.errors());
            Arc::new(p)
        })
        .collect();
    let probes = [veil_l7_policy::Probe {
        port: pod.port(),
        path: "/healthz",
    }];
    let engine_pod = Pod {
        namespace: "shop",
        labels: &server.labels,
        named_ports: &[],
        probes: &probes,
    };
    let matcher = |port| {
        Arc::new(PortMatcher::new(
            &engine_pod,
            port,
            &compiled,
            Settings::default(),
        ))
    };
    let covered = CoveredPod {
        workload: Arc::clone(&server),
        ports: HashMap::from([(pod.port(), matcher(pod.port()))]),
        other_ports: matcher(0),
        node_direct_ports: Vec::new(),
    };
    let mut workloads = HashMap::new();
    for w in [
        server,
        workload(WEB, "web", "web"),
        workload(DB, "db", "db"),
        workload(FLOODER, "flood", "web"),
    ] {
        workloads.insert(w.ip, w);
    }
    Arc::new(Dataplane {
        workloads,
        covered: HashMap::from([(pod.ip(), Arc::new(covered))]),
        node_ips: vec![IpAddr::V4(NODE)],
        generation,
    })
}

/// The policy most tests use.
fn web_policy() -> Value {
    let web = json!([{"serviceAccount": {"name": "web"}}]);
    json!({
        "podSelector": {},
        "ingress": [
            {"from": web, "http": [{"methods": ["GET"], "path": {"prefix": "/public"}}]},
            {"from": web, "http": [{"methods": ["POST"], "path": {"exact": "/submit"},
                                    "headers": [{"name": "x-token", "exact": "s3cret"}]}]},
            {"from": web, "http": [{"path": {"exact": "/hosted"}, "hosts": ["api.shop.svc"]}]},
            {"from": web, "http": [{"methods": ["POST"], "path": {"prefix": "/pkg.Public"}}]},
        ]
    })
}

/// A proxy fed by a test listener that stands in for `sk_lookup`: every connection to it
/// is taken to be for `pod`.
struct Harness {
    front: SocketAddr,
    handle: ProxyHandle,
    tx: watch::Sender<Arc<Dataplane>>,
    pod: SocketAddr,
}

impl Harness {
    async fn new(pod: SocketAddr, policies: &[(&str, Value)], settings: ProxySettings) -> Harness {
        let (tx, rx) = watch::channel(dataplane(pod, policies, 1));
        let handle = ProxyHandle::new(settings, rx, Flows::new(1024));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("front");
        let front = listener.local_addr().expect("front addr");
        let h = handle.clone();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move { h.serve_connection(stream, peer, pod).await });
            }
        });
        Harness {
            front,
            handle,
            tx,
            pod,
        }
    }

    async fn echo(policies: &[(&str, Value)]) -> Harness {
        Harness::new(
            echo_server(POD_IP).await,
            policies,
            ProxySettings::default(),
        )
        .await
    }

    /// The echo pod under [`web_policy`], with `settings`.
    async fn web(settings: ProxySettings) -> Harness {
        let pod = echo_server(POD_IP).await;
        Harness::new(pod, &[("allow-web", web_policy())], settings).await
    }

    fn publish(&self, policies: &[(&str, Value)], generation: u64) {
        self.tx
            .send_replace(dataplane(self.pod, policies, generation));
    }

    fn flows(&self, filter: &Filter) -> Vec<Arc<FlowRecord>> {
        self.handle.flows().snapshot(filter)
    }
}

async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((src, 0)))
        .expect("bind client");
    socket.connect(to).await.expect("connect")
}

/// One HTTP/1.1 request written by hand (so the target goes out byte for byte), on its
/// own connection; the status and the body.
async fn raw_h1(
    src: Ipv4Addr,
    to: SocketAddr,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, String) {
    raw_h1_host(src, to, method, target, Some("api.shop.svc"), extra).await
}

/// [`raw_h1`] with the `Host` field chosen (`None`: none).
async fn raw_h1_host(
    src: Ipv4Addr,
    to: SocketAddr,
    method: &str,
    target: &str,
    host: Option<&str>,
    extra: &str,
) -> (u16, String) {
    let mut s = connect_from(src, to).await;
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {target} HTTP/1.1\r\n{host}{extra}Connection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

fn json_body(body: &str) -> Value {
    // The echo's and the proxy's bodies are small, so they arrive in one chunk.
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1_client(src: Ipv4Addr, to: SocketAddr) -> H1 {
    let io = TokioIo::new(connect_from(src, to).await);
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    sender
}

async fn h1_get(sender: &mut H1, path: &str) -> (StatusCode, Value) {
    sender.ready().await.expect("ready");
    let req = Request::get(path)
        .header("host", "api.shop.svc")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, json_body(&String::from_utf8_lossy(&body)))
}

#[tokio::test]
async fn proxy_http1_allows_denies_and_normalises() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    // Allowed, and the pod sees the path and the client.
    let (status, body) = raw_h1(WEB, h.front, "GET", "/public/x?q=1", "").await;
    assert_eq!(status, 200, "{body}");
    let echo = json_body(&body);
    assert_eq!(echo["path"], "/public/x?q=1");
    assert!(
        echo["headers"]["x-request-id"][0].is_string(),
        "request id added: {echo}"
    );
    // The pod sees the normalised path, query kept.
    for (raw, seen) in [
        ("//public//x", "/public/x"),
        ("/public/%78?a=%2F", "/public/x?a=%2F"),
        ("/x/../public/y", "/public/y"),
    ] {
        let (status, body) = raw_h1(WEB, h.front, "GET", raw, "").await;
        assert_eq!(status, 200, "{raw}: {body}");
        assert_eq!(json_body(&body)["path"], seen, "{raw}");
    }
    // Bypass attempts are denied, naming the policy.
    for raw in [
        "/admin",
        "//admin",
        "/%61dmin",
        "/./admin",
        "/public/../admin",
        "/public/..%2Fadmin",
        "/public;x/../admin",
    ] {
        let (status, body) = raw_h1(WEB, h.front, "GET", raw, "").await;
        assert_eq!(status, 403, "{raw}: {body}");
        let deny = json_body(&body);
        assert_eq!(deny["error"], "denied");
        assert_eq!(deny["policy"], "shop/allow-web");
        assert!(deny["request_id"].is_string());
    }
    let (_, body) = raw_h1(WEB, h.front, "GET", "/admin", "x-request-id: abc-1\r\n").await;
    assert_eq!(json_body(&body)["reason"], "no rule matched");
    assert_eq!(json_body(&body)["request_id"], "abc-1");
    let (_, body) = raw_h1(WEB, h.front, "GET", "/public/%2e%2e/%2e%2e/x", "").await;
    assert!(
        json_body(&body)["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("invalid path")),
        "{body}"
    );
    // Method, header and host rules; two Host fields, or a Host that is not the
    // absolute-form target's, are refused.
    const API: Option<&str> = Some("api.shop.svc");
    let cases: [(&str, &str, Option<&str>, &str, u16); 11] = [
        ("POST", "/public/x", API, "", 403),
        ("POST", "/submit", API, "x-token: s3cret\r\n", 200),
        ("POST", "/submit", API, "x-token: nope\r\n", 403),
        (
            "POST",
            "/submit",
            API,
            "x-token: s3cret\r\nx-token: nope\r\n",
            403,
        ),
        ("POST", "/submit", API, "", 403),
        ("GET", "/hosted", API, "", 200),
        ("GET", "/hosted", Some("API.shop.svc."), "", 200),
        ("GET", "/hosted", Some("evil.example"), "", 403),
        ("GET", "/public/x", API, "Host: other\r\n", 400),
        ("GET", "http://evil.example/public/x", API, "", 400),
        ("GET", "http://api.shop.svc/hosted", None, "", 200),
    ];
    for (method, target, host, extra, want) in cases {
        let (status, body) = raw_h1_host(WEB, h.front, method, target, host, extra).await;
        assert_eq!(status, want, "{method} {target} {host:?} {extra:?}: {body}");
    }
    // Another ServiceAccount, or an address no pod owns: denied.
    assert_eq!(raw_h1(DB, h.front, "GET", "/public/x", "").await.0, 403);
    assert_eq!(
        raw_h1(STRANGER, h.front, "GET", "/public/x", "").await.0,
        403
    );
    // Flows: one per request, denials named.
    let denied = h.flows(&Filter {
        verdict: Some(FlowVerdict::Deny),
        policy: Some("shop/allow-web".into()),
        ..Filter::default()
    });
    assert!(denied
        .iter()
        .any(|f| f.request_id.as_deref() == Some("abc-1")
            && f.status == Some(403)
            && f.path.as_deref() == Some("/admin")
            && f.source.pod.as_deref() == Some("web")));
    let stats = h.handle.stats();
    assert!(
        stats.requests_allowed >= 6 && stats.requests_denied >= 10,
        "{stats:?}"
    );
}

#[tokio::test]
async fn proxy_audit_mode_passes_and_records_audit_deny() {
    let mut spec = web_policy();
    spec["mode"] = json!("audit");
    let h = Harness::echo(&[("watch", spec)]).await;
    let (status, body) = raw_h1(DB, h.front, "DELETE", "/admin", "x-request-id: audit-1\r\n").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_body(&body)["method"], "DELETE");
    let f = h.flows(&Filter {
        verdict: Some(FlowVerdict::AuditDeny),
        ..Filter::default()
    });
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].request_id.as_deref(), Some("audit-1"));
    assert_eq!(f[0].policy.as_deref(), Some("shop/watch"));
    assert_eq!(h.handle.stats().requests_audit_denied, 1);
    // Bytes that are not HTTP pass too (to an HTTP pod, which answers 400 itself).
    let out = send_raw(DB, h.front, b"\x16\x03\x01 hello\r\n\r\n").await;
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let f = h.flows(&Filter {
        verdict: Some(FlowVerdict::AuditDeny),
        ..Filter::default()
    });
    assert!(f
        .iter()
        .any(|r| r.kind == FlowKind::NotHttp && r.policy.as_deref() == Some("shop/watch")));
}

#[tokio::test]
async fn proxy_http2_streams_are_judged_one_by_one_and_grpc_gets_status_7() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    let io = TokioIo::new(connect_from(WEB, h.front).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let req = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(format!("http://api.shop.svc{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let allowed = sender
        .send_request(req("GET", "/public/h2"))
        .await
        .expect("allowed");
    assert_eq!(allowed.status(), 200);
    let body = allowed
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let echo = json_body(&String::from_utf8_lossy(&body));
    assert_eq!(
        (echo["version"].as_str(), echo["path"].as_str()),
        (Some("HTTP/2.0"), Some("/public/h2"))
    );
    let denied = sender
        .send_request(req("GET", "/admin"))
        .await
        .expect("denied");
    assert_eq!(denied.status(), 403);
    // A gRPC call on the same connection: trailers-only, PERMISSION_DENIED.
    let mut grpc = req("POST", "/pkg.Admin/Delete");
    grpc.headers_mut()
        .insert("content-type", "application/grpc".parse().expect("ct"));
    grpc.headers_mut()
        .insert("te", "trailers".parse().expect("te"));
    let resp = sender.send_request(grpc).await.expect("grpc");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"7"[..])
    );
    let msg = resp
        .headers()
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        msg.contains("shop/allow-web") && msg.contains("denied"),
        "{msg}"
    );
    // An allowed gRPC call reaches the pod over h2, and its trailers come back.
    let mut call = req("POST", "/pkg.Public/Get");
    call.headers_mut()
        .insert("content-type", "application/grpc".parse().expect("ct"));
    call.headers_mut()
        .insert("te", "trailers".parse().expect("te"));
    let resp = sender.send_request(call).await.expect("grpc call");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    let echo = json_body(&String::from_utf8_lossy(&collected.to_bytes()));
    assert_eq!(
        echo["headers"]["te"][0], "trailers",
        "te: trailers passes end to end"
    );
    // And the connection still serves allowed streams.
    let again = sender
        .send_request(req("GET", "/public/again"))
        .await
        .expect("again");
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn proxy_policy_change_applies_to_next_request_on_same_connection() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    let mut c = h1_client(WEB, h.front).await;
    assert_eq!(h1_get(&mut c, "/public/1").await.0, 200);
    h.publish(&[("deny-all", json!({"podSelector": {}}))], 2);
    let (status, body) = h1_get(&mut c, "/public/1").await;
    assert_eq!(status, 403);
    assert_eq!(body["policy"], "shop/deny-all");
    h.publish(&[("allow-web", web_policy())], 3);
    assert_eq!(h1_get(&mut c, "/public/1").await.0, 200);
    assert_eq!(
        h.handle.stats().connections,
        1,
        "one keep-alive connection throughout"
    );
}

/// Sends `bytes` on a new connection from `src`; what comes back until the proxy closes
/// (or an error, or the wait runs out).
async fn send_raw(src: Ipv4Addr, to: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect_from(src, to).await;
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    out
}

/// Sends `msg` and asserts it comes back.
async fn assert_echoed(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("echoed");
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn proxy_rule_without_http_splices_raw_bytes_for_allowed_peers_only() {
    let pod = tcp_echo(POD_IP).await;
    let spec =
        json!({"podSelector": {}, "ingress": [{"from": [{"serviceAccount": {"name": "web"}}]}]});
    let h = Harness::new(pod, &[("tcp", spec)], ProxySettings::default()).await;
    let mut s = connect_from(WEB, h.front).await;
    assert_echoed(&mut s, b"\x16\x03\x01 not http at all\n").await;
    // Another peer: HTTP would be judged, and raw bytes close the connection.
    let mut s = connect_from(DB, h.front).await;
    s.write_all(b"\x16\x03\x01 not http at all\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("closed in time");
    assert!(n.is_err() || out.is_empty(), "nothing comes back: {out:?}");
    let f = h.flows(&Filter::default());
    assert!(
        f.iter().any(|r| r.kind == FlowKind::L4
            && r.verdict == FlowVerdict::Allow
            && r.policy.as_deref() == Some("shop/tcp")
            && r.rule == Some(0)),
        "{f:?}"
    );
    assert!(
        f.iter().any(|r| r.kind == FlowKind::NotHttp
            && r.verdict == FlowVerdict::Deny
            && r.source.pod.as_deref() == Some("db")),
        "{f:?}"
    );
    // A request line, then lines that are not HTTP headers: hyper answers 400, recorded.
    let out = send_raw(DB, h.front, b"GET / HTTP/1.1\r\nthis is no header\r\n\r\n").await;
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let stats = h.handle.stats();
    assert_eq!((stats.connections_l4, stats.connections_not_http), (1, 2));
}

#[tokio::test]
async fn proxy_upstream_down_answers_503_promptly() {
    let closed = {
        let l = std::net::TcpListener::bind((POD_IP, 0)).expect("bind");
        l.local_addr().expect("addr")
    };
    let h = Harness::new(
        closed,
        &[("allow-web", web_policy())],
        ProxySettings::default(),
    )
    .await;
    let start = Instant::now();
    let (status, body) = raw_h1(WEB, h.front, "GET", "/public/x", "").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(json_body(&body)["destination"], closed.to_string());
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(h.handle.stats().upstream_errors, 1);
}

const SLOW_REQUEST: &[u8] =
    b"GET /public/x HTTP/1.1\r\nHost: api.shop.svc\r\nX-Slow: 1234567890\r\n\r\n";

/// Writes `head` at once, then `rest` one byte a second; how long until the proxy closed
/// the connection, and what it sent.
fn trickle(
    mut s: TcpStream,
    head: &'static [u8],
    rest: &'static [u8],
) -> tokio::task::JoinHandle<(Duration, Vec<u8>)> {
    tokio::spawn(async move {
        let start = Instant::now();
        let _ = s.write_all(head).await;
        for b in rest {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        (start.elapsed(), out)
    })
}

#[tokio::test]
async fn proxy_slowloris_and_half_open_floods_do_not_stop_others() {
    let settings = ProxySettings {
        header_read_timeout: Duration::from_secs(2),
        max_connections_per_source: 20,
        ..ProxySettings::default()
    };
    let h = Harness::web(settings).await;
    // A slowloris client, one byte a second; another that sends its request line at
    // once, then trickles the headers (cut by hyper's header timeout, not the sniffing).
    let slow_task = trickle(connect_from(WEB, h.front).await, b"", SLOW_REQUEST);
    let (line, headers) = SLOW_REQUEST.split_at(24);
    let slow_headers_task = trickle(connect_from(WEB, h.front).await, line, headers);
    // A flood of connections that say nothing, from one address.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(connect_from(FLOODER, h.front).await);
    }
    // Someone else is served meanwhile.
    for i in 0..3 {
        let (status, _) = raw_h1(WEB, h.front, "GET", &format!("/public/{i}"), "").await;
        assert_eq!(status, 200);
    }
    for task in [slow_task, slow_headers_task] {
        let (took, out) = tokio::time::timeout(WAIT, task)
            .await
            .expect("slow client cut")
            .expect("task");
        assert!(
            took < Duration::from_secs(6),
            "cut after the header timeout, took {took:?}"
        );
        assert!(
            !String::from_utf8_lossy(&out).contains("\"method\""),
            "never reached the pod"
        );
    }
    let stats = h.handle.stats();
    assert!(stats.limit_refusals >= 40, "{stats:?}");
    assert!(stats.header_timeouts >= 2, "{stats:?}");
    assert!(stats.header_timeouts >= 1, "{stats:?}");
    assert!(h
        .flows(&Filter::default())
        .iter()
        .any(|f| f.kind == FlowKind::Limit));
}

#[test]
fn proxy_bind_sets_ip_transparent_accepts_and_drains() {
    if !is_root() {
        eprintln!("skipped: IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pod = echo_server(POD_IP).await;
        let (_tx, rx) = watch::channel(dataplane(pod, &[("allow-web", web_policy())], 1));
        let settings = ProxySettings {
            drain_timeout: Duration::from_secs(5),
            ..ProxySettings::default()
        };
        let mut config = ProxyConfig::new(rx, Flows::default());
        config.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        config.settings = settings;
        let mut bound = Proxy::bind(config).expect("bind");
        let addr = bound.local_addr();
        assert_ne!(addr.port(), 0);
        for fd in bound.listener_fds() {
            let sock = socket2::SockRef::from(&fd);
            assert!(sock.ip_transparent_v4().expect("getsockopt IP_TRANSPARENT"));
        }
        bound.original_destination = Some(pod);
        let handle = bound.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        // Served on the bound port.
        let mut c = h1_client(WEB, addr).await;
        assert_eq!(h1_get(&mut c, "/public/a").await.0, 200);
        // A request in flight when the drain starts still completes.
        let mut slow = h1_client(WEB, addr).await;
        let in_flight = tokio::spawn(async move { h1_get(&mut slow, "/public/slow").await.0 });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let _ = stop.send(());
        assert_eq!(in_flight.await.expect("task"), 200);
        tokio::time::timeout(WAIT, run)
            .await
            .expect("run returns")
            .expect("task")
            .expect("run ok");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "drained once idle, took {:?}",
            start.elapsed()
        );
        // No longer accepting.
        assert!(TcpStream::connect(addr).await.is_err());
        assert!(handle.stats().requests_allowed >= 2);
    });
}

#[tokio::test]
async fn proxy_drain_deadline_cuts_what_is_left() {
    if !is_root() {
        eprintln!("skipped: IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)");
        return;
    }
    let pod = echo_server(POD_IP).await;
    let (_tx, rx) = watch::channel(dataplane(pod, &[("allow-web", web_policy())], 1));
    let mut config = ProxyConfig::new(rx, Flows::default());
    config.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.settings.drain_timeout = Duration::from_millis(300);
    let mut bound = Proxy::bind(config).expect("bind");
    let addr = bound.local_addr();
    bound.original_destination = Some(pod);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(bound.run(async {
        let _ = stopped.await;
    }));
    let mut slow = h1_client(WEB, addr).await;
    let in_flight = tokio::spawn(async move {
        let req = Request::get("/public/slower")
            .header("host", "a")
            .body(Full::new(Bytes::new()))
            .expect("req");
        slow.send_request(req).await.map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run returns")
        .expect("task")
        .expect("run ok");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    assert!(
        in_flight.await.expect("task").is_err(),
        "the slow request was cut"
    );
}

#[tokio::test]
async fn proxy_upstream_is_transparent_and_pooled() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    let (_, first) = raw_h1(WEB, h.front, "GET", "/public/1", "").await;
    let (_, second) = raw_h1(WEB, h.front, "GET", "/public/2", "").await;
    let peer = |b: &str| json_body(b)["peer"].as_str().map(str::to_owned);
    let (first, second) = (peer(&first), peer(&second));
    // Two downstream connections, one pooled upstream connection (`Connection: close`
    // is hop-by-hop and does not reach the pod).
    assert_eq!(first, second);
    if is_root() {
        let ip = first.as_deref().and_then(|p| p.split(':').next());
        assert_eq!(ip, Some("127.0.0.2"), "the pod sees the client's address");
    } else {
        eprintln!(
            "skipped the peer check: not root, so IP_TRANSPARENT is refused and the pod sees \
             the node's address"
        );
    }
    // Another client gets its own upstream connection, from its own address.
    let mut spec = web_policy();
    spec["ingress"][0]["from"] = json!([{"serviceAccount": {"name": "db"}}]);
    h.publish(&[("allow-web", spec)], 2);
    let (status, other) = raw_h1(DB, h.front, "GET", "/public/3", "").await;
    assert_eq!(status, 200, "{other}");
    assert_ne!(peer(&other), first);
}

#[tokio::test]
async fn proxy_http1_pipelined_requests_are_judged_each() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    let mut s = connect_from(WEB, h.front).await;
    s.write_all(
        b"GET /public/a HTTP/1.1\r\nHost: api.shop.svc\r\n\r\n\
          GET /admin HTTP/1.1\r\nHost: api.shop.svc\r\n\r\n\
          GET /public/b HTTP/1.1\r\nHost: api.shop.svc\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12))
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{text}");
    assert!(text.contains("/public/a") && text.contains("/public/b"));
}

#[tokio::test]
async fn proxy_pod_no_longer_covered_is_spliced() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    h.tx.send_replace(Arc::new(Dataplane {
        generation: 2,
        ..Dataplane::default()
    }));
    let (status, body) = raw_h1(STRANGER, h.front, "GET", "/admin", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_body(&body)["path"], "/admin");
    let f = h.flows(&Filter::default());
    assert!(f
        .iter()
        .any(|r| r.kind == FlowKind::L4 && r.reason.as_deref() == Some("not covered")));
}

#[tokio::test]
async fn proxy_request_timeout_answers_504_and_header_limits_431() {
    let settings = ProxySettings {
        request_timeout: Duration::from_millis(300),
        ..ProxySettings::default()
    };
    let h = Harness::web(settings).await;
    let start = Instant::now();
    let (status, body) = raw_h1(WEB, h.front, "GET", "/public/slower", "").await;
    assert_eq!(status, 504, "{body}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // More header fields than the limit: refused while parsing, recorded.
    let many: String = (0..150).map(|i| format!("x-h{i}: 1\r\n")).collect();
    let (status, _) = raw_h1(WEB, h.front, "GET", "/public/x", &many).await;
    assert_eq!(status, 431);
    let f = h.flows(&Filter::default());
    assert!(f
        .iter()
        .any(|r| r.kind == FlowKind::Limit && r.verdict == FlowVerdict::Deny));
}

#[tokio::test]
async fn proxy_kubelet_probes_from_the_node_pass_only_for_declared_paths() {
    let h = Harness::echo(&[("deny-all", json!({"podSelector": {}}))]).await;
    let (status, body) = raw_h1(NODE, h.front, "GET", "/healthz", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(raw_h1(NODE, h.front, "GET", "/admin", "").await.0, 403);
    assert_eq!(raw_h1(NODE, h.front, "POST", "/healthz", "").await.0, 403);
    assert_eq!(raw_h1(WEB, h.front, "GET", "/healthz", "").await.0, 403);
    let f = h.flows(&Filter {
        verdict: Some(FlowVerdict::Allow),
        ..Filter::default()
    });
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].reason.as_deref(), Some("local node probe"));
}

#[tokio::test]
async fn proxy_upgrade_is_judged_then_tunnelled() {
    let h = Harness::echo(&[("allow-web", web_policy())]).await;
    let upgrade = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: api.shop.svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    };
    let mut s = connect_from(WEB, h.front).await;
    s.write_all(upgrade("/public/ws").as_bytes())
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(n, 1, "closed early: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 101") && head.contains("upgrade: echo"),
        "{head}"
    );
    assert_echoed(&mut s, b"ping through the tunnel").await;
    // A denied upgrade is answered 403 and never switches.
    let mut s = connect_from(DB, h.front).await;
    s.write_all(upgrade("/public/ws").as_bytes())
        .await
        .expect("write");
    let mut out = vec![0u8; 12];
    tokio::time::timeout(WAIT, s.read_exact(&mut out))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&out, b"HTTP/1.1 403");
}
