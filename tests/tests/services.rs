//! Services through a real kube-proxy (iptables mode) in every node, as on kind and most
//! clusters, with Veil's WireGuard on: real HTTP from pods to a ClusterIP. Every test is
//! named `service_*` so `cargo test --workspace service_` runs them.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use veil_testbed::capture::Capture;
use veil_testbed::control_plane::SERVICE_CIDR;
use veil_testbed::objects::cluster_ip;
use veil_testbed::{eventually, BedConfig, HttpReply, Pod, ServicePortSpec, TestBed, Workload};

/// Two nodes, each with kube-proxy, WireGuard on (the default).
fn bed_with_kube_proxy() -> TestBed {
    TestBed::start(BedConfig {
        nodes: 2,
        kube_proxy: true,
        ..Default::default()
    })
    .unwrap()
}

/// A `veil-echo` pod on node 1 behind a two-port Service; client pods on node 0
/// (cross-node) and node 1 (same node) reach it through the ClusterIP with HTTP/1.1 on
/// port 80 (→ the named port `http`, 8080) and h2c on port 9000 (→ 9090 by number). The
/// echo sees each client pod's own address (kube-proxy DNATs, nothing SNATs), the
/// cross-node requests cross the underlay only inside WireGuard, and kube-proxy's rules
/// live in the nodes' namespaces, not the host's. A node's own request and a pod calling
/// its own Service are masqueraded to the node's address, as kube-proxy does anywhere.
#[test]
fn service_cluster_ip_reaches_pods_across_and_within_nodes_keeping_the_client_address() {
    let bed = bed_with_kube_proxy();
    bed.create_namespace("demo", &[("team", "demo")]).unwrap();
    let echo_w = Workload::new("demo")
        .label("app", "echo")
        .service_account("echo")
        .port("http", 8080)
        .port("h2", 9090);
    let echo = bed.add_workload(1, "echo", &echo_w).unwrap();
    let _http = echo.serve_echo(8080).unwrap();
    let _h2 = echo.serve_echo(9090).unwrap();
    let client_w = Workload::new("demo")
        .label("app", "client")
        .service_account("client");
    let far = bed.add_workload(0, "client-far", &client_w).unwrap();
    let near = bed.add_workload(1, "client-near", &client_w).unwrap();

    let svc = bed
        .create_service(
            "demo",
            "echo",
            &[("app", "echo")],
            &[
                ServicePortSpec::named("http", 80, "http"),
                ServicePortSpec::number("h2", 9000, 9090),
            ],
        )
        .unwrap();
    let vip = cluster_ip(&svc).unwrap();
    let range: Ipv4Net = SERVICE_CIDR.parse().unwrap();
    assert!(range.contains(&vip), "{vip} is not in {range}");

    let (n0, n1) = (bed.node(0).ip, bed.node(1).ip);
    let capture = Capture::start(
        bed.underlay(),
        &format!("ip and host {n0} and host {n1}"),
        bed.dir(),
    )
    .unwrap();
    let marker = format!("veil-service-marker-{}", std::process::id());
    for client in [&far, &near] {
        let url = format!("http://{vip}/hello?{marker}={}", client.name);
        let reply = curl(client, &[&url]);
        assert_eq!(reply.status, 200, "{reply:?}");
        let json = reply.json().unwrap();
        assert_eq!(json["pod"], "echo", "{json}");
        assert_eq!(json["version"], "HTTP/1.1", "{json}");
        assert_eq!(
            json["path"],
            format!("/hello?{marker}={}", client.name),
            "{json}"
        );
        assert_eq!(
            reply.peer_ip().unwrap(),
            client.ip,
            "{} reached the echo with another source address: {json}",
            client.name
        );

        let url = format!("http://{vip}:9000/h2?{marker}");
        let reply = curl(client, &["--http2-prior-knowledge", &url]);
        assert_eq!(reply.status, 200, "{reply:?}");
        let json = reply.json().unwrap();
        assert_eq!(json["version"], "HTTP/2.0", "{json}");
        assert_eq!(reply.peer_ip().unwrap(), client.ip, "{json}");
    }
    // What kube-proxy does masquerade arrives from a node's address, as on any cluster:
    // node 0's own request (its source is outside `--cluster-cidr`), still only through
    // WireGuard, and the echo pod calling its own Service (hairpin).
    let url = format!("http://{vip}/node?{marker}");
    let out = bed
        .node(0)
        .netns
        .exec(&["curl", "-sS", "--noproxy", "*", "--max-time", "10", &url])
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("node 0 → {url}: {e}: {out:?}"));
    assert_eq!(
        json["peer"].as_str().unwrap().split(':').next(),
        Some(&*n0.to_string()),
        "{json}"
    );
    let reply = curl(&echo, &[&format!("http://{vip}/hairpin")]);
    assert_eq!(reply.peer_ip().unwrap(), n1, "{reply:?}");

    let seen = capture.stop().unwrap();
    assert!(
        !seen.lines.is_empty(),
        "the cross-node requests crossed the underlay"
    );
    assert!(
        !seen.contains(marker.as_bytes()),
        "a request crossed the underlay in clear text"
    );
    for line in &seen.lines {
        assert!(
            line.contains(".51871 > ") && line.contains(".51871: UDP"),
            "a packet between the nodes is not WireGuard UDP: {line}"
        );
    }

    // An address of the Service range that no Service holds has no kube-proxy rule: the
    // agent's route refuses it on the node at once (it never leaves by the default route).
    let unused = (1..255u8)
        .map(|last| Ipv4Addr::new(198, 19, 240, last))
        .find(|ip| *ip != vip && *ip != Ipv4Addr::new(198, 19, 240, 1))
        .unwrap();
    let started = std::time::Instant::now();
    let err = far
        .curl(&["--connect-timeout", "5", &format!("http://{unused}/")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(7)") && started.elapsed() < Duration::from_secs(4),
        "{unused} was not refused at once: {err}"
    );
    // The node's answer (an `unreachable` route: ICMP host unreachable) is rate-limited to one a second per
    // peer: the refused curl above may have used it up.
    let ping = far
        .exec(&[
            "ping",
            "-c",
            "2",
            "-i",
            "1.5",
            "-W",
            "1",
            &unused.to_string(),
        ])
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    assert!(
        said.contains(&format!("From {n0} ")) && said.contains("Unreachable"),
        "ping {unused}: {said}"
    );

    // The Service exists only inside the nodes: the host's own rules never name it.
    // And the bed's own accept rule for its underlay in the host's FORWARD chain (against
    // Docker's DROP policy) is still there beside whatever kube-proxy did.
    let host = std::process::Command::new("iptables-save")
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(
        !host.contains(&vip.to_string()),
        "kube-proxy wrote rules for {vip} into the host's namespace"
    );
    let underlay = bed.underlay();
    assert!(
        host.lines().any(
            |l| l.starts_with(&format!("-A FORWARD -i {underlay} -o {underlay}"))
                && l.ends_with("-j ACCEPT")
        ),
        "the bed's FORWARD accept rule for {underlay} is gone"
    );
    for i in 0..2 {
        assert!(bed.iptables(i).unwrap().contains(&format!("{vip}/32")));
        // The built-in role of `system:kube-proxy` is all it needs.
        let log = std::fs::read_to_string(bed.node(i).dir.join("kube-proxy-0.log")).unwrap();
        assert!(!log.contains("forbidden"), "kube-proxy {i}: {log}");
    }
}

/// The EndpointSlices the bed writes follow the pods: a second backend on the other node
/// answers through the same ClusterIP once the slices are rewritten, and after it is
/// deleted only the first one does.
#[test]
fn service_endpoints_follow_pods_as_the_bed_rewrites_them() {
    let bed = bed_with_kube_proxy();
    let web = Workload::new("default")
        .label("app", "web")
        .port("http", 8080);
    let one = bed.add_workload(0, "web-one", &web).unwrap();
    let _one = one.serve_echo(8080).unwrap();
    let client = bed
        .add_workload(1, "client", &Workload::new("default"))
        .unwrap();
    let svc = bed
        .create_service(
            "default",
            "web",
            &[("app", "web")],
            &[ServicePortSpec::named("http", 80, "http")],
        )
        .unwrap();
    let url = format!("http://{}/", cluster_ip(&svc).unwrap());
    let answered_by = |client: &Pod| -> String {
        let reply = curl(client, &[&url]);
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.json().unwrap()["pod"].as_str().unwrap().to_string()
    };
    assert_eq!(answered_by(&client), "web-one");

    let two = bed.add_workload(1, "web-two", &web).unwrap();
    let server_two = two.serve_echo(8080).unwrap();
    bed.write_endpoint_slices("default", "web").unwrap();
    // kube-proxy picks at random: both answer within a few dozen requests.
    let mut seen = std::collections::BTreeSet::new();
    eventually("both backends answer", Duration::from_secs(30), || {
        seen.insert(answered_by(&client));
        Ok((seen.len() == 2).then_some(()))
    })
    .unwrap();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web-one", "web-two"]);

    drop(server_two);
    bed.delete_workload(two).unwrap();
    bed.write_endpoint_slices("default", "web").unwrap();
    for _ in 0..10 {
        assert_eq!(answered_by(&client), "web-one");
    }
}

/// `curl args` from `client`, once it connects (see [`Pod::curl_until_connected`]).
fn curl(client: &Pod, args: &[&str]) -> HttpReply {
    client.curl_until_connected(args).unwrap()
}
