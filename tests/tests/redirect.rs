//! The redirect datapath on a real kernel: a "node" network namespace with two "pod"
//! namespaces behind veths, `Redirect` loaded in the node, a transparent stand-in proxy.
//! Root only; addresses from 198.18.250.0/24 and 198.18.251.0/24.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_agent::redirect::{consts, Redirect, SpoofedFamily};
use veil_testbed::net::Netns;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
const POD_A: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 3);
const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 99);
const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 251, 10);
const PROXY_PORT: u16 = 15001;
const TIMEOUT: Duration = Duration::from_secs(3);

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP socket with `IP_TRANSPARENT`, `SO_MARK` `mark` and `SO_REUSEADDR`, bound to
/// `ip:port`: what the proxy uses for its listener and its upstream connections.
fn transparent_socket(ip: Ipv4Addr, port: u16, mark: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor this function owns; every pointer is to
    // a live local of the length passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        check(fd, "socket")?;
        let fd = OwnedFd::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let one: libc::c_int = 1;
        let int = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let opt = |level, name, value: *const libc::c_void, what| {
            check(libc::setsockopt(raw, level, name, value, int), what)
        };
        opt(
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&one as *const i32).cast(),
            "IP_TRANSPARENT",
        )?;
        opt(
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const i32).cast(),
            "SO_REUSEADDR",
        )?;
        opt(
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            "SO_MARK",
        )?;
        let addr = sockaddr(ip, port);
        check(
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            "bind",
        )?;
        Ok(fd)
    }
}

/// The stand-in proxy: a transparent listener on 0.0.0.0:15001 that answers every
/// connection with the local and peer addresses it accepted it with.
fn proxy_listener() -> Result<TcpListener> {
    let fd = transparent_socket(Ipv4Addr::UNSPECIFIED, PROXY_PORT, consts::UPSTREAM_MARK)?;
    // SAFETY: listen(2) on the socket we own.
    check(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 64) },
        "listen",
    )?;
    Ok(TcpListener::from(fd))
}

fn serve(listener: TcpListener, name: &'static str) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (Ok(local), Ok(peer)) = (conn.local_addr(), conn.peer_addr()) else {
                continue;
            };
            let _ = write!(conn, "{name} local={local} peer={peer}");
        }
    });
}

/// Connects to `to` and reads what the server says.
fn call(to: SocketAddrV4) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(to), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Like the proxy's upstream: from `client` (not a local address), marked, to `to`.
fn call_transparently(client: Ipv4Addr, to: SocketAddrV4) -> Result<String> {
    let fd = transparent_socket(client, 0, consts::UPSTREAM_MARK)?;
    let addr = sockaddr(*to.ip(), to.port());
    // SAFETY: connect(2) on the socket we own with a live sockaddr_in.
    check(
        unsafe {
            libc::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        },
        "connect",
    )?;
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

struct Bed {
    node: Netns,
    a: Netns,
    b: Netns,
}

/// Node plus pods A and B, each a /32 behind a veth (`vra`, `vrb` on the node), with
/// the node as their gateway: the shape `mesh-cni` gives pods.
fn bed(tag: &str) -> Result<Bed> {
    let node = Netns::create(&format!("vrn-{tag}"))?;
    let a = Netns::create(&format!("vra-{tag}"))?;
    let b = Netns::create(&format!("vrb-{tag}"))?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    for (pod, veth, ip) in [(&a, "vra", POD_A), (&b, "vrb", POD_B)] {
        let link = format!(
            "link add {veth} type veth peer name eth0 netns {}",
            pod.name()
        );
        node.ip(&link.split(' ').collect::<Vec<_>>())?;
        node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", veth])?;
        node.ip(&["link", "set", veth, "up"])?;
        node.ip(&["route", "add", &format!("{ip}/32"), "dev", veth])?;
        pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", &format!("{GATEWAY}/32"), "dev", "eth0"])?;
        pod.ip(&["route", "add", "default", "via", &GATEWAY.to_string()])?;
        let name: &'static str = if ip == POD_A { "pod-a" } else { "pod-b" };
        pod.spawn(move || {
            serve(TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080))?, name);
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("server thread"))??;
    }
    Ok(Bed { node, a, b })
}

fn in_pod<T: Send + 'static>(
    pod: &Netns,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    pod.spawn(work)
        .join()
        .map_err(|_| anyhow::anyhow!("pod thread panicked"))?
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("no interface {name}");
    }
    Ok(index)
}

fn pins(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/veil-test-redirect-{tag}"))
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf"))
    {
        let ok = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()?
            .success();
        if !ok {
            bail!("mount bpffs");
        }
    }
    Ok(())
}

/// Loads `Redirect` from `pin_dir`, attaches both pods, covers B, installs the rules.
fn load(rt: &tokio::runtime::Runtime, pin_dir: &std::path::Path) -> Result<Redirect> {
    let redirect = Redirect::load(pin_dir)?;
    redirect.attach_pod("vra", ifindex("vra")?, POD_A)?;
    redirect.attach_pod("vrb", ifindex("vrb")?, POD_B)?;
    rt.block_on(async {
        let handle = mesh_agent::netns::netlink_here()?;
        for name in ["vra", "vrb"] {
            mesh_agent::redirect::accept_local(&handle, ifindex(name)?).await?;
        }
        redirect.ensure_rules(&handle).await?;
        // Twice: idempotent.
        redirect.ensure_rules(&handle).await?;
        let covered: BTreeSet<Ipv4Addr> = [POD_B].into_iter().collect();
        redirect
            .set_covered(&handle, &covered, Some(GATEWAY))
            .await?;
        redirect
            .set_covered(&handle, &covered, Some(GATEWAY))
            .await?;
        anyhow::Ok(())
    })?;
    // The machine's own cgroup2 root: the program marks only this namespace's sockets.
    let cgroup = mesh_agent::redirect::cgroup2_root(std::path::Path::new(
        mesh_agent::redirect::DEFAULT_CGROUP_ROOT,
    ))?;
    redirect.attach_node(&cgroup)?;
    Ok(redirect)
}

/// (a): A → B:8080 is accepted by the proxy as B:8080 from A.
fn proxied(bed: &Bed) -> Result<()> {
    let answer = in_pod(&bed.a, || call(SocketAddrV4::new(POD_B, 8080)))?;
    if !(answer.starts_with("proxy local=198.18.250.3:8080 peer=198.18.250.2:")) {
        bail!("A → B:8080 was not proxied: {answer:?}");
    }
    Ok(())
}

#[test]
fn redirect_netns_steers_covered_pods_into_the_proxy_and_back() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces, eBPF)");
        return Ok(());
    }
    ensure_bpffs()?;
    let tag = format!("{}", std::process::id() % 100_000);
    let bed = bed(&tag)?;
    let pins = Pins(pins(&tag));
    let _ = Redirect::unpin_all(&pins.0);
    // A stale rule at one of our priorities (another selector): ensure_rules replaces it.
    bed.node.ip(&[
        "rule", "add", "priority", "114", "ipproto", "udp", "lookup", "120",
    ])?;
    run(&bed, pins.0.clone())
}

fn run(bed: &Bed, pin_dir: PathBuf) -> Result<()> {
    // Everything on the node side runs on one thread inside the node's namespace: the
    // interface names and the sk_lookup attachment resolve there.
    let (to_node, node_rx) = mpsc::channel::<NodeWork>();
    let (done_tx, done) = mpsc::channel::<Result<()>>();
    let node_thread = bed.node.spawn(move || {
        let set_up = || -> Result<NodeSide> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let redirect = load(&rt, &pin_dir)?;
            let listener = proxy_listener()?;
            redirect.set_proxy_listeners(std::slice::from_ref(&listener))?;
            let events = rt
                .block_on(async { redirect.spoof_events() })
                .context("events")??;
            Ok(NodeSide {
                rt,
                redirect: Some(redirect),
                listener: Some(listener),
                events,
                pin_dir,
            })
        };
        let mut side = match set_up() {
            Ok(side) => side,
            Err(e) => {
                // The first piece of work hears why.
                done_tx.send(Err(e.context("node set-up"))).ok();
                return Ok(());
            }
        };
        for work in node_rx {
            done_tx.send(work(&mut side)).ok();
        }
        Ok(())
    });
    let on_node = |work: NodeWork| -> Result<()> {
        // A failed set-up has left its error in `done`, and the send fails.
        let _ = to_node.send(work);
        done.recv().context("node thread gone")?
    };

    // The listener must serve; its clone does so, the original stays in the sockmap.
    on_node(Box::new(|side| {
        let l = side.listener.as_ref().context("listener")?.try_clone()?;
        serve(l, "proxy");
        Ok(())
    }))?;

    let rules = bed.node.exec(&["ip", "rule"])?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("114:\tfrom all ipproto tcp lookup 120") && !rules.contains("udp"),
        "stale rule not replaced:\n{rules}"
    );
    // (a) covered: proxied, with the original destination as local address.
    proxied(bed).context("(a)")?;
    // (b) uncovered: B → A:8080 reaches A's own server, from B.
    let answer = in_pod(&bed.b, || call(SocketAddrV4::new(POD_A, 8080)))?;
    assert!(
        answer.starts_with("pod-a local=198.18.250.2:8080 peer=198.18.250.3:"),
        "(b) {answer:?}"
    );
    // (d) the proxy's transparent upstream: from A's address, marked, to B:8080 reaches
    // B's server, which sees A; the reply comes back to this socket (from_pod steering).
    on_node(Box::new(|_| {
        let answer = call_transparently(POD_A, SocketAddrV4::new(POD_B, 8080))?;
        if !answer.starts_with("pod-b local=198.18.250.3:8080 peer=198.18.250.2:") {
            bail!("(d) upstream answer {answer:?}");
        }
        Ok(())
    }))?;
    // (f) a Service: kube-proxy's DNAT in PREROUTING, then the covered route: the proxy
    // accepts it as B:8080, and the client hears back from the Service address.
    let out = bed.node.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &SERVICE.to_string(),
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        "198.18.250.3:8080",
    ])?;
    assert!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = in_pod(&bed.a, || {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::from((SERVICE, 80)), TIMEOUT)?;
        let peer = stream.peer_addr()?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok((peer, answer))
    })?;
    assert_eq!(
        answer.0,
        SocketAddr::from((SERVICE, 80)),
        "(f) reply source"
    );
    assert!(
        answer
            .1
            .starts_with("proxy local=198.18.250.3:8080 peer=198.18.250.2:"),
        "(f) {answer:?}"
    );
    // (h) the node's own connections (kubelet, host-network pods): to covered B through
    // the proxy, from the node's address (the covered route's src), over IPv4 and
    // v4-mapped IPv6 sockets; to uncovered A straight to A; to an exempt (pod, port), the
    // kubelet's tcpSocket probe, straight to B.
    on_node(Box::new(|side| {
        let answer = call(SocketAddrV4::new(POD_B, 8080))?;
        if !answer.starts_with("proxy local=198.18.250.3:8080 peer=198.18.250.1:") {
            bail!("(h) node -> covered B: {answer:?}");
        }
        let mapped = std::net::SocketAddrV6::new(POD_B.to_ipv6_mapped(), 8080, 0, 0);
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V6(mapped), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        if !answer.starts_with("proxy local=198.18.250.3:8080 peer=198.18.250.1:") {
            bail!("(h) node -> covered B over IPv6: {answer:?}");
        }
        let answer = call(SocketAddrV4::new(POD_A, 8080))?;
        if !answer.starts_with("pod-a local=198.18.250.2:8080 peer=198.18.250.1:") {
            bail!("(h) node -> uncovered A: {answer:?}");
        }
        let redirect = side.redirect.as_ref().context("redirect")?;
        redirect.set_node_direct(&[(POD_B, 8080)].into_iter().collect())?;
        let answer = call(SocketAddrV4::new(POD_B, 8080))?;
        if !answer.starts_with("pod-b local=198.18.250.3:8080 peer=198.18.250.1:") {
            bail!("(h) node -> exempt B:8080: {answer:?}");
        }
        redirect.set_node_direct(&BTreeSet::new())?;
        let answer = call(SocketAddrV4::new(POD_B, 8080))?;
        if !answer.starts_with("proxy ") {
            bail!("(h) node -> B:8080 after the exemption went: {answer:?}");
        }
        Ok(())
    }))?;
    // (h) a pod's own sockets stay unmarked: A → B still reaches the proxy from A.
    proxied(bed).context("(h) pods unaffected")?;
    // (e) a spoofed source from A: not delivered, counted, reported.
    bed.a
        .ip(&["addr", "add", &format!("{SPOOFED}/32"), "dev", "eth0"])?;
    let spoofed = in_pod(&bed.a, || {
        // A SYN from the extra address; from_pod drops it, so no answer ever comes.
        let stream = TcpStream::from(transparent_socket(SPOOFED, 0, 0)?);
        stream.set_nonblocking(true)?;
        let to = sockaddr(GATEWAY, 9);
        // SAFETY: connect(2) on the socket we own with a live sockaddr_in; non-blocking,
        // so it returns at once (EINPROGRESS).
        unsafe {
            libc::connect(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        std::thread::sleep(Duration::from_millis(300));
        Ok(stream.peer_addr().is_ok())
    })?;
    assert!(!spoofed, "(e) the spoofed SYN got an answer");
    on_node(Box::new(|side| {
        let redirect = side.redirect.as_ref().context("redirect")?;
        let counts = redirect.counters("vra").context("counters of vra")?;
        if counts.spoofed_packets == 0 {
            bail!("(e) no spoofed packet counted: {counts:?}");
        }
        let deadline = Instant::now() + TIMEOUT;
        let events = side.rt.block_on(async {
            tokio::time::timeout_at(deadline.into(), side.events.next_batch()).await
        })??;
        let vra = ifindex("vra")?;
        if !events.iter().any(|e| {
            e.ifindex == vra
                && e.family
                    == SpoofedFamily::Ipv4 {
                        src: SPOOFED,
                        dst: GATEWAY,
                    }
                && e.protocol == 6
        }) {
            bail!("(e) no spoof event for vra: {events:?}");
        }
        Ok(())
    }))?;
    // (c) no socket in the sockmap: covered connections fail closed (the SYN is dropped,
    // the client never connects; see bpf/sk_lookup.c for why it is no RST).
    on_node(Box::new(|side| {
        Ok(side
            .redirect
            .as_ref()
            .context("redirect")?
            .clear_proxy_listeners()?)
    }))?;
    let closed = in_pod(&bed.a, || {
        let to = SocketAddr::from((POD_B, 8080));
        Ok(TcpStream::connect_timeout(&to, Duration::from_millis(1500)).map(|_| ()))
    })?;
    match closed {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!("(c) expected no connection, got {other:?}"),
    }
    // (g) an agent restart: the Redirect goes, the pinned links keep working (with the
    // listener back in the map, the maps being pinned), then a new Redirect takes over.
    on_node(Box::new(|side| {
        let redirect = side.redirect.take().context("redirect")?;
        redirect.set_proxy_listeners(std::slice::from_ref(
            side.listener.as_ref().context("listener")?,
        ))?;
        drop(redirect);
        Ok(())
    }))?;
    proxied(bed).context("(g) with no agent")?;
    on_node(Box::new(|side| {
        let redirect = load(&side.rt, &side.pin_dir)?;
        side.redirect = Some(redirect);
        Ok(())
    }))?;
    proxied(bed).context("(g) after the restart")?;
    let answer = in_pod(&bed.b, || call(SocketAddrV4::new(POD_A, 8080)))?;
    assert!(
        answer.starts_with("pod-a "),
        "(g) uncovered after the restart: {answer:?}"
    );
    // Uncovering B: straight to B again.
    on_node(Box::new(|side| {
        let redirect = side.redirect.as_ref().context("redirect")?;
        side.rt.block_on(async {
            let handle = mesh_agent::netns::netlink_here()?;
            redirect
                .set_covered(&handle, &BTreeSet::new(), Some(GATEWAY))
                .await?;
            anyhow::Ok(())
        })
    }))?;
    let answer = in_pod(&bed.a, || call(SocketAddrV4::new(POD_B, 8080)))?;
    assert!(answer.starts_with("pod-b "), "uncovered B: {answer:?}");
    // Uninstall: rules and routes go.
    on_node(Box::new(|side| {
        let redirect = side.redirect.take().context("redirect")?;
        side.rt.block_on(async {
            let handle = mesh_agent::netns::netlink_here()?;
            redirect.remove_all(&handle).await?;
            anyhow::Ok(())
        })
    }))?;
    let rules = bed.node.exec(&["ip", "rule"])?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("lookup 120") && !rules.contains("lookup 121"),
        "{rules}"
    );
    drop(to_node);
    node_thread
        .join()
        .map_err(|_| anyhow::anyhow!("node thread panicked"))??;
    Ok(())
}

/// Work for the node thread.
type NodeWork = Box<dyn FnOnce(&mut NodeSide) -> Result<()> + Send>;

/// Removes the pins even when the test panics.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = Redirect::unpin_all(&self.0) {
            eprintln!("remove pins {}: {e}", self.0.display());
        }
    }
}

struct NodeSide {
    rt: tokio::runtime::Runtime,
    redirect: Option<Redirect>,
    listener: Option<TcpListener>,
    events: mesh_agent::redirect::SpoofEvents,
    pin_dir: PathBuf,
}

const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 252, 5);

/// Ones' complement sum of 16-bit words, folded.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// For a while, answers every SYN of B to REMOTE:8080 that comes out of the TUN with a
/// SYN-ACK written into it (as the WireGuard datapath does with decrypted packets);
/// retransmitted SYNs of an earlier connection get answered too, which is harmless.
fn answer_syns(tun: &mut std::fs::File, window: Duration) -> Result<usize> {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + window;
    let mut answered = 0;
    while Instant::now() < deadline {
        let n = match tun.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let p = &buf[..n];
        if n >= 40 && p[0] >> 4 == 4 && p[9] == 6 && p[16..20] == REMOTE.octets() {
            answer_syn(tun, p)?;
            answered += 1;
        }
    }
    Ok(answered)
}

fn answer_syn(tun: &mut std::fs::File, syn: &[u8]) -> Result<()> {
    let ihl = usize::from(syn[0] & 0xf) * 4;
    let tcp = &syn[ihl..];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&REMOTE.octets());
    ip.extend_from_slice(&POD_B.octets());
    let ip_sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let mut seg = Vec::new();
    seg.extend_from_slice(&tcp[2..4]); // source port: the SYN's destination
    seg.extend_from_slice(&tcp[0..2]);
    seg.extend_from_slice(&1000u32.to_be_bytes());
    seg.extend_from_slice(&seq.wrapping_add(1).to_be_bytes());
    seg.extend_from_slice(&[0x50, 0x12, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&REMOTE.octets());
    pseudo.extend_from_slice(&POD_B.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let tcp_sum = checksum(&[&pseudo, &seg]);
    seg[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    ip.extend_from_slice(&seg);
    tun.write_all(&ip)?;
    Ok(())
}

/// A TUN device named `name` in the calling thread's namespace (IFF_TUN | IFF_NO_PI).
fn tun(name: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // struct ifreq: the name, then the flags (a short) at 16; 40 bytes.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags: u16 = 0x0001 | 0x1000; // IFF_TUN | IFF_NO_PI
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF with a 40-byte ifreq on the descriptor we own.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            TUNSETIFF as _,
            ifreq.as_mut_ptr(),
        )
    };
    check(rc, "TUNSETIFF")?;
    Ok(file)
}

#[test]
fn redirect_netns_answers_from_the_tunnel_reach_a_covered_client() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces, eBPF)");
        return Ok(());
    }
    ensure_bpffs()?;
    let tag = format!("t{}", std::process::id() % 10_000);
    let bed = bed(&tag)?;
    let pins = Pins(pins(&tag));
    let _ = Redirect::unpin_all(&pins.0);
    let dir = pins.0.clone();
    let (ready_tx, ready) = mpsc::channel::<()>();
    let (go_tx, go) = mpsc::channel::<bool>();
    // The node: a TUN standing in for veil-wg0, routes to a "remote" pod through it.
    let node = bed.node.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut device = tun("vrt")?;
        veil_testbed::net::ip(&["link", "set", "vrt", "up"])?;
        veil_testbed::net::ip(&["route", "add", "198.18.252.0/24", "dev", "vrt"])?;
        let redirect = load(&rt, &dir)?;
        let listener = proxy_listener()?;
        redirect.set_proxy_listeners(std::slice::from_ref(&listener))?;
        let mut attached = false;
        ready_tx.send(()).ok();
        // One round per client connection: answer its SYN through the TUN.
        while let Ok(attach) = go.recv() {
            if attach && !attached {
                redirect.attach_tunnel("vrt")?;
                attached = true;
            }
            answer_syns(&mut device, Duration::from_millis(1200))?;
        }
        redirect.detach_tunnel("vrt")?;
        Ok(())
    });
    if ready.recv().is_err() {
        return match node.join() {
            Ok(Err(e)) => Err(e.context("node set-up")),
            _ => bail!("node set-up failed"),
        };
    }
    let connect = |attach: bool| -> Result<bool> {
        let client = bed.b.spawn(|| {
            let to = SocketAddr::from((REMOTE, 8080));
            Ok(TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok())
        });
        go_tx
            .send(attach)
            .map_err(|_| anyhow::anyhow!("node thread gone"))?;
        client
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    };
    // Without from_tunnel, table 120 hands B's SYN-ACK to the proxy: B never connects.
    assert!(!connect(false)?, "connected without from_tunnel");
    // With it, the answer is routed to B.
    assert!(connect(true)?, "B's connection through the tunnel failed");
    drop(go_tx);
    node.join()
        .map_err(|_| anyhow::anyhow!("node thread panicked"))??;
    Ok(())
}
