//! The Helm chart (`charts/veil`) checked with the real `helm` (built by `make setup`):
//! lint, rendering in every supported shape, the values schema refusing mistakes, and the
//! generated README matching values.yaml. No cluster needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_yaml::Value;

/// The Kubernetes version the chart is rendered for (the one `make setup` builds).
const KUBE_VERSION: &str = "1.34.4";
const NAMESPACE: &str = "veil-system";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn chart() -> PathBuf {
    repo().join("charts/veil")
}

fn helm(args: &[&str]) -> Result<Output> {
    let helm = veil_testbed::bins::tool("helm")?;
    Command::new(&helm)
        .args(args)
        .output()
        .with_context(|| format!("run {} {}", helm.display(), args.join(" ")))
}

/// `helm template` of the chart with `extra` arguments; the raw output.
fn template_raw(extra: &[&str]) -> Result<Output> {
    let chart = chart();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let mut args = vec![
        "template",
        "veil",
        chart,
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ];
    args.extend_from_slice(extra);
    helm(&args)
}

/// The chart's manifests rendered with `extra` arguments, one YAML value per object.
fn render(extra: &[&str]) -> Result<Vec<Value>> {
    let out = template_raw(extra)?;
    ensure!(
        out.status.success(),
        "helm template {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).context("helm template printed non-UTF-8")?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("helm template {extra:?} printed invalid YAML"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

fn get<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    find(docs, kind, name).with_context(|| format!("no {kind} {name} rendered"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The rules of a (Cluster)Role as (resource, verbs, resourceNames) triples.
fn rules(role: &Value) -> Vec<(String, Vec<String>, Vec<String>)> {
    let owned = |v: &Value| strings(v).into_iter().map(String::from).collect::<Vec<_>>();
    role["rules"]
        .as_sequence()
        .map(|rules| {
            rules
                .iter()
                .flat_map(|r| {
                    strings(&r["resources"])
                        .into_iter()
                        .map(|res| {
                            (
                                res.to_string(),
                                owned(&r["verbs"]),
                                owned(&r["resourceNames"]),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> Result<&'a Value> {
    pod_spec[list]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)))
        .with_context(|| format!("no {list} entry {name}"))
}

#[test]
fn e2e_chart_lint_is_clean_in_strict_mode() -> Result<()> {
    let chart = chart();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    // Strict: a warning fails too. Linted in the default shape and the two reduced ones.
    for extra in [
        &[][..],
        &["--set", "encryption=none"][..],
        &["--set", "identity.enabled=false"][..],
    ] {
        let mut args = vec!["lint", "--strict", chart, "--kube-version", KUBE_VERSION];
        args.extend_from_slice(extra);
        let out = helm(&args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "helm lint {extra:?} failed:\n{text}");
        ensure!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "helm lint {extra:?} reports problems:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn e2e_chart_renders_the_agent_least_privileged_and_consistent() -> Result<()> {
    let docs = render(&[])?;
    let ds = get(&docs, "DaemonSet", "veil-agent")?;
    ensure!(ds["metadata"]["namespace"].as_str() == Some(NAMESPACE));
    let pod = &ds["spec"]["template"]["spec"];
    ensure!(pod["hostNetwork"].as_bool() == Some(true), "host network");
    ensure!(pod["dnsPolicy"].as_str() == Some("ClusterFirstWithHostNet"));
    ensure!(pod["priorityClassName"].as_str() == Some("system-node-critical"));
    ensure!(
        pod["tolerations"].as_sequence().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists")
                && t.get("key").is_none()
                && t.get("effect").is_none())),
        "the agent tolerates every taint: {:?}",
        pod["tolerations"]
    );
    let strategy = &ds["spec"]["updateStrategy"];
    ensure!(strategy["type"].as_str() == Some("RollingUpdate"));
    ensure!(strategy["rollingUpdate"]["maxUnavailable"].as_i64() == Some(1));

    let agent = container(pod, "containers", "agent")?;
    let security = &agent["securityContext"];
    ensure!(
        security["privileged"].as_bool() == Some(false),
        "not privileged"
    );
    ensure!(strings(&security["capabilities"]["drop"]) == ["ALL"]);
    let added = strings(&security["capabilities"]["add"]);
    ensure!(
        added == ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
        "capabilities {added:?}"
    );
    let node_name = agent["env"]
        .as_sequence()
        .and_then(|e| {
            e.iter()
                .find(|e| e["name"].as_str() == Some("VEIL_NODE_NAME"))
        })
        .context("VEIL_NODE_NAME not set")?;
    ensure!(node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName"));
    let probe = strings(&agent["readinessProbe"]["exec"]["command"]);
    ensure!(
        probe
            == [
                "/usr/local/bin/meshctl",
                "--socket",
                "/run/veil/admin.sock",
                "pods"
            ],
        "{probe:?}"
    );

    // The one privileged container only mounts the node's bpffs where none is.
    let mount = container(pod, "initContainers", "mount-bpffs")?;
    ensure!(mount["securityContext"]["privileged"].as_bool() == Some(true));
    let script = strings(&mount["command"]).join(" ");
    ensure!(
        script.contains("mount -t bpf bpf /sys/fs/bpf") && !script.contains("rm "),
        "mount-bpffs runs: {script}"
    );
    let install = container(pod, "initContainers", "install-cni")?;
    let script = strings(&install["command"]).join(" ");
    ensure!(
        script.contains("mv -f") && script.contains("/host/opt/cni/bin"),
        "install-cni copies then renames: {script}"
    );

    // The settings agree with each other: the agent names its own DaemonSet, may read
    // it, and runs as the account the admission policy lets change Node annotations.
    let config = &get(&docs, "ConfigMap", "veil-agent")?["data"];
    ensure!(config["VEIL_OWNER_DAEMONSET"].as_str() == Some("veil-system/veil-agent"));
    ensure!(config["VEIL_CNI_CONF_FILE"].as_str() == Some("/host/etc/cni/net.d/05-veil.conflist"));
    ensure!(config["VEIL_ISSUER_ADDRESS"].as_str() == Some("veil-issuer.veil-system.svc:8443"));
    ensure!(config["VEIL_TRUST_BUNDLE_NAMESPACE"].as_str() == Some(NAMESPACE));
    ensure!(config["VEIL_ENCRYPTION"].as_str() == Some("wireguard"));
    ensure!(
        config.get("VEIL_CLUSTER_POD_CIDR").is_none(),
        "optional settings stay unset"
    );
    let role = rules(get(&docs, "Role", "veil-agent")?);
    ensure!(
        role.contains(&(
            "daemonsets".into(),
            vec!["get".into()],
            vec!["veil-agent".into()]
        )),
        "{role:?}"
    );
    ensure!(
        config["VEIL_POLICY_STATUS_LEASE"].as_str() == Some("veil-system/veil-policy-status"),
        "one Lease names the agent that writes policy status"
    );
    ensure!(
        role.contains(&(
            "leases".into(),
            vec!["get".into(), "update".into()],
            vec!["veil-policy-status".into()]
        )),
        "{role:?}"
    );
    let cluster = rules(get(&docs, "ClusterRole", "veil-agent")?);
    ensure!(
        cluster.contains(&("l7policies/status".into(), vec!["patch".into()], vec![])),
        "{cluster:?}"
    );
    let nodes = cluster
        .iter()
        .find(|(r, _, _)| r == "nodes")
        .context("no rule on nodes")?;
    ensure!(nodes.1 == ["get", "list", "watch", "patch"], "{nodes:?}");
    ensure!(
        cluster
            .iter()
            .all(|(r, _, _)| r != "secrets" && r != "configmaps"),
        "the agent reads no Secret and no ConfigMap cluster-wide: {cluster:?}"
    );
    let policy = get(&docs, "ValidatingAdmissionPolicy", "veil-node-annotations")?;
    ensure!(serde_yaml::to_string(policy)?.contains("system:serviceaccount:veil-system:veil-agent"));
    ensure!(
        pod["serviceAccountName"].as_str() == Some("veil-agent"),
        "the agent runs as the account the policy names"
    );

    // The issuer serves the agents' account, as namespace/name.
    let issuer = get(&docs, "Deployment", "veil-issuer")?;
    let env = &container(&issuer["spec"]["template"]["spec"], "containers", "issuer")?["env"];
    let agents = env
        .as_sequence()
        .and_then(|e| {
            e.iter()
                .find(|e| e["name"].as_str() == Some("VEIL_AGENT_SERVICE_ACCOUNTS"))
        })
        .context("VEIL_AGENT_SERVICE_ACCOUNTS not set")?;
    ensure!(agents["value"].as_str() == Some("veil-system/veil-agent"));
    let pdb = get(&docs, "PodDisruptionBudget", "veil-issuer")?;
    ensure!(
        pdb["spec"]["maxUnavailable"].as_i64() == Some(1)
            && pdb["spec"].get("minAvailable").is_none(),
        "a single issuer must not block node drains"
    );
    get(&docs, "Service", "veil-issuer")?;
    Ok(())
}

#[test]
fn e2e_chart_renders_without_encryption_or_identity() -> Result<()> {
    let docs = render(&["--set", "encryption=none"])?;
    let config = &get(&docs, "ConfigMap", "veil-agent")?["data"];
    ensure!(config["VEIL_ENCRYPTION"].as_str() == Some("none"));
    let pod = &get(&docs, "DaemonSet", "veil-agent")?["spec"]["template"]["spec"];
    ensure!(
        container(pod, "containers", "agent")?
            .get("ports")
            .is_none(),
        "no WireGuard port without WireGuard"
    );

    let docs = render(&["--set", "identity.enabled=false"])?;
    for (kind, name) in [
        ("Deployment", "veil-issuer"),
        ("Service", "veil-issuer"),
        ("ServiceAccount", "veil-issuer"),
        ("PodDisruptionBudget", "veil-issuer"),
    ] {
        ensure!(
            find(&docs, kind, name).is_none(),
            "{kind} {name} rendered with identity off"
        );
    }
    let config = &get(&docs, "ConfigMap", "veil-agent")?["data"];
    ensure!(
        config.get("VEIL_ISSUER_ADDRESS").is_none(),
        "identity off in the agent"
    );
    let pod = &get(&docs, "DaemonSet", "veil-agent")?["spec"]["template"]["spec"];
    ensure!(
        pod.get("hostPID").is_none(),
        "no host PID namespace without identity"
    );
    // Pods and policies are read for enforcement whether identity is on or not; reading
    // is all: no get (no single pod), no writes.
    let cluster = rules(get(&docs, "ClusterRole", "veil-agent")?);
    for resource in ["pods", "namespaces", "l7policies"] {
        ensure!(
            cluster
                .iter()
                .any(|(r, verbs, _)| r == resource && verbs == &["list", "watch"]),
            "{resource} read without identity: {cluster:?}"
        );
    }

    let docs = render(&[
        "--set",
        "agent.privileged=true",
        "--set",
        "clusterPodCIDR=10.244.0.0/16",
        "--set",
        "podMTU=1400",
    ])?;
    let config = &get(&docs, "ConfigMap", "veil-agent")?["data"];
    ensure!(config["VEIL_CLUSTER_POD_CIDR"].as_str() == Some("10.244.0.0/16"));
    ensure!(config["VEIL_POD_MTU"].as_str() == Some("1400"));
    let pod = &get(&docs, "DaemonSet", "veil-agent")?["spec"]["template"]["spec"];
    let security = &container(pod, "containers", "agent")?["securityContext"];
    ensure!(
        security["privileged"].as_bool() == Some(true),
        "the escape hatch"
    );
    Ok(())
}

/// `helm template` with `values` must fail, and its message must contain every `needles`.
fn refused(values: &str, needles: &[&str]) -> Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).with_context(|| format!("write {}", file.display()))?;
    let file = file.to_str().context("temporary path is not UTF-8")?;
    let out = template_raw(&["--values", file])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("helm template accepted {values:?}");
    }
    for needle in needles {
        ensure!(
            stderr.contains(needle),
            "the refusal of {values:?} does not name {needle:?}:\n{stderr}"
        );
    }
    Ok(())
}

#[test]
fn e2e_chart_schema_refuses_bad_values_naming_them() -> Result<()> {
    // A misspelt key would otherwise be ignored silently, leaving the default in force.
    refused(
        "agent:\n  serviceAcountName: mesh\n",
        &["serviceAcountName", "/agent"],
    )?;
    refused("encrytion: none\n", &["encrytion"])?;
    refused("encryption: rot13\n", &["/encryption", "wireguard"])?;
    refused(
        "wireguard:\n  keyRotation: 1w\n",
        &["/wireguard/keyRotation", "1w"],
    )?;
    refused(
        "clusterPodCIDR: 10.244.0.0/33\n",
        &["/clusterPodCIDR", "10.244.0.0/33"],
    )?;
    Ok(())
}

#[test]
fn e2e_chart_readme_has_no_drift() -> Result<()> {
    let script = repo().join("tests/scripts/helm-docs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .output()
        .with_context(|| format!("run {} --check", script.display()))?;
    ensure!(
        out.status.success(),
        "charts/veil/README.md differs from what helm-docs generates (run `bash tests/scripts/helm-docs.sh`):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
