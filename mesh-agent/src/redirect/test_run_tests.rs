//! `BPF_PROG_TEST_RUN` of both programs on crafted input, each test in a fresh network
//! namespace of its own thread with its own pin directory. Root only.

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{TestRun, TestRunOptions};
use veil_bpf::{PodPort, SpoofEvent, SpoofedFamily, OUTBOUND_MAP};

use super::Redirect;

const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 3);
const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 99);
/// `lo`: the interface test runs may name without creating one.
const LO: u32 = 1;

const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

/// Why a root-only test cannot run here, if it cannot.
pub(crate) fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (eBPF, network namespaces)");
    }
    None
}

/// Mounts bpffs at /sys/fs/bpf when it is not (these machines do not at boot) and
/// returns a fresh pin directory under it.
pub(crate) fn pin_dir(tag: &str) -> PinDir {
    const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if !mounted {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("run mount");
        assert!(status.success(), "mount bpffs");
    }
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/veil-test-{tag}-{}",
        std::process::id()
    ));
    let _ = Redirect::unpin_all(&dir);
    PinDir(dir)
}

/// A pin directory removed on drop.
pub(crate) struct PinDir(pub(crate) PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = Redirect::unpin_all(&self.0) {
            eprintln!("remove pins {}: {e}", self.0.display());
        }
    }
}

/// Runs `f` with a `Redirect` loaded from a fresh pin directory, on a thread in a new
/// network namespace with `lo` up, with a tokio runtime for netlink; unless not root.
fn with_redirect(tag: &str, f: impl FnOnce(&Redirect, &tokio::runtime::Runtime) + Send + 'static) {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let pins = pin_dir(tag);
    let dir = pins.0.clone();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(up.success());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let redirect = Redirect::load(&dir).expect("load");
        f(&redirect, &rt)
    })
    .join()
    .expect("test thread")
}

/// Covers `ip` (map and route) through a netlink socket of the thread's namespace.
fn cover(redirect: &Redirect, rt: &tokio::runtime::Runtime, ip: Ipv4Addr) {
    rt.block_on(async {
        let handle = crate::netns::netlink_here().unwrap();
        redirect
            .set_covered(&handle, &[ip].into_iter().collect(), None)
            .await
            .unwrap();
    });
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ipv4_tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ethernet(0x0800, &ipv4_tcp_flags(src, dst, sport, dport, 0x12))
}

/// An IPv4 TCP segment (no link header) with TCP `flags` (0x02 SYN, 0x12 SYN-ACK).
fn ipv4_tcp_flags(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    ip.extend_from_slice(&tcp);
    ip
}

fn ipv6_from(src_first_word: [u8; 2]) -> Vec<u8> {
    let mut ip6 = vec![0x60, 0, 0, 0, 0, 0, 58, 255];
    let mut src = [0u8; 16];
    src[..2].copy_from_slice(&src_first_word);
    src[15] = 1;
    ip6.extend_from_slice(&src);
    ip6.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    ethernet(0x86dd, &ip6)
}

fn arp() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1];
    arp.extend_from_slice(&POD.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&OTHER.octets());
    ethernet(0x0806, &arp)
}

/// Runs `from_pod` on `frame` as if it came in on `lo`; returns the verdict and the mark.
fn run_from_pod(redirect: &Redirect, frame: &[u8]) -> (u32, u32) {
    run_tc(redirect, None, frame)
}

/// Runs `from_pod` on `frame` as if it came in on `lo`, or `from_tunnel` on the device
/// `tunnel`.
fn run_tc(redirect: &Redirect, tunnel: Option<u32>, frame: &[u8]) -> (u32, u32) {
    // struct __sk_buff: ifindex at 40, mark at 8 (linux/bpf.h), 192 bytes.
    let mut ctx_in = [0u8; 192];
    ctx_in[40..44].copy_from_slice(&tunnel.unwrap_or(LO).to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let mut data_out = vec![0u8; frame.len() + 64];
    let result = redirect.with_tc(tunnel.is_some(), |program| {
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN of from_pod")
    });
    let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap());
    (result.return_value, mark)
}

#[test]
fn redirect_bpf_test_run_from_pod_counts_passes_and_drops_spoofed() {
    with_redirect("from-pod", |redirect, rt| {
        redirect.attach_pod("lo", LO, POD).expect("attach to lo");
        let mut events = rt.block_on(async { redirect.spoof_events().unwrap().unwrap() });

        // The pod's own source, to an uncovered destination: passed, counted.
        let own = ipv4_tcp(POD, OTHER, 40000, 8080);
        assert_eq!(run_from_pod(redirect, &own), (TC_ACT_UNSPEC, 0));
        // ARP passes; so do IPv6 link-local and unspecified sources (neighbour discovery).
        assert_eq!(run_from_pod(redirect, &arp()).0, TC_ACT_UNSPEC);
        assert_eq!(
            run_from_pod(redirect, &ipv6_from([0xfe, 0x80])).0,
            TC_ACT_UNSPEC
        );
        let mut unspecified = ipv6_from([0, 0]);
        unspecified[14 + 8 + 15] = 0;
        assert_eq!(run_from_pod(redirect, &unspecified).0, TC_ACT_UNSPEC);
        let counts = redirect.counters("lo").unwrap();
        assert_eq!((counts.packets, counts.spoofed_packets), (4, 0));

        // A spoofed IPv4 source: dropped, counted, reported.
        let spoofed = ipv4_tcp(SPOOFED, OTHER, 40000, 8080);
        assert_eq!(run_from_pod(redirect, &spoofed).0, TC_ACT_SHOT);
        // Global IPv6: Veil gives pods none, so it is spoofed too.
        assert_eq!(
            run_from_pod(redirect, &ipv6_from([0x20, 0x01])).0,
            TC_ACT_SHOT
        );
        let counts = redirect.counters("lo").unwrap();
        assert_eq!((counts.packets, counts.spoofed_packets), (6, 2));
        assert_eq!(
            counts.spoofed_bytes,
            (spoofed.len() + ipv6_from([0x20, 0x01]).len()) as u64
        );
        let got = events.drain();
        assert_eq!(
            got,
            vec![
                SpoofEvent {
                    ifindex: LO,
                    family: SpoofedFamily::Ipv4 {
                        src: SPOOFED,
                        dst: OTHER
                    },
                    protocol: 6
                },
                SpoofEvent {
                    ifindex: LO,
                    family: SpoofedFamily::Ipv6,
                    protocol: 58
                }
            ]
        );

        // A covered pod's TCP with no proxy socket for the tuple: passed, not marked.
        cover(redirect, rt, POD);
        assert_eq!(run_from_pod(redirect, &own), (TC_ACT_UNSPEC, 0));

        // Pruning keeps live interfaces and forgets the others.
        assert_eq!(redirect.prune(&[LO].into_iter().collect()).unwrap(), 0);
        assert!(redirect.counters("lo").is_some());
        assert_eq!(redirect.prune(&Default::default()).unwrap(), 1);
        assert!(redirect.counters("lo").is_none());
        // An interface without an anti-spoofing entry is left alone.
        redirect.detach_pod("lo").unwrap();
        assert_eq!(run_from_pod(redirect, &spoofed).0, TC_ACT_UNSPEC);
    });
}

/// Runs `sk_lookup` for a TCP SYN from OTHER:40000 to `local`:8080; returns the verdict
/// and the cookie of the socket it selected (0 for none).
fn run_sk_lookup(redirect: &Redirect, local: Ipv4Addr) -> (u32, u64) {
    run_sk_lookup_from(redirect, 40000, local)
}

/// [`run_sk_lookup`] from OTHER:`port`.
fn run_sk_lookup_from(redirect: &Redirect, port: u16, local: Ipv4Addr) -> (u32, u64) {
    // struct bpf_sk_lookup (linux/bpf.h): cookie 0, family 8, protocol 12, remote_ip4 16,
    // remote_port 36 (network order), local_ip4 40, local_port 60; 72 bytes.
    let mut ctx = [0u8; 72];
    ctx[8..12].copy_from_slice(&(libc::AF_INET as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&(libc::IPPROTO_TCP as u32).to_ne_bytes());
    ctx[16..20].copy_from_slice(&OTHER.octets());
    ctx[36..38].copy_from_slice(&port.to_be_bytes());
    ctx[40..44].copy_from_slice(&local.octets());
    ctx[60..64].copy_from_slice(&8080u32.to_ne_bytes());
    let mut out = [0u8; 72];
    let fd = redirect.with_sk_lookup(|p| p.fd().unwrap().as_fd().as_raw_fd());
    // union bpf_attr, the `test` member: prog_fd 0, retval 4, ctx_size_in 40,
    // ctx_size_out 44, ctx_in 48, ctx_out 56; 80 bytes. aya 0.14's TestRun does not cover
    // sk_lookup programs, so the syscall is made here.
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[40..44].copy_from_slice(&(ctx.len() as u32).to_ne_bytes());
    attr[44..48].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[48..56].copy_from_slice(&(ctx.as_ptr() as u64).to_ne_bytes());
    attr[56..64].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: attr and both buffers outlive the call; the sizes are theirs.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    let retval = u32::from_ne_bytes(attr[4..8].try_into().unwrap());
    let cookie = u64::from_ne_bytes(out[0..8].try_into().unwrap());
    (retval, cookie)
}

fn cookie(socket: &impl AsRawFd) -> u64 {
    super::socket_u64(socket, libc::SO_COOKIE).expect("SO_COOKIE")
}

#[test]
fn redirect_bpf_test_run_sk_lookup_assigns_covered_only_and_fails_closed() {
    with_redirect("sk-lookup", |redirect, rt| {
        cover(redirect, rt, POD);
        // Uncovered: passed, nothing selected.
        assert_eq!(run_sk_lookup(redirect, OTHER), (SK_PASS, 0));
        // Covered with an empty sockmap: dropped (fail closed).
        assert_eq!(run_sk_lookup(redirect, POD), (SK_DROP, 0));
        // Covered with the proxy's listener: assigned to it.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        redirect
            .set_proxy_listeners(std::slice::from_ref(&listener))
            .unwrap();
        assert_eq!(run_sk_lookup(redirect, POD), (SK_PASS, cookie(&listener)));
        assert_eq!(run_sk_lookup(redirect, OTHER), (SK_PASS, 0));
        // The listener closes: the kernel empties the slot, covered connections fail closed.
        drop(listener);
        assert_eq!(run_sk_lookup(redirect, POD), (SK_DROP, 0));
    });
}

#[test]
fn redirect_bpf_test_run_sk_lookup_spreads_over_proxy_workers() {
    with_redirect("sk-workers", |redirect, rt| {
        cover(redirect, rt, POD);
        let mut workers: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        redirect.set_proxy_listeners(&workers).unwrap();
        let cookies: Vec<u64> = workers.iter().map(cookie).collect();
        let chosen: Vec<(u16, u64)> = (40000..40064)
            .map(|port| {
                let (verdict, cookie) = run_sk_lookup_from(redirect, port, POD);
                assert_eq!(verdict, SK_PASS, "port {port}");
                (port, cookie)
            })
            .collect();
        for c in &cookies {
            let share = chosen.iter().filter(|(_, got)| got == c).count();
            assert!(share >= 16, "worker {c} got {share} of 64: {chosen:?}");
        }
        // The same connection always goes to the same worker.
        for &(port, c) in &chosen {
            assert_eq!(run_sk_lookup_from(redirect, port, POD), (SK_PASS, c));
        }
        // A worker's socket closes: its share fails closed, the other's is still served.
        let gone = cookies[1];
        drop(workers.remove(1));
        for &(port, c) in &chosen {
            let want = if c == gone {
                (SK_DROP, 0)
            } else {
                (SK_PASS, c)
            };
            assert_eq!(run_sk_lookup_from(redirect, port, POD), want, "port {port}");
        }
        // Counts the map cannot hold are refused, naming the map.
        let none: [TcpListener; 0] = [];
        let err = redirect.set_proxy_listeners(&none).unwrap_err().to_string();
        assert!(err.contains("veil_proxy_socks"), "{err}");
        redirect.clear_proxy_listeners().unwrap();
        assert_eq!(run_sk_lookup_from(redirect, 40000, POD), (SK_DROP, 0));
    });
}

/// An agent of a release whose map was retired left its pin; the next agent removes it
/// and serves from the maps of its own layout.
#[test]
fn redirect_restart_removes_the_pins_of_retired_maps() {
    with_redirect("retired", |redirect, rt| {
        let dir = redirect.pin_dir().to_path_buf();
        let old = dir.join(veil_bpf::RETIRED_MAPS[0]);
        MapData::from_pin(dir.join(veil_bpf::PROXY_WORKERS_MAP))
            .unwrap()
            .pin(&old)
            .unwrap();
        assert!(old.exists());
        let restarted = Redirect::load(&dir).expect("reload");
        assert!(!old.exists(), "{} left behind", old.display());
        cover(&restarted, rt, POD);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        restarted
            .set_proxy_listeners(std::slice::from_ref(&listener))
            .unwrap();
        assert_eq!(run_sk_lookup(&restarted, POD), (SK_PASS, cookie(&listener)));
    });
}

#[test]
fn redirect_bpf_test_run_from_pod_remembers_the_connections_covered_pods_open() {
    with_redirect("outbound", |redirect, rt| {
        redirect.attach_pod("lo", LO, POD).expect("attach to lo");
        let outbound = || -> Vec<PodPort> {
            let map = MapData::from_pin(redirect.pin_dir().join(OUTBOUND_MAP)).unwrap();
            let map: BpfHashMap<_, PodPort, u8> =
                BpfHashMap::try_from(aya::maps::Map::LruHashMap(map)).unwrap();
            map.keys().map(|k| k.unwrap()).collect()
        };
        let syn = ethernet(0x0800, &ipv4_tcp_flags(POD, OTHER, 40000, 8080, 0x02));
        // Not covered yet: nothing remembered.
        assert_eq!(run_from_pod(redirect, &syn), (TC_ACT_UNSPEC, 0));
        assert!(outbound().is_empty());
        cover(redirect, rt, POD);
        // A SYN-ACK (answering a connection to the pod) is not remembered; a SYN is.
        assert_eq!(
            run_from_pod(redirect, &ipv4_tcp(POD, OTHER, 8080, 40001)).0,
            TC_ACT_UNSPEC
        );
        assert!(outbound().is_empty());
        assert_eq!(run_from_pod(redirect, &syn), (TC_ACT_UNSPEC, 0));
        assert_eq!(
            outbound(),
            vec![PodPort {
                ipv4: veil_bpf::ipv4_key(POD),
                port: 40000u16.to_be(),
                reserved: 0
            }]
        );
    });
}

#[test]
fn redirect_cgroup2_root_names_a_directory_without_cgroup2() {
    let dir = std::env::temp_dir().join(format!("veil-no-cgroup-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("unified")).expect("temp dir");
    let err = super::cgroup2_root(&dir).expect_err("a plain directory is no cgroup2");
    let message = err.to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        message.contains(&dir.display().to_string()) && message.contains("cgroup2"),
        "{message}"
    );
}

/// A full exemption map takes a new set all the same: stale exemptions go before new ones
/// are added, so one that outlived its pod never stays behind.
#[test]
fn redirect_node_direct_exemptions_replace_a_full_map() {
    with_redirect("node-direct", |redirect, _rt| {
        let full: std::collections::BTreeSet<(Ipv4Addr, u16)> = (0
            ..veil_bpf::consts::MAX_NODE_DIRECT)
            .map(|i| {
                (
                    Ipv4Addr::from(0xc612_0000 | (i >> 8)),
                    (i & 0xff) as u16 + 1,
                )
            })
            .collect();
        redirect.set_node_direct(&full).expect("fill the map");
        let next: std::collections::BTreeSet<(Ipv4Addr, u16)> =
            [(Ipv4Addr::new(198, 18, 250, 9), 9000)]
                .into_iter()
                .collect();
        redirect.set_node_direct(&next).expect("replace a full map");
        let map = MapData::from_pin(redirect.pin_dir().join(veil_bpf::NODE_DIRECT_MAP)).unwrap();
        let map: BpfHashMap<_, PodPort, u8> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
        let left: Vec<(Ipv4Addr, u16)> = map.keys().map(|k| k.unwrap().endpoint()).collect();
        assert_eq!(left, vec![(Ipv4Addr::new(198, 18, 250, 9), 9000)]);
    });
}
