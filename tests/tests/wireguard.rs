//! WireGuard between nodes, proven on the wire: captures on the underlay, strict mode,
//! cryptokey routing, peers following Node objects, restarts and key rotation.
//! Every test is named `wireguard_*` so `cargo test --workspace wireguard` runs them.

use std::net::SocketAddr;
use std::time::Duration;

use veil_testbed::capture::Capture;
use veil_testbed::{eventually, AdminRequest, AdminResponse, BedConfig, Pod, TestBed};

const KEY: &str = "veil.dev/wireguard-public-key";

fn marker() -> Vec<u8> {
    format!("VEIL-PLAINTEXT-MARKER-{}-", std::process::id()).into_bytes()
}

fn marked_payload(len: usize) -> Vec<u8> {
    marker().into_iter().cycle().take(len).collect()
}

/// Pod `a` on node 0 and pod `c` on node 1, once they reach each other.
fn connected_pods(bed: &TestBed) -> (Pod, Pod) {
    bed.connected_pods().unwrap()
}

/// Peers of node `i` as its agent reports them.
fn peers(bed: &TestBed, i: usize) -> Vec<mesh_agent::wireguard::PeerStatus> {
    match bed.ask_agent(i, AdminRequest::Wireguard).unwrap() {
        AdminResponse::Wireguard { peers, .. } => peers,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Every captured packet between two node addresses is WireGuard UDP on its port.
fn assert_only_wireguard(lines: &[String]) {
    for line in lines {
        let udp = line.contains(".51871 > ") && line.contains(".51871: UDP");
        assert!(
            udp,
            "a packet between the nodes is not WireGuard UDP: {line}"
        );
    }
}

/// A tcpdump filter for every packet between nodes 0 and 1, over either underlay family.
fn between_nodes(bed: &TestBed) -> String {
    let (n0, n1) = (bed.node(0), bed.node(1));
    let mut filter = format!("(ip and host {} and host {})", n0.ip, n1.ip);
    if let (Some(a), Some(b)) = (n0.ip6, n1.ip6) {
        filter += &format!(" or (ip6 and host {a} and host {b})");
    }
    filter
}

/// Pods on two nodes exchange 2 MiB each way with a known marker while the underlay is
/// captured: the payload arrives intact, and the capture holds no marker, no pod address,
/// nothing but WireGuard UDP. Returns the captured lines.
fn exchange_marked_payloads(bed: &TestBed, a: &Pod, c: &Pod) -> Vec<String> {
    let capture = Capture::start(bed.underlay(), &between_nodes(bed), bed.dir()).unwrap();
    for (from, to) in [(a, c), (c, a)] {
        let data = marked_payload(2 << 20);
        let server = to.tcp_receive_once(9000).unwrap();
        from.tcp_send(SocketAddr::from((to.ip, 9000)), data.clone())
            .unwrap();
        assert!(
            server.join().unwrap().unwrap() == data,
            "{} -> {}: payload corrupted",
            from.name,
            to.name
        );
    }
    a.ping(c.ip).unwrap();
    let seen = capture.stop().unwrap();
    assert!(
        seen.lines.len() > 100,
        "the capture saw the transfer ({} packets)",
        seen.lines.len()
    );
    assert!(
        !seen.contains(&marker()),
        "the marker crossed the underlay in clear text"
    );
    assert_only_wireguard(&seen.lines);
    // And the pods' addresses never appear as packet addresses on the underlay.
    assert!(seen
        .lines
        .iter()
        .all(|l| !l.contains(&a.ip.to_string()) && !l.contains(&c.ip.to_string())));
    seen.lines
}

/// Whether a command succeeded, and what it printed (stdout, then stderr).
fn outcome(out: &std::process::Output) -> (bool, String) {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The pod's interface MTU.
fn pod_mtu(pod: &Pod) -> usize {
    let out = pod.netns.exec(&["cat", "/sys/class/net/eth0/mtu"]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A ping of `payload` bytes with DF set (`-M do`); whether it was answered, and what
/// ping said.
fn ping_df(from: &Pod, to: &Pod, payload: usize) -> (bool, String) {
    let out = from
        .netns
        .exec(&[
            "ping",
            "-M",
            "do",
            "-s",
            &payload.to_string(),
            "-c",
            "1",
            "-W",
            "2",
            &to.ip.to_string(),
        ])
        .unwrap();
    outcome(&out)
}

/// Packets of exactly the pod MTU with DF set cross in both directions (the encrypted
/// packet fits the underlay: nothing is black-holed); one byte more is refused at the
/// pod with "message too long", which TCP's path MTU discovery learns from.
fn assert_full_size_packets_cross(a: &Pod, c: &Pod, mtu: usize) {
    for (from, to) in [(a, c), (c, a)] {
        // 20 bytes of IPv4 header and 8 of ICMP around the payload.
        let (ok, said) = ping_df(from, to, mtu - 28);
        assert!(
            ok,
            "{} -> {}: a full-size DF packet was lost: {said}",
            from.name, to.name
        );
        let (ok, said) = ping_df(from, to, mtu - 27);
        assert!(
            !ok && said.contains("message too long"),
            "{} -> {}: one byte over the MTU should be refused locally: {said}",
            from.name,
            to.name
        );
    }
}

/// No IP fragments among captured lines: encapsulated packets fit the underlay whole.
fn assert_no_fragments(lines: &[String]) {
    for line in lines {
        assert!(
            !line.contains("frag"),
            "an underlay packet was fragmented: {line}"
        );
    }
}

#[test]
fn wireguard_underlay_carries_no_plaintext() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);
    let lines = exchange_marked_payloads(&bed, &a, &c);
    assert!(lines.iter().all(|l| l.contains(" IP ")), "IPv4 underlay");
    assert_no_fragments(&lines);
}

#[test]
fn wireguard_mtu_fits_the_ipv4_underlay_with_df_set() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);
    // 1500-byte underlay minus 60 for WireGuard over IPv4.
    assert_eq!(pod_mtu(&a), 1440);
    assert_eq!(pod_mtu(&c), 1440);
    assert_full_size_packets_cross(&a, &c, 1440);
}

#[test]
fn wireguard_over_an_ipv6_underlay_reserves_80_bytes_and_carries_no_plaintext() {
    let bed = TestBed::start(BedConfig {
        ipv6_underlay: true,
        ..Default::default()
    })
    .unwrap();
    let (a, c) = connected_pods(&bed);
    // 1500-byte underlay minus 80 for WireGuard over IPv6.
    assert_eq!(pod_mtu(&a), 1420);
    assert_eq!(pod_mtu(&c), 1420);
    let endpoint = &peers(&bed, 0)[0].endpoint;
    assert_eq!(
        endpoint.ip(),
        bed.node(1).internal_ip(),
        "the peer is reached at its IPv6 InternalIP"
    );
    let lines = exchange_marked_payloads(&bed, &a, &c);
    assert!(
        lines.iter().all(|l| l.contains(" IP6 ")),
        "node-to-node traffic crosses over IPv6 only"
    );
    assert_no_fragments(&lines);
    assert_full_size_packets_cross(&a, &c, 1420);
}

#[test]
fn wireguard_strict_mode_sends_nothing_before_the_peer_key_is_known() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);
    let key = bed
        .node_annotation(1, KEY)
        .unwrap()
        .expect("node-1 published its key");

    // Take node-1's key away: node-0 no longer has a peer for node-1's pods.
    bed.annotate_node(1, KEY, None).unwrap();
    eventually("node-0 drops its peer", Duration::from_secs(10), || {
        Ok(peers(&bed, 0).is_empty().then_some(()))
    })
    .unwrap();
    let filter = format!("ip and host {} and host {}", bed.node(0).ip, bed.node(1).ip);
    let capture = Capture::start(bed.underlay(), &filter, bed.dir()).unwrap();
    assert!(a.ping(c.ip).is_err(), "no peer key, no traffic");
    let server = c.tcp_receive_once(9001).unwrap();
    assert!(a
        .tcp_send(SocketAddr::from((c.ip, 9001)), marked_payload(4096))
        .is_err());
    drop(server);
    let seen = capture.stop().unwrap();
    assert!(
        !seen.contains(&marker()),
        "plaintext left node-0 without a peer key"
    );
    // node-1 still knows node-0, so its replies and handshakes may cross, encrypted only.
    assert_only_wireguard(&seen.lines);
    match bed.ask_agent(0, AdminRequest::Wireguard).unwrap() {
        AdminResponse::Wireguard {
            dropped_no_peer, ..
        } => assert!(dropped_no_peer > 0),
        other => panic!("{other:?}"),
    }

    // The key comes back: traffic flows again.
    bed.annotate_node(1, KEY, Some(&key)).unwrap();
    eventually(
        "ping once the key is published",
        Duration::from_secs(20),
        || Ok(a.ping(c.ip).ok()),
    )
    .unwrap();
}

#[test]
fn wireguard_cryptokey_routing_drops_inner_sources_outside_the_peer_cidr() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let a = bed.add_pod(0, "a").unwrap();
    let c = bed.add_pod(1, "c").unwrap();
    eventually("cross-node ping", Duration::from_secs(20), || {
        Ok(c.ping(a.ip).ok())
    })
    .unwrap();

    // c claims an address from another node's range and pings a from it: the eBPF
    // program on c's veth drops that at the source and counts it.
    let spoofed = "198.19.250.7";
    c.netns
        .ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
        .unwrap();
    let ping_from = |netns: &veil_testbed::net::Netns| {
        netns
            .exec(&[
                "ping",
                "-c",
                "3",
                "-W",
                "1",
                "-I",
                spoofed,
                &a.ip.to_string(),
            ])
            .unwrap()
    };
    let out = ping_from(&c.netns);
    assert!(
        !out.status.success(),
        "a answered a spoofed source: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let c_info = bed
        .agent_pods(1)
        .unwrap()
        .into_iter()
        .find(|p| p.ip == c.ip)
        .unwrap();
    assert!(c_info.spoofed_packets >= 3, "{c_info:?}");

    // Past the source node's anti-spoofing (here: node-1 itself sends from that address,
    // as a compromised node could), node-0's cryptokey routing still refuses it: "a
    // datagram from a valid peer whose inner source lies outside its pod CIDR".
    let node1 = &bed.node(1).netns;
    node1
        .ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "lo"])
        .unwrap();
    let capture = Capture::start(bed.underlay(), "udp port 51871", bed.dir()).unwrap();
    let out = ping_from(node1);
    assert!(
        !out.status.success(),
        "a answered a spoofed source: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let seen = capture.stop().unwrap();
    assert!(
        !seen.lines.is_empty(),
        "the spoofed packets were sent, encrypted, to node-0"
    );
    let from_node1 = peers(&bed, 0)
        .into_iter()
        .find(|p| p.node == bed.node(1).name)
        .unwrap();
    assert!(
        from_node1.rx_spoofed >= 3,
        "node-0 counted {} spoofed packets",
        from_node1.rx_spoofed
    );
    c.ping(a.ip).unwrap();
}

#[test]
fn wireguard_peers_follow_nodes_restarts_and_key_changes() {
    let mut bed = TestBed::start(BedConfig {
        nodes: 3,
        ..Default::default()
    })
    .unwrap();
    let (a, c) = connected_pods(&bed);
    eventually("node-0 has two peers", Duration::from_secs(10), || {
        Ok((peers(&bed, 0).len() == 2).then_some(()))
    })
    .unwrap();

    // Restart: the private key file is reused, so the published key does not change.
    let key_before = bed.node_annotation(1, KEY).unwrap();
    bed.restart_agent(1).unwrap();
    assert_eq!(
        bed.node_annotation(1, KEY).unwrap(),
        key_before,
        "the restarted agent kept its key"
    );
    eventually(
        "ping after node-1's agent restarted",
        Duration::from_secs(20),
        || Ok(a.ping(c.ip).ok()),
    )
    .unwrap();

    // Traffic to node-2 too, so both of node-0's peers have counters to lose.
    let e = bed.add_pod(2, "e").unwrap();
    eventually("ping node-2's pod", Duration::from_secs(20), || {
        Ok(a.ping(e.ip).ok())
    })
    .unwrap();
    let sent_to = |node: usize| {
        let name = &bed.node(node).name;
        peers(&bed, 0)
            .iter()
            .find(|p| &p.node == name)
            .map(|p| p.tx_bytes)
    };

    // A key change (rotation on demand) is followed by the peers; node-0's session with
    // node-2 is left alone (a replaced peer would start its counters from zero).
    let node2_before = sent_to(2).unwrap();
    let rotated = match bed.ask_agent(1, AdminRequest::RotateKey).unwrap() {
        AdminResponse::Rotated { public_key } => public_key,
        other => panic!("{other:?}"),
    };
    assert_ne!(Some(rotated.clone()), key_before);
    assert_eq!(bed.node_annotation(1, KEY).unwrap(), Some(rotated));
    let started = std::time::Instant::now();
    eventually(
        "ping after node-1's key changed",
        Duration::from_secs(20),
        || Ok(a.ping(c.ip).ok()),
    )
    .unwrap();
    eprintln!(
        "traffic to node-1 resumed {:?} after its key changed",
        started.elapsed()
    );
    assert!(
        sent_to(2).unwrap() >= node2_before,
        "node-1's key change disturbed the session with node-2"
    );

    // Node removal removes the peer, and leaves the other alone.
    let node1_before = sent_to(1).unwrap();
    assert!(node1_before > 0);
    bed.delete_node_object(2).unwrap();
    let started = std::time::Instant::now();
    eventually(
        "node-0 drops the removed node",
        Duration::from_secs(10),
        || Ok(sent_to(2).is_none().then_some(())),
    )
    .unwrap();
    eprintln!(
        "node-0 dropped the removed node's peer in {:?}",
        started.elapsed()
    );
    a.ping(c.ip).unwrap();
    assert!(
        sent_to(1).unwrap() > node1_before,
        "node-2's removal disturbed the session with node-1"
    );
    bed.check_agent(0).unwrap();
}

#[test]
fn wireguard_key_rotation_during_a_long_transfer_keeps_the_connection() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);

    // A paced transfer of 64 MiB over about four seconds, with both nodes rotating in the middle.
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;
    let server = c.tcp_receive_once(9002).unwrap();
    let dst = SocketAddr::from((c.ip, 9002));
    let sender = a.netns.spawn(move || {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        // A stalled tunnel must fail the test, not hang it.
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        for i in 0..CHUNKS {
            stream.write_all(&vec![(i % 251) as u8; CHUNK])?;
            std::thread::sleep(Duration::from_millis(60));
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        anyhow::Ok(())
    });
    std::thread::sleep(Duration::from_millis(1200));
    for node in [0, 1] {
        assert!(matches!(
            bed.ask_agent(node, AdminRequest::RotateKey).unwrap(),
            AdminResponse::Rotated { .. }
        ));
    }
    sender.join().unwrap().expect("the sender saw no reset");
    let got = server.join().unwrap().expect("the receiver saw no reset");
    assert_eq!(got.len(), CHUNK * CHUNKS);
    for (i, chunk) in got.chunks(CHUNK).enumerate() {
        assert!(
            chunk.iter().all(|b| *b == (i % 251) as u8),
            "chunk {i} corrupted"
        );
    }
}

#[test]
fn wireguard_interoperates_with_wireguard_go() {
    let mut bed = TestBed::start(BedConfig {
        nodes: 1,
        ..Default::default()
    })
    .unwrap();
    let a = bed.add_pod(0, "a").unwrap();
    let other = bed.add_bare_node().unwrap();
    let node = bed.node(other);
    // A per-bed name: wireguard-go's control socket is /var/run/wireguard/<name>.sock,
    // shared by every namespace of this host.
    let dev = format!("wgg{}", bed.index);
    let mut cmd = std::process::Command::new(veil_testbed::bins::tool("wireguard-go").unwrap());
    cmd.args(["-f", &dev])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let _wggo = veil_testbed::process::Proc::spawn(
        "wireguard-go",
        cmd,
        &node.dir.join("wireguard-go.log"),
        Some(&node.netns.path()),
    )
    .unwrap();
    let wg = |args: &[&str]| -> String {
        let mut argv = vec!["wg"];
        argv.extend_from_slice(args);
        let out = node.netns.exec(&argv).unwrap();
        assert!(
            out.status.success(),
            "wg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    eventually("wireguard-go device up", Duration::from_secs(10), || {
        Ok(node
            .netns
            .exec(&["wg", "show", &dev])?
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    let private = node.dir.join("wggo.key");
    let out = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    std::fs::write(&private, &out.stdout).unwrap();
    let public = {
        use std::io::Write;
        let mut child = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    let veil_key = bed
        .node_annotation(0, KEY)
        .unwrap()
        .expect("node-0 published its key");
    let veil_node = bed.node(0);
    wg(&[
        "set",
        &dev,
        "listen-port",
        "51871",
        "private-key",
        private.to_str().unwrap(),
        "peer",
        &veil_key,
        "endpoint",
        &format!("{}:51871", veil_node.ip),
        "allowed-ips",
        &veil_node.pod_cidr.to_string(),
    ]);
    let far = std::net::Ipv4Addr::from(u32::from(node.pod_cidr.network()) + 5);
    node.netns
        .ip(&["addr", "add", &format!("{far}/32"), "dev", &dev])
        .unwrap();
    node.netns
        .ip(&["link", "set", &dev, "mtu", "1420", "up"])
        .unwrap();
    node.netns
        .ip(&["route", "add", &veil_node.pod_cidr.to_string(), "dev", &dev])
        .unwrap();
    // Veil learns the wireguard-go peer from the Node object, as it would any node.
    bed.annotate_node(other, KEY, Some(&public)).unwrap();
    bed.annotate_node(other, "veil.dev/wireguard-port", Some("51871"))
        .unwrap();

    eventually("Veil pod -> wireguard-go", Duration::from_secs(20), || {
        Ok(a.ping(far).ok())
    })
    .unwrap();
    let out = node
        .netns
        .exec(&["ping", "-c", "2", "-W", "2", &a.ip.to_string()])
        .unwrap();
    assert!(
        out.status.success(),
        "wireguard-go -> Veil pod: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let handshakes = wg(&["show", &dev, "latest-handshakes"]);
    let when: u64 = handshakes
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(when > 0, "wireguard-go saw a handshake: {handshakes}");
    let transfer = wg(&["show", &dev, "transfer"]);
    let fields: Vec<u64> = transfer
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        fields[0] > 0 && fields[1] > 0,
        "traffic both ways: {transfer}"
    );
}

/// Packets each queue of node `i` has carried: (tx, rx).
fn queue_packets(bed: &TestBed, i: usize) -> Vec<(u64, u64)> {
    match bed.ask_agent(i, AdminRequest::Wireguard).unwrap() {
        AdminResponse::Wireguard { queues, .. } => queues
            .iter()
            .map(|q| (q.tx_packets, q.rx_packets))
            .collect(),
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn wireguard_multi_queue_device_pins_each_peer_to_one_queue() {
    const QUEUES: usize = 4;
    let mut bed = TestBed::start(BedConfig {
        nodes: 0,
        ..Default::default()
    })
    .unwrap();
    let hub = bed.add_bare_node().unwrap();
    bed.set_agent_args(hub, vec!["--wireguard-queues".into(), QUEUES.to_string()]);
    bed.start_agent(hub).unwrap();
    bed.add_node().unwrap();
    bed.add_node().unwrap();

    // The device has a queue per thread pair.
    let listing = bed
        .node(hub)
        .netns
        .exec(&["ls", "/sys/class/net/veil-wg0/queues"])
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for q in 0..QUEUES {
        assert!(listing.contains(&format!("tx-{q}")), "queue {q}: {listing}");
    }

    let a = bed.add_pod(hub, "a").unwrap();
    let remote = [bed.add_pod(1, "b").unwrap(), bed.add_pod(2, "c").unwrap()];
    for pod in &remote {
        eventually("cross-node ping", Duration::from_secs(20), || {
            Ok(pod.ping(a.ip).ok())
        })
        .unwrap();
    }
    let pinned: Vec<usize> = (1..=2)
        .map(|n| {
            let status = peers(&bed, hub);
            let peer = status.iter().find(|p| p.node == bed.node(n).name).unwrap();
            peer.queue
        })
        .collect();
    assert_ne!(
        pinned[0], pinned[1],
        "two peers added one after the other get different queues"
    );

    // Each remote pod sends to `a` in turn: the hub decrypts only on that peer's queue,
    // and sends its ACKs from the same queue (the kernel steers a flow's replies to the
    // TUN queue its packets were written on).
    for (pod, queue) in remote.iter().zip(&pinned) {
        let before = queue_packets(&bed, hub);
        let data = marked_payload(4 << 20);
        let server = a.tcp_receive_once(9100).unwrap();
        pod.tcp_send(SocketAddr::from((a.ip, 9100)), data.clone())
            .unwrap();
        assert!(server.join().unwrap().unwrap() == data);
        let after = queue_packets(&bed, hub);
        let rx: Vec<u64> = (0..QUEUES).map(|q| after[q].1 - before[q].1).collect();
        let tx: Vec<u64> = (0..QUEUES).map(|q| after[q].0 - before[q].0).collect();
        assert!(
            rx[*queue] > 0,
            "{}: nothing on its queue {queue}: rx {rx:?}",
            pod.name
        );
        // The other peers may send a packet or two meanwhile on their own queues (a
        // WireGuard keepalive 10 s after their last data, a late ACK of their flow): a
        // flow decrypted on a wrong queue would put thousands there.
        let elsewhere = rx.iter().sum::<u64>() - rx[*queue];
        assert!(
            elsewhere <= 4,
            "{}: decrypted outside its queue {queue}: rx {rx:?}",
            pod.name
        );
        assert!(
            tx[*queue] * 10 >= tx.iter().sum::<u64>() * 9,
            "{}: replies not from its queue {queue}: tx {tx:?}",
            pod.name
        );
    }
}

#[test]
fn wireguard_agent_adopts_a_single_queue_device_left_by_an_older_agent() {
    let mut bed = TestBed::start(BedConfig {
        nodes: 1,
        ..Default::default()
    })
    .unwrap();
    let old = bed.add_bare_node().unwrap();
    // What an agent before multi-queue left behind: a persistent single-queue device.
    bed.node(old)
        .netns
        .ip(&["tuntap", "add", "dev", "veil-wg0", "mode", "tun"])
        .unwrap();
    bed.set_agent_args(old, vec!["--wireguard-queues".into(), "2".into()]);
    bed.start_agent(old).unwrap();
    let (a, c) = connected_pods(&bed);
    assert_eq!(
        queue_packets(&bed, old).len(),
        1,
        "the old device's one queue"
    );
    let data = marked_payload(1 << 20);
    let server = a.tcp_receive_once(9200).unwrap();
    c.tcp_send(SocketAddr::from((a.ip, 9200)), data.clone())
        .unwrap();
    assert!(server.join().unwrap().unwrap() == data);
}

/// Runs the real `meshctl` with `--socket <socket>`; whether it succeeded, and what it said.
fn meshctl(socket: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(veil_testbed::bins::veil("meshctl").unwrap())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    outcome(&out)
}

#[test]
fn wireguard_meshctl_shows_key_peers_and_queues_and_rotates() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, c) = connected_pods(&bed);
    let socket = bed.node(0).admin_socket();

    let (ok, out) = meshctl(&socket, &["wireguard"]);
    assert!(ok, "{out}");
    let key = bed.node_annotation(0, KEY).unwrap().unwrap();
    assert!(out.contains(&format!("public key {key}")), "{out}");
    let peer = bed.node(1);
    for field in [
        peer.name.clone(),
        peer.pod_cidr.to_string(),
        format!("{}:51871", peer.ip),
    ] {
        assert!(out.contains(&field), "no {field} in: {out}");
    }
    assert!(out.contains("queues (packets) 0: tx "), "{out}");

    let (ok, out) = meshctl(&socket, &["wireguard", "rotate"]);
    assert!(ok, "{out}");
    let rotated = out
        .trim()
        .strip_prefix("rotated; new public key ")
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert_ne!(rotated, key);
    assert_eq!(bed.node_annotation(0, KEY).unwrap(), Some(rotated));
    eventually("ping after rotating", Duration::from_secs(20), || {
        Ok(a.ping(c.ip).ok())
    })
    .unwrap();

    let (ok, out) = meshctl(&socket, &["pods"]);
    assert!(ok && out.contains(&a.ip.to_string()), "{out}");

    // No agent there: a failure that names the socket.
    let missing = bed.dir().join("no-agent.sock");
    let (ok, out) = meshctl(&missing, &["wireguard"]);
    assert!(!ok && out.contains("no-agent.sock"), "{out}");
}

/// A pod talking to another node itself (where the API server, host-network pods and
/// NodePorts live) and that node talking back to the pod: both directions arrive, and the
/// underlay carries nothing but WireGuard between the nodes. Found on kind: with the
/// replies of the node (source: its own address) refused by cryptokey routing, no pod
/// could reach the API server through its Service.
#[test]
fn wireguard_pods_and_peer_nodes_reach_each_other_encrypted() {
    let bed = TestBed::start(BedConfig::default()).unwrap();
    let (a, _c) = connected_pods(&bed);
    let node1 = bed.node(1);
    let capture = Capture::start(bed.underlay(), &between_nodes(&bed), bed.dir()).unwrap();

    // Pod a (node 0) -> node 1's own address.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let server = node1.netns.spawn(move || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", 9100))?;
        bound_tx.send(()).ok();
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut data)?;
        Ok((data, peer))
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let data = marked_payload(256 << 10);
    a.tcp_send(SocketAddr::from((node1.ip, 9100)), data.clone())
        .unwrap();
    let (got, peer) = server.join().unwrap().unwrap();
    assert!(got == data, "pod -> node: payload corrupted");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(a.ip),
        "node 1 saw the pod's own address"
    );

    // Node 1 itself -> pod a.
    let receiver = a.tcp_receive_once(9101).unwrap();
    let data2 = marked_payload(256 << 10);
    let sent = data2.clone();
    let dst = SocketAddr::from((a.ip, 9101));
    node1
        .netns
        .spawn(move || {
            let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            std::io::Write::write_all(&mut s, &sent)?;
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
    assert!(
        receiver.join().unwrap().unwrap() == data2,
        "node -> pod: payload corrupted"
    );

    let seen = capture.stop().unwrap();
    assert!(
        !seen.contains(&marker()),
        "the marker crossed the underlay in clear text"
    );
    assert_only_wireguard(&seen.lines);
}
