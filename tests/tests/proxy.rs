//! L7 enforcement end to end on the test bed: real agents steer connections to pods an
//! `L7Policy` selects into their proxy (eBPF `sk_lookup` + policy routing), with
//! WireGuard between the nodes and a real kube-proxy in each; real `curl` in pod
//! namespaces, a real `veil-echo` as the server. Every test is named `proxy_*`, so
//! `cargo test --workspace proxy` runs them with the proxy's own unit tests.

use std::time::{Duration, Instant};

use veil_testbed::capture::Capture;
use veil_testbed::objects::cluster_ip;
use veil_testbed::{eventually, BedConfig, HttpReply, Pod, ServicePortSpec, TestBed, Workload};

const POLICY: &str = r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: api-guard, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: {name: web}}]
      ports: [8080]
      http:
        - methods: [GET]
          path: {prefix: /public}
"#;

/// The port of the api's `tcpSocket` probe.
const PROBE_PORT: u16 = 9100;

/// Asserts a 403 from the proxy that names the policy.
fn assert_denied(reply: &HttpReply, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {reply:?}");
    let json = reply.json().unwrap();
    assert_eq!(json["policy"], "shop/api-guard", "{what}: {json}");
    assert!(
        json["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{what}: {json}"
    );
}

struct Shop {
    bed: TestBed,
    api: Pod,
    free: Pod,
    web_far: Pod,
    web_near: Pod,
    other: Pod,
    _servers: Vec<veil_testbed::process::Proc>,
}

/// Two nodes with kube-proxy and WireGuard; in namespace `shop`: `api` (app=api) and
/// `free` (selected by no policy) serving on node 1, `web` clients (ServiceAccount web)
/// on both nodes, `other` (ServiceAccount other) on node 0.
fn shop() -> Shop {
    let bed = TestBed::start(BedConfig {
        nodes: 2,
        kube_proxy: true,
        ..Default::default()
    })
    .unwrap();
    bed.create_namespace("shop", &[("team", "shop")]).unwrap();
    let server = |name: &str, app: &str| {
        Workload::new("shop")
            .label("app", app)
            .service_account(name)
            .port("http", 8080)
    };
    // The api declares the kubelet's probes: httpGet on its HTTP port, tcpSocket on PROBE_PORT.
    let api = server("api", "api")
        .http_probe(8080, "/ready")
        .tcp_probe(PROBE_PORT);
    let api = bed.add_workload(1, "api", &api).unwrap();
    let free = bed
        .add_workload(1, "free", &server("free", "free"))
        .unwrap();
    let servers = vec![
        api.serve_echo(8080).unwrap(),
        api.serve_echo(PROBE_PORT).unwrap(),
        free.serve_echo(8080).unwrap(),
    ];
    let client = |node: usize, name: &str, sa: &str| {
        let w = Workload::new("shop")
            .label("app", "client")
            .service_account(sa);
        bed.add_workload(node, name, &w).unwrap()
    };
    let web_far = client(0, "web-far", "web");
    let web_near = client(1, "web-near", "web");
    let other = client(0, "other", "other");
    Shop {
        bed,
        api,
        free,
        web_far,
        web_near,
        other,
        _servers: servers,
    }
}

/// Applies the policy and waits until the proxy on the api's node enforces it.
fn enforce(shop: &Shop) {
    shop.bed.apply_policy(POLICY).unwrap();
    let started = Instant::now();
    let url = format!("http://{}:8080/admin", shop.api.ip);
    eventually("the policy enforced", Duration::from_secs(10), || {
        Ok((shop.web_far.curl(&[&url])?.status == 403).then_some(()))
    })
    .unwrap();
    eprintln!(
        "policy enforced {} ms after it was applied",
        started.elapsed().as_millis()
    );
}

#[test]
fn proxy_enforces_l7_policy_across_nodes_same_node_and_through_services() {
    let shop = shop();
    let api = format!("http://{}:8080", shop.api.ip);

    // No policy yet: anything goes, straight to the pod, from pods and from the node.
    let reply = curl(&shop.other, &[&format!("{api}/admin")]);
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = shop.bed.node(1).curl(&[&format!("{api}/admin")]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let before = shop.bed.meshctl(1, &["proxy"]).unwrap();
    assert!(
        before.contains("\"connections\": 0"),
        "the proxy saw traffic: {before}"
    );

    enforce(&shop);

    for client in [&shop.web_far, &shop.web_near] {
        // Allowed: the pod answers, sees the path the policy judged and the client's own
        // address as its peer.
        let reply = curl(client, &[&format!("{api}/public/items?x=1")]);
        assert_eq!(reply.status, 200, "{}: {reply:?}", client.name);
        let json = reply.json().unwrap();
        assert_eq!(json["path"], "/public/items?x=1", "{json}");
        assert_eq!(
            reply.peer_ip().unwrap(),
            client.ip,
            "{}: {json}",
            client.name
        );
        let reply = curl(client, &["--path-as-is", &format!("{api}/public/./a/../b")]);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.json().unwrap()["path"], "/public/b");

        // Denied: wrong method, wrong path, and every way of spelling /admin.
        assert_denied(
            &curl(client, &["-X", "POST", &format!("{api}/public")]),
            "POST",
        );
        for path in [
            "/admin",
            "//admin",
            "/%61dmin",
            "/./admin",
            "/public/../admin",
        ] {
            let reply = curl(client, &["--path-as-is", &format!("{api}{path}")]);
            assert_denied(&reply, path);
        }
        // HTTP/2 with prior knowledge: judged per stream too.
        let reply = curl(
            client,
            &["--http2-prior-knowledge", &format!("{api}/public/h2")],
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.json().unwrap()["version"], "HTTP/2.0");
        let reply = curl(
            client,
            &["--http2-prior-knowledge", &format!("{api}/admin")],
        );
        assert_denied(&reply, "h2 /admin");
    }
    // A ServiceAccount the rule does not name.
    assert_denied(&curl(&shop.other, &[&format!("{api}/public")]), "other SA");

    // Through the Service's ClusterIP (kube-proxy DNATs after the client's veth): the
    // same verdicts, from the other node and from the api's own node.
    let svc = shop
        .bed
        .create_service(
            "shop",
            "api",
            &[("app", "api")],
            &[ServicePortSpec::named("http", 80, "http")],
        )
        .unwrap();
    let vip = cluster_ip(&svc).unwrap();
    for client in [&shop.web_far, &shop.web_near] {
        let reply = curl(client, &[&format!("http://{vip}/public/svc")]);
        assert_eq!(reply.status, 200, "{} via {vip}: {reply:?}", client.name);
        assert_eq!(reply.peer_ip().unwrap(), client.ip);
        assert_denied(
            &curl(client, &[&format!("http://{vip}/admin")]),
            "via the Service",
        );
    }
    assert_denied(
        &curl(&shop.other, &[&format!("http://{vip}/public")]),
        "other via the Service",
    );

    // The node itself (the kubelet, host-network pods) meets the proxy too, from its own
    // address: the api's declared httpGet probe passes, nothing else does, directly or
    // through the Service; the port of its tcpSocket probe is reached directly, so the
    // probe tests the pod and not the proxy (which would answer it with the pod dead).
    let node = shop.bed.node(1);
    let reply = node.curl(&[&format!("{api}/ready")]).unwrap();
    assert_eq!(reply.status, 200, "the node's probe: {reply:?}");
    assert_eq!(reply.peer_ip().unwrap(), node.ip, "the node's probe");
    assert_denied(&node.curl(&[&format!("{api}/public")]).unwrap(), "the node");
    assert_denied(
        &node.curl(&[&format!("http://{vip}/public")]).unwrap(),
        "the node via the Service",
    );
    let reply = node
        .curl(&[&format!("http://{}:{PROBE_PORT}/any", shop.api.ip)])
        .unwrap();
    assert_eq!(reply.status, 200, "the tcpSocket probe's port: {reply:?}");
    assert_eq!(reply.peer_ip().unwrap(), node.ip);
    // Another node is not the pod's own: its request for the probe path is judged as any,
    // and both ways cross the underlay inside WireGuard (the proxy answers from the pod's
    // address to a node's).
    let filter = format!("host {}", shop.api.ip);
    let capture = Capture::start(shop.bed.underlay(), &filter, shop.bed.dir()).unwrap();
    assert_denied(
        &shop.bed.node(0).curl(&[&format!("{api}/ready")]).unwrap(),
        "another node",
    );
    let seen = capture.stop().unwrap();
    assert!(
        seen.lines.is_empty(),
        "the api's address in clear on the underlay: {:?}",
        seen.lines
    );

    // A pod no policy selects: served directly, the proxy never sees the connection.
    let counted = |out: &str| {
        let stats: serde_json::Value = serde_json::from_str(out).unwrap();
        stats["connections"].as_u64().unwrap()
    };
    let seen = counted(&shop.bed.meshctl(1, &["proxy"]).unwrap());
    let reply = curl(
        &shop.other,
        &[&format!("http://{}:8080/admin", shop.free.ip)],
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.peer_ip().unwrap(), shop.other.ip);
    assert_eq!(counted(&shop.bed.meshctl(1, &["proxy"]).unwrap()), seen);

    // The covered pod's own outgoing connections are its business: they reach a pod on
    // the other node (answers come back through WireGuard) and one on its own node.
    let _other_echo = shop.other.serve_echo(8080).unwrap();
    for target in [&shop.other, &shop.free] {
        let reply = curl(&shop.api, &[&format!("http://{}:8080/out", target.ip)]);
        assert_eq!(reply.status, 200, "api -> {}: {reply:?}", target.name);
        assert_eq!(reply.peer_ip().unwrap(), shop.api.ip);
    }

    // Who was refused, by which policy: the flow records of the api's node.
    let denied = shop
        .bed
        .meshctl(1, &["observe", "--verdict", "deny", "--json"])
        .unwrap();
    let records: Vec<serde_json::Value> = denied
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["policy"] == "shop/api-guard"
            && r["source"]["pod"] == "other"
            && r["destination"]["pod"] == "api"
            && r["status"] == 403),
        "{denied}"
    );
    let node_ip = shop.bed.node(1).ip.to_string();
    assert!(
        records.iter().any(|r| r["source"]["ip"] == node_ip.as_str()
            && r["source"]["pod"].is_null()
            && r["destination"]["pod"] == "api"),
        "the node's refused request: {denied}"
    );
    assert!(records.iter().all(|r| r["verdict"] == "deny"), "{denied}");
    let table = shop
        .bed
        .meshctl(1, &["observe", "--namespace", "shop"])
        .unwrap();
    assert!(
        table.contains("shop/web-far") && table.contains("allow"),
        "{table}"
    );
}

/// A pod that sends with another pod's address (here: that of a client the policy
/// allows) gets nothing delivered; the drop is counted on its interface and recorded as a
/// flow naming the real sender.
#[test]
fn proxy_spoofed_source_is_dropped_counted_and_recorded() {
    let shop = shop();
    enforce(&shop);
    let stolen = shop.web_far.ip.to_string();
    let out = shop
        .other
        .exec(&["ip", "addr", "add", &format!("{stolen}/32"), "dev", "eth0"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let url = format!("http://{}:8080/public", shop.api.ip);
    let spoofed = shop
        .other
        .curl(&["--interface", &stolen, "--connect-timeout", "3", &url]);
    assert!(
        spoofed.is_err(),
        "a spoofed connection got an answer: {spoofed:?}"
    );
    let pods = shop.bed.meshctl(0, &["pods", "--json"]).unwrap();
    let pods: serde_json::Value = serde_json::from_str(&pods).unwrap();
    let other = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == shop.other.ip.to_string())
        .unwrap_or_else(|| panic!("{pods}"));
    assert!(other["spoofed_packets"].as_u64().unwrap() > 0, "{other}");
    let flows = shop
        .bed
        .meshctl(0, &["observe", "--pod", "other", "--json"])
        .unwrap();
    assert!(
        flows.lines().any(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            r["kind"] == "spoofed" && r["verdict"] == "deny" && r["source"]["ip"] == stolen
        }),
        "{flows}"
    );
    // The pod's own address still works.
    let reply = curl(&shop.other, &[&url]);
    assert_denied(&reply, "other, with its own address");
}

/// The api's agent restarts under a steady stream of requests: no request ever gets an
/// answer the policy would not give (covered connections are refused while the proxy is
/// away, never passed unjudged), enforcement resumes when the agent is back, the eBPF
/// programs stay attached and pods keep their addresses.
#[test]
fn proxy_agent_restart_fails_closed_and_resumes() {
    let mut shop = shop();
    enforce(&shop);
    let allowed = format!("http://{}:8080/public/steady", shop.api.ip);
    let denied = format!("http://{}:8080/admin", shop.api.ip);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let stop = stop.clone();
        let (client_ns, allowed, denied) =
            (shop.web_far.netns.path(), allowed.clone(), denied.clone());
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for url in [&allowed, &denied] {
                    let out = std::process::Command::new("ip")
                        .args(["netns", "exec"])
                        .arg(client_ns.file_name().unwrap_or_default())
                        .args([
                            "curl",
                            "-s",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{http_code}",
                            "--max-time",
                            "3",
                            url,
                        ])
                        .output();
                    let code = out
                        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                        .unwrap_or_default();
                    outcomes.push((url.clone(), code));
                }
            }
            outcomes
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let pods_before = shop.bed.agent_pods(1).unwrap();
    shop.bed.restart_agent(1).unwrap();
    // Enforcement is back: allowed passes, denied is 403 again.
    eventually(
        "enforcement after the restart",
        Duration::from_secs(30),
        || {
            let ok = shop
                .web_far
                .curl(&[&allowed])
                .map(|r| r.status == 200)
                .unwrap_or(false);
            let no = shop
                .web_far
                .curl(&[&denied])
                .map(|r| r.status == 403)
                .unwrap_or(false);
            Ok((ok && no).then_some(()))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcomes = stream.join().unwrap();
    let unjudged: Vec<_> = outcomes
        .iter()
        .filter(|(url, code)| url == &denied && code == "200")
        .collect();
    assert!(
        unjudged.is_empty(),
        "passed unjudged during the restart: {unjudged:?}"
    );
    let refused = outcomes.iter().filter(|(_, code)| code == "000").count();
    eprintln!(
        "{} requests during the restart, {refused} refused while the proxy was away",
        outcomes.len()
    );
    let pods_after = shop.bed.agent_pods(1).unwrap();
    assert_eq!(
        pods_before.iter().map(|p| p.ip).collect::<Vec<_>>(),
        pods_after.iter().map(|p| p.ip).collect::<Vec<_>>()
    );
    // The programs survived on the pods' interfaces (their counters kept counting).
    assert!(
        pods_after.iter().all(|p| p.tx_packets > 0),
        "{pods_after:?}"
    );
}

/// A second policy on the api: gRPC's Echo call and raw TCP on port 9000 for `web` only.
const EXTRA: &str = r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: api-extra, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: {name: web}}]
      ports: [9000]
    - from: [{serviceAccount: {name: web}}]
      ports: [8080]
      http: [{methods: [POST], path: {exact: /veil.test.Echo/Echo}}]
"#;

/// Real clients of other protocols in the pods: one h2c connection (nghttp) carrying an
/// allowed and a denied stream; gRPC calls (tonic, in `veil-client`) allowed for `web`
/// and PERMISSION_DENIED for `other`; raw TCP under a rule without `http` reaching the
/// pod from `web` and closed, never delivered, from `other`.
#[test]
fn proxy_h2_streams_grpc_and_raw_tcp_from_real_clients() {
    let shop = shop();
    enforce(&shop);
    shop.bed.apply_policy(EXTRA).unwrap();
    let api = format!("http://{}:8080", shop.api.ip);

    // Two streams on one h2c connection (nghttp fetches all its URIs over one): the
    // allowed one answered by the pod, the denied one by the proxy.
    let out = shop
        .web_far
        .exec(&[
            "nghttp",
            "-n",
            "--stat",
            &format!("{api}/public/a"),
            &format!("{api}/admin"),
        ])
        .unwrap();
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    // `id responseEnd requestStart process code size path` rows, one per stream.
    let mut codes: Vec<(String, String)> = stats
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 7 && f[0].parse::<u32>().is_ok())
                .then(|| (f[6].to_string(), f[4].to_string()))
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            ("/admin".to_string(), "403".to_string()),
            ("/public/a".to_string(), "200".to_string())
        ],
        "{stats}"
    );

    // gRPC: the rule is in the second policy, which reaches the agent within a second.
    let client = veil_testbed::bins::veil("veil-client").unwrap();
    let client = client.to_string_lossy();
    let grpc = |pod: &Pod, code: &str| {
        let out = pod
            .exec(&[
                &client,
                "grpc",
                &api,
                "--message",
                "hi",
                "--expect-code",
                code,
            ])
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    eventually("gRPC allowed for web", Duration::from_secs(5), || {
        Ok(grpc(&shop.web_far, "0").0.then_some(()))
    })
    .unwrap();
    let (denied, said) = grpc(&shop.other, "7");
    assert!(
        denied,
        "other's gRPC call was not PERMISSION_DENIED: {said}"
    );
    assert!(said.contains("shop/api-"), "{said}");

    // Raw TCP on 9000: other's bytes are closed by the proxy (not HTTP, no rule for it),
    // so the first connection the pod accepts is web's.
    let receiver = shop.api.tcp_receive_once(9000).unwrap();
    let port = std::net::SocketAddr::from((shop.api.ip, 9000));
    let _ = shop
        .other
        .tcp_send(port, b"\x00\x01 not http from other".to_vec());
    shop.web_far
        .tcp_send(port, b"\x00\x01 not http from web".to_vec())
        .unwrap();
    let got = receiver.join().unwrap().unwrap();
    assert_eq!(
        got,
        b"\x00\x01 not http from web",
        "{}",
        String::from_utf8_lossy(&got)
    );
    let flows = shop
        .bed
        .meshctl(1, &["observe", "--pod", "api", "--json"])
        .unwrap();
    let records: Vec<serde_json::Value> = flows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen = |kind: &str, verdict: &str, from: &Pod| {
        records.iter().any(|r| {
            r["kind"] == kind
                && r["verdict"] == verdict
                && r["source"]["ip"] == from.ip.to_string()
                && r["destination"]["port"] == 9000
        })
    };
    assert!(seen("l4", "allow", &shop.web_far), "{flows}");
    assert!(seen("not-http", "deny", &shop.other), "{flows}");
}

/// An HTTP/1.1 exchange on an open connection: writes `GET path`, reads one response
/// (status line, headers, a Content-Length body); the status.
fn get_on(stream: &mut std::net::TcpStream, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: api\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 16 * 1024, "response head too long");
        anyhow::ensure!(stream.read(&mut byte)? == 1, "connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow::anyhow!("no Content-Length in {head:?}"))?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(status)
}

/// A policy edited while a client holds a keep-alive connection open: the connection's
/// next request gets the new verdict within a second of the edit, on the same
/// connection. Then one source opening more connections than the per-source limit, half
/// of them sending a header line every few seconds (slowloris) and half sending nothing
/// (half-open), does not keep the other clients from being served.
#[test]
fn proxy_live_policy_edit_on_keep_alive_and_floods_do_not_starve_others() {
    use std::sync::mpsc;
    let shop = shop();
    enforce(&shop);
    let dst = std::net::SocketAddr::from((shop.api.ip, 8080));

    let (status_tx, status_rx) = mpsc::channel::<(std::time::Instant, u16)>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let client = shop.web_far.netns.spawn(move || {
        let mut stream = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut requests = 0u32;
        while stop_rx.try_recv().is_err() {
            let status = get_on(&mut stream, "/public/live")?;
            requests += 1;
            status_tx.send((Instant::now(), status)).ok();
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(requests)
    });
    let statuses: Vec<u16> = (0..3)
        .map(|_| status_rx.recv_timeout(Duration::from_secs(10)).unwrap().1)
        .collect();
    assert_eq!(statuses, [200, 200, 200]);
    let edited = Instant::now();
    shop.bed
        .apply_policy(&POLICY.replace("prefix: /public", "prefix: /private"))
        .unwrap();
    let refused_after = loop {
        let (at, status) = status_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the keep-alive connection stopped answering");
        if status == 403 {
            break at.duration_since(edited);
        }
        assert_eq!(status, 200, "before the edit reached the agent");
    };
    stop_tx.send(()).unwrap();
    let requests = client.join().unwrap().unwrap();
    eprintln!(
        "the edit refused the open connection's request {} ms after it was applied ({requests} requests on the one connection)",
        refused_after.as_millis()
    );
    assert!(
        refused_after <= Duration::from_secs(1),
        "the edit took {refused_after:?} to reach an open connection"
    );
    shop.bed.apply_policy(POLICY).unwrap();
    let url = format!("http://{}:8080/public/again", shop.api.ip);
    eventually("the policy restored", Duration::from_secs(5), || {
        Ok((shop.web_far.curl(&[&url])?.status == 200).then_some(()))
    })
    .unwrap();

    // The flood: 600 connections from `other` (over the per-source limit of 512).
    let (held_tx, held_rx) = mpsc::channel::<usize>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let flood = shop.other.netns.spawn(move || {
        use std::io::Write;
        let mut held = Vec::new();
        for i in 0..600 {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))
            else {
                continue;
            };
            if i % 2 == 0 {
                // Slowloris: a request line and one header, never the blank line.
                let _ = s.write_all(b"GET /public HTTP/1.1\r\nHost: api\r\nX-Slow: 1\r\n");
            }
            held.push(s);
        }
        held_tx.send(held.len()).ok();
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
        Ok(held.len())
    });
    let opened = held_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    eprintln!("flood: {opened} connections from other held open");
    for client in [&shop.web_far, &shop.web_near] {
        let started = Instant::now();
        let reply = client
            .curl(&[
                "--max-time",
                "3",
                &format!("http://{}:8080/public/during-flood", shop.api.ip),
            ])
            .unwrap();
        assert_eq!(reply.status, 200, "{}: {reply:?}", client.name);
        eprintln!(
            "{} served in {:?} during the flood",
            client.name,
            started.elapsed()
        );
    }
    release_tx.send(()).ok();
    flood.join().unwrap().unwrap();
    let counters = shop.bed.meshctl(1, &["proxy"]).unwrap();
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert!(
        counters["limit_refusals"].as_u64().unwrap_or_default() > 0,
        "the per-source limit refused nothing: {counters}"
    );
}

/// `curl args` from `client`, once it connects (see [`Pod::curl_until_connected`]).
fn curl(client: &Pod, args: &[&str]) -> HttpReply {
    client.curl_until_connected(args).unwrap()
}
