//! CNI end-to-end: pods made by `mesh-cni` through real agents on a real API server.
//! Every test here is named `cni_*` so `cargo test --workspace cni` runs them all.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use veil_testbed::bed::pod_call;
use veil_testbed::{eventually, AdminRequest, AdminResponse, BedConfig, CniCall, TestBed};

/// A payload whose every byte depends on its position, so reordering or truncation shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn cni_same_node_and_cross_node_pods_reach_each_other() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let a = bed.add_pod(0, "a").unwrap();
    let b = bed.add_pod(0, "b").unwrap();
    let c = bed.add_pod(1, "c").unwrap();
    assert!(bed.node(0).pod_cidr.contains(&a.ip) && bed.node(0).pod_cidr.contains(&b.ip));
    assert!(bed.node(1).pod_cidr.contains(&c.ip));

    a.ping(b.ip).unwrap();
    // Peer routes follow the Node watch, so cross-node reachability is eventual.
    eventually("cross-node ping a -> c", Duration::from_secs(20), || {
        Ok(a.ping(c.ip).ok())
    })
    .unwrap();
    c.ping(b.ip).unwrap();

    for (from, to) in [(&a, &b), (&a, &c), (&c, &a)] {
        let data = payload(1 << 20);
        let server = to.tcp_receive_once(8080).unwrap();
        from.tcp_send(SocketAddr::from((to.ip, 8080)), data.clone())
            .unwrap();
        let got = server.join().unwrap().unwrap();
        assert_eq!(
            got.len(),
            data.len(),
            "{} -> {}: length",
            from.name,
            to.name
        );
        assert!(
            got == data,
            "{} -> {}: payload corrupted",
            from.name,
            to.name
        );
    }

    // The eBPF counter on a's host-side veth saw a's megabytes leave.
    let pods = bed.agent_pods(0).unwrap();
    let a_info = pods.iter().find(|p| p.ip == a.ip).unwrap();
    assert!(
        a_info.tx_bytes > 2 << 20,
        "counter saw {} bytes from a",
        a_info.tx_bytes
    );
    assert_eq!(a_info.pod.as_deref(), Some("default/a"));
}

#[test]
fn cni_concurrent_adds_get_distinct_addresses_and_pool_exhaustion_is_an_error() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        pod_prefix_len: 24,
        ..Default::default()
    })
    .unwrap();
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let bed = &bed;
                s.spawn(move || bed.add_pod(0, &format!("p{i}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let ips: BTreeSet<_> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 50, "50 ADDs must give 50 distinct addresses");
    drop(pods);
}

#[test]
fn cni_pool_of_a_28_is_exhausted_with_the_spec_error_and_nothing_leaks() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        pod_prefix_len: 28,
        ..Default::default()
    })
    .unwrap();
    // A /28 has 16 addresses: network, node and broadcast are reserved, 13 remain.
    let pods: Vec<_> = (0..13)
        .map(|i| bed.add_pod(0, &format!("q{i}")).unwrap())
        .collect();
    let netns = veil_testbed::net::Netns::create(&format!("veil{}p-overflow", bed.index)).unwrap();
    let out = bed
        .cni(
            0,
            &CniCall {
                command: "ADD".into(),
                container_id: "overflow".into(),
                netns: Some(netns.path()),
                ifname: "eth0".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(!out.success);
    assert_eq!(out.error_code(), Some(100), "{}", out.stdout);
    assert!(
        out.error_msg().contains("no free address"),
        "{}",
        out.stdout
    );
    assert_eq!(out.json.as_ref().unwrap()["cniVersion"], "1.0.0");
    // Nothing leaked: no interface in the pod, no extra allocation, no extra veth.
    let links = netns.exec(&["ip", "-o", "link"]).unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("eth0"));
    assert_eq!(bed.agent_pods(0).unwrap().len(), 13);
    let node_links = bed
        .node(0)
        .netns
        .exec(&["ip", "-o", "link", "show", "type", "veth"])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&node_links.stdout)
            .lines()
            .filter(|l| l.contains("veil"))
            .count(),
        13
    );
    // Freeing one makes room again.
    let mut pods = pods;
    bed.delete_pod(pods.pop().unwrap()).unwrap();
    bed.add_pod(0, "after-free").unwrap();
}

#[test]
fn cni_agent_restart_keeps_addresses_and_connectivity() {
    let mut bed = TestBed::start(BedConfig::default()).unwrap();
    let a = bed.add_pod(0, "a").unwrap();
    let c = bed.add_pod(1, "c").unwrap();
    eventually("cross-node ping", Duration::from_secs(20), || {
        Ok(a.ping(c.ip).ok())
    })
    .unwrap();

    bed.restart_agent(0).unwrap();
    a.ping(c.ip).unwrap();
    let pods = bed.agent_pods(0).unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pods[0].ip, a.ip,
        "the restarted agent remembers a's address"
    );
    // CHECK passes after restart: the agent adopted the existing attachment.
    let check = bed.cni(0, &pod_call("CHECK", &a)).unwrap();
    assert!(check.success, "{}", check.stdout);

    let d = bed.add_pod(0, "d").unwrap();
    assert_ne!(d.ip, a.ip, "a pod added after restart gets a fresh address");
    d.ping(a.ip).unwrap();
    d.ping(c.ip).unwrap();
}

#[test]
fn cni_del_is_idempotent_reuses_cleanly_and_check_detects_a_removed_veth() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        pod_prefix_len: 24,
        ..Default::default()
    })
    .unwrap();
    let netns = veil_testbed::net::Netns::create(&format!("veil{}p-ghost", bed.index)).unwrap();
    let ghost = CniCall {
        command: "DEL".into(),
        container_id: "never-added".into(),
        netns: Some(netns.path()),
        ifname: "eth0".into(),
        ..Default::default()
    };
    let out = bed.cni(0, &ghost).unwrap();
    assert!(
        out.success && out.stdout.trim().is_empty(),
        "DEL of an unknown container: {}",
        out.stdout
    );
    let out = bed
        .cni(
            0,
            &CniCall {
                netns: None,
                ..ghost
            },
        )
        .unwrap();
    assert!(out.success, "DEL without CNI_NETNS: {}", out.stdout);

    let a = bed.add_pod(0, "a").unwrap();
    let b = bed.add_pod(0, "b").unwrap();
    let first_ip = a.ip;
    let del = bed.cni(0, &pod_call("DEL", &a)).unwrap();
    assert!(del.success, "{}", del.stdout);
    let again = bed.cni(0, &pod_call("DEL", &a)).unwrap();
    assert!(again.success, "second DEL: {}", again.stdout);
    // ADD after DEL on the same namespace and container works and the pod is reachable.
    let re = bed
        .cni(
            0,
            &CniCall {
                command: "ADD".into(),
                ..pod_call("ADD", &a)
            },
        )
        .unwrap();
    assert!(re.success, "{}", re.stdout);
    let new_ip: ipnet::Ipv4Net = re.json.unwrap()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        new_ip.addr(),
        first_ip,
        "a freed address is not handed out again at once"
    );
    b.ping(new_ip.addr()).unwrap();

    let check = bed.cni(0, &pod_call("CHECK", &b)).unwrap();
    assert!(check.success, "CHECK of a healthy pod: {}", check.stdout);
    b.netns.ip(&["link", "del", "eth0"]).unwrap();
    let check = bed.cni(0, &pod_call("CHECK", &b)).unwrap();
    assert!(!check.success);
    assert_eq!(check.error_code(), Some(101), "{}", check.stdout);
    assert!(check.error_msg().contains("missing"), "{}", check.stdout);
}

#[test]
fn cni_bad_input_gets_spec_errors_and_the_agent_survives() {
    let mut bed = TestBed::start(BedConfig {
        nodes: 1,
        pod_prefix_len: 24,
        ..Default::default()
    })
    .unwrap();
    let netns = veil_testbed::net::Netns::create(&format!("veil{}p-bad", bed.index)).unwrap();
    let add = CniCall {
        command: "ADD".into(),
        container_id: "bad".into(),
        netns: Some(netns.path()),
        ifname: "eth0".into(),
        ..Default::default()
    };
    let garbage = bed
        .cni(
            0,
            &CniCall {
                stdin: Some(b"\x00\xffnot json{".to_vec()),
                ..add.clone()
            },
        )
        .unwrap();
    assert!(!garbage.success);
    assert_eq!(garbage.error_code(), Some(6), "{}", garbage.stdout);

    let wrong_version = br#"{"cniVersion":"0.1.0","name":"veil","type":"mesh-cni"}"#.to_vec();
    let out = bed
        .cni(
            0,
            &CniCall {
                stdin: Some(wrong_version),
                ..add.clone()
            },
        )
        .unwrap();
    assert_eq!(out.error_code(), Some(1), "{}", out.stdout);
    assert!(out.error_msg().contains("0.1.0"), "{}", out.stdout);

    let out = bed
        .cni(
            0,
            &CniCall {
                netns: None,
                ..add.clone()
            },
        )
        .unwrap();
    assert_eq!(out.error_code(), Some(4), "{}", out.stdout);
    assert!(out.error_msg().contains("CNI_NETNS"), "{}", out.stdout);

    let out = bed
        .cni(
            0,
            &CniCall {
                netns: Some("/run/netns/does-not-exist".into()),
                ..add.clone()
            },
        )
        .unwrap();
    assert!(!out.success);
    assert!(out.stdout.contains("does-not-exist"), "{}", out.stdout);

    // Garbage straight at the agent's socket, bypassing the plugin.
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(bed.node(0).socket()).unwrap();
        s.write_all(b"{\"request\":\"add\", garbage\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("could not decode"), "{answer}");
    }

    bed.check_agent(0).unwrap();
    assert!(
        bed.agent_pods(0).unwrap().is_empty(),
        "failed ADDs left no allocation"
    );
    let pod = bed.add_pod(0, "good").unwrap();
    assert!(bed.node(0).pod_cidr.contains(&pod.ip));
}

#[test]
fn cni_node_joining_and_leaving_updates_routes() {
    let mut bed = TestBed::start(BedConfig::default()).unwrap();
    let a = bed.add_pod(0, "a").unwrap();
    let joined = bed.add_node().unwrap();
    let e = bed.add_pod(joined, "e").unwrap();
    eventually(
        "ping to a pod on the node that joined",
        Duration::from_secs(20),
        || Ok(a.ping(e.ip).ok()),
    )
    .unwrap();
    e.ping(a.ip).unwrap();

    let cidr = bed.node(joined).pod_cidr.to_string();
    bed.delete_node_object(joined).unwrap();
    // The peer goes; its range stays routed into the WireGuard device (strict: pods of a
    // node that left are dropped, never reached in clear along some other route).
    let joined_name = bed.node(joined).name.clone();
    eventually(
        "the removed node's peer withdrawn",
        Duration::from_secs(20),
        || {
            Ok(match bed.ask_agent(0, AdminRequest::Wireguard)? {
                AdminResponse::Wireguard { peers, .. } => {
                    peers.iter().all(|p| p.node != joined_name).then_some(())
                }
                _ => None,
            })
        },
    )
    .unwrap();
    let out = bed
        .node(0)
        .netns
        .exec(&["ip", "route", "show", &cidr])
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout);
    assert!(route.contains("dev veil-wg0"), "{route}");
    assert!(a.ping(e.ip).is_err(), "no route to a node that left");
    bed.check_agent(0).unwrap();
}

#[test]
fn cni_works_under_the_reference_cnitool() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        pod_prefix_len: 24,
        ..Default::default()
    })
    .unwrap();
    let peer = bed.add_pod(0, "peer").unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    std::fs::write(conf_dir.path().join("10-veil.conf"), bed.node(0).netconf()).unwrap();
    let netns = veil_testbed::net::Netns::create(&format!("veil{}p-cnitool", bed.index)).unwrap();
    let cni_dir = veil_testbed::bins::veil("mesh-cni")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let cnitool = |verb: &str| {
        let out = std::process::Command::new(veil_testbed::bins::tool("cnitool").unwrap())
            .args([verb, "veil"])
            .arg(netns.path())
            .env("CNI_PATH", &cni_dir)
            .env("NETCONFPATH", conf_dir.path())
            .env("CNI_CONTAINERID", format!("cnitool-{}", bed.index))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cnitool {verb}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let result: serde_json::Value = serde_json::from_str(&cnitool("add")).unwrap();
    let ip: ipnet::Ipv4Net = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bed.node(0).pod_cidr.contains(&ip.addr()));
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        netns.path().display().to_string()
    );
    peer.ping(ip.addr()).unwrap();
    cnitool("check");
    cnitool("del");
    let links = netns.exec(&["ip", "-o", "link"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("eth0"),
        "DEL removed the pod's interface"
    );
    assert!(
        bed.agent_pods(0).unwrap().iter().all(|p| p.ip != ip.addr()),
        "DEL freed the address"
    );
}

#[test]
fn cni_1_1_status_and_gc_release_what_the_runtime_no_longer_holds() {
    let bed = TestBed::start(BedConfig {
        nodes: 1,
        ..Default::default()
    })
    .unwrap();
    let keep = bed.add_pod(0, "keep").unwrap();
    let stale = bed.add_pod(0, "stale").unwrap();
    let socket = bed.node(0).socket();
    let conf = |extra: serde_json::Value| {
        let mut conf = serde_json::json!({
            "cniVersion": "1.1.0", "name": "veil", "type": "mesh-cni", "agentSocket": socket,
        });
        conf.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        conf.to_string().into_bytes()
    };
    let status = bed
        .cni(
            0,
            &CniCall {
                command: "STATUS".into(),
                stdin: Some(conf(serde_json::json!({}))),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        status.success,
        "STATUS of a running agent: {}",
        status.stdout
    );

    let valid = serde_json::json!({"cni.dev/valid-attachments": [
        {"containerID": keep.container_id, "ifname": "eth0"},
    ]});
    let gc = bed
        .cni(
            0,
            &CniCall {
                command: "GC".into(),
                stdin: Some(conf(valid)),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(gc.success, "GC: {}", gc.stdout);
    let pods = bed.agent_pods(0).unwrap();
    assert_eq!(
        pods.iter().map(|p| p.ip).collect::<Vec<_>>(),
        vec![keep.ip],
        "GC freed the stale address only"
    );
    let links = stale.netns.exec(&["ip", "-o", "link"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("eth0"),
        "GC removed the stale pod's interface"
    );
    let fresh = bed.add_pod(0, "fresh").unwrap();
    keep.ping(fresh.ip).unwrap();
}

#[test]
fn cni_cross_node_pods_reach_each_other_over_an_ipv6_underlay_without_encryption() {
    let bed = TestBed::start(BedConfig {
        encryption: "none",
        ipv6_underlay: true,
        ..Default::default()
    })
    .unwrap();
    let a = bed.add_pod(0, "a").unwrap();
    let c = bed.add_pod(1, "c").unwrap();
    // IPv4 pod routes with an IPv6 next hop (the peer's only InternalIP).
    eventually("cross-node ping", Duration::from_secs(20), || {
        Ok(a.ping(c.ip).ok())
    })
    .unwrap();
    let route = bed
        .node(0)
        .netns
        .exec(&["ip", "route", "show", &bed.node(1).pod_cidr.to_string()])
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    let via = bed.node(1).ip6.unwrap().to_string();
    assert!(route.contains(&format!("via inet6 {via}")), "{route}");
    let data = payload(1 << 20);
    let server = c.tcp_receive_once(8081).unwrap();
    a.tcp_send(SocketAddr::from((c.ip, 8081)), data.clone())
        .unwrap();
    assert!(server.join().unwrap().unwrap() == data);
}

/// What Docker does to a host: bridge netfilter on and the FORWARD policy DROP. A bed must
/// keep working on such a host (its bridges carry their own accept rule); the policy is
/// put back as it was afterwards.
#[test]
fn cni_cross_node_traffic_survives_dockers_forward_drop_policy() {
    veil_testbed::require_root();
    let sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    let Ok(nf_before) = std::fs::read_to_string(sysctl) else {
        eprintln!("no bridge netfilter in this kernel ({sysctl}): bridged frames never meet the FORWARD chain, nothing to test");
        return;
    };
    let iptables = veil_testbed::bins::on_path("iptables").unwrap();
    let policy_before = String::from_utf8(
        std::process::Command::new(&iptables)
            .args(["-S", "FORWARD"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("-P FORWARD ").map(str::to_string))
    .unwrap_or_else(|| "ACCEPT".into());
    let set_policy = |p: &str| {
        let ok = std::process::Command::new(&iptables)
            .args(["-P", "FORWARD", p])
            .status()
            .unwrap()
            .success();
        assert!(ok, "iptables -P FORWARD {p}");
    };
    std::fs::write(sysctl, "1").unwrap();
    set_policy("DROP");
    let outcome = std::panic::catch_unwind(|| {
        let bed = TestBed::start(BedConfig::default()).unwrap();
        let a = bed.add_pod(0, "a").unwrap();
        let c = bed.add_pod(1, "c").unwrap();
        eventually("cross-node ping a -> c", Duration::from_secs(20), || {
            Ok(a.ping(c.ip).ok())
        })
        .unwrap();
        let data = payload(256 << 10);
        let server = c.tcp_receive_once(8080).unwrap();
        a.tcp_send(SocketAddr::from((c.ip, 8080)), data.clone())
            .unwrap();
        assert!(server.join().unwrap().unwrap() == data, "payload corrupted");
    });
    set_policy(&policy_before);
    std::fs::write(sysctl, nf_before.trim()).unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
