//! The test bed: control plane, underlay, nodes with agents, and pods made through CNI.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{
    Namespace, Node as KubeNode, Pod as KubePod, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;
use mesh_agent::admin::{self, AdminRequest, AdminResponse, PodInfo};
use mesh_agent::cni::protocol::{self, AgentRequest, AgentResponse};
use serde_json::json;

use crate::bins;
use crate::control_plane::{random_token, ControlPlane, Token, SERVICE_CIDR};
use crate::net::{ip, Bridge, Netns};
use crate::objects::{self, ServicePortSpec, Workload};
use crate::process::{eventually, Proc};

/// Nodes a bed can hold: each has an API token made before the API server starts.
pub const MAX_NODES: usize = 8;
/// Beds at once on one machine: each takes one /24 of the underlay range and eight /24s
/// of the pod range, below the Service range at 198.19.240.0/24.
const MAX_BEDS: u32 = 30;
/// How long an agent may take to serve after it starts (it waits for its Node first).
const AGENT_READY: Duration = Duration::from_secs(60);
/// How long kube-proxy may take to program what there is, from its start or from a
/// change (it syncs at most once a second by default; from its start to the first full
/// sync took ≈ 0.4 s here).
const KUBE_PROXY_READY: Duration = Duration::from_secs(60);

/// Prefix of the beds' eBPF pin directories under `/sys/fs/bpf` (`make clean-testbeds`
/// removes stale ones).
pub const BPF_PIN_PREFIX: &str = "veil-bed-";

/// The Lease that picks the one agent writing `L7Policy` status (the chart's name, in
/// namespace `default`).
pub const POLICY_STATUS_LEASE: &str = "default/veil-policy-status";

/// The shape of a bed.
#[derive(Debug, Clone)]
pub struct BedConfig {
    /// Nodes to start with.
    pub nodes: usize,
    /// Prefix length of each node's pod CIDR (24 by default; 28 for pool exhaustion).
    pub pod_prefix_len: u8,
    /// The agents' `--encryption` (`wireguard`, the default, or `none`).
    pub encryption: &'static str,
    /// Nodes also get an IPv6 underlay address (from the benchmarking range 2001:2::/48),
    /// and it is their Node's only InternalIP: node-to-node traffic crosses over IPv6.
    /// The API server stays on IPv4.
    pub ipv6_underlay: bool,
    /// Agents get `--cluster-pod-cidr` [`CLUSTER_POD_CIDR`] (the default); without it,
    /// strictness rests on the pod CIDRs each agent has seen.
    pub cluster_pod_cidr: bool,
    /// Every node also runs a real `kube-proxy` (iptables mode) in its namespace, as on
    /// kind and most clusters, and agents get `--service-cidr` as the chart gives it, so
    /// Services created with [`TestBed::create_service`] work. Off by default: it costs
    /// a process per node (≈ 0.4 s each to its first sync), and the tests that need no
    /// Services keep proving Veil's own paths with no other rules in the nodes' netfilter
    /// tables. IPv4 only: an IPv6-underlay bed gives kube-proxy an IPv6 primary family.
    pub kube_proxy: bool,
    /// The agents' `RUST_LOG`: debug for Veil by default (the tests' logs explain their
    /// failures); a benchmark runs them at `info`, as the chart does.
    pub agent_log: &'static str,
}

impl Default for BedConfig {
    fn default() -> Self {
        BedConfig {
            nodes: 2,
            pod_prefix_len: 24,
            encryption: "wireguard",
            ipv6_underlay: false,
            cluster_pod_cidr: true,
            kube_proxy: false,
            agent_log: "info,mesh_agent=debug",
        }
    }
}

/// The pod range of every bed (pod CIDRs are carved from it): agents drop traffic into
/// it that no known node covers rather than routing it in clear.
pub const CLUSTER_POD_CIDR: &str = "198.19.0.0/16";

/// A node: a network namespace on the underlay, a Node object, and a `mesh-agent`.
pub struct Node {
    /// The Node's name.
    pub name: String,
    /// Its IPv4 underlay address (the Node's InternalIP unless the bed is IPv6).
    pub ip: Ipv4Addr,
    /// Its IPv6 underlay address, in an IPv6 bed (then the Node's only InternalIP).
    pub ip6: Option<Ipv6Addr>,
    /// Its pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// Directory with its kubeconfig, agent state, socket and logs.
    pub dir: PathBuf,
    /// Extra arguments for its agent (see [`TestBed::set_agent_args`]).
    agent_args: Vec<String>,
    // Drop order: the agent and kube-proxy stop before their namespace goes.
    agent: Option<Proc>,
    kube_proxy: Option<Proc>,
    /// The node's namespace.
    pub netns: Netns,
}

impl Node {
    /// The address other nodes reach it at: its Node's InternalIP.
    pub fn internal_ip(&self) -> IpAddr {
        self.ip6.map_or(IpAddr::V4(self.ip), IpAddr::V6)
    }

    /// Where its agent pins eBPF maps and links: its own directory, since bpffs is shared
    /// by every namespace of the machine.
    pub fn bpf_pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{BPF_PIN_PREFIX}{}", self.netns.name()))
    }

    /// The agent's CNI socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    /// The agent's admin socket (`meshctl`).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts `cmd` (`name`) in the node's namespace (its agent, kube-proxy, a benchmark's proxy),
    /// logging to `<log>-<n>.log` in [`Node::dir`], a new number per start.
    pub fn spawn_daemon(&self, name: &str, log: &str, cmd: Command) -> Result<Proc> {
        let prefix = format!("{log}-");
        let n = next_log_number(&self.dir, &prefix);
        Proc::spawn(
            &format!("{name} {}", self.name),
            cmd,
            &self.dir.join(format!("{prefix}{n}.log")),
            Some(&self.netns.path()),
        )
    }

    /// Runs the real `curl` in the node's own namespace, as the kubelet or a host-network
    /// pod would connect: see [`Pod::curl`].
    pub fn curl(&self, args: &[&str]) -> Result<HttpReply> {
        curl_in(
            &self.netns,
            &format!("node {} ({})", self.name, self.ip),
            args,
        )
    }

    /// The network configuration a runtime on this node hands `mesh-cni`.
    pub fn netconf(&self) -> String {
        json!({
            "cniVersion": "1.0.0",
            "name": "veil",
            "type": "mesh-cni",
            "agentSocket": self.socket(),
        })
        .to_string()
    }
}

/// One invocation of `mesh-cni`, as a runtime makes it.
#[derive(Debug, Clone, Default)]
pub struct CniCall {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`; `None` leaves it unset.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// stdin; the node's network configuration when `None`.
    pub stdin: Option<Vec<u8>>,
}

/// What `mesh-cni` did.
#[derive(Debug, Clone)]
pub struct CniOutput {
    /// Exit status was zero.
    pub success: bool,
    /// stdout.
    pub stdout: String,
    /// stdout parsed, when it was JSON.
    pub json: Option<serde_json::Value>,
}

impl CniOutput {
    /// The error code of a failed call.
    pub fn error_code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }

    /// The error message of a failed call.
    pub fn error_msg(&self) -> String {
        self.json
            .as_ref()
            .and_then(|j| j.get("msg"))
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string()
    }
}

/// A pod: a network namespace given its interface by `mesh-cni` on one node.
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Its Kubernetes namespace (`K8S_POD_NAMESPACE`).
    pub namespace: String,
    /// Index of the node it runs on.
    pub node: usize,
    /// `CNI_CONTAINERID` it was added with.
    pub container_id: String,
    /// Its address, from the ADD result.
    pub ip: Ipv4Addr,
    /// The ADD result.
    pub result: serde_json::Value,
    /// Where the logs of processes it runs go.
    pub log_dir: PathBuf,
    /// Its namespace.
    pub netns: Netns,
}

/// An HTTP answer `curl` got.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (`veil-echo` answers one JSON object).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(self.body.trim())
            .with_context(|| format!("body is not JSON: {}", self.body))
    }

    /// The address in `peer` (`ip:port`) of a `veil-echo` answer: who the server saw.
    pub fn peer_ip(&self) -> Result<Ipv4Addr> {
        let json = self.json()?;
        let peer = json["peer"].as_str().unwrap_or_default();
        let (ip, _port) = peer
            .rsplit_once(':')
            .with_context(|| format!("peer is not ip:port: {json}"))?;
        ip.parse().with_context(|| format!("peer {peer}: {json}"))
    }
}

/// Runs the real `curl` in `netns` (`who` names it in errors) with `args`: see [`Pod::curl`].
fn curl_in(netns: &Netns, who: &str, args: &[&str]) -> Result<HttpReply> {
    let write_out = format!("{CURL_STATUS_MARK}%{{http_code}}");
    let mut argv = vec![
        "curl",
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "--write-out",
        &write_out,
    ];
    argv.extend_from_slice(args);
    let out = netns.exec(&argv)?;
    if !out.status.success() {
        bail!(
            "curl {} from {who}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, status) = stdout
        .rsplit_once(CURL_STATUS_MARK)
        .ok_or_else(|| anyhow!("curl printed no status: {stdout}"))?;
    Ok(HttpReply {
        status: status.trim().parse()?,
        body: body.to_string(),
    })
}

/// What `curl --write-out` prints after the body, so the status can be split off.
const CURL_STATUS_MARK: &str = "\n--veil-http-status:";

/// How long a server started in a pod may take to listen.
const SERVER_READY: Duration = Duration::from_secs(20);

impl Pod {
    /// Starts `argv` (a program path or a name on PATH, and its arguments) inside the
    /// pod's network namespace, with `POD_NAME` and `POD_NAMESPACE` set as the downward
    /// API would; output to `<name>.log` in [`Pod::log_dir`]. Killed when dropped.
    pub fn spawn(&self, name: &str, argv: &[&str]) -> Result<Proc> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("spawn {name} in {}: empty argv", self.name))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("POD_NAME", &self.name)
            .env("POD_NAMESPACE", &self.namespace);
        Proc::spawn(
            &format!("{name} in pod {}", self.name),
            cmd,
            &self.log_dir.join(format!("{name}.log")),
            Some(&self.netns.path()),
        )
    }

    /// Starts `veil-echo` on `0.0.0.0:port` in the pod and returns once it accepts
    /// connections on the pod's address.
    pub fn serve_echo(&self, port: u16) -> Result<Proc> {
        let echo = bins::veil("veil-echo")?;
        let listen = format!("0.0.0.0:{port}");
        let mut server = self.spawn(
            &format!("veil-echo-{port}"),
            &[&echo.to_string_lossy(), "--listen", &listen],
        )?;
        self.wait_listening(port, Some(&mut server))?;
        Ok(server)
    }

    /// Waits until something accepts TCP connections on the pod's address at `port`
    /// (failing at once if `server`, when given, has exited).
    pub fn wait_listening(&self, port: u16, mut server: Option<&mut Proc>) -> Result<()> {
        let dst = SocketAddr::from((self.ip, port));
        let what = format!("{} listening on {dst}", self.name);
        eventually(&what, SERVER_READY, || {
            if let Some(server) = server.as_deref_mut() {
                server.check_running()?;
            }
            let connected = self
                .netns
                .spawn(move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok()))
                .join()
                .map_err(|_| anyhow!("probe thread panicked"))??;
            Ok(connected.then_some(()))
        })
    }

    /// Runs `argv` inside the pod's network namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Result<std::process::Output> {
        self.netns.exec(argv)
    }

    /// [`Pod::curl`], retried for up to 15 s while the connection itself fails (the first
    /// packet to a peer node may wait for its WireGuard handshake); any HTTP answer is
    /// returned as it is.
    pub fn curl_until_connected(&self, args: &[&str]) -> Result<HttpReply> {
        eventually(
            &format!("{} curl {args:?}", self.name),
            Duration::from_secs(15),
            || Ok(Some(self.curl(args)?)),
        )
    }

    /// Runs the real `curl` in the pod with `args` (URL and options: `--http2-prior-knowledge`,
    /// `-H`, …; 10 s at most, no proxy from the environment) and returns the status and
    /// body; fails when curl does (connection refused, timeout), with its message.
    pub fn curl(&self, args: &[&str]) -> Result<HttpReply> {
        curl_in(&self.netns, &format!("{} ({})", self.name, self.ip), args)
    }

    /// Pings `dst` from the pod (3 tries, 1 s apart at most).
    pub fn ping(&self, dst: Ipv4Addr) -> Result<()> {
        let out = self
            .netns
            .exec(&["ping", "-c", "1", "-W", "1", "-w", "3", &dst.to_string()])?;
        if !out.status.success() {
            bail!(
                "ping {dst} from {} ({}): {} {}",
                self.name,
                self.ip,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Listens on `port` and returns, once bound, a handle that yields all bytes of the
    /// first connection.
    pub fn tcp_receive_once(&self, port: u16) -> Result<JoinHandle<Result<Vec<u8>>>> {
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let handle = self.netns.spawn(move || {
            let listener = TcpListener::bind(("0.0.0.0", port))?;
            bound_tx.send(()).ok();
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            Ok(data)
        });
        bound_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("listener in {} did not bind port {port}", self.name))?;
        Ok(handle)
    }

    /// Connects to `dst` and sends `payload`.
    pub fn tcp_send(&self, dst: SocketAddr, payload: Vec<u8>) -> Result<()> {
        self.netns
            .spawn(move || {
                let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                    .with_context(|| format!("connect {dst}"))?;
                // A black-holed path fails the test instead of hanging it.
                stream.set_write_timeout(Some(Duration::from_secs(30)))?;
                stream
                    .write_all(&payload)
                    .with_context(|| format!("send {} bytes to {dst}", payload.len()))?;
                stream.shutdown(std::net::Shutdown::Write)?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow!("sender thread panicked"))?
    }
}

static BEDS_IN_PROCESS: AtomicU32 = AtomicU32::new(0);

/// A running test cluster.
pub struct TestBed {
    /// This bed's number: its underlay is `198.18.<index>.0/24`.
    pub index: u32,
    // Drop order: nodes, then the underlay, then the control plane, then the files.
    nodes: Vec<Node>,
    underlay: Bridge,
    control_plane: ControlPlane,
    /// An admin client for the bed's API server.
    pub client: kube::Client,
    rt: tokio::runtime::Runtime,
    agent_tokens: Vec<Token>,
    kube_proxy_token: Token,
    config: BedConfig,
    _data: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent first: its pins are only removed once nothing uses them.
        drop(self.agent.take());
        if let Err(e) = mesh_agent::redirect::Redirect::unpin_all(&self.bpf_pin_dir()) {
            eprintln!("node {}: eBPF pins left: {e}", self.name);
        }
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs of a failed test; the directory holds no processes or devices.
            let kept =
                std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("temp dir"))
                    .keep();
            eprintln!("test bed {}: logs kept in {}", self.index, kept.display());
        }
    }
}

impl TestBed {
    /// Starts a bed with `config.nodes` nodes, each with a running agent.
    pub fn start(config: BedConfig) -> Result<TestBed> {
        crate::require_root();
        assert!(
            config.nodes <= MAX_NODES,
            "a bed holds at most {MAX_NODES} nodes"
        );
        let (index, underlay) = claim_index()?;
        let gateway = Ipv4Addr::new(198, 18, index as u8, 1);
        ip(&[
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            underlay.name(),
        ])?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("veil-bed{index}-"))
            .tempdir()?;
        // etcd syncs every write; on tmpfs that costs nothing.
        let data = tempfile::Builder::new()
            .prefix("veil-etcd-")
            .tempdir_in(shm_or_tmp())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let agent_tokens: Vec<Token> = (0..MAX_NODES)
            .map(|i| Token {
                token: random_token("agent"),
                user: format!("veil-agent:{}", node_name(i)),
                groups: vec!["veil:agents".into()],
            })
            .collect();
        // The user kubeadm gives kube-proxy: the built-in ClusterRoleBinding
        // `system:node-proxier` grants it what kube-proxy reads and writes.
        let kube_proxy_token = Token {
            token: random_token("kube-proxy"),
            user: "system:kube-proxy".into(),
            groups: Vec::new(),
        };
        let tokens: Vec<Token> = agent_tokens
            .iter()
            .chain([&kube_proxy_token])
            .cloned()
            .collect();
        let control_plane = ControlPlane::start(dir.path(), data.path(), gateway, &tokens, &rt)?;
        let client = control_plane.client(&rt, &control_plane.admin.token)?;
        let mut bed = TestBed {
            index,
            nodes: Vec::new(),
            underlay,
            control_plane,
            client,
            rt,
            agent_tokens,
            kube_proxy_token,
            config: config.clone(),
            _data: data,
            dir,
        };
        std::fs::write(
            bed.admin_kubeconfig(),
            bed.control_plane.kubeconfig(&bed.control_plane.admin.token),
        )?;
        bed.grant_agents()?;
        bed.install_crds()?;
        for _ in 0..config.nodes {
            bed.add_node()?;
        }
        Ok(bed)
    }

    /// Runs a future on the bed's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A client with the bed's admin credentials.
    pub fn admin_client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A client that authenticates with `token` (e.g. a ServiceAccount token).
    pub fn client_with_token(&self, token: &str) -> Result<kube::Client> {
        self.control_plane.client(&self.rt, token)
    }

    /// The bed's control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The bed's directory (logs, kubeconfigs, agent state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig with admin rights on the bed's API server (for `kubectl`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// How many nodes the bed has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Installs the chart's CRDs (as `helm install` does, before anything else) and waits
    /// until the API server serves them.
    fn install_crds(&self) -> Result<()> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/veil/crds/l7policy.yaml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let name = crd.metadata.name.clone().context("the CRD has a name")?;
        let crds = Api::<CustomResourceDefinition>::all(self.client.clone());
        self.block_on(crds.create(&PostParams::default(), &crd))
            .with_context(|| format!("install {}", path.display()))?;
        eventually("CRD established", Duration::from_secs(30), || {
            let crd = self.block_on(crds.get(&name))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        })
    }

    /// The agents' permissions, as the chart grants them: read Nodes, Pods, Namespaces and
    /// L7Policies.
    fn grant_agents(&self) -> Result<()> {
        let role = ClusterRole {
            metadata: ObjectMeta {
                name: Some("veil-agent".into()),
                ..Default::default()
            },
            rules: Some(vec![
                PolicyRule {
                    api_groups: Some(vec!["".into()]),
                    resources: Some(vec!["nodes".into()]),
                    verbs: vec!["get".into(), "list".into(), "watch".into(), "patch".into()],
                    ..Default::default()
                },
                PolicyRule {
                    api_groups: Some(vec!["".into()]),
                    resources: Some(vec![
                        "pods".into(),
                        "namespaces".into(),
                        "serviceaccounts".into(),
                    ]),
                    verbs: vec!["get".into(), "list".into(), "watch".into()],
                    ..Default::default()
                },
                PolicyRule {
                    api_groups: Some(vec!["veil.dev".into()]),
                    resources: Some(vec!["l7policies".into()]),
                    verbs: vec!["list".into(), "watch".into()],
                    ..Default::default()
                },
                PolicyRule {
                    api_groups: Some(vec!["veil.dev".into()]),
                    resources: Some(vec!["l7policies/status".into()]),
                    verbs: vec!["patch".into()],
                    ..Default::default()
                },
                PolicyRule {
                    api_groups: Some(vec!["coordination.k8s.io".into()]),
                    resources: Some(vec!["leases".into()]),
                    verbs: vec!["get".into(), "create".into(), "update".into()],
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some("veil-agent".into()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "veil-agent".into(),
            },
            subjects: Some(vec![Subject {
                kind: "Group".into(),
                name: "veil:agents".into(),
                api_group: Some("rbac.authorization.k8s.io".into()),
                ..Default::default()
            }]),
        };
        self.block_on(async {
            Api::<ClusterRole>::all(self.client.clone())
                .create(&PostParams::default(), &role)
                .await?;
            Api::<ClusterRoleBinding>::all(self.client.clone())
                .create(&PostParams::default(), &binding)
                .await?;
            anyhow::Ok(())
        })
    }

    /// Adds a node: namespace on the underlay, Node object, running agent. Returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let i = self.add_bare_node()?;
        self.start_agent(i)?;
        if self.config.kube_proxy {
            self.start_kube_proxy(i)?;
        }
        Ok(i)
    }

    /// Adds a node without an agent: namespace on the underlay and Node object, for tests
    /// that put something else there (a wireguard-go peer, say). Returns its index.
    pub fn add_bare_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        assert!(i < MAX_NODES, "a bed holds at most {MAX_NODES} nodes");
        let name = node_name(i);
        let k = self.index;
        let netns = Netns::create(&format!("veil{k}n{i}"))?;
        let uplink = format!("veil{k}u{i}");
        let _ = ip(&["link", "del", &uplink]);
        ip(&[
            "link",
            "add",
            &uplink,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        ip(&["link", "set", &uplink, "master", self.underlay.name(), "up"])?;
        let node_ip = Ipv4Addr::new(198, 18, k as u8, 10 + i as u8);
        netns.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
        let ip6 = self
            .config
            .ipv6_underlay
            .then(|| Ipv6Addr::new(0x2001, 2, 0, k as u16, 0, 0, 0, 10 + i as u16));
        if let Some(ip6) = ip6 {
            // nodad: usable at once, not after duplicate address detection's second or two.
            netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        }
        netns.ip(&["link", "set", "eth0", "up"])?;
        let pod_cidr = Ipv4Net::new(
            Ipv4Addr::new(198, 19, ((k - 1) * 8 + i as u32) as u8, 0),
            self.config.pod_prefix_len,
        )?;
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("kubeconfig"),
            self.control_plane.kubeconfig(&self.agent_tokens[i].token),
        )?;
        let internal_ip = ip6.map_or(IpAddr::V4(node_ip), IpAddr::V6);
        self.create_node_object(&name, pod_cidr, internal_ip)?;
        self.nodes.push(Node {
            name,
            ip: node_ip,
            ip6,
            pod_cidr,
            dir,
            agent_args: Vec::new(),
            agent: None,
            kube_proxy: None,
            netns,
        });
        Ok(i)
    }

    /// The underlay bridge's name (capture here to see what crosses between nodes).
    pub fn underlay(&self) -> &str {
        self.underlay.name()
    }

    /// Sets (`Some`) or removes (`None`) an annotation on node `i`'s Node object.
    pub fn annotate_node(&self, i: usize, key: &str, value: Option<&str>) -> Result<()> {
        let name = self.nodes[i].name.clone();
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.block_on(async {
            Api::<KubeNode>::all(self.client.clone())
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            anyhow::Ok(())
        })
    }

    /// An annotation of node `i`'s Node object.
    pub fn node_annotation(&self, i: usize, key: &str) -> Result<Option<String>> {
        let name = self.nodes[i].name.clone();
        let node = self.block_on(Api::<KubeNode>::all(self.client.clone()).get(&name))?;
        Ok(node.metadata.annotations.and_then(|a| a.get(key).cloned()))
    }

    /// Asks node `i`'s agent on its admin socket; fails on an error answer.
    pub fn ask_agent(&self, i: usize, request: AdminRequest) -> Result<AdminResponse> {
        match admin::call(
            &self.nodes[i].admin_socket(),
            &request,
            Duration::from_secs(30),
        ) {
            Ok(AdminResponse::Failed { error }) => bail!("{error}"),
            Ok(answer) => Ok(answer),
            Err(e) => bail!("{e}"),
        }
    }

    /// Creates a Node object with `pod_cidr` and InternalIP `node_ip` (no namespace, no
    /// agent: the bed's nodes get theirs through [`TestBed::add_node`]).
    pub fn create_node_object(&self, name: &str, pod_cidr: Ipv4Net, node_ip: IpAddr) -> Result<()> {
        let node: KubeNode = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": pod_cidr.to_string(), "podCIDRs": [pod_cidr.to_string()]},
        }))?;
        self.block_on(async {
            let nodes = Api::<KubeNode>::all(self.client.clone());
            nodes.create(&PostParams::default(), &node).await?;
            let status = json!({"status": {"addresses": [
                {"type": "InternalIP", "address": node_ip.to_string()},
                {"type": "Hostname", "address": name},
            ]}});
            nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            anyhow::Ok(())
        })
    }

    /// Deletes node `i`'s Node object (its namespace and agent stay until the bed drops).
    pub fn delete_node_object(&self, i: usize) -> Result<()> {
        let name = self.nodes[i].name.clone();
        self.block_on(async {
            Api::<KubeNode>::all(self.client.clone())
                .delete(&name, &Default::default())
                .await?;
            anyhow::Ok(())
        })
    }

    /// Extra arguments for node `i`'s agent from its next start on (e.g. identity flags);
    /// with [`TestBed::add_bare_node`] they apply from the first start.
    pub fn set_agent_args(&mut self, i: usize, args: Vec<String>) {
        self.nodes[i].agent_args = args;
    }

    /// Starts node `i`'s agent and waits until it answers on its socket.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(bins::veil("mesh-agent")?);
        cmd.arg("--node-name")
            .arg(&node.name)
            .arg("--kubeconfig")
            .arg(node.dir.join("kubeconfig"))
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--cni-socket")
            .arg(node.socket())
            .arg("--admin-socket")
            .arg(node.admin_socket())
            .arg("--policy-status-lease")
            .arg(POLICY_STATUS_LEASE)
            .arg("--bpf-pin-dir")
            .arg(node.bpf_pin_dir())
            .arg("--encryption")
            .arg(self.config.encryption)
            .args(
                self.config
                    .cluster_pod_cidr
                    .then_some(["--cluster-pod-cidr", CLUSTER_POD_CIDR])
                    .into_iter()
                    .flatten(),
            )
            .args(
                self.config
                    .kube_proxy
                    .then_some(["--service-cidr", SERVICE_CIDR])
                    .into_iter()
                    .flatten(),
            )
            .args(&node.agent_args)
            .env("RUST_LOG", self.config.agent_log)
            .env("RUST_BACKTRACE", "0");
        let agent = node.spawn_daemon("mesh-agent", "agent", cmd)?;
        let socket = node.socket();
        let what = format!("agent on {} serving", node.name);
        self.nodes[i].agent = Some(agent);
        let agent = self.nodes[i].agent.as_mut().expect("just set");
        eventually(&what, AGENT_READY, || {
            agent.check_running()?;
            Ok(matches!(
                protocol::call(&socket, &AgentRequest::Status, Duration::from_secs(2)),
                Ok(AgentResponse::Done)
            )
            .then_some(()))
        })
    }

    /// Starts a real `kube-proxy` (iptables mode) in node `i`'s namespace and waits until
    /// it has programmed the Services there are (at least the API server's own,
    /// `default/kubernetes`). It authenticates as `system:kube-proxy`, the user the
    /// built-in ClusterRoleBinding `system:node-proxier` serves, and logs to
    /// `kube-proxy-<n>.log` in the node's directory. Stopped with the node.
    pub fn start_kube_proxy(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let kubeconfig = node.dir.join("kube-proxy.kubeconfig");
        std::fs::write(
            &kubeconfig,
            self.control_plane.kubeconfig(&self.kube_proxy_token.token),
        )?;
        let mut cmd = Command::new(bins::kube("kube-proxy")?);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hostname-override={}", node.name))
            .arg("--proxy-mode=iptables")
            // What it takes for a pod source to be "local": traffic from outside the range
            // (the node itself, say) to a ClusterIP is masqueraded, pods' is not.
            .arg(format!("--cluster-cidr={}", self.pod_range()))
            // nf_conntrack_max and the conntrack hash size are global (the host's
            // namespace alone may write them): leave them. The TCP timeouts are per
            // namespace, but kind leaves them too, and so does the bed: kube-proxy then
            // writes no conntrack sysctl at all.
            .arg("--conntrack-max-per-core=0")
            .arg("--conntrack-tcp-timeout-established=0")
            .arg("--conntrack-tcp-timeout-close-wait=0")
            // Its default (-999) needs CAP_SYS_RESOURCE, which this host's bounding set
            // may lack; and a test's daemon is no more precious than the test.
            .arg("--oom-score-adj=0")
            // NodePorts on the node's InternalIP only (upstream's recommendation): no
            // localhost NodePorts, so no route_localnet either.
            .arg("--nodeport-addresses=primary")
            .arg("--v=2");
        let proc = node.spawn_daemon("kube-proxy", "kube-proxy", cmd)?;
        let what = format!("kube-proxy on {} synced", node.name);
        self.nodes[i].kube_proxy = Some(proc);
        let node = &mut self.nodes[i];
        let proc = node.kube_proxy.as_mut().expect("just set");
        eventually(&what, KUBE_PROXY_READY, || {
            proc.check_running()?;
            Ok(iptables_save(&node.netns)?
                .contains(KUBERNETES_SERVICE_RULE)
                .then_some(()))
        })
    }

    /// Stops node `i`'s kube-proxy (its rules stay, as on a real node).
    pub fn stop_kube_proxy(&mut self, i: usize) {
        if let Some(mut proc) = self.nodes[i].kube_proxy.take() {
            proc.stop(Duration::from_secs(10));
        }
    }

    /// Node `i`'s iptables rules, every table (`iptables-save`).
    pub fn iptables(&self, i: usize) -> Result<String> {
        iptables_save(&self.nodes[i].netns)
    }

    /// The range every pod of this bed has its address from (the nodes' pod CIDRs are
    /// carved from it): kube-proxy's `--cluster-cidr`.
    pub fn pod_range(&self) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(198, 19, ((self.index - 1) * 8) as u8, 0), 21)
            .expect("a valid prefix")
    }

    /// Stops node `i`'s agent (SIGTERM).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut agent) = self.nodes[i].agent.take() {
            agent.stop(Duration::from_secs(10));
        }
    }

    /// Restarts node `i`'s agent.
    pub fn restart_agent(&mut self, i: usize) -> Result<()> {
        self.stop_agent(i);
        self.start_agent(i)
    }

    /// Node `i`'s agent process, if running.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].agent.as_ref().map(|a| a.pid())
    }

    /// Fails when node `i`'s agent is not running.
    pub fn check_agent(&mut self, i: usize) -> Result<()> {
        self.nodes[i]
            .agent
            .as_mut()
            .ok_or_else(|| anyhow!("agent {i} is stopped"))?
            .check_running()
    }

    /// The pods node `i`'s agent reports.
    pub fn agent_pods(&self, i: usize) -> Result<Vec<PodInfo>> {
        match self.ask_agent(i, AdminRequest::Pods)? {
            AdminResponse::Pods { pods } => Ok(pods),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Runs `mesh-cni` for node `i` with a clean environment, as a runtime does.
    pub fn cni(&self, i: usize, call: &CniCall) -> Result<CniOutput> {
        let mut cmd = Command::new(bins::veil("mesh-cni")?);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", &call.command)
            .env("CNI_CONTAINERID", &call.container_id)
            .env("CNI_IFNAME", &call.ifname)
            .env("CNI_ARGS", &call.args)
            .env(
                "CNI_PATH",
                bins::veil("mesh-cni")?.parent().unwrap_or(Path::new("/")),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = &call.netns {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd.spawn().context("run mesh-cni")?;
        let stdin = call
            .stdin
            .clone()
            .unwrap_or_else(|| self.nodes[i].netconf().into_bytes());
        child.stdin.take().expect("piped").write_all(&stdin)?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(CniOutput {
            success: out.status.success(),
            json: serde_json::from_str(stdout.trim()).ok(),
            stdout,
        })
    }

    /// Creates a pod on node `i` in Kubernetes namespace `default` and runs CNI ADD for it.
    pub fn add_pod(&self, i: usize, name: &str) -> Result<Pod> {
        self.add_pod_in(i, "default", name)
    }

    /// Creates a pod `ns/name` on node `i` and runs CNI ADD for it (no Pod object: see
    /// [`TestBed::add_workload`]). Pod names are unique within a bed, whatever the namespace.
    pub fn add_pod_in(&self, i: usize, ns: &str, name: &str) -> Result<Pod> {
        let netns = Netns::create(&format!("veil{}p-{name}", self.index))?;
        let container_id = format!("{name}-{}", self.index);
        let log_dir = self.dir.path().join("pods").join(name);
        std::fs::create_dir_all(&log_dir)?;
        let out = self.cni(
            i,
            &CniCall {
                command: "ADD".into(),
                container_id: container_id.clone(),
                netns: Some(netns.path()),
                ifname: "eth0".into(),
                args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
                stdin: None,
            },
        )?;
        if !out.success {
            bail!(
                "CNI ADD for pod {name} on {} failed: {}",
                self.nodes[i].name,
                out.stdout
            );
        }
        let result = out
            .json
            .ok_or_else(|| anyhow!("ADD printed no JSON: {}", out.stdout))?;
        let address = result["ips"][0]["address"]
            .as_str()
            .ok_or_else(|| anyhow!("ADD result has no address: {result}"))?;
        let ip = address.parse::<Ipv4Net>()?.addr();
        Ok(Pod {
            name: name.to_string(),
            namespace: ns.to_string(),
            node: i,
            container_id,
            ip,
            result,
            log_dir,
            netns,
        })
    }

    /// Creates Namespace `name` with `labels`.
    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let ns = objects::namespace(name, labels);
        self.block_on(
            Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns),
        )
        .with_context(|| format!("create Namespace {name}"))?;
        Ok(())
    }

    /// Creates ServiceAccount `ns/name` unless it exists (no controller manager runs in
    /// the bed to make `default`, and pods cannot be created for a missing one).
    pub fn ensure_service_account(&self, ns: &str, name: &str) -> Result<()> {
        let sa = ServiceAccount {
            metadata: objects::meta(name, Some(ns)),
            ..Default::default()
        };
        match self.block_on(
            Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
                .create(&PostParams::default(), &sa),
        ) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("create ServiceAccount {ns}/{name}")),
        }
    }

    /// A workload pod, as a kubelet makes one: the Pod object `w.namespace/name` bound to
    /// node `i` (labels, ServiceAccount, named ports), the pod's network through CNI ADD,
    /// then the object's status (Running, `podIP`) through the status subresource.
    pub fn add_workload(&self, i: usize, name: &str, w: &Workload) -> Result<Pod> {
        self.create_workload_object(i, name, w)?;
        let pod = self.add_pod_in(i, &w.namespace, name)?;
        self.set_pod_running(&pod)?;
        Ok(pod)
    }

    /// The Pod object for bed pod `pod` (made by [`TestBed::add_pod_in`]) as
    /// [`TestBed::add_workload`] writes it; `w.namespace` must be the pod's.
    pub fn create_pod_object(&self, pod: &Pod, w: &Workload) -> Result<KubePod> {
        if w.namespace != pod.namespace {
            bail!(
                "pod {} is in namespace {}, not {}",
                pod.name,
                pod.namespace,
                w.namespace
            );
        }
        self.create_workload_object(pod.node, &pod.name, w)?;
        self.set_pod_running(pod)
    }

    /// The Pod object `w.namespace/name` bound to node `i`, its ServiceAccount made first.
    fn create_workload_object(&self, i: usize, name: &str, w: &Workload) -> Result<()> {
        self.ensure_service_account(&w.namespace, &w.service_account)?;
        let object = objects::workload_pod(name, &self.nodes[i].name, w);
        let pods = Api::<KubePod>::namespaced(self.client.clone(), &w.namespace);
        self.block_on(pods.create(&PostParams::default(), &object))
            .with_context(|| format!("create Pod {}/{name}", w.namespace))?;
        Ok(())
    }

    /// Deletes `pod`'s Pod object at once (no kubelet confirms a graceful deletion here),
    /// then runs CNI DEL and removes its namespace, as a kubelet would. Rewrite the
    /// EndpointSlices of Services that selected it ([`TestBed::write_endpoint_slices`]).
    pub fn delete_workload(&self, pod: Pod) -> Result<()> {
        let pods = Api::<KubePod>::namespaced(self.client.clone(), &pod.namespace);
        let now = kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        self.block_on(pods.delete(&pod.name, &now))
            .with_context(|| format!("delete Pod {}/{}", pod.namespace, pod.name))?;
        self.delete_pod(pod)
    }

    /// Writes a kubelet's status for `pod`'s object: Running at its address.
    pub fn set_pod_running(&self, pod: &Pod) -> Result<KubePod> {
        let pods = Api::<KubePod>::namespaced(self.client.clone(), &pod.namespace);
        self.block_on(pods.patch_status(
            &pod.name,
            &PatchParams::default(),
            &Patch::Merge(objects::running_status(pod.ip)),
        ))
        .with_context(|| format!("write status of Pod {}/{}", pod.namespace, pod.name))
    }

    /// Creates a ClusterIP Service `ns/name` over the pods `selector` matches, writes its
    /// EndpointSlices (see [`TestBed::write_endpoint_slices`]) and, with kube-proxy on,
    /// waits until every node's kube-proxy has programmed it. Returns the Service, its
    /// `clusterIP` set ([`objects::cluster_ip`]).
    pub fn create_service(
        &self,
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[ServicePortSpec],
    ) -> Result<Service> {
        let svc = objects::cluster_ip_service(ns, name, selector, ports);
        let svc = self
            .block_on(
                Api::<Service>::namespaced(self.client.clone(), ns)
                    .create(&PostParams::default(), &svc),
            )
            .with_context(|| format!("create Service {ns}/{name}"))?;
        self.write_endpoint_slices(ns, name)?;
        Ok(svc)
    }

    /// Writes the EndpointSlices of Service `ns/name` from the Pod objects there are now,
    /// as the EndpointSlice controller would (the bed runs no kube-controller-manager):
    /// call it again after pods come or go. With kube-proxy on, returns once every node's
    /// kube-proxy has programmed exactly these endpoints.
    pub fn write_endpoint_slices(&self, ns: &str, name: &str) -> Result<()> {
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), ns);
        let ours = format!(
            "kubernetes.io/service-name={name},endpointslice.kubernetes.io/managed-by={}",
            objects::ENDPOINT_SLICE_MANAGER
        );
        let want = self.block_on(async {
            let svc = Api::<Service>::namespaced(self.client.clone(), ns)
                .get(name)
                .await?;
            let pods = Api::<KubePod>::namespaced(self.client.clone(), ns)
                .list(&Default::default())
                .await?;
            let want = objects::endpoint_slices(&svc, &pods.items);
            let apply = PatchParams::apply(objects::ENDPOINT_SLICE_MANAGER).force();
            for slice in &want {
                let slice_name = slice.metadata.name.clone().unwrap_or_default();
                let mut body = serde_json::to_value(slice)?;
                body["apiVersion"] = json!("discovery.k8s.io/v1");
                body["kind"] = json!("EndpointSlice");
                slices
                    .patch(&slice_name, &apply, &Patch::Apply(&body))
                    .await
                    .with_context(|| format!("apply EndpointSlice {ns}/{slice_name}"))?;
            }
            let keep: Vec<Option<String>> = want.iter().map(|s| s.metadata.name.clone()).collect();
            for old in slices.list(&ListParams::default().labels(&ours)).await? {
                if !keep.contains(&old.metadata.name) {
                    let old_name = old.metadata.name.unwrap_or_default();
                    slices.delete(&old_name, &Default::default()).await?;
                }
            }
            anyhow::Ok(want)
        })?;
        // kube-proxy's comments on its rules: "<ns>/<svc>:<port> -> <ip>:<port>".
        let want: BTreeSet<String> = want
            .iter()
            .flat_map(|slice| {
                let ports = slice.ports.clone().unwrap_or_default();
                slice.endpoints.iter().flat_map(move |e| {
                    let ports = ports.clone();
                    e.addresses.clone().into_iter().flat_map(move |ip| {
                        ports.clone().into_iter().map(move |p| {
                            format!(
                                "{ns}/{name}:{} -> {ip}:{}",
                                p.name.unwrap_or_default(),
                                p.port.unwrap_or_default()
                            )
                        })
                    })
                })
            })
            .collect();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.kube_proxy.is_none() {
                continue;
            }
            let what = format!("kube-proxy on {} programmed Service {ns}/{name}", node.name);
            eventually(&what, KUBE_PROXY_READY, || {
                let have = endpoint_rules(&self.iptables(i)?, &format!("{ns}/{name}:"));
                if have == want {
                    return Ok(Some(()));
                }
                bail!("endpoint rules {have:?}, want {want:?}")
            })?;
        }
        Ok(())
    }

    /// Pod `a` on node 0 and pod `c` on node 1, once they reach each other.
    pub fn connected_pods(&self) -> Result<(Pod, Pod)> {
        let a = self.add_pod(0, "a")?;
        let c = self.add_pod(1, "c")?;
        eventually("cross-node ping", Duration::from_secs(20), || {
            Ok(a.ping(c.ip).ok())
        })?;
        Ok((a, c))
    }

    /// Runs CNI DEL for a pod and removes its namespace.
    pub fn delete_pod(&self, pod: Pod) -> Result<()> {
        let out = self.cni(pod.node, &pod_call("DEL", &pod))?;
        if !out.success {
            bail!("CNI DEL for pod {} failed: {}", pod.name, out.stdout);
        }
        Ok(())
    }

    /// Creates or replaces an `L7Policy` from its YAML (server-side apply, as `kubectl
    /// apply --server-side` does); returns its `metadata.generation`.
    pub fn apply_policy(&self, yaml: &str) -> Result<i64> {
        use veil_l7_policy::L7Policy;
        let value: serde_json::Value = serde_yaml::from_str(yaml).context("policy YAML")?;
        let meta = &value["metadata"];
        let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
            bail!("the policy names no namespace and name: {value}");
        };
        let api = Api::<L7Policy>::namespaced(self.client.clone(), ns);
        let applied = self.block_on(api.patch(
            name,
            &PatchParams::apply("veil-testbed").force(),
            &Patch::Apply(&value),
        ))?;
        Ok(applied.metadata.generation.unwrap_or_default())
    }

    /// Runs the real `meshctl` against node `i`'s agent; its stdout, or an error with
    /// what it said.
    pub fn meshctl(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new(bins::veil("meshctl")?)
            .arg("--socket")
            .arg(self.nodes[i].admin_socket())
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "meshctl {args:?} on node {i}: {}{stdout}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Everything every agent run of node `i` logged, oldest run first.
    pub fn agent_log(&self, i: usize) -> String {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(&self.nodes[i].dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        runs.retain(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with("agent-") && n.ends_with(".log"))
        });
        runs.sort();
        runs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Dumps the logs of every agent and the API server (for failure reports).
    pub fn logs(&self) -> BTreeMap<String, String> {
        let mut logs = BTreeMap::new();
        for node in &self.nodes {
            if let Ok(entries) = std::fs::read_dir(&node.dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().ends_with(".log") {
                        logs.insert(
                            e.path().display().to_string(),
                            crate::process::tail(&e.path(), 50),
                        );
                    }
                }
            }
        }
        logs
    }
}

/// A CNI call for an existing pod (`CHECK`, `DEL`).
pub fn pod_call(command: &str, pod: &Pod) -> CniCall {
    CniCall {
        command: command.into(),
        container_id: pod.container_id.clone(),
        netns: Some(pod.netns.path()),
        ifname: "eth0".into(),
        args: String::new(),
        stdin: None,
    }
}

/// The rule kube-proxy writes for the API server's own Service: once there, the first
/// full sync is done.
const KUBERNETES_SERVICE_RULE: &str = "default/kubernetes:https cluster IP";

/// The comments of kube-proxy's endpoint rules (`<ns>/<svc>:<port> -> <ip>:<port>`) in
/// `saved` (`iptables-save`) that start with `service` (`<ns>/<svc>:`).
fn endpoint_rules(saved: &str, service: &str) -> BTreeSet<String> {
    saved
        .lines()
        .filter_map(|line| line.split_once("--comment \"")?.1.split_once('"'))
        .map(|(comment, _)| comment)
        .filter(|c| c.starts_with(service) && c.contains(" -> "))
        .map(str::to_string)
        .collect()
}

fn iptables_save(netns: &Netns) -> Result<String> {
    let out = netns.exec(&["iptables-save"])?;
    if !out.status.success() {
        bail!(
            "iptables-save in {}: {}",
            netns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn next_log_number(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

fn shm_or_tmp() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// Claims a bed number by creating its bridge: creation fails if another bed (in this or
/// another process, or left over from a killed run) holds the name.
fn claim_index() -> Result<(u32, Bridge)> {
    let start = std::process::id()
        .wrapping_mul(7)
        .wrapping_add(BEDS_IN_PROCESS.fetch_add(1, Ordering::SeqCst));
    for offset in 0..MAX_BEDS {
        let index = (start + offset) % MAX_BEDS + 1;
        if let Ok(bridge) = Bridge::create(&format!("veilbr{index}")) {
            return Ok((index, bridge));
        }
    }
    bail!("no free test bed slot: {MAX_BEDS} bridges veilbr1..veilbr{MAX_BEDS} exist (stale? `make clean-testbeds`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_rules_are_read_from_kube_proxys_comments() {
        // Lines as kube-proxy v1.34 wrote them in a bed.
        let saved = r#"
-A KUBE-SERVICES -d 198.19.240.201/32 -p tcp -m comment --comment "demo/echo:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-JWGTEK2EMVJSPT4J
-A KUBE-SVC-JWGTEK2EMVJSPT4J -m comment --comment "demo/echo:http -> 198.19.49.2:8080" -j KUBE-SEP-SEKSQWUNPB3DIFYR
-A KUBE-SVC-KT7F22MTFYTW3VEB -m comment --comment "demo/echo:h2 -> 198.19.49.2:9090" -j KUBE-SEP-BXNE56ONSHSBWV5O
-A KUBE-SVC-XXXXXXXXXXXXXXXX -m comment --comment "demo/echo2:http -> 198.19.49.3:8080" -j KUBE-SEP-YYYYYYYYYYYYYYYY
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment "default/kubernetes:https -> 198.18.7.1:6443" -j KUBE-SEP-NTF36TYMHFEEJSJN
"#;
        assert_eq!(
            endpoint_rules(saved, "demo/echo:"),
            BTreeSet::from([
                "demo/echo:h2 -> 198.19.49.2:9090".to_string(),
                "demo/echo:http -> 198.19.49.2:8080".to_string(),
            ])
        );
        assert!(endpoint_rules(saved, "demo/none:").is_empty());
    }
}
