//! Node-to-node encryption with WireGuard (boringtun, userspace): the node key, the peer
//! set from Node objects, and the packet path. Strict: pod traffic to another node goes
//! into the WireGuard device or nowhere, never onto the underlay in clear.

pub mod datapath;
pub mod keys;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use boringtun::noise::Tunn;
use boringtun::x25519::PublicKey;

use crate::k8s::{NodeInfo, WireguardEndpoint};
use datapath::{Peer, PeerCounters, PeerTable, Shared};
use keys::{KeyError, NodeKey};

/// The WireGuard device's name on every node.
pub const DEVICE_NAME: &str = "veil-wg0";

/// Errors of starting the WireGuard path.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    /// The key could not be loaded or made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The TUN device could not be made.
    #[error("create TUN device {DEVICE_NAME}: {0}")]
    Tun(std::io::Error),
    /// The UDP socket could not be bound.
    #[error("bind WireGuard UDP port {port}: {source}")]
    Bind {
        /// The port.
        port: u16,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Keeps the device (and the routes into it) when the agent exits: without a reader the
/// kernel drops what is routed there, which is the point: nothing falls back to a plain
/// route while the agent restarts. A new agent attaches to it by name.
fn set_persistent(tun: &tun_rs::SyncDevice) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// `_IOW('T', 203, int)` from linux/if_tun.h.
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    // SAFETY: TUNSETPERSIST takes an int argument by value on an open TUN descriptor.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Binds the WireGuard port on every address of both families, so peers reach this node
/// over an IPv4 or an IPv6 underlay alike; IPv4 alone where the kernel has no IPv6.
fn bind(port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual_stack = || -> std::io::Result<UdpSocket> {
        let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(socket.into())
    };
    match dual_stack() {
        Ok(socket) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            tracing::info!(
                port,
                "no IPv6 in this kernel; WireGuard listens on IPv4 only"
            );
            UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        }
        Err(e) => Err(e),
    }
}

/// One peer as `meshctl wireguard` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// Node name.
    pub node: String,
    /// Endpoint.
    pub endpoint: SocketAddr,
    /// Its pod CIDR.
    pub pod_cidr: ipnet::Ipv4Net,
    /// Seconds since the last completed handshake, if any.
    pub last_handshake_secs: Option<u64>,
    /// Plaintext bytes sent.
    pub tx_bytes: u64,
    /// Plaintext bytes received.
    pub rx_bytes: u64,
    /// Packets dropped by cryptokey routing.
    pub rx_spoofed: u64,
}

/// The running WireGuard path of this node.
pub struct Wireguard {
    shared: Arc<Shared>,
    key: Mutex<NodeKey>,
    port: u16,
    next_index: AtomicU32,
}

impl Wireguard {
    /// Loads (or makes) the key at `key_path`, opens the device with `mtu` and binds `port`,
    /// and starts the packet threads. The device persists across agent restarts, so routes
    /// into it stay and traffic waits (or drops) instead of leaking while no agent runs.
    pub fn start(key_path: &Path, port: u16, mtu: u32) -> Result<Arc<Self>, WireguardError> {
        let key = NodeKey::load_or_create(key_path)?;
        let tun = tun_rs::DeviceBuilder::new()
            .name(DEVICE_NAME)
            .mtu(mtu as u16)
            .offload(true)
            .enable(true)
            .build_sync()
            .map_err(WireguardError::Tun)?;
        set_persistent(&tun).map_err(WireguardError::Tun)?;
        let socket = bind(port).map_err(|source| WireguardError::Bind { port, source })?;
        let shared = Arc::new(Shared::new(tun, socket, mtu as usize).map_err(WireguardError::Tun)?);
        for (name, run) in [
            ("wg-tx", datapath::run_tx as fn(Arc<Shared>)),
            ("wg-rx", datapath::run_rx),
            ("wg-timers", datapath::run_timers),
        ] {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(shared))
                .map_err(WireguardError::Tun)?;
        }
        tracing::info!(
            device = DEVICE_NAME,
            port,
            mtu,
            public_key = keys::encode(key.public().as_bytes()),
            "WireGuard up"
        );
        Ok(Arc::new(Wireguard {
            shared,
            key: Mutex::new(key),
            port,
            next_index: AtomicU32::new(1),
        }))
    }

    /// What this node publishes on its Node.
    pub fn endpoint(&self) -> WireguardEndpoint {
        WireguardEndpoint {
            public_key: *self.key.lock().expect("key lock").public().as_bytes(),
            port: self.port,
        }
    }

    /// Makes the peer set equal to the nodes with a published key; unchanged peers keep
    /// their sessions, so established connections are not disturbed.
    pub fn set_peers(&self, nodes: &[NodeInfo]) {
        // Hold the key for the whole swap: a rotation between reading the key and
        // installing the table would leave new sessions on the old key for good.
        let key = self.key.lock().expect("key lock");
        let secret = key.secret();
        let current = self.shared.table();
        let peers = nodes
            .iter()
            .filter_map(|node| {
                let wg = node.wireguard?;
                let endpoint = SocketAddr::from((node.internal_ip, wg.port));
                if let Some(same) = current.peers().iter().find(|p| {
                    p.name == node.name && p.public_key == wg.public_key && p.endpoint == endpoint && p.pod_cidr == node.pod_cidr
                }) {
                    return Some(same.clone());
                }
                tracing::info!(node = node.name, %endpoint, pod_cidr = %node.pod_cidr, "WireGuard peer");
                // Indexes tell sessions apart; boringtun uses the low 8 bits itself.
                let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                let tunn = Tunn::new(secret.clone(), PublicKey::from(wg.public_key), None, None, index, None);
                Some(Arc::new(Peer {
                    name: node.name.clone(),
                    endpoint,
                    pod_cidr: node.pod_cidr,
                    public_key: wg.public_key,
                    tunn: Mutex::new(tunn),
                    counters: PeerCounters::default(),
                }))
            })
            .collect();
        self.shared.set_table(PeerTable::new(peers));
        drop(key);
    }

    /// Replaces the node key; sessions re-handshake with the new key as soon as peers have
    /// seen it published. Returns what to publish.
    pub fn rotate(&self) -> Result<WireguardEndpoint, KeyError> {
        let mut key = self.key.lock().expect("key lock");
        key.rotate()?;
        for peer in self.shared.table().peers() {
            peer.tunn
                .lock()
                .expect("tunn lock poisoned")
                .set_static_private(key.secret(), key.public(), None);
        }
        tracing::info!(
            public_key = keys::encode(key.public().as_bytes()),
            "WireGuard key rotated"
        );
        Ok(WireguardEndpoint {
            public_key: *key.public().as_bytes(),
            port: self.port,
        })
    }

    /// Every peer's state.
    pub fn status(&self) -> Vec<PeerStatus> {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared
            .table()
            .peers()
            .iter()
            .map(|p| {
                let (since, ..) = p.tunn.lock().expect("tunn lock poisoned").stats();
                PeerStatus {
                    node: p.name.clone(),
                    endpoint: p.endpoint,
                    pod_cidr: p.pod_cidr,
                    last_handshake_secs: since.map(|d| d.as_secs()),
                    tx_bytes: p.counters.tx_bytes.load(Relaxed),
                    rx_bytes: p.counters.rx_bytes.load(Relaxed),
                    rx_spoofed: p.counters.rx_spoofed.load(Relaxed),
                }
            })
            .collect()
    }

    /// Packets dropped because no peer with a key covers their destination.
    pub fn dropped_no_peer(&self) -> u64 {
        self.shared.counters.tx_no_peer.load(Ordering::Relaxed)
    }
}
