//! The WireGuard packet path: a multi-queue TUN device with offloads (TSO in, GRO out),
//! UDP sockets with GSO and GRO sharing the port (SO_REUSEPORT), one
//! `boringtun::noise::Tunn` per peer behind its own lock, and per queue two threads:
//! TUN → encrypt → UDP and UDP → decrypt → TUN; one more drives the per-peer timers. No
//! global lock: the peer table is an immutable snapshot swapped whole by the control plane.
//!
//! Each peer is pinned to one queue: a reuseport program picks the receiving socket from
//! the session index in the WireGuard header (which encodes the peer), the receive thread
//! writes into its own TUN queue, and the kernel steers a flow's outgoing packets to the
//! queue its incoming ones were written on. A peer's packets so stay on one thread pair
//! (its session lock is never fought over), while different peers use different cores.

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use ipnet::Ipv4Net;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// WireGuard's largest overhead on an IPv4 packet beyond the packet itself (header 16,
/// tag 16) plus padding to 16 bytes; buffers for one encrypted packet need this much more.
const ENCAP_OVERHEAD: usize = 32 + 16;
/// boringtun wants at least this much room for handshake messages.
const MIN_DST: usize = 148;
/// The most payload one UDP GSO send may carry (a UDP datagram's limit, with room for headers).
const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffers: a GRO receive holds up to 64 KB per datagram, so the default ~200 KB
/// overflows under a single fast flow; 16 MB absorbs bursts between batches.
const SOCKET_BUFFER_BYTES: libc::c_int = 16 << 20;
/// How often timers run: handshake retries and keepalives need no finer grain.
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Counters of one peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Plaintext bytes sent to the peer.
    pub tx_bytes: AtomicU64,
    /// Plaintext bytes received from the peer and delivered.
    pub rx_bytes: AtomicU64,
    /// Decrypted packets dropped because their source is outside the peer's pod CIDR.
    pub rx_spoofed: AtomicU64,
    /// Datagrams from the peer's address that did not decrypt or parse (empty,
    /// truncated, forged, replayed).
    pub rx_malformed: AtomicU64,
}

/// One remote node.
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Where its agent listens.
    pub endpoint: SocketAddr,
    /// Its pod CIDR: sources accepted from it, and destinations sent to it.
    pub pod_cidr: Ipv4Net,
    /// Its own IPv4 address (InternalIP): also accepted from it and sent to it, so pods
    /// reach the node itself (API server, host-network pods) and it reaches them, encrypted.
    pub node_ip: Option<Ipv4Addr>,
    /// Its public key.
    pub public_key: [u8; 32],
    /// The index its sessions are numbered from (boringtun shifts it left by 8).
    pub index: u32,
    /// The Noise state; locked per packet batch, never across peers.
    pub tunn: Mutex<Tunn>,
    /// Its counters.
    pub counters: PeerCounters,
}

/// Counters of one queue (a TUN queue, a socket and their two threads).
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Packets read from the device and encrypted.
    pub tx_packets: AtomicU64,
    /// Packets decrypted and written to the device.
    pub rx_packets: AtomicU64,
}

/// One queue: a TUN queue and the socket its threads use.
pub struct Queue {
    tun: SyncDevice,
    socket: UdpSocket,
    udp: UdpSocketState,
    /// Its counters.
    pub counters: QueueCounters,
}

impl Queue {
    /// Pairs a TUN queue with a socket, making the socket's buffers fit a fast flow.
    pub fn new(tun: SyncDevice, socket: UdpSocket) -> std::io::Result<Self> {
        force_buffer(&socket, libc::SO_RCVBUFFORCE)?;
        force_buffer(&socket, libc::SO_SNDBUFFORCE)?;
        let udp = UdpSocketState::new((&socket).into())?;
        Ok(Queue {
            tun,
            socket,
            udp,
            counters: QueueCounters::default(),
        })
    }
}

impl Peer {
    /// The queue the reuseport program pins this peer's datagrams to (see
    /// `steer_by_session`): the low byte of its index, modulo the queue count.
    pub fn queue(&self, queues: usize) -> usize {
        (self.index & 0xff) as usize % queues.max(1)
    }
}

/// An immutable set of peers.
#[derive(Default)]
pub struct PeerTable {
    peers: Vec<Arc<Peer>>,
}

impl PeerTable {
    /// Builds a table.
    pub fn new(peers: Vec<Arc<Peer>>) -> Self {
        PeerTable { peers }
    }

    /// Every peer.
    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    /// The peer whose node address is `dst`, else whose pod CIDR holds it (longest prefix).
    pub fn by_destination(&self, dst: Ipv4Addr) -> Option<&Arc<Peer>> {
        if let Some(node) = self.peers.iter().find(|p| p.node_ip == Some(dst)) {
            return Some(node);
        }
        self.peers
            .iter()
            .filter(|p| p.pod_cidr.contains(&dst))
            .max_by_key(|p| p.pod_cidr.prefix_len())
    }

    /// The peer whose endpoint address is `ip` (an IPv4 peer seen on the dual-stack
    /// socket arrives as an IPv4-mapped IPv6 address).
    pub fn by_source(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        let ip = ip.to_canonical();
        self.peers.iter().find(|p| p.endpoint.ip() == ip)
    }
}

/// Device-wide counters.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Packets from pods to a destination no peer with a key covers: dropped, never sent in clear.
    pub tx_no_peer: AtomicU64,
    /// Datagrams from addresses that are no peer's endpoint.
    pub rx_unknown_source: AtomicU64,
}

/// State the threads share with the control plane.
pub struct Shared {
    table: RwLock<Arc<PeerTable>>,
    /// The queues; every one has at least one.
    pub queues: Vec<Queue>,
    /// Whether the sockets are IPv6 (dual-stack), so IPv4 peers are addressed mapped.
    ipv6_socket: bool,
    offset: usize,
    mtu: usize,
    /// Device-wide counters.
    pub counters: DeviceCounters,
}

impl Shared {
    /// Wraps the queues (at least one; all of one device, sockets of one family).
    pub fn new(queues: Vec<Queue>, mtu: usize) -> std::io::Result<Self> {
        let first = queues
            .first()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no queues"))?;
        let offset = if first.tun.tcp_gso() {
            VIRTIO_NET_HDR_LEN
        } else {
            0
        };
        let ipv6_socket = first.socket.local_addr()?.is_ipv6();
        Ok(Shared {
            ipv6_socket,
            table: RwLock::new(Arc::default()),
            queues,
            offset,
            mtu,
            counters: DeviceCounters::default(),
        })
    }

    /// The current peers.
    pub fn table(&self) -> Arc<PeerTable> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Swaps in a new peer set.
    pub fn set_table(&self, table: PeerTable) {
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
    }

    fn send(&self, queue: usize, dst: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let destination = match dst {
            SocketAddr::V4(v4) if self.ipv6_socket => {
                SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))
            }
            other => other,
        };
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        let q = &self.queues[queue];
        if let Err(e) = q.udp.try_send((&q.socket).into(), &transmit) {
            tracing::debug!(peer = %dst, error = %e, "send to peer");
        }
    }
}

/// Sets a socket buffer past `net.core.[rw]mem_max` (the agent runs as root).
fn force_buffer(socket: &UdpSocket, option: libc::c_int) -> std::io::Result<()> {
    set_socket_option(socket, option, &SOCKET_BUFFER_BYTES)
}

/// `setsockopt(SOL_SOCKET, option)` with `value`, for the options `std` and `socket2` lack.
/// `T` must be the C type the kernel expects for `option`.
pub(crate) fn set_socket_option<T>(
    socket: &UdpSocket,
    option: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a pointer to a live `T` and its size; the kernel copies what it reads.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Returns once `fd` is readable. No busy polling: measured with one flow on a saturated
/// 2-core machine, spinning 20-150 us before sleeping cost 6-20 % of throughput (the
/// spinning threads took CPU from the ones with work), and never gained any.
fn wait_readable(fd: std::os::fd::RawFd) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; -1 sleeps until readable (or a signal, which just returns).
    unsafe { libc::poll(&mut pollfd, 1, -1) };
}

fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

/// Encrypted packets waiting to go out as one GSO send: equal-sized segments, the last
/// may be shorter.
struct GsoRun {
    queue: usize,
    dst: Option<SocketAddr>,
    start: usize,
    end: usize,
    segment: usize,
    count: usize,
}

impl GsoRun {
    fn new(queue: usize) -> Self {
        GsoRun {
            queue,
            dst: None,
            start: 0,
            end: 0,
            segment: 0,
            count: 0,
        }
    }

    fn flush(&mut self, shared: &Shared, out: &[u8]) {
        if let Some(dst) = self.dst.filter(|_| self.count > 0) {
            let segment = (self.count > 1).then_some(self.segment);
            shared.send(self.queue, dst, &out[self.start..self.end], segment);
        }
        self.count = 0;
        self.start = self.end;
    }

    /// Adds the packet just written at `out[self.end..self.end + len]`.
    fn push(
        &mut self,
        shared: &Shared,
        out: &[u8],
        dst: SocketAddr,
        len: usize,
        max_segments: usize,
    ) {
        // One GSO send carries at most a UDP datagram's worth of payload.
        let too_big = self.end - self.start + len > MAX_GSO_BYTES;
        if self.count > 0 && (self.dst != Some(dst) || len > self.segment || too_big) {
            self.flush(shared, out);
        }
        if self.count == 0 {
            self.dst = Some(dst);
            self.segment = len;
            self.start = self.end;
        }
        self.end += len;
        self.count += 1;
        if len < self.segment || self.count >= max_segments {
            self.flush(shared, out);
        }
    }
}

/// TUN → encrypt → UDP, in batches, for queue `q`.
pub fn run_tx(shared: Arc<Shared>, q: usize) {
    let queue = &shared.queues[q];
    let slot = shared.mtu + ENCAP_OVERHEAD + MIN_DST;
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; shared.mtu.max(1500) + 64]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut out = vec![0u8; IDEAL_BATCH_SIZE * slot];
    let max_segments = queue.udp.max_gso_segments().max(1);
    loop {
        wait_readable(std::os::fd::AsRawFd::as_raw_fd(&queue.tun));
        let n = match queue
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "read from WireGuard device");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        queue
            .counters
            .tx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        let table = shared.table();
        let mut run = GsoRun::new(q);
        let mut held: Option<(&Arc<Peer>, std::sync::MutexGuard<'_, Tunn>)> = None;
        for i in 0..n {
            let packet = bufs[i].get(..sizes[i]).unwrap_or_default();
            let Some(peer) = ipv4_destination(packet).and_then(|d| table.by_destination(d)) else {
                shared.counters.tx_no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if out.len() - run.end < packet.len() + ENCAP_OVERHEAD + MIN_DST {
                run.flush(&shared, &out);
                run.end = 0;
                run.start = 0;
            }
            // Keep the peer's lock across consecutive packets to the same peer.
            if held.as_ref().is_none_or(|(p, _)| !Arc::ptr_eq(p, peer)) {
                // Release the previous peer's lock before taking the next one.
                drop(held.take());
                held = Some((peer, lock_session(peer)));
            }
            let Some((peer, tunn)) = held.as_mut() else {
                continue;
            };
            peer.counters
                .tx_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            let at = run.end;
            match tunn.encapsulate(packet, &mut out[at..]) {
                TunnResult::WriteToNetwork(encrypted) => {
                    let len = encrypted.len();
                    let dst = peer.endpoint;
                    run.push(&shared, &out, dst, len, max_segments);
                }
                TunnResult::Err(e) => tracing::debug!(peer = peer.name, error = ?e, "encapsulate"),
                // Queued until the handshake completes.
                _ => {}
            }
        }
        drop(held);
        run.flush(&shared, &out);
    }
}

/// UDP → decrypt → TUN, in batches, for queue `q`, with cryptokey routing on the inner
/// source.
pub fn run_rx(shared: Arc<Shared>, q: usize) {
    const DATAGRAMS: usize = 32;
    let queue = &shared.queues[q];
    let gro = queue.udp.gro_segments().max(1);
    let mut storage: [Vec<u8>; DATAGRAMS] =
        std::array::from_fn(|_| vec![0u8; 65535.max(gro * 1600)]);
    let mut metas = vec![RecvMeta::default(); DATAGRAMS];
    let mut plain = vec![0u8; 65535];
    let offset = shared.offset;
    // Full capacity up front: tun-rs coalesces packets into a buffer only if it already
    // has room for the result, so lazily grown buffers would silently disable GRO (the
    // pages are touched only as coalescing fills them).
    let mut tun_bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(65535 + offset))
        .collect();
    let mut pending = 0usize;
    let mut gro_table = GROTable::default();
    loop {
        wait_readable(std::os::fd::AsRawFd::as_raw_fd(&queue.socket));
        let count = {
            let mut slices: [IoSliceMut<'_>; DATAGRAMS] = storage
                .each_mut()
                .map(|b| IoSliceMut::new(b.as_mut_slice()));
            match queue
                .udp
                .recv((&queue.socket).into(), &mut slices, &mut metas)
            {
                Ok(count) => count,
                Err(e) => {
                    tracing::warn!(error = %e, "receive from WireGuard socket");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        };
        let table = shared.table();
        for (meta, buf) in metas.iter().zip(&storage).take(count) {
            let Some(peer) = table.by_source(meta.addr.ip()) else {
                shared
                    .counters
                    .rx_unknown_source
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // `meta.len` comes from the kernel, but clamp it: a slice past the buffer
            // would panic with the peer's session locked.
            let received = buf.get(..meta.len).unwrap_or(buf);
            let mut tunn = lock_session(peer);
            decrypt_datagrams(
                peer,
                &mut tunn,
                meta.addr.ip(),
                received,
                meta.stride,
                &mut plain,
                |output| match output {
                    Decrypted::Reply(reply) => shared.send(q, meta.addr, reply, None),
                    Decrypted::Packet(packet) => {
                        let buf = &mut tun_bufs[pending];
                        buf.clear();
                        buf.resize(offset, 0);
                        buf.extend_from_slice(packet);
                        pending += 1;
                        if pending == tun_bufs.len() {
                            write_tun(&shared, q, &mut gro_table, &mut tun_bufs[..pending]);
                            pending = 0;
                        }
                    }
                },
            );
        }
        if pending > 0 {
            write_tun(&shared, q, &mut gro_table, &mut tun_bufs[..pending]);
            pending = 0;
        }
    }
}

/// What decrypting a peer's datagrams produced.
pub enum Decrypted<'a> {
    /// A handshake or cookie message to send back to the peer.
    Reply(&'a [u8]),
    /// A decrypted IPv4 packet whose source the peer may send from.
    Packet(&'a [u8]),
}

/// Locks a peer's session. A poisoned lock means a packet thread panicked with it held;
/// that thread's death already stops the agent (see `crate::fatal`), so the session is
/// still used until then rather than taking every other thread down with it.
pub fn lock_session(peer: &Peer) -> std::sync::MutexGuard<'_, Tunn> {
    peer.tunn
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Decrypts what one receive returned from `peer` (at `src`): `received` holds one
/// datagram, or several of `stride` bytes each (UDP GRO; the last may be shorter), and
/// every byte of it is the sender's choice. Empty, truncated, oversized, garbage and
/// replayed datagrams are counted and dropped; nothing here may panic, because the
/// caller holds the peer's session lock. Inner packets from outside the peer's pod CIDR
/// are dropped (cryptokey routing); what survives goes to `emit`.
pub fn decrypt_datagrams(
    peer: &Peer,
    tunn: &mut Tunn,
    src: IpAddr,
    received: &[u8],
    stride: usize,
    plain: &mut [u8],
    mut emit: impl FnMut(Decrypted<'_>),
) {
    // A stride of 0 means "one datagram"; `chunks(0)` would panic.
    let stride = if stride == 0 { received.len() } else { stride };
    if received.is_empty() {
        peer.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    for datagram in received.chunks(stride.max(1)) {
        let mut result = tunn.decapsulate(Some(src), datagram, plain);
        loop {
            match result {
                TunnResult::WriteToNetwork(reply) => {
                    emit(Decrypted::Reply(reply));
                    // Flush packets queued behind a handshake.
                    result = tunn.decapsulate(None, &[], plain);
                    continue;
                }
                TunnResult::WriteToTunnelV4(packet, source) => {
                    if peer.pod_cidr.contains(&source) || peer.node_ip == Some(source) {
                        peer.counters
                            .rx_bytes
                            .fetch_add(packet.len() as u64, Ordering::Relaxed);
                        emit(Decrypted::Packet(packet));
                    } else {
                        peer.counters.rx_spoofed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = peer.name, %source, "dropped: inner source neither the peer's pod CIDR nor its node address");
                    }
                }
                // Pods are IPv4 only: an IPv6 inner packet is no pod's.
                TunnResult::WriteToTunnelV6(..) => {
                    peer.counters.rx_spoofed.fetch_add(1, Ordering::Relaxed);
                }
                TunnResult::Err(e) => {
                    peer.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(peer = peer.name, error = ?e, "decapsulate");
                }
                TunnResult::Done => {}
            }
            break;
        }
    }
}

fn write_tun(shared: &Shared, q: usize, gro_table: &mut GROTable, bufs: &mut [Vec<u8>]) {
    let queue = &shared.queues[q];
    queue
        .counters
        .rx_packets
        .fetch_add(bufs.len() as u64, Ordering::Relaxed);
    if let Err(e) = queue.tun.send_multiple(gro_table, bufs, shared.offset) {
        tracing::debug!(error = %e, "write to WireGuard device");
    }
}

/// Drives handshakes, rekeys and keepalives of every peer.
pub fn run_timers(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 2048];
    loop {
        std::thread::sleep(TIMER_TICK);
        for peer in shared.table().peers() {
            let mut tunn = lock_session(peer);
            match tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(packet) => shared.send(0, peer.endpoint, packet, None),
                TunnResult::Err(e) => tracing::trace!(peer = peer.name, error = ?e, "timers"),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer as node B sees node A (pod CIDR 198.19.1.0/24), and A's session to B.
    fn pair() -> (Peer, Tunn) {
        use boringtun::x25519::{PublicKey, StaticSecret};
        let (sa, sb) = (
            StaticSecret::random_from_rng(rand_core::OsRng),
            StaticSecret::random_from_rng(rand_core::OsRng),
        );
        let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
        let a = Tunn::new(sa, pb, None, None, 1, None);
        let b_view = Tunn::new(sb, pa, None, None, 2, None);
        let peer = Peer {
            name: "node-a".into(),
            endpoint: "198.18.0.2:51871".parse().unwrap(),
            pod_cidr: "198.19.1.0/24".parse().unwrap(),
            node_ip: Some("198.18.0.2".parse().unwrap()),
            public_key: *pa.as_bytes(),
            index: 2,
            tunn: Mutex::new(b_view),
            counters: PeerCounters::default(),
        };
        (peer, a)
    }

    fn ipv4_packet(src: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[198, 19, 2, 9]);
        p
    }

    /// Feeds `datagram` to B; returns B's replies and delivered packets.
    fn feed(peer: &Peer, datagram: &[u8], stride: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut plain = vec![0u8; 65535];
        let (mut replies, mut packets) = (Vec::new(), Vec::new());
        let src = peer.endpoint.ip();
        let mut tunn = lock_session(peer);
        decrypt_datagrams(
            peer,
            &mut tunn,
            src,
            datagram,
            stride,
            &mut plain,
            |out| match out {
                Decrypted::Reply(r) => replies.push(r.to_vec()),
                Decrypted::Packet(p) => packets.push(p.to_vec()),
            },
        );
        (replies, packets)
    }

    /// A's first data packet to B after a completed handshake (and B delivered nothing yet).
    fn established(peer: &Peer, a: &mut Tunn, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 65535];
        let init = match a.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            _ => panic!("expected a handshake initiation"),
        };
        let (replies, _) = feed(peer, &init, 0);
        let response = replies.first().expect("a handshake response").clone();
        let mut out = Vec::new();
        let mut result = a.decapsulate(None, &response, &mut buf);
        while let TunnResult::WriteToNetwork(msg) = result {
            out.push(msg.to_vec());
            result = a.decapsulate(None, &[], &mut buf);
        }
        // The keepalive first, then the packet queued behind the handshake.
        out.into_iter()
            .max_by_key(Vec::len)
            .expect("the queued packet")
    }

    #[test]
    fn hardening_rx_survives_empty_truncated_garbage_and_replayed_datagrams() {
        let (peer, mut a) = pair();
        let packet = ipv4_packet([198, 19, 1, 7]);
        let data = established(&peer, &mut a, &packet);

        // What used to panic with the session locked: an empty datagram (stride 0).
        assert_eq!(feed(&peer, &[], 0), (vec![], vec![]));
        // Every truncation of a real data packet, garbage, and odd strides.
        for len in 0..data.len() {
            let (_, delivered) = feed(&peer, &data[..len], 0);
            assert!(
                delivered.is_empty(),
                "a truncated datagram of {len} bytes delivered"
            );
        }
        for stride in [1, 3, 16, 31] {
            feed(&peer, &data, stride);
        }
        feed(&peer, &[0xff; 4096], 0);
        feed(&peer, &[1, 0, 0, 0], 0);
        assert!(peer.counters.rx_malformed.load(Ordering::Relaxed) > data.len() as u64);

        // The real packet still decrypts once; its replay does not.
        let (_, delivered) = feed(&peer, &data, 0);
        assert_eq!(delivered, vec![packet]);
        let (_, replayed) = feed(&peer, &data, 0);
        assert!(
            replayed.is_empty(),
            "a replayed datagram was delivered again"
        );
        assert!(!peer.tunn.is_poisoned());
    }

    #[test]
    fn hardening_rx_drops_inner_sources_outside_the_peer_cidr() {
        let (peer, mut a) = pair();
        let data = established(&peer, &mut a, &ipv4_packet([198, 19, 9, 9]));
        let (_, delivered) = feed(&peer, &data, 0);
        assert!(delivered.is_empty());
        assert_eq!(peer.counters.rx_spoofed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn wireguard_destination_parsing() {
        let mut packet = [0u8; 20];
        packet[0] = 0x45;
        packet[16..20].copy_from_slice(&[198, 19, 1, 5]);
        assert_eq!(
            ipv4_destination(&packet),
            Some(Ipv4Addr::new(198, 19, 1, 5))
        );
        packet[0] = 0x60;
        assert_eq!(ipv4_destination(&packet), None);
        assert_eq!(ipv4_destination(&packet[..10]), None);
    }
}
