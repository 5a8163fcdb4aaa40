//! The agent's settings: one documented field each, from flags or environment, checked
//! before anything starts.

use std::path::PathBuf;

use clap::Parser;

/// Where agent state (IPAM records, keys) lives; survives agent restarts, like kubelet's.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/veil";
/// Where the CNI plugin finds the agent; `/run` so a node reboot clears stale sockets.
pub const DEFAULT_CNI_SOCKET: &str = crate::cni::spec::DEFAULT_AGENT_SOCKET;
/// WireGuard over an IPv4 underlay adds 60 bytes (20 IP + 8 UDP + 32 WireGuard); pods get
/// an MTU that leaves room for it now so enabling encryption never changes a running pod's MTU.
pub const ENCAP_OVERHEAD_IPV4: u32 = 60;
/// WireGuard over an IPv6 underlay adds 80 bytes (40 IP + 8 UDP + 32 WireGuard).
pub const ENCAP_OVERHEAD_IPV6: u32 = 80;
/// WireGuard's UDP port unless configured: one above the 51820 that wg-quick users often
/// hold already, so a node running both does not clash.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51871;
/// How often a node replaces its WireGuard key. WireGuard already renews session keys
/// every two minutes; rotating the static key daily bounds how long a stolen node key
/// stays useful, at the cost of one handshake per peer per day.
pub const DEFAULT_KEY_ROTATION: &str = "24h";
/// The most WireGuard queues: the steering program tells peers apart by one byte.
pub const MAX_QUEUES: usize = 64;
/// The smallest MTU IPv4 guarantees; below it a setting is a mistake.
pub const MIN_MTU: u32 = 576;
/// The issuer's namespace, where it publishes the trust bundle: the chart installs it
/// there, and `veil-issuer --namespace` defaults to the same.
pub const DEFAULT_TRUST_BUNDLE_NAMESPACE: &str = "veil-system";
/// The ConfigMap the issuer publishes the trust bundle in (`veil-issuer
/// --bundle-configmap`'s default).
pub const DEFAULT_TRUST_BUNDLE_CONFIGMAP: &str = "veil-trust-bundle";
/// The issuer's ServiceAccount (`veil-issuer --service-account`'s default); its serving
/// certificate names `spiffe://<trust domain>/ns/<bundle namespace>/sa/veil-issuer`.
pub const DEFAULT_ISSUER_SERVICE_ACCOUNT: &str = "veil-issuer";
/// Where workloads find the SPIFFE Workload API: under `/run` like the CNI socket (a
/// reboot clears it), alone in its own directory, which is what pods mount (hostPath):
/// they never see the CNI socket, and a restarted agent re-creates the socket inside
/// the same directory, so existing mounts keep working.
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "/run/veil/workload-api/socket";

/// The SPIFFE trust domain workloads are named in unless configured: Kubernetes' default
/// cluster domain, as Istio and Linkerd default to it too. It must equal the issuer's.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The agent's configuration: one group of flags per component, flattened into one
/// command line (every flag keeps its name and environment variable).
#[derive(Debug, Clone, Parser)]
#[command(name = "mesh-agent", version, about = "Veil's per-node agent")]
pub struct Config {
    /// Name of the Node object this agent serves (the chart passes spec.nodeName).
    #[arg(long, env = "VEIL_NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig to reach the API server; in-cluster credentials when unset.
    #[arg(long, env = "VEIL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory for state that must survive restarts.
    #[arg(long, env = "VEIL_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Unix socket `meshctl` talks to (root only): pods, WireGuard, key rotation, flows.
    #[arg(long, env = "VEIL_ADMIN_SOCKET", default_value = crate::admin::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// `<namespace>/<name>` of the DaemonSet that runs this agent. On SIGTERM the agent
    /// asks for it: gone (an uninstall) means the agent removes everything it put on
    /// the node; present (an upgrade, a restart) means it leaves all of it for the next one.
    #[arg(long, env = "VEIL_OWNER_DAEMONSET")]
    pub owner_daemonset: Option<String>,
    /// Pod networking and the CNI plugin.
    #[command(flatten)]
    pub cni: CniConfig,
    /// Node-to-node routing and encryption.
    #[command(flatten)]
    pub network: NetworkConfig,
    /// SPIFFE identities for the node's pods.
    #[command(flatten)]
    pub identity: IdentityConfig,
    /// L7 policy enforcement.
    #[command(flatten)]
    pub policy: PolicyConfig,
}

/// Pod networking and the CNI plugin.
#[derive(Debug, Clone, clap::Args)]
pub struct CniConfig {
    /// Unix socket the CNI plugin and meshctl connect to.
    #[arg(long, env = "VEIL_CNI_SOCKET", default_value = DEFAULT_CNI_SOCKET)]
    pub cni_socket: PathBuf,
    /// The CNI network configuration the agent writes once it serves pods (e.g.
    /// `/etc/cni/net.d/05-veil.conflist`); until then the kubelet keeps pods waiting
    /// instead of starting them without a network. Unset: the agent writes none.
    #[arg(long, env = "VEIL_CNI_CONF_FILE")]
    pub cni_conf_file: Option<PathBuf>,
    /// Chain the `portmap` plugin after `mesh-cni` in that configuration, for hostPort.
    #[arg(long, env = "VEIL_CNI_CHAIN_PORTMAP", default_value_t = true, action = clap::ArgAction::Set)]
    pub cni_chain_portmap: bool,
    /// The installed `mesh-cni` binary (the chart's init container copies it there);
    /// removed with everything else when the agent's DaemonSet is uninstalled.
    #[arg(long, env = "VEIL_CNI_PLUGIN_FILE")]
    pub cni_plugin_file: Option<PathBuf>,
    /// Pod interface MTU; by default the underlay MTU minus `encap_overhead`.
    #[arg(long, env = "VEIL_POD_MTU")]
    pub pod_mtu: Option<u32>,
    /// Bytes reserved for encapsulation when deriving the pod MTU; by default 60 when the
    /// node's InternalIP is IPv4, 80 when it is IPv6.
    #[arg(long, env = "VEIL_ENCAP_OVERHEAD")]
    pub encap_overhead: Option<u32>,
}

/// Node-to-node routing and encryption.
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkConfig {
    /// Node-to-node encryption: `wireguard` (strict: never clear text) or `none`.
    #[arg(long, env = "VEIL_ENCRYPTION", value_enum, default_value_t = Encryption::Wireguard)]
    pub encryption: Encryption,
    /// UDP port for WireGuard.
    #[arg(long, env = "VEIL_WIREGUARD_PORT", default_value_t = DEFAULT_WIREGUARD_PORT)]
    pub wireguard_port: u16,
    /// WireGuard queues (TUN queue, socket and two threads each; peers are spread over
    /// them); by default one per CPU, at most 8.
    #[arg(long, env = "VEIL_WIREGUARD_QUEUES")]
    pub wireguard_queues: Option<usize>,
    /// Period of WireGuard key rotation (`30m`, `12h`, `7d`; `0` turns it off).
    #[arg(long, env = "VEIL_KEY_ROTATION", default_value = DEFAULT_KEY_ROTATION, value_parser = parse_period)]
    pub key_rotation: std::time::Duration,
    /// The cluster's whole pod range: with encryption on, traffic to any of it that no
    /// known node covers is dropped rather than routed in clear.
    #[arg(long, env = "VEIL_CLUSTER_POD_CIDR")]
    pub cluster_pod_cidr: Option<ipnet::Ipv4Net>,
    /// The cluster's Service range (kube-apiserver's --service-cluster-ip-range): pods'
    /// packets still addressed to it after kube-proxy (no Service there yet) are refused
    /// on the node instead of following its default route off the node.
    #[arg(long, env = "VEIL_SERVICE_CIDR")]
    pub service_cidr: Option<ipnet::Ipv4Net>,
}

/// SPIFFE identities for the node's pods.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityConfig {
    /// The SPIFFE issuer (`host:port`). Identity is on only when this is set: the agent
    /// then keeps an SVID for every pod on its node and serves the Workload API.
    #[arg(long, env = "VEIL_ISSUER_ADDRESS")]
    pub issuer_address: Option<String>,
    /// The SPIFFE ID the issuer must present; by default
    /// `spiffe://<bundle's trust domain>/ns/<trust bundle namespace>/sa/veil-issuer`.
    #[arg(long, env = "VEIL_ISSUER_ID")]
    pub issuer_id: Option<String>,
    /// The agent's projected ServiceAccount token (audience `veil-issuer`), re-read on
    /// every request because the kubelet rotates it. Required with `--issuer-address`.
    #[arg(long, env = "VEIL_ISSUER_TOKEN_FILE")]
    pub issuer_token_file: Option<PathBuf>,
    /// Namespace of the ConfigMap the issuer publishes the trust bundle in.
    #[arg(long, env = "VEIL_TRUST_BUNDLE_NAMESPACE", default_value = DEFAULT_TRUST_BUNDLE_NAMESPACE)]
    pub trust_bundle_namespace: String,
    /// The ConfigMap the issuer publishes the trust bundle in.
    #[arg(long, env = "VEIL_TRUST_BUNDLE_CONFIGMAP", default_value = DEFAULT_TRUST_BUNDLE_CONFIGMAP)]
    pub trust_bundle_configmap: String,
    /// Unix socket of the SPIFFE Workload API (served only with identity on).
    #[arg(long, env = "VEIL_WORKLOAD_API_SOCKET", default_value = DEFAULT_WORKLOAD_API_SOCKET)]
    pub workload_api_socket: PathBuf,
}

/// L7 policy enforcement.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyConfig {
    /// SPIFFE trust domain of workload identities in policies and flow records
    /// (`spiffe://<trust domain>/ns/<namespace>/sa/<serviceaccount>`).
    #[arg(long, env = "VEIL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Let the kubelet's declared `httpGet` probes through from the pod's own node,
    /// whatever the policies say (nothing else from the node).
    #[arg(long, env = "VEIL_ALLOW_LOCAL_NODE_PROBES", default_value_t = veil_l7_policy::DEFAULT_ALLOW_LOCAL_NODE_PROBES, action = clap::ArgAction::Set)]
    pub allow_local_node_probes: bool,
    /// `<namespace>/<name>` of the Lease that picks the one agent writing `L7Policy`
    /// status (`Accepted`, `observedGeneration`); unset: this agent never writes status.
    #[arg(long, env = "VEIL_POLICY_STATUS_LEASE")]
    pub policy_status_lease: Option<String>,
    /// TCP port of the proxy's transparent listener (it only receives what the eBPF
    /// `sk_lookup` program assigns it; nothing connects to the port itself).
    #[arg(long, env = "VEIL_PROXY_PORT", default_value_t = crate::proxy::DEFAULT_PORT)]
    pub proxy_port: u16,
    /// Where the eBPF maps and links are pinned (a bpffs directory that outlives the
    /// agent, so a restart neither detaches the programs nor forgets covered pods).
    #[arg(long, env = "VEIL_BPF_PIN_DIR", default_value = crate::redirect::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// Worker threads of the proxy, each with its own listening socket and runtime.
    #[arg(long, env = "VEIL_PROXY_THREADS", default_value_t = crate::proxy::DEFAULT_THREADS)]
    pub proxy_threads: usize,
    /// The node's cgroup2 root (or a cgroup v1 root with the unified hierarchy at
    /// `<dir>/unified`), where the program steering the node's own connections to covered
    /// pods into the proxy attaches; the agent's own cgroup would miss the kubelet.
    #[arg(long, env = "VEIL_CGROUP_ROOT", default_value = crate::redirect::DEFAULT_CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
}

/// Node-to-node encryption modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encryption {
    /// WireGuard between nodes; pod traffic never leaves a node in clear text.
    Wireguard,
    /// Plain routing between nodes (for benchmarks and networks encrypted otherwise).
    None,
}

/// Parses `90s`, `30m`, `12h`, `7d` or `0`.
pub fn parse_period(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a period like 30m, 12h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{text:?}: unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// A setting that cannot work, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// The flag (and environment variable) at fault.
    pub setting: &'static str,
    /// Why.
    pub reason: String,
}

impl Config {
    /// Checks rules no single flag parser can.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = veil_identity::TrustDomain::new(&self.policy.trust_domain) {
            return Err(ConfigError {
                setting: "--trust-domain (VEIL_TRUST_DOMAIN)",
                reason: format!(
                    "{:?} is not a SPIFFE trust domain: {e}",
                    self.policy.trust_domain
                ),
            });
        }
        if let Some(lease) = &self.policy.policy_status_lease {
            crate::policy_status::StatusLease::parse(lease, &self.node_name).map_err(|reason| {
                ConfigError {
                    setting: "--policy-status-lease (VEIL_POLICY_STATUS_LEASE)",
                    reason,
                }
            })?;
        }
        if !(1..=64).contains(&self.policy.proxy_threads) {
            return Err(ConfigError {
                setting: "--proxy-threads (VEIL_PROXY_THREADS)",
                reason: format!("{} is outside 1..=64", self.policy.proxy_threads),
            });
        }
        if self.node_name.trim().is_empty() {
            return Err(ConfigError {
                setting: "--node-name (VEIL_NODE_NAME)",
                reason: "must not be empty".into(),
            });
        }
        if let Some(mtu) = self.cni.pod_mtu {
            if !(MIN_MTU..=65535).contains(&mtu) {
                return Err(ConfigError {
                    setting: "--pod-mtu (VEIL_POD_MTU)",
                    reason: format!("{mtu} is outside {MIN_MTU}..=65535"),
                });
            }
        }
        if let Some(overhead) = self.cni.encap_overhead.filter(|o| *o > 1000) {
            return Err(ConfigError {
                setting: "--encap-overhead (VEIL_ENCAP_OVERHEAD)",
                reason: format!("{overhead} bytes leaves no room for packets"),
            });
        }
        // Pods mount the Workload API socket's directory: the CNI socket (root's
        // control over every pod's network) must never be inside it.
        if let Some(dir) = self.identity.workload_api_socket.parent() {
            if self.cni.cni_socket.starts_with(dir) {
                return Err(ConfigError {
                    setting: "--workload-api-socket (VEIL_WORKLOAD_API_SOCKET)",
                    reason: format!(
                        "its directory {} would expose the CNI socket {} to pods; give it a directory of its own",
                        dir.display(),
                        self.cni.cni_socket.display()
                    ),
                });
            }
        }
        if self.network.encryption == Encryption::Wireguard && self.network.wireguard_port == 0 {
            return Err(ConfigError {
                setting: "--wireguard-port (VEIL_WIREGUARD_PORT)",
                reason: "must not be 0".into(),
            });
        }
        if let Some(queues) = self
            .network
            .wireguard_queues
            .filter(|q| !(1..=MAX_QUEUES).contains(q))
        {
            return Err(ConfigError {
                setting: "--wireguard-queues (VEIL_WIREGUARD_QUEUES)",
                reason: format!("{queues} is outside 1..={MAX_QUEUES}"),
            });
        }
        if let Some(owner) = &self.owner_daemonset {
            crate::node_install::Owner::parse(owner).map_err(|reason| ConfigError {
                setting: "--owner-daemonset (VEIL_OWNER_DAEMONSET)",
                reason,
            })?;
        }
        if let Some(file) = self
            .cni
            .cni_conf_file
            .as_ref()
            .filter(|f| f.file_name().is_none())
        {
            return Err(ConfigError {
                setting: "--cni-conf-file (VEIL_CNI_CONF_FILE)",
                reason: format!("{} names no file", file.display()),
            });
        }
        if !self.network.key_rotation.is_zero()
            && self.network.key_rotation < std::time::Duration::from_secs(60)
        {
            return Err(ConfigError {
                setting: "--key-rotation (VEIL_KEY_ROTATION)",
                reason: "shorter than a minute would keep peers re-handshaking; use 0 to turn rotation off".into(),
            });
        }
        self.validate_identity()
    }

    /// Whether the agent obtains SVIDs and serves the Workload API.
    pub fn identity_enabled(&self) -> bool {
        self.identity.issuer_address.is_some()
    }

    fn validate_identity(&self) -> Result<(), ConfigError> {
        let Some(address) = &self.identity.issuer_address else {
            return Ok(());
        };
        let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !port_ok {
            return Err(ConfigError {
                setting: "--issuer-address (VEIL_ISSUER_ADDRESS)",
                reason: format!("{address:?} is not host:port"),
            });
        }
        if self.identity.issuer_token_file.is_none() {
            return Err(ConfigError {
                setting: "--issuer-token-file (VEIL_ISSUER_TOKEN_FILE)",
                reason: "is required when --issuer-address is set (the issuer authenticates agents by their ServiceAccount token)".into(),
            });
        }
        if let Some(id) = &self.identity.issuer_id {
            veil_identity::parse_id(id).map_err(|e| ConfigError {
                setting: "--issuer-id (VEIL_ISSUER_ID)",
                reason: e.to_string(),
            })?;
        }
        for (setting, value) in [
            (
                "--trust-bundle-namespace (VEIL_TRUST_BUNDLE_NAMESPACE)",
                &self.identity.trust_bundle_namespace,
            ),
            (
                "--trust-bundle-configmap (VEIL_TRUST_BUNDLE_CONFIGMAP)",
                &self.identity.trust_bundle_configmap,
            ),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError {
                    setting,
                    reason: "must not be empty".into(),
                });
            }
        }
        Ok(())
    }

    /// How many WireGuard queues to open.
    pub fn wireguard_queues(&self) -> usize {
        self.network
            .wireguard_queues
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
    }

    /// The bytes WireGuard adds on an underlay reached from `node_ip`.
    pub fn encap_overhead_for(&self, node_ip: std::net::IpAddr) -> u32 {
        self.cni.encap_overhead.unwrap_or(if node_ip.is_ipv4() {
            ENCAP_OVERHEAD_IPV4
        } else {
            ENCAP_OVERHEAD_IPV6
        })
    }

    /// The pod MTU for an underlay of `underlay_mtu` bytes reached from `node_ip`.
    pub fn pod_mtu_for(&self, underlay_mtu: u32, node_ip: std::net::IpAddr) -> u32 {
        self.cni.pod_mtu.unwrap_or(
            underlay_mtu
                .saturating_sub(self.encap_overhead_for(node_ip))
                .max(MIN_MTU),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("mesh-agent").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn hardening_the_workload_api_directory_never_holds_the_cni_socket() {
        assert!(parse(&["--node-name", "n"]).validate().is_ok());
        let err = parse(&[
            "--node-name",
            "n",
            "--workload-api-socket",
            "/run/veil/workload.sock",
        ])
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("--workload-api-socket"), "{err}");
    }

    #[test]
    fn config_defaults_and_mtu() {
        let config = parse(&["--node-name", "n1"]);
        config.validate().unwrap();
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        let v4: std::net::IpAddr = "198.18.0.10".parse().unwrap();
        let v6: std::net::IpAddr = "2001:2::10".parse().unwrap();
        assert_eq!(config.pod_mtu_for(1500, v4), 1440);
        assert_eq!(
            config.pod_mtu_for(1500, v6),
            1420,
            "IPv6 underlay: 80 bytes"
        );
        assert_eq!(
            parse(&["--node-name", "n1", "--pod-mtu", "1400"]).pod_mtu_for(9000, v4),
            1400
        );
        let fixed = parse(&["--node-name", "n1", "--encap-overhead", "100"]);
        assert_eq!(fixed.pod_mtu_for(1500, v6), 1400, "a set overhead wins");
        let huge = parse(&["--node-name", "n1", "--encap-overhead", "2000"]);
        assert!(huge
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--encap-overhead"));
    }

    #[test]
    fn config_wireguard_defaults_and_periods() {
        let config = parse(&["--node-name", "n1"]);
        assert_eq!(config.network.encryption, Encryption::Wireguard);
        assert_eq!(config.network.wireguard_port, 51871);
        assert_eq!(
            config.network.key_rotation,
            std::time::Duration::from_secs(86400)
        );
        assert_eq!(parse_period("30m").unwrap().as_secs(), 1800);
        assert!(parse_period("0").unwrap().is_zero());
        assert!(parse_period("12x").is_err());
        let err = parse(&["--node-name", "n1", "--key-rotation", "5s"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--key-rotation"), "{err}");
    }

    #[test]
    fn config_identity_is_off_by_default_and_needs_a_token_file() {
        let config = parse(&["--node-name", "n1"]);
        config.validate().unwrap();
        assert!(!config.identity_enabled());
        assert_eq!(config.identity.trust_bundle_namespace, "veil-system");
        assert_eq!(config.identity.trust_bundle_configmap, "veil-trust-bundle");
        assert_eq!(
            config.identity.workload_api_socket,
            PathBuf::from(DEFAULT_WORKLOAD_API_SOCKET)
        );
        let err = parse(&["--node-name", "n1", "--issuer-address", "issuer:8443"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--issuer-token-file"), "{err}");
        let on = parse(&[
            "--node-name",
            "n1",
            "--issuer-address",
            "issuer:8443",
            "--issuer-token-file",
            "/t",
        ]);
        on.validate().unwrap();
        assert!(on.identity_enabled());
        for (flag, value, bad) in [
            ("--issuer-address", "issuer", "--issuer-address"),
            ("--issuer-id", "https://x/y", "--issuer-id"),
        ] {
            let mut args = vec!["--node-name", "n1", "--issuer-token-file", "/t"];
            if flag != "--issuer-address" {
                args.extend(["--issuer-address", "issuer:8443"]);
            }
            args.extend([flag, value]);
            let err = parse(&args).validate().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn config_rejects_tiny_mtu_naming_the_setting() {
        let err = parse(&["--node-name", "n1", "--pod-mtu", "100"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--pod-mtu"), "{err}");
    }
}
