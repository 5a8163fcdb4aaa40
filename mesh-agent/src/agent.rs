//! The agent's lifecycle: learn the node, open state, load eBPF, bind the CNI socket,
//! keep peer routes current, and stop cleanly on SIGTERM.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use tokio::sync::watch;

use crate::config::{Config, Encryption};
use crate::identity::Identity;
use crate::ipam::Ipam;
use crate::k8s::{self, NodeInfo};
use crate::netns;
use crate::peers::{Candidate, KnownCidrs};
use crate::routes;
use crate::server::{self, PodService};
use crate::wireguard::{self, Wireguard};

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Talking to Kubernetes failed.
    #[error(transparent)]
    K8s(#[from] k8s::K8sError),
    /// Address state could not be opened.
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    /// eBPF could not be loaded, attached or its routing installed.
    #[error(transparent)]
    Redirect(#[from] crate::redirect::RedirectError),
    /// Netlink could not be opened or answered.
    #[error("{0}")]
    Network(String),
    /// WireGuard could not start.
    #[error(transparent)]
    Wireguard(#[from] wireguard::WireguardError),
    /// The agent cannot read its own DaemonSet (`--owner-daemonset`).
    #[error("{0}")]
    Owner(String),
    /// The proxy's listener could not be bound.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    /// The CNI socket could not be bound.
    #[error("bind CNI socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A started agent.
pub struct Agent {
    /// What the agent learned of its own node.
    pub node: NodeInfo,
    /// The MTU pods get.
    pub pod_mtu: u32,
    service: Arc<PodService>,
    listener: Option<tokio::net::UnixListener>,
    admin: Option<tokio::net::UnixListener>,
    client: kube::Client,
    config: Config,
    wireguard: Option<(Arc<Wireguard>, u32)>,
    rotate_rx:
        Option<tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<Result<String, String>>>>,
    identity: Option<Identity>,
    watch: Option<tokio::task::JoinHandle<()>>,
    policy_status: Option<tokio::task::JoinHandle<()>>,
    local_pods: tokio::sync::watch::Receiver<Option<crate::state::LocalPods>>,
    dataplane: crate::state::DataplaneRx,
    proxy: Option<crate::proxy::Bound>,
    redirect: Arc<crate::redirect::Redirect>,
    /// The source of the node's own connections to covered pods (`None`: they reach the
    /// pods directly, see [`steer_node_connections`]).
    node_source: Option<std::net::Ipv4Addr>,
    flows: crate::flows::Flows,
    routes: Option<PeerRoutes>,
    peers_rx: watch::Receiver<Option<Vec<Candidate>>>,
    fatal: crate::fatal::Fatal,
    died: crate::fatal::FatalReceiver,
}

/// Publishes the node's WireGuard key, retrying until the API server takes it: peers
/// cannot reach this node before it is published, so giving up is never right.
async fn publish_until_done(client: &kube::Client, node: &str, endpoint: k8s::WireguardEndpoint) {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match k8s::publish_wireguard(client, node, endpoint).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(node, error = %e, retry_in_ms = delay.as_millis() as u64, "publish WireGuard key");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(10));
            }
        }
    }
}

/// The name and MTU of the interface that holds `ip`.
async fn underlay_link(
    handle: &rtnetlink::Handle,
    ip: IpAddr,
) -> Result<(String, u32), StartError> {
    let net_err =
        |e: rtnetlink::Error| StartError::Network(format!("find underlay interface of {ip}: {e}"));
    let mut addresses = handle.address().get().execute();
    let mut index = None;
    while let Some(msg) = addresses.try_next().await.map_err(net_err)? {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
        {
            index = Some(msg.header.index);
        }
    }
    let index = index.ok_or_else(|| {
        StartError::Network(format!(
            "no interface in this namespace holds the node's InternalIP {ip}"
        ))
    })?;
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(net_err)?;
    let attribute = |pick: fn(&LinkAttribute) -> Option<LinkAttribute>| {
        link.as_ref()
            .and_then(|l| l.attributes.iter().find_map(pick))
    };
    let mtu = attribute(|a| matches!(a, LinkAttribute::Mtu(_)).then(|| a.clone()));
    let name = attribute(|a| matches!(a, LinkAttribute::IfName(_)).then(|| a.clone()));
    match (name, mtu) {
        (Some(LinkAttribute::IfName(name)), Some(LinkAttribute::Mtu(mtu))) => Ok((name, mtu)),
        _ => Err(StartError::Network(format!(
            "interface {index} reports no name or MTU"
        ))),
    }
}

/// Turns on IPv4 forwarding unless it is on: in a container `/proc/sys` is read-only, and
/// nodes that already forward (kubeadm requires it) must not fail on the write.
fn enable_forwarding() -> Result<(), StartError> {
    const SYSCTL: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read(SYSCTL).is_ok_and(|v| v.trim_ascii() == b"1") {
        return Ok(());
    }
    std::fs::write(SYSCTL, b"1").map_err(|e| {
        StartError::Network(format!(
            "enable net.ipv4.ip_forward ({SYSCTL}): {e}; set the sysctl on the node or run the agent where it can"
        ))
    })
}

impl Agent {
    /// Does everything that can fail before serving, so failures surface at start.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let (fatal, died) = crate::fatal::channel();
        let client = k8s::client(config.kubeconfig.as_deref()).await?;
        if let Some(owner) = &config.owner_daemonset {
            let owner = crate::node_install::Owner::parse(owner).map_err(StartError::Owner)?;
            crate::node_install::check_owner(&client, &owner)
                .await
                .map_err(StartError::Owner)?;
        }
        let node = k8s::wait_for_own_node(&client, &config.node_name).await;
        tracing::info!(node = node.name, pod_cidr = %node.pod_cidr, internal_ip = %node.internal_ip, "own node");
        let netlink = netns::netlink_here().map_err(|e| StartError::Network(e.to_string()))?;
        let (underlay_name, underlay) = underlay_link(&netlink, node.internal_ip).await?;
        let pod_mtu = config.pod_mtu_for(underlay, node.internal_ip);
        enable_forwarding()?;
        let ipam = Ipam::open(node.pod_cidr, &config.state_dir.join("ipam"))?;
        let redirect = Arc::new(crate::redirect::Redirect::load(&config.policy.bpf_pin_dir)?);
        redirect.ensure_rules(&netlink).await?;
        let node_source = steer_node_connections(&redirect, &config, node.internal_ip)?;
        let (wireguard, rotate_tx, rotate_rx) = match config.network.encryption {
            Encryption::None => (None, None, None),
            Encryption::Wireguard => {
                let key_path = config.state_dir.join("wireguard/private.key");
                let wg = Wireguard::start(
                    &key_path,
                    config.network.wireguard_port,
                    pod_mtu,
                    config.wireguard_queues(),
                    &fatal,
                )?;
                let device = crate::podnet::link_by_name(&netlink, wireguard::DEVICE_NAME)
                    .await
                    .map_err(|e| StartError::Network(e.to_string()))?
                    .ok_or_else(|| {
                        StartError::Network(format!(
                            "{} vanished after creation",
                            wireguard::DEVICE_NAME
                        ))
                    })?;
                publish_until_done(&client, &node.name, wg.endpoint()).await;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                (Some((wg, device.header.index)), Some(tx), Some(rx))
            }
        };
        // Answers to the connections covered pods open themselves arrive from other nodes
        // on this device; from_tunnel marks them so the covered table lets them through.
        let arrival = match &wireguard {
            Some(_) => wireguard::DEVICE_NAME,
            None => underlay_name.as_str(),
        };
        redirect.attach_tunnel(arrival)?;
        // Identity starts in `run`, in the background: an unreachable issuer or a missing
        // trust bundle must not keep pods from getting their network.
        let identity = Identity::new(&config);
        let service = Arc::new(PodService {
            ipam,
            netlink,
            redirect: redirect.clone(),
            pod_mtu,
            wireguard: wireguard.as_ref().map(|(wg, _)| wg.clone()),
            rotate: rotate_tx,
            attestor: identity.as_ref().map(|i| i.attestor.clone()),
        });
        service.restore().await;
        // Pods get their network only once routes for every known peer are in place:
        // before the first complete Node list, a new pod could reach other nodes' pods
        // along the default route, in clear.
        let (state, state_run) = crate::state::start(
            client.clone(),
            crate::state::StateConfig {
                node_name: node.name.clone(),
                trust_domain: config.policy.trust_domain.clone(),
                settings: veil_l7_policy::Settings {
                    allow_local_node_probes: config.policy.allow_local_node_probes,
                },
            },
        );
        let mut peers_rx = state.nodes.clone();
        let local_pods = state.local_pods.clone();
        let dataplane = state.dataplane.clone();
        let watch = tokio::spawn(state_run);
        let policy_status = config
            .policy
            .policy_status_lease
            .as_deref()
            .and_then(|lease| {
                crate::policy_status::StatusLease::parse(lease, &node.name)
                    .ok()
                    .map(|lease| {
                        tokio::spawn(crate::policy_status::run(
                            client.clone(),
                            lease,
                            state.policies.clone(),
                            state.policies_listed.clone(),
                        ))
                    })
            });
        let mut routes = PeerRoutes {
            netlink: service.netlink.clone(),
            wireguard: wireguard.clone(),
            known: KnownCidrs::load(&config.state_dir.join(KNOWN_CIDRS_FILE)),
            own: node.clone(),
            catch_all: config.network.cluster_pod_cidr,
            services: config.network.service_cidr,
            excluded: Vec::new(),
        };
        tracing::info!("waiting for the first complete Node list");
        let first = peers_rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| StartError::Network("the node watch stopped before listing".into()))?
            .clone()
            .unwrap_or_default();
        if wireguard.is_some() || config.network.service_cidr.is_some() {
            routes::ensure_pods_rule(&service.netlink, node.pod_cidr)
                .await
                .map_err(|e| StartError::Network(e.to_string()))?;
        }
        routes.apply(&first).await;
        let bind = |path: &std::path::PathBuf| {
            crate::local_socket::bind(path).map_err(|source| StartError::Bind {
                path: path.clone(),
                source,
            })
        };
        let flows = crate::flows::Flows::default();
        let proxy = crate::proxy::Proxy::bind(crate::proxy::ProxyConfig {
            addr: std::net::SocketAddr::from((
                std::net::Ipv4Addr::UNSPECIFIED,
                config.policy.proxy_port,
            )),
            workers: config.policy.proxy_threads,
            settings: crate::proxy::ProxySettings::default(),
            dataplane: dataplane.clone(),
            flows: flows.clone(),
        })?;
        // From here on, covered connections reach this proxy (they were refused since the
        // previous agent's listener closed).
        redirect.set_proxy_listeners(&proxy.listener_fds())?;
        let listener = bind(&config.cni.cni_socket)?;
        let admin = bind(&config.admin_socket)?;
        tracing::info!(socket = %config.cni.cni_socket.display(), pod_mtu, "serving CNI");
        Ok(Agent {
            node,
            pod_mtu,
            service,
            listener: Some(listener),
            admin: Some(admin),
            client,
            config,
            wireguard,
            rotate_rx,
            identity,
            watch: Some(watch),
            policy_status,
            local_pods,
            dataplane: dataplane.clone(),
            proxy: Some(proxy),
            redirect,
            node_source,
            flows,
            routes: Some(routes),
            peers_rx,
            fatal,
            died,
        })
    }

    /// Serves until SIGTERM or SIGINT, then removes the socket. Pods keep their network:
    /// veths, addresses and routes live in the kernel, and the next agent adopts them.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (Some(listener), Some(admin), Some(watch), Some(mut reconciler)) = (
            self.listener.take(),
            self.admin.take(),
            self.watch.take(),
            self.routes.take(),
        ) else {
            anyhow::bail!("Agent::run called twice");
        };
        let mut peers_rx = self.peers_rx.clone();
        let routes = tokio::spawn(async move {
            while peers_rx.changed().await.is_ok() {
                let set = peers_rx.borrow_and_update().clone().unwrap_or_default();
                reconciler.apply(&set).await;
            }
        });
        let rotation = match (self.wireguard.clone(), self.rotate_rx.take()) {
            (Some((wg, _)), Some(rx)) => Some(tokio::spawn(rotate_keys(
                wg,
                self.client.clone(),
                self.config.node_name.clone(),
                self.config.network.key_rotation,
                rx,
            ))),
            _ => None,
        };
        let workload_socket = self.identity.as_ref().map(|i| i.socket().to_path_buf());
        let identity = self.identity.take().map(|identity| {
            tokio::spawn(identity.run(self.client.clone(), self.local_pods.clone()))
        });
        let serve = tokio::spawn(server::serve(listener, self.service.clone()));
        let Some(proxy) = self.proxy.take() else {
            anyhow::bail!("Agent::run called twice");
        };
        let proxy_handle = proxy.handle();
        let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
        // Its own threads: the control plane cannot starve requests.
        let proxy = tokio::task::spawn_blocking(move || {
            let outcome = proxy.run_workers(async {
                let _ = proxy_stopped.await;
            });
            if let Err(e) = outcome {
                tracing::error!(error = %e, "proxy stopped");
            }
        });
        let admin = tokio::spawn(crate::admin::serve(
            admin,
            Arc::new(crate::admin::AdminService {
                pods: self.service.clone(),
                flows: self.flows.clone(),
                proxy: Some(proxy_handle),
            }),
        ));
        if let Some(conf) = &self.config.cni.cni_conf_file {
            crate::node_install::write_cni_conf(
                conf,
                &self.config.cni.cni_socket,
                self.config.cni.cni_chain_portmap,
            )
            .map_err(|e| anyhow::anyhow!("write CNI configuration {}: {e}", conf.display()))?;
            tracing::info!(path = %conf.display(), "CNI configuration written: pods may start");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tasks = vec![
            ("state watches", watch),
            ("route reconciler", routes),
            ("CNI server", serve),
            ("admin server", admin),
            ("proxy", proxy),
            (
                "covered pods",
                tokio::spawn(cover_pods(
                    self.redirect.clone(),
                    self.service.netlink.clone(),
                    self.dataplane.clone(),
                    self.node_source,
                )),
            ),
        ];
        match self.redirect.spoof_events() {
            Some(Ok(events)) => tasks.push((
                "spoof events",
                tokio::spawn(record_spoofing(
                    events,
                    self.redirect.clone(),
                    self.dataplane.clone(),
                    self.flows.clone(),
                )),
            )),
            Some(Err(e)) => anyhow::bail!("spoof events: {e}"),
            None => {}
        }
        tasks.extend(rotation.map(|t| ("key rotation", t)));
        tasks.extend(self.policy_status.take().map(|t| ("policy status", t)));
        tasks.extend(identity.map(|t| ("identity", t)));
        // Every task runs for the agent's lifetime: one that ends has died.
        let fatal = self.fatal.clone();
        // Once stopping, a task that ends because another was aborted first (the route
        // reconciler when the node watch's sender goes) is no failure.
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchers = tasks
            .into_iter()
            .map(|(part, task)| {
                let fatal = fatal.clone();
                let stopping = stopping.clone();
                let abort = task.abort_handle();
                let watcher = tokio::spawn(async move {
                    let reason = match task.await {
                        Ok(()) => "returned".to_string(),
                        Err(e) if e.is_cancelled() => return,
                        Err(e) => format!("panicked: {e}"),
                    };
                    if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                        fatal.report(part, &reason);
                    }
                });
                (abort, watcher)
            })
            .collect::<Vec<_>>();
        let mut departure = crate::node_install::Departure::Restart;
        let outcome = tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                departure = self.departure().await;
                if matches!(departure, crate::node_install::Departure::Uninstall(_)) {
                    self.drain_pods().await;
                }
                Ok(())
            }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); Ok(()) }
            reason = self.died.died() => Err(anyhow::anyhow!(reason)),
        };
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        // The proxy drains (stops accepting, lets in-flight requests finish up to its
        // deadline); aborting cannot stop its thread, the signal does.
        let _ = stop_proxy.send(());
        for (abort, _) in &watchers {
            abort.abort();
        }
        for (_, watcher) in watchers {
            let _ = watcher.await;
        }
        if let Some(socket) = workload_socket {
            let _ = std::fs::remove_file(socket);
        }
        // Nobody waits on the admin socket across a restart (unlike CNI's, see below).
        let _ = std::fs::remove_file(&self.config.admin_socket);
        // The CNI socket stays while another agent is coming: `mesh-cni` tells "restarting,
        // try again" (a socket nobody answers) from "no agent on this node" (no socket).
        if let crate::node_install::Departure::Uninstall(why) = departure {
            // After the tasks stopped: the route reconciler must not re-add what goes now.
            tracing::info!(why, "uninstall: removing everything Veil put on this node");
            let failed =
                crate::node_install::remove_from_node(&self.config, &self.service.netlink).await;
            for what in &failed {
                tracing::warn!(what, "left on the node");
            }
        }
        outcome
    }

    /// Before an uninstall removes the CNI configuration, keeps serving while pods deleted
    /// with the release (the issuer's, workloads') get their DEL: containerd cannot tear
    /// down a sandbox once no configuration is left. Gives up after [`UNINSTALL_DRAIN`].
    async fn drain_pods(&self) {
        let deadline = tokio::time::Instant::now() + UNINSTALL_DRAIN;
        loop {
            let left = self.service.ipam.allocations().len();
            if left == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    pods = left,
                    "uninstall: pods still hold addresses; their deletion will need a CNI again"
                );
                return;
            }
            tracing::info!(
                pods = left,
                "uninstall: waiting for the node's pods to be deleted"
            );
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// On SIGTERM: an uninstall when the agent's DaemonSet is gone (asked while the tasks
    /// still run, so pods being deleted meanwhile keep getting CNI DEL), else a restart.
    async fn departure(&self) -> crate::node_install::Departure {
        let Some(owner) = self
            .config
            .owner_daemonset
            .as_deref()
            .and_then(|o| crate::node_install::Owner::parse(o).ok())
        else {
            return crate::node_install::Departure::Restart;
        };
        let departure = crate::node_install::departure(&self.client, &owner).await;
        if departure == crate::node_install::Departure::Restart {
            tracing::info!("DaemonSet still present: leaving the node's network to the next agent");
        }
        departure
    }
}

/// How long an uninstalling agent waits for its node's pods to go: within the chart's
/// 30 s grace period, with time left to clean up.
const UNINSTALL_DRAIN: std::time::Duration = std::time::Duration::from_secs(20);

/// Where the pod CIDRs of every peer ever accepted are kept (see [`KnownCidrs`]).
const KNOWN_CIDRS_FILE: &str = "known-pod-cidrs.json";

/// Keeps the kernel's peer routes and the WireGuard peer table equal to the peer set.
struct PeerRoutes {
    netlink: rtnetlink::Handle,
    wireguard: Option<(Arc<Wireguard>, u32)>,
    known: KnownCidrs,
    own: NodeInfo,
    catch_all: Option<ipnet::Ipv4Net>,
    /// The cluster's Service range, unreachable for pods (see [`routes::desired`]).
    services: Option<ipnet::Ipv4Net>,
    /// The nodes excluded last time, so each change is reported once.
    excluded: Vec<crate::peers::Excluded>,
}

impl PeerRoutes {
    /// Checks the Nodes and applies the peer set: WireGuard peers first, then routes
    /// (strict: every remembered pod CIDR and the cluster range go into the device even
    /// without a peer).
    async fn apply(&mut self, nodes: &[Candidate]) {
        let known = &self.known;
        let set = crate::peers::validate(&self.own, self.catch_all, nodes, |n| known.holds(n));
        if set.excluded != self.excluded {
            for e in &set.excluded {
                tracing::warn!(
                    node = e.node,
                    reason = e.reason,
                    "node excluded from the peer set"
                );
            }
            self.excluded = set.excluded.clone();
        }
        let set = &set;
        self.known.remember(&set.peers);
        let device = self.wireguard.as_ref().map(|(wg, index)| {
            wg.set_peers(set);
            *index
        });
        let drops: Vec<_> = match device {
            Some(_) => self
                .known
                .strict_drops(&self.own, &set.peers)
                .into_iter()
                .chain(self.catch_all)
                .collect(),
            None => Vec::new(),
        };
        let want = routes::desired(&set.peers, device, &drops, self.services);
        tracing::info!(
            peers = set.peers.len(),
            excluded = set.excluded.len(),
            strict_drops = drops.len(),
            "peer set changed"
        );
        if let Err(e) = routes::reconcile(&self.netlink, &want).await {
            tracing::warn!(error = %e, "peer routes not fully reconciled");
        }
    }
}

/// Rotates the node key every `period` (unless zero) and whenever asked, publishing each
/// new key. Peers keep their sessions until they re-handshake with the new key.
async fn rotate_keys(
    wg: Arc<Wireguard>,
    client: kube::Client,
    node: String,
    period: std::time::Duration,
    mut asked: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<Result<String, String>>>,
) {
    let mut timer = (!period.is_zero())
        .then(|| tokio::time::interval_at(tokio::time::Instant::now() + period, period));
    loop {
        let reply = tokio::select! {
            Some(reply) = asked.recv() => Some(reply),
            _ = async { timer.as_mut().expect("guarded").tick().await }, if timer.is_some() => None,
            else => return,
        };
        let outcome = match wg.rotate() {
            Ok(endpoint) => {
                publish_until_done(&client, &node, endpoint).await;
                Ok(wireguard::keys::encode(&endpoint.public_key))
            }
            Err(e) => {
                tracing::error!(error = %e, "WireGuard key rotation failed; keeping the old key");
                Err(e.to_string())
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
}

/// How often the covered set is reconciled even without a change: a route or map entry
/// removed by hand comes back.
const COVER_RESYNC: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps the covered pods (eBPF map and local routes) equal to the snapshot's. Nothing
/// is written before the first complete snapshot: until then the covered set pinned by
/// the previous agent stays, so a restart never uncovers a pod.
async fn cover_pods(
    redirect: Arc<crate::redirect::Redirect>,
    netlink: rtnetlink::Handle,
    mut dataplane: crate::state::DataplaneRx,
    node_source: Option<std::net::Ipv4Addr>,
) {
    use std::collections::BTreeSet;
    loop {
        let snapshot = dataplane.borrow_and_update().clone();
        if snapshot.generation > 0 {
            let v4 = |ip: &IpAddr| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            };
            let covered: BTreeSet<std::net::Ipv4Addr> =
                snapshot.covered.keys().filter_map(v4).collect();
            let direct: BTreeSet<(std::net::Ipv4Addr, u16)> = snapshot
                .covered
                .iter()
                .filter_map(|(ip, pod)| Some((v4(ip)?, pod)))
                .flat_map(|(ip, pod)| pod.node_direct_ports.iter().map(move |p| (ip, *p)))
                .collect();
            // The probes' exemptions first: a new pod's tcpSocket probe must not meet the
            // proxy between its route and its exemption.
            if let Err(e) = redirect.set_node_direct(&direct) {
                tracing::warn!(error = %e, "node probe exemptions not fully set; retrying");
            }
            if let Err(e) = redirect.set_covered(&netlink, &covered, node_source).await {
                tracing::warn!(error = %e, "covered pods not fully set; retrying");
            }
        }
        // A change, or the periodic resync; a closed channel means the state layer has
        // stopped, which its own task reports.
        if let Ok(Err(_)) = tokio::time::timeout(COVER_RESYNC, dataplane.changed()).await {
            return;
        }
    }
}

/// Attaches the program that steers the node's own connections to covered pods (kubelet
/// probes, host-network pods) into the proxy, and returns the node address they come
/// from. Without an IPv4 InternalIP there is no address to give them (the kernel would
/// pick the pod's own, and the proxy would take the node for the pod): they then reach
/// covered pods directly, as the log says.
fn steer_node_connections(
    redirect: &crate::redirect::Redirect,
    config: &Config,
    internal_ip: IpAddr,
) -> Result<Option<std::net::Ipv4Addr>, StartError> {
    match internal_ip {
        IpAddr::V4(ip) => {
            let cgroup = crate::redirect::cgroup2_root(&config.policy.cgroup_root)?;
            redirect.attach_node(&cgroup)?;
            Ok(Some(ip))
        }
        IpAddr::V6(_) => {
            tracing::warn!(%internal_ip, "no IPv4 InternalIP: the node's own connections reach covered pods without the proxy");
            redirect.detach_node()?;
            Ok(None)
        }
    }
}

/// Turns anti-spoofing's events into flow records (the drops themselves are exact in the
/// per-pod counters; events may be lost when the ring is full).
async fn record_spoofing(
    mut events: crate::redirect::SpoofEvents,
    redirect: Arc<crate::redirect::Redirect>,
    dataplane: crate::state::DataplaneRx,
    flows: crate::flows::Flows,
) {
    use crate::flows::{Endpoint, FlowKind, FlowRecord, FlowVerdict};
    loop {
        let batch = match events.next_batch().await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "spoof events");
                return;
            }
        };
        let snapshot = dataplane.borrow().clone();
        for event in batch {
            let (src, dst) = match event.family {
                veil_bpf::SpoofedFamily::Ipv4 { src, dst } => {
                    (IpAddr::V4(src), Some(IpAddr::V4(dst)))
                }
                _ => (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), None),
            };
            let mut source = Endpoint::new(src, None, None);
            // The claimed source names nobody; the pod behind the interface is who sent it.
            let sender = redirect
                .pod_ip(event.ifindex)
                .and_then(|ip| snapshot.workload(IpAddr::V4(ip)));
            if let Some(sender) = sender {
                source.namespace = Some(sender.namespace.clone());
                source.pod = Some(sender.name.clone());
                source.spiffe_id = Some(sender.spiffe_id.clone());
            }
            let destination = dst.map_or_else(
                || Endpoint::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), None, None),
                |ip| Endpoint::new(ip, None, snapshot.workload(ip).map(|w| w.as_ref())),
            );
            let mut record =
                FlowRecord::new(FlowKind::Spoofed, FlowVerdict::Deny, source, destination);
            record.reason = Some(format!(
                "source address is not the pod's (ifindex {}, protocol {})",
                event.ifindex, event.protocol
            ));
            flows.record(record);
        }
    }
}
