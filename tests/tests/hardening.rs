//! Hardening on the test bed: what a hostile peer, local user or API object can do to a
//! node must leave its pods' traffic, its identities and its encryption intact. Every
//! test is named `hardening_*` so `cargo test --workspace hardening` runs them.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use veil_testbed::{eventually, AdminRequest, AdminResponse, BedConfig, CniCall, Pod, TestBed};

/// uid and gid of `nobody` on Debian.
const NOBODY: u32 = 65534;

/// Pod `a` on node 0 and pod `c` on node 1, once they reach each other.
fn connected_pods(bed: &TestBed) -> (Pod, Pod) {
    bed.connected_pods().unwrap()
}

/// Everything node `i`'s agents have logged so far.
/// Runs the real `meshctl` against `socket`, as `uid` when given.
fn meshctl(socket: &Path, args: &[&str], uid: Option<u32>) -> (bool, String) {
    let mut cmd = std::process::Command::new(veil_testbed::bins::veil("meshctl").unwrap());
    cmd.arg("--socket").arg(socket).args(args);
    if let Some(uid) = uid {
        // std drops supplementary groups when root sets a uid.
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// Child process (run inside a node's namespace by the test below): drops to `nobody`
/// and sends the WireGuard port of `VEIL_TARGET` every kind of malformed datagram.
#[test]
#[ignore = "run by hardening_garbage_datagrams_from_a_peer_as_nobody_leave_traffic_and_meshctl_working"]
fn child_send_malformed_datagrams_as_nobody() {
    let Ok(target) = std::env::var("VEIL_TARGET") else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    nix::unistd::setgroups(&[]).unwrap();
    nix::unistd::setgid(nix::unistd::Gid::from_raw(NOBODY)).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(NOBODY)).unwrap();
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    let mut sent = 0;
    // Empty; truncated headers of each message type; full-size garbage; a data header
    // with a counter but no tag; a flood of handshake-initiation-sized junk.
    let mut datagrams: Vec<Vec<u8>> = vec![vec![]];
    for kind in 1u8..=4 {
        for len in [1, 3, 4, 5, 8, 15, 16, 31, 32, 63, 147, 148, 149] {
            let mut d = vec![0u8; len];
            d[0] = kind;
            datagrams.push(d);
        }
    }
    datagrams.push(vec![0xa5; 1400]);
    datagrams.push(vec![0xff; 65_000]);
    for _ in 0..500 {
        let mut init = vec![0x5a; 148];
        init[..4].copy_from_slice(&[1, 0, 0, 0]);
        datagrams.push(init);
    }
    for d in &datagrams {
        if socket.send_to(d, target).is_ok() {
            sent += 1;
        }
    }
    println!("SENT={sent}");
}

#[test]
fn hardening_garbage_datagrams_from_a_peer_as_nobody_leave_traffic_and_meshctl_working() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);
    let target = SocketAddr::from((bed.node(0).ip, 51871));
    let out = bed.node(1).netns.run_test_child(
        "child_send_malformed_datagrams_as_nobody",
        &[("VEIL_TARGET", target.to_string().as_ref())],
    );
    let sent: usize = veil_testbed::net::child_field(&out, "SENT")
        .parse()
        .unwrap();
    assert!(sent > 500, "{out}");

    // Both directions still carry traffic, the agent still answers, nothing panicked.
    for (from, to) in [(&a, &c), (&c, &a)] {
        eventually("ping after the garbage", Duration::from_secs(10), || {
            Ok(from.ping(to.ip).ok())
        })
        .unwrap();
    }
    let (ok, said) = meshctl(&bed.node(0).admin_socket(), &["wireguard"], None);
    assert!(ok, "{said}");
    let peers = match bed.ask_agent(0, AdminRequest::Wireguard).unwrap() {
        AdminResponse::Wireguard { peers, .. } => peers,
        other => panic!("{other:?}"),
    };
    assert!(
        peers[0].rx_malformed > 0,
        "the malformed datagrams were counted: {peers:?}"
    );
    for i in 0..2 {
        let logs = bed.agent_log(i);
        assert!(!logs.contains("panicked"), "node-{i} agent log:\n{logs}");
    }
}

#[test]
fn hardening_local_sockets_refuse_unprivileged_callers_and_outlast_slow_clients() {
    use std::os::unix::fs::PermissionsExt;
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        ..BedConfig::default()
    })
    .unwrap();
    for socket in [bed.node(0).socket(), bed.node(0).admin_socket()] {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is root-only", socket.display());
    }
    let socket = bed.node(0).admin_socket();
    let key = bed
        .node_annotation(0, "veil.dev/wireguard-public-key")
        .unwrap();

    // Let nobody reach the socket through the bed's private directories, so that what
    // refuses it is the socket's own protection.
    for dir in socket
        .ancestors()
        .skip(1)
        .take_while(|d| d.starts_with(bed.dir()))
    {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001)).unwrap();
    }
    // The file mode stops nobody first...
    let (ok, said) = meshctl(&socket, &["wireguard", "rotate"], Some(NOBODY));
    assert!(!ok && said.contains("ermission denied"), "{said}");
    // ...and with the mode opened up, the agent's own check (SO_PEERCRED) still does.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, said) = meshctl(&socket, &["wireguard", "rotate"], Some(NOBODY));
    assert!(!ok, "nobody rotated the key: {said}");
    let (ok, said) = meshctl(&socket, &["pods"], Some(NOBODY));
    assert!(!ok, "nobody listed pods: {said}");
    assert_eq!(
        bed.node_annotation(0, "veil.dev/wireguard-public-key")
            .unwrap(),
        key,
        "the key did not change"
    );
    assert!(bed.agent_log(0).contains("is not root"));

    // A hundred clients that connect and say nothing hold no slot for long: root's
    // request is served once the agent has timed them out.
    let idle: Vec<_> = (0..100)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    assert!(idle.len() >= 64, "{} idle connections", idle.len());
    let started = Instant::now();
    let (ok, said) = meshctl(&socket, &["wireguard"], None);
    assert!(ok, "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "served after {:?}",
        started.elapsed()
    );
    drop(idle);
}

#[test]
fn hardening_cni_add_refuses_what_is_no_pod_network_namespace_at_once() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        ..BedConfig::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let cases = [
        (fifo, "not a network namespace (a FIFO)"),
        (file, "not a network namespace (a regular file)"),
        (
            dir.path().to_path_buf(),
            "not a network namespace (a directory)",
        ),
        (bed.node(0).netns.path(), "the node's own network namespace"),
    ];
    for (i, (netns, says)) in cases.into_iter().enumerate() {
        let started = Instant::now();
        let out = bed
            .cni(
                0,
                &CniCall {
                    command: "ADD".into(),
                    container_id: format!("bad-{i}"),
                    netns: Some(netns.clone()),
                    ifname: "eth0".into(),
                    args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad".into(),
                    stdin: None,
                },
            )
            .unwrap();
        assert!(!out.success, "{netns:?}: {}", out.stdout);
        assert_eq!(out.error_code(), Some(4), "{}", out.stdout);
        assert!(out.error_msg().contains(says), "{}", out.stdout);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Nothing was allocated, and the agent still serves real pods.
    assert!(bed.agent_pods(0).unwrap().is_empty());
    let pod = bed.add_pod(0, "good").unwrap();
    assert_eq!(bed.agent_pods(0).unwrap().len(), 1);
    bed.delete_pod(pod).unwrap();
}

/// A tcpdump filter for every IPv4 packet on the underlay.
const ALL_IPV4: &str = "ip";

/// Sends a marked payload and a ping from `a` to `c` while the underlay is captured, and
/// checks that nothing of it crossed in clear: no marker, no packet addressed between
/// the pods, only WireGuard UDP between nodes.
fn assert_nothing_leaves_in_clear(bed: &TestBed, a: &Pod, c: &Pod, port: u16) {
    let marker = format!("VEIL-STRICT-MARKER-{}-", std::process::id()).into_bytes();
    let capture =
        veil_testbed::capture::Capture::start(bed.underlay(), ALL_IPV4, bed.dir()).unwrap();
    let payload: Vec<u8> = marker.iter().copied().cycle().take(4096).collect();
    let _ = a.tcp_send(SocketAddr::from((c.ip, port)), payload);
    let _ = a.ping(c.ip);
    let seen = capture.stop().unwrap();
    assert!(!seen.contains(&marker), "plaintext crossed the underlay");
    // tcpdump prints `IP <src>[.port] > <dst>[.port]:`.
    let from_a = [format!("IP {} >", a.ip), format!("IP {}.", a.ip)];
    for line in &seen.lines {
        assert!(
            !from_a.iter().any(|f| line.contains(f.as_str())),
            "a pod packet crossed in clear: {line}"
        );
    }
}

#[test]
fn hardening_deleting_a_node_without_cluster_pod_cidr_sends_no_plaintext() {
    let mut bed = TestBed::start(BedConfig {
        cluster_pod_cidr: false,
        ..BedConfig::default()
    })
    .unwrap();
    // Real nodes have a default route; here it leads to node-1 itself, so a packet for
    // node-1's pods that loses its peer route would cross the underlay in clear.
    let via = bed.node(1).ip.to_string();
    bed.node(0)
        .netns
        .ip(&["route", "add", "default", "via", &via])
        .unwrap();
    let (a, c) = connected_pods(&bed);
    bed.delete_node_object(1).unwrap();
    eventually("node-0 forgets node-1", Duration::from_secs(10), || {
        Ok(match bed.ask_agent(0, AdminRequest::Wireguard)? {
            AdminResponse::Wireguard { peers, .. } => peers.is_empty().then_some(()),
            _ => None,
        })
    })
    .unwrap();
    assert_nothing_leaves_in_clear(&bed, &a, &c, 9101);

    // An agent restart does not forget the range either (it is remembered on disk).
    bed.restart_agent(0).unwrap();
    let out = bed
        .node(0)
        .netns
        .exec(&["ip", "route", "show", &bed.node(1).pod_cidr.to_string()])
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout);
    assert!(route.contains("dev veil-wg0"), "{route}");
    assert_nothing_leaves_in_clear(&bed, &a, &c, 9102);
}

#[test]
fn hardening_a_single_node_has_its_strict_routes_before_it_serves_pods() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        ..BedConfig::default()
    })
    .unwrap();
    // The bed waits for the agent to serve; by then the cluster range must be routed
    // into the device, although no peer ever appeared.
    let out = bed
        .node(0)
        .netns
        .exec(&["ip", "route", "show", veil_testbed::bed::CLUSTER_POD_CIDR])
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout);
    assert!(route.contains("dev veil-wg0"), "{route}");
}

#[test]
fn hardening_node_objects_that_would_capture_traffic_are_excluded_and_reported() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);
    let n1 = bed.node(1);
    // Newer objects claiming node-1's pods, node-0's address, or every address.
    let half = ipnet::Ipv4Net::new(n1.pod_cidr.network(), 25).unwrap();
    bed.create_node_object("impostor-cidr", half, "198.18.250.1".parse().unwrap())
        .unwrap();
    bed.create_node_object(
        "impostor-ip",
        "198.19.250.0/24".parse().unwrap(),
        bed.node(0).internal_ip(),
    )
    .unwrap();
    bed.create_node_object(
        "impostor-all",
        "0.0.0.0/0".parse().unwrap(),
        "198.18.250.3".parse().unwrap(),
    )
    .unwrap();
    let excluded = eventually("impostors reported", Duration::from_secs(10), || {
        Ok(match bed.ask_agent(0, AdminRequest::Wireguard)? {
            AdminResponse::Wireguard { excluded, .. } => {
                // The bed writes a Node's addresses just after creating it.
                let settled = excluded.len() == 3
                    && excluded.iter().all(|e| !e.reason.contains("no InternalIP"));
                settled.then_some(excluded)
            }
            _ => None,
        })
    })
    .unwrap();
    let said = format!("{excluded:?}");
    assert!(
        said.contains(&format!("overlaps node {}", n1.name)),
        "{said}"
    );
    assert!(said.contains("is this node's"), "{said}");
    assert!(said.contains("covers every address"), "{said}");
    let (ok, out) = meshctl(&bed.node(0).admin_socket(), &["wireguard"], None);
    assert!(ok && out.contains("excluded node impostor-all"), "{out}");
    // The real node keeps its place: traffic still flows, encrypted.
    a.ping(c.ip).unwrap();
    let out = bed
        .node(0)
        .netns
        .exec(&["ip", "route", "show", "0.0.0.0/0", "dev", "veil-wg0"])
        .unwrap();
    assert!(out.stdout.is_empty(), "no default route into the device");
}

/// The chart's manifests rendered by the real `helm template`.
fn chart_manifests() -> Vec<serde_yaml::Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/veil");
    let out = std::process::Command::new(veil_testbed::bins::tool("helm").unwrap())
        .args(["template", "veil"])
        .arg(chart)
        .args(["--namespace", "veil-system", "--kube-version", "1.34.4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

/// Publishes `key` as Node `node`'s WireGuard key, as `client`, the way an agent does.
async fn publish(
    client: &kube::Client,
    node: &str,
    key: [u8; 32],
) -> Result<(), mesh_agent::k8s::K8sError> {
    let endpoint = mesh_agent::k8s::WireguardEndpoint {
        public_key: key,
        port: 51871,
    };
    mesh_agent::k8s::publish_wireguard(client, node, endpoint).await
}

#[test]
fn hardening_only_the_agent_of_a_node_may_change_its_veil_annotations() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use kube::api::{Api, PostParams};

    let bed = TestBed::start(BedConfig::default()).unwrap();
    let admin = bed.admin_client();
    let (n0, n1) = (bed.node(0).name.clone(), bed.node(1).name.clone());
    let pp = PostParams::default();
    // The chart's policy, applied as rendered; the agent account with the rights the
    // chart will give it (patching Nodes), and a pod of it on node-1.
    let token = bed.block_on(async {
        for doc in chart_manifests() {
            match doc["kind"].as_str() {
                Some("ValidatingAdmissionPolicy") => {
                    let policy: ValidatingAdmissionPolicy = serde_yaml::from_value(doc)?;
                    Api::all(admin.clone()).create(&pp, &policy).await?;
                }
                Some("ValidatingAdmissionPolicyBinding") => {
                    let binding: ValidatingAdmissionPolicyBinding = serde_yaml::from_value(doc)?;
                    Api::all(admin.clone()).create(&pp, &binding).await?;
                }
                _ => {}
            }
        }
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "veil-system"}}))?;
        Api::<Namespace>::all(admin.clone()).create(&pp, &ns).await?;
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "veil-agent", "namespace": "veil-system"}}))?;
        Api::namespaced(admin.clone(), "veil-system")
            .create(&pp, &sa)
            .await?;
        let role: ClusterRole = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "veil-agent-nodes"},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]}))?;
        Api::<ClusterRole>::all(admin.clone()).create(&pp, &role).await?;
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "veil-agent-nodes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "veil-agent-nodes"},
            "subjects": [{"kind": "ServiceAccount", "name": "veil-agent", "namespace": "veil-system"}]}))?;
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&pp, &binding)
            .await?;
        let pod = veil_testbed::objects::pod("veil-system", "agent-1", &n1, "veil-agent", true);
        let pod = Api::<KubePod>::namespaced(admin.clone(), "veil-system")
            .create(&pp, &pod)
            .await?;
        veil_testbed::objects::service_account_token(
            &admin,
            "veil-system",
            "veil-agent",
            Some(&pod),
            vec![],
            Duration::from_secs(600),
        )
        .await
    })
    .unwrap();
    let agent1 = bed.client_with_token(&token).unwrap();
    let forged = [0xf0; 32];

    // The policy takes a moment to load; until then the forged write might pass, so
    // wait for the refusal, then check that it stays refused and names the rule.
    let mut attempt = 0u32;
    let refusal = eventually(
        "the policy refuses node-1's agent on node-0",
        Duration::from_secs(20),
        || {
            // A fresh value each time: rewriting the same value changes nothing.
            attempt += 1;
            Ok(
                match bed.block_on(publish(&agent1, &n0, [attempt as u8; 32])) {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => None,
                },
            )
        },
    )
    .unwrap();
    assert!(
        refusal.contains("only the Veil agent running on this node"),
        "{refusal}"
    );
    // The admin is refused too; node-1's agent may change node-1's own annotation.
    let admin_change = bed.block_on(publish(&admin, &n0, forged));
    assert!(admin_change.is_err(), "the admin changed node-0's key");
    let key0 = bed
        .node_annotation(0, "veil.dev/wireguard-public-key")
        .unwrap();
    assert_ne!(
        key0.as_deref(),
        Some(mesh_agent::wireguard::keys::encode(&forged).as_str()),
        "the admin's forged key did not land"
    );
    let key1 = bed
        .node_annotation(1, "veil.dev/wireguard-public-key")
        .unwrap()
        .unwrap();
    bed.block_on(publish(&agent1, &n1, forged))
        .expect("node-1's agent changes its own key");
    let key1 = mesh_agent::wireguard::keys::decode(&key1).unwrap();
    bed.block_on(publish(&agent1, &n1, key1))
        .expect("and changes it back");
}
