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

use crate::k8s::WireguardEndpoint;
use datapath::{Peer, PeerCounters, PeerTable, Queue, Shared};
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

/// Binds `count` sockets to the WireGuard port on every address of both families (so peers
/// reach this node over an IPv4 or an IPv6 underlay alike; IPv4 alone where the kernel has
/// no IPv6), sharing the port with SO_REUSEPORT when there are several, which are then
/// steered by [`steer_by_session`].
fn bind(port: u16, count: usize) -> std::io::Result<Vec<UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let one = |ipv6: bool| -> std::io::Result<UdpSocket> {
        let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if count > 1 {
            socket.set_reuse_port(true)?;
        }
        let addr = if ipv6 {
            socket.set_only_v6(false)?;
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        };
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    let first = match one(true) {
        Ok(socket) => socket,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            tracing::info!(
                port,
                "no IPv6 in this kernel; WireGuard listens on IPv4 only"
            );
            one(false)?
        }
        Err(e) => return Err(e),
    };
    let ipv6 = first.local_addr()?.is_ipv6();
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(one(ipv6)?);
    }
    if count > 1 {
        steer_by_session(&sockets[0], count)?;
    }
    Ok(sockets)
}

/// Attaches a classic BPF program to the port's reuseport group that hands each datagram
/// to socket `peer % count`, `peer` being the byte of our session index that
/// [`Wireguard::set_peers`] numbers peers by (boringtun puts the index it is given above
/// 8 bits of session counter; the receiver index is little-endian at offset 4 of the UDP
/// payload, at 8 in a handshake response). A handshake initiation names no index of ours
/// and lands anywhere, which is fine: any queue can serve any peer; pinning only keeps a
/// peer's bulk on one thread pair.
fn steer_by_session(socket: &UdpSocket, count: usize) -> std::io::Result<()> {
    /// SO_ATTACH_REUSEPORT_CBPF in asm-generic/socket.h (x86_64, arm64); libc lacks it.
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    // Opcodes from linux/filter.h.
    const LD_B_ABS: u16 = 0x30;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JA: u16 = 0x05;
    const RSH_K: u16 = 0x74;
    const AND_K: u16 = 0x54;
    const MOD_K: u16 = 0x94;
    const RET_A: u16 = 0x16;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let program = [
        // The message type; a handshake response (2) carries our index at 8, others at 4.
        op(LD_B_ABS, 0, 0, 0),
        op(JEQ_K, 0, 2, 2),
        op(LD_W_ABS, 0, 0, 8),
        op(JA, 0, 0, 1),
        op(LD_W_ABS, 0, 0, 4),
        // Loaded big-endian, so the index's byte 1 (the peer's number) is bits 16..24.
        op(RSH_K, 0, 0, 16),
        op(AND_K, 0, 0, 0xff),
        op(MOD_K, 0, 0, count as u32),
        // The socket's position in the group.
        op(RET_A, 0, 0, 0),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // `fprog` points into `program`, which outlives the call; the kernel copies both.
    datapath::set_socket_option(socket, SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// Opens `count` queues of the device; one if the persistent device was made without
/// multi-queue by an older agent (deleting it would open a moment without strict routes).
fn open_device(mtu: u32, count: usize) -> std::io::Result<Vec<tun_rs::SyncDevice>> {
    let build = |multi_queue: bool| {
        tun_rs::DeviceBuilder::new()
            .name(DEVICE_NAME)
            .mtu(mtu as u16)
            .offload(true)
            .multi_queue(multi_queue)
            .enable(true)
            .build_sync()
    };
    let first = match build(count > 1) {
        Ok(tun) => tun,
        Err(e) if count > 1 && e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                device = DEVICE_NAME,
                "the existing device has one queue; using it (delete the device while no pods run to get more)"
            );
            return Ok(vec![build(false)?]);
        }
        Err(e) => return Err(e),
    };
    let mut queues = vec![first];
    for _ in 1..count {
        let queue = queues[0].try_clone()?;
        queues.push(queue);
    }
    Ok(queues)
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
    /// Datagrams from its address that did not decrypt or parse.
    #[serde(default)]
    pub rx_malformed: u64,
    /// The queue its traffic is pinned to.
    #[serde(default)]
    pub queue: usize,
}

/// One queue as `meshctl wireguard` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStatus {
    /// Packets read from the device and encrypted on this queue.
    pub tx_packets: u64,
    /// Packets decrypted and written to the device on this queue.
    pub rx_packets: u64,
}

/// The running WireGuard path of this node.
pub struct Wireguard {
    shared: Arc<Shared>,
    key: Mutex<NodeKey>,
    port: u16,
    next_index: AtomicU32,
    excluded: Mutex<Vec<crate::peers::Excluded>>,
}

impl Wireguard {
    /// Loads (or makes) the key at `key_path`, opens `queues` queues of the device with
    /// `mtu`, binds `port` once per queue, and starts the packet threads. The device
    /// persists across agent restarts, so routes into it stay and traffic waits (or drops)
    /// instead of leaking while no agent runs. A packet thread that dies is reported to
    /// `fatal`.
    pub fn start(
        key_path: &Path,
        port: u16,
        mtu: u32,
        queues: usize,
        fatal: &crate::fatal::Fatal,
    ) -> Result<Arc<Self>, WireguardError> {
        let key = NodeKey::load_or_create(key_path)?;
        let tuns = open_device(mtu, queues.max(1)).map_err(WireguardError::Tun)?;
        set_persistent(&tuns[0]).map_err(WireguardError::Tun)?;
        let sockets =
            bind(port, tuns.len()).map_err(|source| WireguardError::Bind { port, source })?;
        let queues = tuns
            .into_iter()
            .zip(sockets)
            .map(|(tun, socket)| Queue::new(tun, socket))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(WireguardError::Tun)?;
        let shared = Arc::new(Shared::new(queues, mtu as usize).map_err(WireguardError::Tun)?);
        let spawn = |name: String, run: Box<dyn FnOnce() + Send>| {
            fatal.spawn_thread(name, run).map_err(WireguardError::Tun)
        };
        for q in 0..shared.queues.len() {
            let (tx, rx) = (shared.clone(), shared.clone());
            spawn(
                format!("wg-tx{q}"),
                Box::new(move || datapath::run_tx(tx, q)),
            )?;
            spawn(
                format!("wg-rx{q}"),
                Box::new(move || datapath::run_rx(rx, q)),
            )?;
        }
        let timers = shared.clone();
        spawn(
            "wg-timers".into(),
            Box::new(move || datapath::run_timers(timers)),
        )?;
        tracing::info!(
            device = DEVICE_NAME,
            port,
            mtu,
            queues = shared.queues.len(),
            public_key = keys::encode(key.public().as_bytes()),
            "WireGuard up"
        );
        Ok(Arc::new(Wireguard {
            shared,
            key: Mutex::new(key),
            port,
            next_index: AtomicU32::new(1),
            excluded: Mutex::default(),
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
    pub fn set_peers(&self, set: &crate::peers::PeerSet) {
        let nodes = &set.peers;
        *self
            .excluded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set.excluded.clone();
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
                    node_ip: match node.internal_ip {
                        std::net::IpAddr::V4(ip) => Some(ip),
                        std::net::IpAddr::V6(_) => None,
                    },
                    public_key: wg.public_key,
                    index,
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
            datapath::lock_session(peer).set_static_private(key.secret(), key.public(), None);
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
                let (since, ..) = datapath::lock_session(p).stats();
                PeerStatus {
                    node: p.name.clone(),
                    endpoint: p.endpoint,
                    pod_cidr: p.pod_cidr,
                    last_handshake_secs: since.map(|d| d.as_secs()),
                    tx_bytes: p.counters.tx_bytes.load(Relaxed),
                    rx_bytes: p.counters.rx_bytes.load(Relaxed),
                    rx_spoofed: p.counters.rx_spoofed.load(Relaxed),
                    rx_malformed: p.counters.rx_malformed.load(Relaxed),
                    queue: p.queue(self.shared.queues.len()),
                }
            })
            .collect()
    }

    /// Packets through each queue.
    pub fn queues(&self) -> Vec<QueueStatus> {
        self.shared
            .queues
            .iter()
            .map(|q| QueueStatus {
                tx_packets: q.counters.tx_packets.load(Ordering::Relaxed),
                rx_packets: q.counters.rx_packets.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Nodes left out of the peer set, and why.
    pub fn excluded(&self) -> Vec<crate::peers::Excluded> {
        self.excluded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Packets dropped because no peer with a key covers their destination.
    pub fn dropped_no_peer(&self) -> u64 {
        self.shared.counters.tx_no_peer.load(Ordering::Relaxed)
    }
}
