//! The end-to-end tier: Veil installed with `helm install` on a real kind cluster (three
//! nodes from the locally built node image, containerd and the kubelet running `mesh-cni`),
//! real HTTP between real pods, a capture on the wire between the nodes, the SPIFFE
//! Workload API from a pod, `helm upgrade` and `helm uninstall`. One test walks the whole
//! life of an install, in the order a user goes through it, on one cluster.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use veil_testbed::capture::Capture;
use veil_testbed::kind::{Kind, LogCollector, NAMESPACE, NETWORK, POD_CIDR, WORKERS};

/// `helm upgrade` of the release with one value changed, then every agent Ready again.
fn helm_upgrade(kind: &Kind, set: &str) -> Result<()> {
    kind.helm(&[
        "upgrade",
        "veil",
        "CHART",
        "-n",
        NAMESPACE,
        "--reuse-values",
        "--set",
        set,
        "--wait",
        "--timeout",
        "10m",
    ])?;
    kind.wait_agents_ready(3, Duration::from_secs(300))
}

/// What one request through `veil-client` saw: the echo server's JSON answer.
fn request(kind: &Kind, url: &str, payload: &str) -> Result<serde_json::Value> {
    let body = kind.exec(
        "demo",
        "client",
        &[
            "veil-client",
            "http",
            url,
            "--method",
            "POST",
            "--data",
            payload,
            "--expect-status",
            "200",
            "--expect-body-contains",
            payload,
            "--timeout",
            "5s",
        ],
    )?;
    serde_json::from_str(&body).with_context(|| format!("echo answer is not JSON: {body}"))
}

/// The enforcing policy of the L7 phase: only the client's GETs under /public.
const ECHO_GUARD: &str = r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: echo-guard, namespace: demo}
spec:
  podSelector: {matchLabels: {app: echo}}
  ingress:
    - from: [{serviceAccount: {name: client}}]
      ports: [8080]
      http: [{methods: [GET], path: {prefix: /public}}]
"#;

/// One request from the client pod through `veil-client`, which checks the status and
/// the body; the body.
fn client_request(kind: &Kind, args: &[&str]) -> Result<String> {
    let mut argv = vec!["veil-client", "http", "--timeout", "5s"];
    argv.extend_from_slice(args);
    kind.exec("demo", "client", &argv)
}

/// `meshctl` in the agent on `node`.
fn meshctl_on(kind: &Kind, node: &str, args: &[&str]) -> Result<String> {
    let pods = kind.get_json(&[
        "-n",
        NAMESPACE,
        "pods",
        "-l",
        "app.kubernetes.io/component=agent",
        "--field-selector",
        &format!("spec.nodeName={node}"),
    ])?;
    let pod = pods["items"][0]["metadata"]["name"]
        .as_str()
        .with_context(|| format!("no agent pod on {node}"))?
        .to_string();
    let mut argv = vec!["meshctl"];
    argv.extend_from_slice(args);
    kind.exec(NAMESPACE, &pod, &argv)
}

/// L7 policies on the real cluster: the demo's audit policy lets a request it would
/// refuse pass and records it; then, alone (policies add up: the audit policy's rule
/// would allow what this one refuses), an enforcing policy lets the client's GET /public
/// through (the echo sees the client's own address and the judged path) and refuses
/// everything else with 403 naming it, directly and through the Service; `meshctl
/// observe` on echo-b's node says who was refused by which policy.
fn l7_enforcement(kind: &Kind, client_ip: &str, cluster_ip: &str) -> Result<()> {
    let echo_b = pod_ip(kind, "echo-b")?;
    let node_b = kind.get_json(&["-n", "demo", "pod", "echo-b"])?["spec"]["nodeName"]
        .as_str()
        .context("echo-b has no node")?
        .to_string();
    let has_record = |out: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        out.lines()
            .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|r| check(&r)))
    };

    // The audit policy alone: PUT is not among its methods, so it passes and is recorded.
    let audit_url = format!("http://{echo_b}:8080/audit");
    client_request(
        kind,
        &[
            "--method",
            "PUT",
            "--data",
            "x",
            "--expect-status",
            "200",
            &audit_url,
        ],
    )?;
    let audited = meshctl_on(
        kind,
        &node_b,
        &["observe", "--verdict", "audit-deny", "--json"],
    )?;
    ensure!(
        has_record(&audited, &|r| r["policy"] == "demo/echo-readers"
            && r["method"] == "PUT"),
        "no audit-deny record naming demo/echo-readers: {audited}"
    );
    kind.kubectl(&["-n", "demo", "delete", "l7policy", "echo-readers"])?;

    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), ECHO_GUARD)?;
    let path = file.path().to_string_lossy().to_string();
    kind.kubectl(&["apply", "-f", &path])?;
    let denied_url = format!("http://{echo_b}:8080/admin");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client_request(kind, &["--expect-status", "403", &denied_url]).is_err() {
        ensure!(
            Instant::now() < deadline,
            "echo-guard not enforced within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = client_request(
        kind,
        &[
            "--expect-status",
            "200",
            &format!("http://{echo_b}:8080/public/./a/../items"),
        ],
    )?;
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(answer["path"] == "/public/items", "echo-b saw {answer}");
    ensure!(
        answer["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{client_ip}:"))),
        "echo-b saw peer {}, not the client {client_ip}",
        answer["peer"]
    );
    for url in [
        denied_url.clone(),
        format!("http://{cluster_ip}:8080/admin"),
    ] {
        client_request(
            kind,
            &[
                "--expect-status",
                "403",
                "--expect-body-contains",
                "demo/echo-guard",
                &url,
            ],
        )
        .with_context(|| format!("{url} not refused"))?;
    }
    client_request(
        kind,
        &[
            "--method",
            "POST",
            "--data",
            "x",
            "--expect-status",
            "403",
            &format!("http://{echo_b}:8080/public"),
        ],
    )?;
    // The kubelet's readiness probe of echo-b (httpGet /healthz every 2 s) meets the proxy
    // too, from the node's own address, and passes as the pod's declared probe: flow
    // records show it allowed, and echo-b stays Ready under the enforcing policy.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let allowed = meshctl_on(kind, &node_b, &["observe", "--verdict", "allow", "--json"])?;
        if has_record(&allowed, &|r| {
            r["path"] == "/healthz"
                && r["destination"]["pod"] == "echo-b"
                && r["source"]["pod"].is_null()
        }) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no kubelet probe of echo-b through the proxy in 20 s: {allowed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let pod = kind.get_json(&["-n", "demo", "pod", "echo-b"])?;
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ensure!(
        ready,
        "echo-b not Ready under echo-guard: {}",
        pod["status"]
    );
    let refused = meshctl_on(kind, &node_b, &["observe", "--verdict", "deny", "--json"])?;
    ensure!(
        has_record(&refused, &|r| r["policy"] == "demo/echo-guard"
            && r["source"]["pod"] == "client"
            && r["destination"]["pod"] == "echo-b"),
        "meshctl observe --verdict deny on {node_b}: {refused}"
    );
    // No policy left: the later phases send what they like.
    kind.kubectl(&["-n", "demo", "delete", "l7policy", "echo-guard"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client_request(kind, &["--expect-status", "200", &denied_url]).is_err() {
        ensure!(
            Instant::now() < deadline,
            "echo-guard still enforced 30 s after deletion"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "e2e: L7 enforcement (audit, allow, 403 direct and via the Service, kubelet probes through the proxy, observe) checked"
    );
    Ok(())
}

fn pod_ip(kind: &Kind, pod: &str) -> Result<String> {
    let p = kind.get_json(&["-n", "demo", "pod", pod])?;
    p["status"]["podIP"]
        .as_str()
        .map(str::to_string)
        .context("pod has no IP")
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (Ok(ip), Ok(net)) = (
        ip.parse::<std::net::Ipv4Addr>(),
        cidr.parse::<ipnet::Ipv4Net>(),
    ) else {
        return false;
    };
    net.contains(&ip)
}

/// Whether a tcpdump address field (`ip.port`, `ip` or `ip.port:`) is a pod's address.
fn is_pod_address(field: &str) -> bool {
    let field = field.trim_end_matches(':');
    in_cidr(field, POD_CIDR)
        || field
            .rsplit_once('.')
            .is_some_and(|(ip, _)| in_cidr(ip, POD_CIDR))
}

/// The lines of agent or issuer logs at error level, or reporting a panic.
fn error_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect()
}

/// Every agent and issuer container: no restart, no error-level line, no panic.
fn assert_clean_logs(kind: &Kind, phase: &str) -> Result<()> {
    let pods = kind.get_json(&["-n", NAMESPACE, "pods"])?;
    for pod in pods["items"].as_array().context("no pods")? {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        for status in pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let restarts = status["restartCount"].as_u64().unwrap_or(0);
            ensure!(
                restarts == 0,
                "{phase}: {name}/{} restarted {restarts} times",
                status["name"]
            );
        }
        let logs = kind.kubectl(&["-n", NAMESPACE, "logs", name, "--all-containers"])?;
        let bad = error_lines(&logs);
        ensure!(
            bad.is_empty(),
            "{phase}: {name} logged errors:\n{}",
            bad.join("\n")
        );
    }
    Ok(())
}

/// Captures on the nodes' shared bridge while `traffic` runs; returns what crossed it.
fn capture_between_nodes(
    traffic: impl FnOnce() -> Result<()>,
) -> Result<veil_testbed::capture::Captured> {
    let dir = tempfile::tempdir()?;
    let capture = Capture::start(NETWORK, "", dir.path())?;
    let outcome = traffic();
    let captured = capture.stop()?;
    outcome?;
    Ok(captured)
}

/// Cross-node requests carrying `payload`, then the verdict on what the wire carried.
fn cross_node_traffic(kind: &Kind, payload: &str) -> Result<veil_testbed::capture::Captured> {
    let echo_b = pod_ip(kind, "echo-b")?;
    capture_between_nodes(|| {
        for i in 0..5 {
            request(kind, &format!("http://{echo_b}:8080/wire/{i}"), payload)?;
        }
        Ok(())
    })
}

fn unique(label: &str) -> String {
    format!(
        "veil-e2e-{label}-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

#[test]
fn e2e_kind_helm_install_traffic_encryption_identity_upgrade_uninstall() -> Result<()> {
    veil_testbed::require_root();
    let started = Instant::now();
    let kind = Kind::up("")?;
    eprintln!("e2e: cluster up in {:?}", started.elapsed());
    let logs_dir = tempfile::tempdir()?;
    let logs = LogCollector::start(&kind, NAMESPACE, logs_dir.path().join("veil-system.log"))?;

    // The agent on every node, pods on both workers addressed by mesh-cni from their
    // node's range through containerd and the kubelet.
    kind.wait_agents_ready(3, Duration::from_secs(120))?;
    let nodes = kind.get_json(&["nodes"])?;
    let mut node_cidr = std::collections::BTreeMap::new();
    for n in nodes["items"].as_array().context("no nodes")? {
        node_cidr.insert(
            n["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            n["spec"]["podCIDR"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    ensure!(node_cidr.len() == 3, "want 3 nodes, have {node_cidr:?}");
    let mut seen_nodes = BTreeSet::new();
    for pod in ["echo-a", "echo-b", "client"] {
        let p = kind.get_json(&["-n", "demo", "pod", pod])?;
        let ip = p["status"]["podIP"].as_str().context("no pod IP")?;
        let node = p["spec"]["nodeName"].as_str().context("no node")?;
        let cidr = &node_cidr[node];
        ensure!(
            in_cidr(ip, cidr) && in_cidr(ip, POD_CIDR),
            "{pod} on {node} has {ip}, outside its node's {cidr}"
        );
        seen_nodes.insert(node.to_string());
    }
    ensure!(
        seen_nodes == WORKERS.iter().map(|w| w.to_string()).collect(),
        "demo pods on {seen_nodes:?}"
    );

    // HTTP with payloads: same node, across nodes, via the Service's ClusterIP and its
    // DNS name. Pod to pod, the server sees the client's own address (no NAT).
    let client_ip = pod_ip(&kind, "client")?;
    let payload = unique("payload");
    for (what, pod) in [("same node", "echo-a"), ("across nodes", "echo-b")] {
        let ip = pod_ip(&kind, pod)?;
        let answer = request(&kind, &format!("http://{ip}:8080/direct"), &payload)
            .with_context(|| format!("client -> {pod} ({what})"))?;
        ensure!(
            answer["pod"] == pod,
            "{what}: answered by {}",
            answer["pod"]
        );
        let peer = answer["peer"].as_str().unwrap_or_default();
        ensure!(
            peer.starts_with(&format!("{client_ip}:")),
            "{what}: server saw peer {peer}, not the client {client_ip}"
        );
    }
    let svc = kind.get_json(&["-n", "demo", "service", "echo"])?;
    let cluster_ip = svc["spec"]["clusterIP"].as_str().context("no ClusterIP")?;
    let mut answered_by = BTreeSet::new();
    for i in 0..12 {
        let a = request(
            &kind,
            &format!("http://{cluster_ip}:8080/svc/{i}"),
            &payload,
        )
        .context("client -> Service ClusterIP")?;
        answered_by.insert(a["pod"].as_str().unwrap_or_default().to_string());
    }
    for i in 0..4 {
        request(
            &kind,
            &format!("http://echo.demo.svc.cluster.local:8080/dns/{i}"),
            &payload,
        )
        .context("client -> Service DNS name")?;
    }
    eprintln!("e2e: Service answered by {answered_by:?}");

    // On the wire between the nodes: the payload never in clear, and every packet between
    // pods is WireGuard UDP (no pod address appears in an outer header).
    let wire_payload = unique("wire");
    let captured = cross_node_traffic(&kind, &wire_payload)?;
    ensure!(
        !captured.contains(wire_payload.as_bytes()),
        "the payload crossed the wire in clear"
    );
    let clear: Vec<&String> = captured
        .lines
        .iter()
        .filter(|l| {
            let mut fields = l.split_whitespace().skip(1);
            fields.next() == Some("IP")
                && [fields.next(), fields.nth(1)]
                    .into_iter()
                    .flatten()
                    .any(is_pod_address)
        })
        .collect();
    ensure!(
        clear.is_empty(),
        "pod packets in clear between nodes: {clear:?}"
    );
    let wireguard = captured
        .lines
        .iter()
        .filter(|l| l.contains(".51871") && l.contains("UDP"))
        .count();
    ensure!(
        wireguard > 0,
        "no WireGuard packets seen between the nodes: {:?}",
        &captured.lines[..captured.lines.len().min(20)]
    );
    eprintln!("e2e: {wireguard} WireGuard packets, 0 in clear");

    // The client pod's own SPIFFE ID from the node's Workload API, through the `spiffe`
    // crate's client.
    let id = kind.exec(
        "demo",
        "client",
        &[
            "veil-svid",
            "--expect-id",
            "spiffe://cluster.local/ns/demo/sa/client",
            "--wait",
            "90s",
        ],
    )?;
    eprintln!("e2e: client pod's SVID: {}", id.trim());
    assert_clean_logs(&kind, "after install")?;

    l7_enforcement(&kind, &client_ip, cluster_ip)?;

    // `helm upgrade` with a changed value rolls every agent; pods keep their addresses
    // and cross-node traffic comes back within a measured bound.
    let before: Vec<String> = ["echo-a", "echo-b", "client"]
        .iter()
        .map(|p| pod_ip(&kind, p))
        .collect::<Result<_>>()?;
    let echo_b = pod_ip(&kind, "echo-b")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        let url = format!("http://{echo_b}:8080/during-upgrade");
        let kubeconfig = kind.kubeconfig().to_path_buf();
        std::thread::spawn(move || -> Result<Duration> {
            let kubectl = veil_testbed::bins::kube("kubectl")?;
            let mut last_ok = Instant::now();
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = std::process::Command::new(&kubectl)
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["-n", "demo", "exec", "client", "--", "veil-client", "http"])
                    .args([url.as_str(), "--timeout", "2s", "--expect-status", "200"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    worst = worst.max(last_ok.elapsed());
                    last_ok = Instant::now();
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Ok(worst.max(last_ok.elapsed()))
        })
    };
    let upgrade_started = Instant::now();
    helm_upgrade(&kind, "wireguard.keyRotation=12h")?;
    // Traffic must flow again after the roll before the probe's verdict counts.
    veil_testbed::eventually("traffic after the upgrade", Duration::from_secs(60), || {
        Ok(
            request(&kind, &format!("http://{echo_b}:8080/after-upgrade"), "x")
                .ok()
                .map(|_| ()),
        )
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst_gap = probe
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
    eprintln!(
        "e2e: helm upgrade rolled 3 agents in {:?}; longest cross-node gap {:?}",
        upgrade_started.elapsed(),
        worst_gap
    );
    ensure!(
        worst_gap <= Duration::from_secs(45),
        "cross-node traffic stopped for {worst_gap:?} during the upgrade (bound 45 s)"
    );
    let after: Vec<String> = ["echo-a", "echo-b", "client"]
        .iter()
        .map(|p| pod_ip(&kind, p))
        .collect::<Result<_>>()?;
    ensure!(
        before == after,
        "pods changed addresses: {before:?} -> {after:?}"
    );
    assert_clean_logs(&kind, "after upgrade")?;

    // The same capture on the same cluster with encryption off must find the payload:
    // the check above can fail.
    helm_upgrade(&kind, "encryption=none")?;
    let clear_payload = unique("clear");
    let captured = veil_testbed::eventually(
        "clear-text routing after encryption=none",
        Duration::from_secs(60),
        || {
            let c = cross_node_traffic(&kind, &clear_payload)?;
            Ok(c.contains(clear_payload.as_bytes()).then_some(c))
        },
    )?;
    ensure!(captured.contains(clear_payload.as_bytes()));
    eprintln!("e2e: with encryption=none the same capture finds the payload");
    assert_clean_logs(&kind, "after encryption=none")?;

    // `helm uninstall`: the workloads go first (their CNI DEL needs the agent), then
    // nothing of Veil is left on any node.
    kind.kubectl(&["delete", "namespace", "demo", "--wait", "--timeout", "3m"])?;
    kind.helm(&[
        "uninstall",
        "veil",
        "-n",
        NAMESPACE,
        "--wait",
        "--timeout",
        "5m",
    ])?;
    veil_testbed::eventually("agents gone", Duration::from_secs(120), || {
        let pods = kind.get_json(&["-n", NAMESPACE, "pods"])?;
        Ok(pods["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(()))
    })?;
    for node in kind.nodes()? {
        let left = kind.on_node(
            &node,
            "ls /etc/cni/net.d/*veil* /opt/cni/bin/mesh-cni 2>/dev/null; \
             ip -o link show veil-wg0 2>/dev/null; \
             ip route show proto 119; \
             find /var/lib/veil /run/veil /sys/fs/bpf/veil -mindepth 1 2>/dev/null; true",
        )?;
        if !left.trim().is_empty() {
            bail!("helm uninstall left on {node}:\n{left}");
        }
    }
    // Every line the agents and the issuer wrote from install to uninstall, the pods that
    // upgrades replaced and the agents' own clean-up included.
    let said = logs.stop()?;
    let bad = error_lines(&said);
    ensure!(
        bad.is_empty(),
        "error-level lines or panics:\n{}",
        bad.join("\n")
    );
    ensure!(
        said.contains("uninstall: removing everything Veil put on this node"),
        "the collected logs do not reach the agents' uninstall ({} lines)",
        said.lines().count()
    );
    eprintln!(
        "e2e: {} log lines of agents and issuer, none at error level; whole run {:?}",
        said.lines().count(),
        started.elapsed()
    );
    Ok(())
}
