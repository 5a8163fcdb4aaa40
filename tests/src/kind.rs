//! The end-to-end tier's cluster: a real kind cluster (one control-plane, two workers)
//! from the locally built node image, Veil installed by its Helm chart, the demo
//! workloads of `tests/kind/demo.yaml` running — all by `tests/kind/cluster.sh`, the same
//! script `make cluster` runs. Deleted when the handle drops, unless `VEIL_KIND_KEEP=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The kind cluster's name (its nodes are `veil-control-plane`, `veil-worker`, `veil-worker2`).
pub const CLUSTER: &str = "veil";
/// Where Veil is installed.
pub const NAMESPACE: &str = "veil-system";
/// The docker network (and bridge) the nodes share: everything between nodes crosses it.
pub const NETWORK: &str = "veil-kind";
/// The cluster's pod range.
pub const POD_CIDR: &str = "198.18.128.0/18";
/// The two workers, where the demo workloads run.
pub const WORKERS: [&str; 2] = ["veil-worker", "veil-worker2"];

/// A running kind cluster with Veil installed.
pub struct Kind {
    repo: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs `cmd`, failing with its output when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Kind {
    /// Brings the cluster up (or adopts a running one) with extra Helm values `helm_set`
    /// (comma-separated `key=value`, may be empty), and waits until all is Ready.
    pub fn up(helm_set: &str) -> Result<Kind> {
        let repo = repo();
        let dir = PathBuf::from(
            std::env::var("VEIL_KIND_DIR").unwrap_or_else(|_| "/var/tmp/veil-kind".into()),
        );
        let status = Command::new("bash")
            .arg(repo.join("tests/kind/cluster.sh"))
            .arg("up")
            .env("VEIL_KIND_DIR", &dir)
            .env("HELM_SET", helm_set)
            .status()
            .context("run tests/kind/cluster.sh up")?;
        if !status.success() {
            bail!("tests/kind/cluster.sh up failed ({status}); its output is above");
        }
        let kubeconfig = dir.join("kubeconfig");
        Ok(Kind {
            repo,
            dir,
            kubeconfig,
        })
    }

    /// The repository root (for the chart and manifests).
    pub fn repo(&self) -> &Path {
        &self.repo
    }

    /// The cluster's kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs kubectl (the one built with the pinned release) against the cluster.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(Command::new(crate::bins::kube("kubectl")?)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args))
    }

    /// `kubectl get -o json` parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).context("kubectl get output is not JSON")
    }

    /// Runs helm against the cluster, with the chart at `charts/veil` as `chart` argument
    /// where `args` says `CHART`.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let chart = self.repo.join("charts/veil");
        let chart = chart.to_string_lossy();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "CHART" { chart.as_ref() } else { *a })
            .collect();
        run(Command::new(crate::bins::tool("helm")?)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(&args))
    }

    /// Runs `cmd` inside a pod's first container.
    pub fn exec(&self, namespace: &str, pod: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["-n", namespace, "exec", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    /// Runs a shell command on a node (a kind node is a container on this machine).
    pub fn on_node(&self, node: &str, script: &str) -> Result<String> {
        run(Command::new(docker()).args(["exec", node, "bash", "-c", script]))
    }

    /// The cluster's nodes.
    pub fn nodes(&self) -> Result<Vec<String>> {
        let list = self.get_json(&["nodes"])?;
        Ok(list["items"]
            .as_array()
            .context("no items")?
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Waits until the agent DaemonSet has `want` Ready pods, all updated.
    pub fn wait_agents_ready(&self, want: u64, timeout: Duration) -> Result<()> {
        crate::eventually("agent DaemonSet Ready", timeout, || {
            let ds = self.get_json(&["-n", NAMESPACE, "daemonset", "veil-agent"])?;
            let status = &ds["status"];
            let ready = status["numberReady"].as_u64().unwrap_or(0);
            let updated = status["updatedNumberScheduled"].as_u64().unwrap_or(0);
            let desired = status["desiredNumberScheduled"].as_u64().unwrap_or(0);
            Ok((ready == want && updated == want && desired == want).then_some(()))
        })
    }
}

impl Drop for Kind {
    fn drop(&mut self) {
        if std::env::var("VEIL_KIND_KEEP").as_deref() == Ok("1") {
            eprintln!(
                "VEIL_KIND_KEEP=1: cluster kept; KUBECONFIG={}",
                self.kubeconfig.display()
            );
            return;
        }
        let status = Command::new("bash")
            .arg(self.repo.join("tests/kind/cluster.sh"))
            .arg("down")
            .env("VEIL_KIND_DIR", &self.dir)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("kind: cluster.sh down failed ({status:?}); `make cluster-down` removes it");
        }
    }
}

/// The docker client the scripts use.
pub fn docker() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// Follows the logs of every pod that appears in a namespace, from the moment it is seen
/// until it ends (also while it terminates), into one file: what the pods said during the
/// whole run, including pods that upgrades and uninstalls replaced.
pub struct LogCollector {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    file: PathBuf,
}

impl LogCollector {
    /// Starts following `namespace` into `file`.
    pub fn start(kind: &Kind, namespace: &str, file: PathBuf) -> Result<LogCollector> {
        let kubectl = crate::bins::kube("kubectl")?;
        let kubeconfig = kind.kubeconfig.clone();
        let namespace = namespace.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let out = std::fs::File::create(&file)?;
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut followed = std::collections::BTreeSet::new();
                let mut children = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let names = Command::new(&kubectl)
                        .arg("--kubeconfig")
                        .arg(&kubeconfig)
                        // Running only: logs -f of a pod still starting ends at once.
                        .args(["-n", &namespace, "get", "pods", "-o"])
                        .arg(r#"jsonpath={range .items[?(@.status.phase=="Running")]}pod/{.metadata.name}{"\n"}{end}"#)
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    for pod in names.lines().filter(|p| !p.is_empty()) {
                        if !followed.insert(pod.to_string()) {
                            continue;
                        }
                        let (Ok(stdout), Ok(stderr)) = (out.try_clone(), out.try_clone()) else {
                            continue;
                        };
                        let child = Command::new(&kubectl)
                            .arg("--kubeconfig")
                            .arg(&kubeconfig)
                            .args(["-n", &namespace, "logs", "-f", "--all-containers"])
                            .args(["--prefix", pod])
                            .stdout(stdout)
                            .stderr(stderr)
                            .spawn();
                        children.extend(child.ok());
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                for mut child in children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            })
        };
        Ok(LogCollector {
            stop,
            thread: Some(thread),
            file,
        })
    }

    /// Stops following and returns every line collected.
    pub fn stop(mut self) -> Result<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::fs::read_to_string(&self.file).with_context(|| format!("read {}", self.file.display()))
    }
}

impl Drop for LogCollector {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
