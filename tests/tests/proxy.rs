//! L7 enforcement end to end on the test bed: real agents steer connections to pods an
//! `L7Policy` selects into their proxy (eBPF `sk_lookup` + policy routing), with
//! WireGuard between the nodes and a real kube-proxy in each; real `curl` in pod
//! namespaces, a real `veil-echo` as the server. Every test is named `proxy_*`, so
//! `cargo test --workspace proxy` runs them with the proxy's own unit tests.

use std::time::{Duration, Instant};

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
        let w = Workload::new("shop")
            .label("app", app)
            .service_account(name)
            .port("http", 8080);
        bed.add_workload(1, name, &w).unwrap()
    };
    let api = server("api", "api");
    let free = server("free", "free");
    let servers = vec![
        api.serve_echo(8080).unwrap(),
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

    // No policy yet: anything goes, straight to the pod.
    let reply = curl(&shop.other, &[&format!("{api}/admin")]);
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

/// `curl args` from `client`, once it connects (see [`Pod::curl_until_connected`]).
fn curl(client: &Pod, args: &[&str]) -> HttpReply {
    client.curl_until_connected(args).unwrap()
}
