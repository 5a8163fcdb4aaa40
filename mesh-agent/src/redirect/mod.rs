//! The eBPF and policy-routing datapath: steers connections to covered pods into the
//! agent's transparent proxy, steers the pods' replies back to the proxy's upstream
//! sockets, and drops what pods send from addresses not theirs.
//!
//! How it fits together (marks, tables and priorities are in `bpf/lib/veil.h`):
//! - routing delivers every TCP packet for a covered pod locally (table
//!   [`consts::COVERED_TABLE`], rule [`consts::COVERED_RULE_PRIORITY`]), after kube-proxy's
//!   DNAT, and `sk_lookup` hands the connection to the proxy's one listener;
//! - the proxy's upstream sockets carry [`consts::UPSTREAM_MARK`], which rule
//!   [`consts::UPSTREAM_RULE_PRIORITY`] sends to the main table (out by the pod's veth);
//! - `from_pod` assigns the covered pod's replies to those sockets and marks them
//!   [`consts::TO_PROXY_MARK`], which rule [`consts::TO_PROXY_RULE_PRIORITY`] delivers locally
//!   (table [`consts::TO_PROXY_TABLE`]);
//! - `from_pod` also drops what a pod sends from an address not its own;
//! - `node_connect` (cgroup `connect4`/`connect6` on the node's cgroup2 root) marks the TCP
//!   sockets the node itself opens with [`consts::NODE_MARK`], which rule
//!   [`consts::NODE_CONNECT_RULE_PRIORITY`] looks up in the covered table first, so the
//!   node's connections to covered pods (kubelet probes, host-network pods) meet the proxy
//!   too, from the node's address (the `src` of the covered routes).
//!
//! Maps and links are pinned under a directory, so an agent restart keeps them all.
//!
//! Every call that names an interface resolves it, and `load` attaches `sk_lookup`, in the
//! *calling thread's* network namespace: call from a thread in the node's namespace.

mod counts;
pub(crate) mod events;
pub(crate) mod routing;

#[cfg(test)]
mod test_run_tests;

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, PerCpuHashMap, PerCpuValues, RingBuf, SockMap,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifier, TcAttachType};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup};
use aya::{Ebpf, EbpfLoader};
use veil_bpf::{
    ipv4_from_key, ipv4_key, PodCounters as RawCounters, PodPort, VeilPod, ALL_MAPS, COVERED_MAP,
    FROM_POD, FROM_POD_PROGRAM, FROM_TUNNEL, FROM_TUNNEL_PROGRAM, NODE_CONNECT,
    NODE_CONNECT4_PROGRAM, NODE_CONNECT6_PROGRAM, NODE_DIRECT_MAP, NODE_NETNS_MAP, PODS_MAP,
    POD_COUNTERS_MAP, PROXY_SOCKS_MAP, PROXY_WORKERS_MAP, RETIRED_MAPS, SK_LOOKUP,
    SK_LOOKUP_PROGRAM, SPOOF_EVENTS_MAP,
};

pub use counts::Counts;
pub use events::SpoofEvents;
pub use veil_bpf::{consts, SpoofEvent, SpoofedFamily};

/// Where the agent pins its maps and links unless configured otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/veil";

/// Where the node's cgroup2 hierarchy is unless configured otherwise.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup2 hierarchy at `root`: `root` itself, or `root/unified` on a host that still
/// mounts cgroup v1 controllers there (the unified hierarchy then holds every process at
/// its root). Errs naming what was found.
pub fn cgroup2_root(root: &Path) -> Result<PathBuf, RedirectError> {
    let is_cgroup2 = |path: &Path| {
        nix::sys::statfs::statfs(path)
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
    };
    let unified = root.join("unified");
    [root.to_path_buf(), unified]
        .into_iter()
        .find(|p| is_cgroup2(p))
        .ok_or_else(|| RedirectError::Attach {
            program: NODE_CONNECT4_PROGRAM,
            target: root.display().to_string(),
            message: "neither it nor its unified/ is a cgroup2 mount; mount the node's cgroup2 hierarchy there (the chart mounts the host's /sys/fs/cgroup)".into(),
        })
}

/// Subdirectory of the pin directory holding the links.
const LINKS_DIR: &str = "links";
/// Pin name of the sk_lookup link.
const SK_LOOKUP_LINK: &str = "sk_lookup";

/// Errors of the redirect datapath; each names the program, map, interface or route.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// An object or program could not be loaded; the message keeps the verifier's log.
    #[error("load eBPF program {program}: {message}")]
    Load {
        /// Program name.
        program: &'static str,
        /// What failed (`{:?}` of aya's error, which carries the verifier log).
        message: String,
    },
    /// Attaching a program failed.
    #[error("attach {program} to {target}: {message}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// The interface or namespace.
        target: String,
        /// What failed.
        message: String,
    },
    /// A map operation failed.
    #[error("eBPF map {map} ({key}): {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The entry or operation.
        key: String,
        /// What failed.
        message: String,
    },
    /// A pin (map, link or directory) could not be read, created or removed.
    #[error("pin {path}: {message}")]
    Pin {
        /// The bpffs path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A netlink request (rule or route) failed.
    #[error("netlink {op} {target}: {source}")]
    Netlink {
        /// The request.
        op: &'static str,
        /// The rule or route.
        target: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

fn map_err(map: &'static str, key: impl std::fmt::Display) -> impl FnOnce(String) -> RedirectError {
    let key = key.to_string();
    move |message| RedirectError::Map { map, key, message }
}

struct Maps {
    pods: BpfHashMap<MapData, u32, VeilPod>,
    counters: PerCpuHashMap<MapData, u32, RawCounters>,
    covered: BpfHashMap<MapData, u32, u8>,
    proxy_socks: SockMap<MapData>,
    proxy_workers: Array<MapData, u32>,
    node_netns: Array<MapData, u64>,
    node_direct: BpfHashMap<MapData, PodPort, u8>,
    spoof_events: Option<RingBuf<MapData>>,
}

struct Inner {
    /// Holds the loaded `from_pod` program, attached to each pod's veth.
    from_pod: Ebpf,
    /// Holds the loaded `from_tunnel` program, attached to the WireGuard device.
    from_tunnel: Ebpf,
    /// Keeps the `sk_lookup` program loaded while this agent runs (its link is pinned).
    _sk_lookup: Ebpf,
    /// Holds the loaded `node_connect` programs, attached by [`Redirect::attach_node`].
    node_connect: Ebpf,
    maps: Maps,
    /// Interfaces this agent attached, by name: their index.
    attached: HashMap<String, u32>,
}

/// The loaded redirect datapath: programs, pinned maps and links.
pub struct Redirect {
    pin_dir: PathBuf,
    nr_cpus: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn load_object(bytes: &[u8], program: &'static str, pin_dir: &Path) -> Result<Ebpf, RedirectError> {
    let mut loader = EbpfLoader::new();
    // Every map by name under the pin directory: the first object creates and pins them,
    // the second (and a restarted agent) reopens them with their contents.
    let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(bytes).map_err(|e| RedirectError::Load {
        program,
        message: format!("{e:?}"),
    })
}

/// The program `name` of `ebpf`, as its type `P`.
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, RedirectError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let load_err = |message: String| RedirectError::Load {
        program: name,
        message,
    };
    ebpf.program_mut(name)
        .ok_or_else(|| load_err("program missing".into()))?
        .try_into()
        .map_err(|e| load_err(format!("{e:?}")))
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, RedirectError> {
    let map = ebpf.take_map(name).ok_or_else(|| RedirectError::Map {
        map: name,
        key: "open".into(),
        message: "missing from the object".into(),
    })?;
    convert(map).map_err(|e| map_err(name, "open")(format!("{e:?}")))
}

fn pin_err(path: &Path) -> impl FnOnce(String) -> RedirectError + '_ {
    move |message| RedirectError::Pin {
        path: path.to_path_buf(),
        message,
    }
}

/// Opens a pinned link, `None` when there is no pin.
fn pinned_link(path: &Path) -> Result<Option<PinnedLink>, RedirectError> {
    if !path.exists() {
        return Ok(None);
    }
    PinnedLink::from_pin(path)
        .map(Some)
        .map_err(|e| pin_err(path)(format!("{e:?}")))
}

/// Pins `link` at `pin` in place of `old` (the link pinned there before, if any). Both
/// programs run until the old link goes; they decide alike, so nothing sees neither.
fn replace_pinned(link: FdLink, old: Option<PinnedLink>, pin: &Path) -> Result<(), RedirectError> {
    let old = match old {
        Some(old) => Some(old.unpin().map_err(|e| pin_err(pin)(e.to_string()))?),
        None => None,
    };
    link.pin(pin).map_err(|e| pin_err(pin)(format!("{e:?}")))?;
    drop(old);
    Ok(())
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14),
/// which `bpf_get_netns_cookie` returns for its sockets.
fn netns_cookie() -> Result<u64, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    socket_u64(&socket, libc::SO_NETNS_COOKIE)
        .map_err(|e| format!("getsockopt(SO_NETNS_COOKIE): {e} (Linux 5.14 or later needed)"))
}

/// A `u64` option of `socket` at `SOL_SOCKET` (`SO_NETNS_COOKIE`, `SO_COOKIE`).
pub(crate) fn socket_u64(socket: &impl AsRawFd, name: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes passed, and the
    // descriptor is open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// Removes a pinned link; the last reference goes and the kernel detaches it.
fn unpin_link(pin: &Path) -> Result<(), RedirectError> {
    if let Some(link) = pinned_link(pin)? {
        let link = link.unpin().map_err(|e| pin_err(pin)(e.to_string()))?;
        drop(link);
    }
    Ok(())
}

/// Attaches `program` at tc ingress of `ifname` with its link pinned at `pin`. A link
/// already pinned there (an earlier agent's) is updated in place to `program`
/// (BPF_LINK_UPDATE: no moment without a program); a stale one (its device was
/// recreated) is replaced.
fn attach_tc(
    program: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    pin: &Path,
) -> Result<(), RedirectError> {
    let attach_err = |message: String| RedirectError::Attach {
        program: name,
        target: ifname.to_string(),
        message,
    };
    let id = match pinned_link(pin)? {
        Some(old) => {
            let link = FdLink::from(old)
                .try_into()
                .map_err(|e| attach_err(format!("{e:?}")))?;
            match program.attach_to_link(link) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::info!(ifname, error = ?e, "pinned tc link is stale, replacing");
                    std::fs::remove_file(pin).map_err(|e| pin_err(pin)(e.to_string()))?;
                    None
                }
            }
        }
        None => None,
    };
    match id {
        // Already pinned; dropping our descriptor leaves the pin holding it.
        Some(id) => drop(program.take_link(id)),
        None => {
            // Kernels before 6.6 attach through a clsact qdisc; on TCX kernels it is unused.
            let _ = tc::qdisc_add_clsact(ifname);
            let id = program
                .attach(ifname, TcAttachType::Ingress)
                .map_err(|e| attach_err(format!("{e:?}")))?;
            let link = program
                .take_link(id)
                .map_err(|e| attach_err(format!("{e:?}")))?;
            let link: FdLink = link.try_into().map_err(|e| attach_err(format!("{e:?}")))?;
            link.pin(pin).map_err(|e| pin_err(pin)(format!("{e:?}")))?;
        }
    }
    Ok(())
}

/// Sets `accept_local` on a pod's host-side veth (index `ifindex`); call it with
/// [`Redirect::attach_pod`]. A covered pod's address is a local route in table 120 for
/// TCP, so the reverse-path check of the pod's own TCP packets (source = the pod) finds a
/// local address and the kernel drops them as martians (EINVAL from `ip route get ... iif
/// <veth> ipproto tcp`, measured here) unless the interface accepts local sources.
/// Anti-spoofing in from_pod is what guards the source. Through netlink (IFLA_INET_CONF),
/// not `/proc/sys`, which is read-only in an unprivileged container.
pub async fn accept_local(handle: &rtnetlink::Handle, ifindex: u32) -> Result<(), RedirectError> {
    use rtnetlink::packet_route::link::{
        AfSpecInet, AfSpecUnspec, InetDevConf, LinkAttribute, LinkMessage,
    };
    let mut conf = InetDevConf::default();
    conf.accept_local = 1;
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    msg.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(conf),
        ])]));
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| RedirectError::Attach {
            program: FROM_POD_PROGRAM,
            target: format!("interface {ifindex}"),
            message: format!("set accept_local: {e}"),
        })
}

impl Redirect {
    /// Loads both programs, creates or reopens the maps pinned under `pin_dir` (created
    /// if missing; bpffs must be mounted there), and attaches `sk_lookup` to the calling
    /// thread's network namespace with a link pinned at `<pin_dir>/links/sk_lookup`. A
    /// link left by an earlier agent is replaced without a gap: the new one is attached
    /// before the old one is released. Spawns nothing.
    pub fn load(pin_dir: &Path) -> Result<Redirect, RedirectError> {
        let links = pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links).map_err(|e| pin_err(&links)(e.to_string()))?;
        // Programs still attached from an earlier agent keep their own reference to a
        // retired map until they are replaced below; the pin is only a name.
        for retired in RETIRED_MAPS {
            let pin = pin_dir.join(retired);
            match std::fs::remove_file(&pin) {
                Ok(()) => tracing::info!(map = retired, "removed the pin of a retired map"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(&pin)(e.to_string())),
            }
        }
        let mut from_pod = load_object(FROM_POD, FROM_POD_PROGRAM, pin_dir)?;
        let mut from_tunnel = load_object(FROM_TUNNEL, FROM_TUNNEL_PROGRAM, pin_dir)?;
        let mut sk_lookup = load_object(SK_LOOKUP, SK_LOOKUP_PROGRAM, pin_dir)?;
        let mut node_connect = load_object(NODE_CONNECT, NODE_CONNECT4_PROGRAM, pin_dir)?;
        let load_err = |program| move |message: String| RedirectError::Load { program, message };
        // `{:?}` keeps the verifier's log, which Display drops.
        for (ebpf, name) in [
            (&mut from_pod, FROM_POD_PROGRAM),
            (&mut from_tunnel, FROM_TUNNEL_PROGRAM),
        ] {
            program_of::<SchedClassifier>(ebpf, name)?
                .load()
                .map_err(|e| load_err(name)(format!("{e:?}")))?;
        }
        {
            let program = program_of::<SkLookup>(&mut sk_lookup, SK_LOOKUP_PROGRAM)?;
            program
                .load()
                .map_err(|e| load_err(SK_LOOKUP_PROGRAM)(format!("{e:?}")))?;
            Self::attach_sk_lookup(program, &links.join(SK_LOOKUP_LINK))?;
        }
        for name in [NODE_CONNECT4_PROGRAM, NODE_CONNECT6_PROGRAM] {
            program_of::<CgroupSockAddr>(&mut node_connect, name)?
                .load()
                .map_err(|e| load_err(name)(format!("{e:?}")))?;
        }
        let maps = Maps {
            pods: take(&mut from_pod, PODS_MAP, BpfHashMap::try_from)?,
            counters: take(&mut from_pod, POD_COUNTERS_MAP, PerCpuHashMap::try_from)?,
            covered: take(&mut from_pod, COVERED_MAP, BpfHashMap::try_from)?,
            proxy_socks: take(&mut from_pod, PROXY_SOCKS_MAP, SockMap::try_from)?,
            proxy_workers: take(&mut from_pod, PROXY_WORKERS_MAP, Array::try_from)?,
            node_netns: take(&mut from_pod, NODE_NETNS_MAP, Array::try_from)?,
            node_direct: take(&mut from_pod, NODE_DIRECT_MAP, BpfHashMap::try_from)?,
            spoof_events: Some(take(&mut from_pod, SPOOF_EVENTS_MAP, RingBuf::try_from)?),
        };
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| load_err(FROM_POD_PROGRAM)(format!("{what}: {e}")))?;
        tracing::info!(pin_dir = %pin_dir.display(), "redirect datapath loaded");
        // Every EbpfLoader parses the kernel's BTF (megabytes) and drops it again; glibc
        // keeps such freed heap as the process's own unless asked to return it.
        // SAFETY: malloc_trim only releases free memory of the allocator; no pointer is
        // involved.
        unsafe { libc::malloc_trim(0) };
        Ok(Redirect {
            pin_dir: pin_dir.to_path_buf(),
            nr_cpus,
            inner: Mutex::new(Inner {
                from_pod,
                from_tunnel,
                _sk_lookup: sk_lookup,
                node_connect,
                maps,
                attached: HashMap::new(),
            }),
        })
    }

    fn attach_sk_lookup(program: &mut SkLookup, pin: &Path) -> Result<(), RedirectError> {
        let attach_err = |message: String| RedirectError::Attach {
            program: SK_LOOKUP_PROGRAM,
            target: "the calling thread's network namespace".into(),
            message,
        };
        let old = pinned_link(pin)?;
        // The thread's own namespace, which is the process's unless it entered another.
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| attach_err(e.to_string()))?;
        let id = program
            .attach(&netns)
            .map_err(|e| attach_err(format!("{e:?}")))?;
        let link: FdLink = program
            .take_link(id)
            .map_err(|e| attach_err(format!("{e:?}")))?
            .into();
        replace_pinned(link, old, pin)
    }

    /// Attaches `node_connect` (`connect4` and `connect6`) to the cgroup2 directory
    /// `cgroup` (the node's root: every process of the node below it), links pinned, after
    /// writing the calling thread's network namespace as the one whose sockets it marks.
    /// Sockets the node opens from then on with a destination a covered pod take the
    /// source `node_ip` (the `src` of the covered routes, [`Redirect::set_covered`]).
    /// Links left by an earlier agent are replaced without a gap. Other programs on the
    /// cgroup stay: a cgroup bpf_link always runs beside them.
    pub fn attach_node(&self, cgroup: &Path) -> Result<(), RedirectError> {
        let cookie = netns_cookie().map_err(|message| RedirectError::Attach {
            program: NODE_CONNECT4_PROGRAM,
            target: "the calling thread's network namespace".into(),
            message,
        })?;
        let mut inner = self.lock();
        inner
            .maps
            .node_netns
            .set(0, cookie, 0)
            .map_err(|e| map_err(NODE_NETNS_MAP, 0)(format!("{e:?}")))?;
        let dir = std::fs::File::open(cgroup).map_err(|e| RedirectError::Attach {
            program: NODE_CONNECT4_PROGRAM,
            target: cgroup.display().to_string(),
            message: e.to_string(),
        })?;
        for name in [NODE_CONNECT4_PROGRAM, NODE_CONNECT6_PROGRAM] {
            let attach_err = |message: String| RedirectError::Attach {
                program: name,
                target: cgroup.display().to_string(),
                message,
            };
            let pin = self.node_link_pin(name);
            let old = pinned_link(&pin)?;
            let program = program_of::<CgroupSockAddr>(&mut inner.node_connect, name)?;
            // Through a bpf_link, which always shares the cgroup with other programs (the
            // kernel answers EINVAL to BPF_F_ALLOW_MULTI passed as a link flag).
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| attach_err(format!("{e:?}")))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(|e| attach_err(format!("{e:?}")))?
                .try_into()
                .map_err(|e| attach_err(format!("{e:?}")))?;
            replace_pinned(link, old, &pin)?;
        }
        tracing::info!(cgroup = %cgroup.display(), netns_cookie = cookie, "node_connect attached");
        Ok(())
    }

    /// Detaches `node_connect` (unpins its links; absent ones are fine) and forgets the
    /// namespace: the node's own connections reach covered pods directly.
    pub fn detach_node(&self) -> Result<(), RedirectError> {
        let mut inner = self.lock();
        for name in [NODE_CONNECT4_PROGRAM, NODE_CONNECT6_PROGRAM] {
            unpin_link(&self.node_link_pin(name))?;
        }
        inner
            .maps
            .node_netns
            .set(0, 0, 0)
            .map_err(|e| map_err(NODE_NETNS_MAP, 0)(format!("{e:?}")))
    }

    fn node_link_pin(&self, program: &str) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(program)
    }

    /// Makes `veil_node_direct` equal to `direct`: the (covered pod, port) pairs the
    /// node's own connections reach without the proxy (the kubelet's tcpSocket and gRPC
    /// probes). Idempotent. Stale exemptions go first and every change is tried: an
    /// exemption that cannot be added (the map full) leaves that probe to the proxy, but
    /// one that outlived its pod must never stay behind because of it, for a later pod at
    /// the same address and port would inherit it. Returns the first error.
    pub fn set_node_direct(&self, direct: &BTreeSet<(Ipv4Addr, u16)>) -> Result<(), RedirectError> {
        let mut inner = self.lock();
        let have: BTreeSet<(Ipv4Addr, u16)> = inner
            .maps
            .node_direct
            .keys()
            .map(|k| k.map(|k| k.endpoint()))
            .collect::<Result<_, _>>()
            .map_err(|e| map_err(NODE_DIRECT_MAP, "list")(format!("{e:?}")))?;
        let mut first_error = None;
        for (ip, port) in have.difference(direct) {
            if let Err(e) = inner.maps.node_direct.remove(&PodPort::new(*ip, *port)) {
                first_error.get_or_insert(map_err(NODE_DIRECT_MAP, format!("{ip}:{port}"))(
                    format!("{e:?}"),
                ));
            }
        }
        for (ip, port) in direct.difference(&have) {
            if let Err(e) = inner
                .maps
                .node_direct
                .insert(PodPort::new(*ip, *port), 1, 0)
            {
                first_error.get_or_insert(map_err(NODE_DIRECT_MAP, format!("{ip}:{port}"))(
                    format!("{e:?}"),
                ));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps as the kernel has them, which
        // is still consistent: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tunnel_link_pin(&self, ifname: &str) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("from_tunnel_{ifname}"))
    }

    fn tc_link_pin(&self, ifname: &str) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("from_pod_{ifname}"))
    }

    /// Attaches `from_pod` at tc ingress of the pod's host-side veth `ifname` (index
    /// `ifindex`, in the calling thread's namespace) with the link pinned and sets the
    /// veth's `accept_local` (call [`accept_local`] too), after writing
    /// the pod's anti-spoofing entry (`pod_ip`) and its counters (kept if they exist, so
    /// an agent restart keeps them). A link pinned by an earlier agent is updated in
    /// place to the new program (no moment without a program).
    pub fn attach_pod(
        &self,
        ifname: &str,
        ifindex: u32,
        pod_ip: Ipv4Addr,
    ) -> Result<(), RedirectError> {
        let mut inner = self.lock();
        // The entries first: a program without them would count nothing and let spoofed
        // packets through.
        let pod = VeilPod {
            ipv4: ipv4_key(pod_ip),
            flags: 0,
        };
        inner
            .maps
            .pods
            .insert(ifindex, pod, 0)
            .map_err(|e| map_err(PODS_MAP, ifname)(format!("{e:?}")))?;
        if inner.maps.counters.get(&ifindex, 0).is_err() {
            let zero = PerCpuValues::try_from(vec![RawCounters::default(); self.nr_cpus])
                .map_err(|e| map_err(POD_COUNTERS_MAP, ifname)(e.to_string()))?;
            inner
                .maps
                .counters
                .insert(ifindex, zero, 0)
                .map_err(|e| map_err(POD_COUNTERS_MAP, ifname)(format!("{e:?}")))?;
        }
        let program = program_of::<SchedClassifier>(&mut inner.from_pod, FROM_POD_PROGRAM)?;
        attach_tc(program, FROM_POD_PROGRAM, ifname, &self.tc_link_pin(ifname))?;
        inner.attached.insert(ifname.to_string(), ifindex);
        tracing::info!(ifname, ifindex, pod_ip = %pod_ip, "from_pod attached");
        Ok(())
    }

    /// Attaches `from_tunnel` at tc ingress of the WireGuard device `ifname` (in the
    /// calling thread's namespace), link pinned; an earlier agent's link is updated in
    /// place. Without it, answers from other nodes to connections that covered pods
    /// opened themselves would be delivered to the proxy instead of the pod.
    pub fn attach_tunnel(&self, ifname: &str) -> Result<(), RedirectError> {
        let mut inner = self.lock();
        let program = program_of::<SchedClassifier>(&mut inner.from_tunnel, FROM_TUNNEL_PROGRAM)?;
        attach_tc(
            program,
            FROM_TUNNEL_PROGRAM,
            ifname,
            &self.tunnel_link_pin(ifname),
        )?;
        tracing::info!(ifname, "from_tunnel attached");
        Ok(())
    }

    /// Detaches `from_tunnel` from `ifname` (unpins its link); absent links are fine.
    pub fn detach_tunnel(&self, ifname: &str) -> Result<(), RedirectError> {
        let _inner = self.lock();
        unpin_link(&self.tunnel_link_pin(ifname))
    }

    /// Detaches `from_pod` from `ifname` (unpins its link) and removes the pod's
    /// anti-spoofing entry and counters. Unknown interfaces are fine: a link pinned by an
    /// earlier agent is still removed.
    pub fn detach_pod(&self, ifname: &str) -> Result<(), RedirectError> {
        let mut inner = self.lock();
        unpin_link(&self.tc_link_pin(ifname))?;
        if let Some(ifindex) = inner.attached.remove(ifname) {
            // Absent entries are fine: nothing to remove.
            let _ = inner.maps.pods.remove(&ifindex);
            let _ = inner.maps.counters.remove(&ifindex);
        }
        tracing::info!(ifname, "from_pod detached");
        Ok(())
    }

    /// Removes the anti-spoofing entries and counters of every interface index not in
    /// `live` (pods deleted while no agent ran: [`Redirect::detach_pod`] after a restart
    /// knows the name only). Call after re-attaching the surviving pods. Returns how many
    /// interfaces were forgotten.
    pub fn prune(&self, live: &BTreeSet<u32>) -> Result<usize, RedirectError> {
        let mut inner = self.lock();
        let stale = |keys: Vec<Result<u32, aya::maps::MapError>>, map: &'static str| {
            keys.into_iter()
                .collect::<Result<Vec<u32>, _>>()
                .map(|keys| {
                    keys.into_iter()
                        .filter(|k| !live.contains(k))
                        .collect::<BTreeSet<u32>>()
                })
                .map_err(|e| map_err(map, "list")(format!("{e:?}")))
        };
        let mut gone = stale(inner.maps.pods.keys().collect(), PODS_MAP)?;
        gone.extend(stale(
            inner.maps.counters.keys().collect(),
            POD_COUNTERS_MAP,
        )?);
        for ifindex in &gone {
            // Absent from one of the two maps is fine.
            let _ = inner.maps.pods.remove(ifindex);
            let _ = inner.maps.counters.remove(ifindex);
        }
        inner.attached.retain(|_, i| live.contains(i));
        tracing::info!(forgotten = gone.len(), "pruned pod entries");
        Ok(gone.len())
    }

    /// What the pod behind `ifname` sent, and what anti-spoofing dropped of it, since it
    /// was first attached; `None` for interfaces this agent has not attached.
    pub fn counters(&self, ifname: &str) -> Option<Counts> {
        let inner = self.lock();
        let ifindex = *inner.attached.get(ifname)?;
        let values = inner.maps.counters.get(&ifindex, 0).ok()?;
        Some(Counts::sum(values.iter()))
    }

    /// The address of the pod behind the host-side veth `ifindex`, as its anti-spoofing
    /// entry says (for naming the sender of a spoofed packet).
    pub fn pod_ip(&self, ifindex: u32) -> Option<Ipv4Addr> {
        let inner = self.lock();
        let pod = inner.maps.pods.get(&ifindex, 0).ok()?;
        Some(ipv4_from_key(pod.ipv4))
    }

    /// Makes the covered set (map `veil_covered` and the `local <ip>/32 src <node_ip>`
    /// routes of table [`consts::COVERED_TABLE`]) equal to `covered`: adds the missing,
    /// removes the extra; idempotent. `node_ip` is the source the node's own connections
    /// to covered pods take (see [`Redirect::attach_node`]). A new pod enters the map
    /// before its route (until the route exists its traffic still goes straight to it, as
    /// before the policy); a pod leaving loses its route before its map entry (so no
    /// locally delivered connection misses the proxy).
    pub async fn set_covered(
        &self,
        handle: &rtnetlink::Handle,
        covered: &BTreeSet<Ipv4Addr>,
        node_ip: Option<Ipv4Addr>,
    ) -> Result<(), RedirectError> {
        let have = self.covered_in_map()?;
        {
            let mut inner = self.lock();
            for ip in covered.difference(&have) {
                inner
                    .maps
                    .covered
                    .insert(ipv4_key(*ip), 1, 0)
                    .map_err(|e| map_err(COVERED_MAP, ip)(format!("{e:?}")))?;
            }
        }
        routing::reconcile_covered_routes(handle, covered, node_ip).await?;
        let mut inner = self.lock();
        for ip in have.difference(covered) {
            inner
                .maps
                .covered
                .remove(&ipv4_key(*ip))
                .map_err(|e| map_err(COVERED_MAP, ip)(format!("{e:?}")))?;
        }
        tracing::info!(covered = covered.len(), "covered pods set");
        Ok(())
    }

    /// The covered pods the map holds now.
    pub fn covered_in_map(&self) -> Result<BTreeSet<Ipv4Addr>, RedirectError> {
        let inner = self.lock();
        inner
            .maps
            .covered
            .keys()
            .map(|k| k.map(ipv4_from_key))
            .collect::<Result<_, _>>()
            .map_err(|e| map_err(COVERED_MAP, "list")(format!("{e:?}")))
    }

    /// Puts the proxy's listening sockets, one per worker thread (TCP, with
    /// `IP_TRANSPARENT` so accepted sockets may answer from a pod's address), into the
    /// sockmap and their number into the workers map, which `sk_lookup` spreads
    /// connections over (their replies leave by rule 111, the node's own TCP). The
    /// kernel empties a slot when its socket closes; until the next call, the connections
    /// hashed to it are refused.
    pub fn set_proxy_listeners(&self, listeners: &[impl AsRawFd]) -> Result<(), RedirectError> {
        let count = u32::try_from(listeners.len())
            .ok()
            .filter(|n| (1..=consts::MAX_PROXY_WORKERS).contains(n))
            .ok_or_else(|| {
                map_err(PROXY_SOCKS_MAP, "listeners")(format!(
                    "{} listeners, the map holds 1 to {}",
                    listeners.len(),
                    consts::MAX_PROXY_WORKERS
                ))
            })?;
        let mut inner = self.lock();
        // The slots first: a count over filled slots would drop connections meanwhile.
        for (slot, listener) in (0u32..).zip(listeners) {
            inner
                .maps
                .proxy_socks
                .set(slot, listener, 0)
                .map_err(|e| map_err(PROXY_SOCKS_MAP, slot)(format!("{e:?}")))?;
        }
        inner
            .maps
            .proxy_workers
            .set(0, count, 0)
            .map_err(|e| map_err(PROXY_WORKERS_MAP, 0)(format!("{e:?}")))
    }

    /// Empties the sockmap: covered connections are refused from now on.
    pub fn clear_proxy_listeners(&self) -> Result<(), RedirectError> {
        let mut inner = self.lock();
        inner
            .maps
            .proxy_workers
            .set(0, 0, 0)
            .map_err(|e| map_err(PROXY_WORKERS_MAP, 0)(format!("{e:?}")))?;
        for slot in 0..consts::MAX_PROXY_WORKERS {
            match inner.maps.proxy_socks.clear_index(&slot) {
                Ok(()) => {}
                // Already empty (the socket closed, or never there): a sockmap answers
                // EINVAL for an empty slot.
                Err(aya::maps::MapError::SyscallError(e))
                    if matches!(e.io_error.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
                Err(e) => return Err(map_err(PROXY_SOCKS_MAP, slot)(format!("{e:?}"))),
            }
        }
        Ok(())
    }

    /// Installs the five rules (110 node mark → table 120, 111 `iif lo ipproto tcp` → main, 112 upstream mark →
    /// main, 113 to-proxy mark → table 121, 114 `ipproto tcp` → table 120) and table
    /// [`consts::TO_PROXY_TABLE`]'s `local 0.0.0.0/0 dev lo`. Idempotent; a rule at one of
    /// these priorities with another selector, table or action is replaced.
    pub async fn ensure_rules(&self, handle: &rtnetlink::Handle) -> Result<(), RedirectError> {
        routing::ensure_rules(handle).await
    }

    /// The spoof-event stream. There is one ring; the first call takes it, later calls
    /// get `None`. Must be called inside a tokio runtime (it registers with the reactor).
    pub fn spoof_events(&self) -> Option<Result<SpoofEvents, RedirectError>> {
        let ring = self.lock().maps.spoof_events.take()?;
        Some(SpoofEvents::new(ring))
    }

    /// Uninstall: removes the rules, the routes of both tables, every pinned link (the
    /// programs detach) and every pinned map, then the pin directory. Consumes `self`,
    /// whose descriptors are the last references.
    pub async fn remove_all(self, handle: &rtnetlink::Handle) -> Result<(), RedirectError> {
        routing::remove_all(handle).await?;
        Self::unpin_all(&self.pin_dir)
    }

    /// Removes every pin under `pin_dir` (links first, then maps, then the directories);
    /// for an uninstall that has no loaded [`Redirect`].
    pub fn unpin_all(pin_dir: &Path) -> Result<(), RedirectError> {
        let links = pin_dir.join(LINKS_DIR);
        if let Ok(entries) = std::fs::read_dir(&links) {
            for entry in entries.flatten() {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| pin_err(&path)(e.to_string()))?;
            }
            std::fs::remove_dir(&links).map_err(|e| pin_err(&links)(e.to_string()))?;
        }
        for map in ALL_MAPS {
            let path = pin_dir.join(map);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(&path)(e.to_string())),
            }
        }
        match std::fs::remove_dir(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(pin_err(pin_dir)(e.to_string())),
        }
    }

    /// For the tests: runs `f` with the loaded `from_pod` program, or `from_tunnel`'s.
    #[cfg(test)]
    pub(crate) fn with_tc<T>(&self, tunnel: bool, f: impl FnOnce(&SchedClassifier) -> T) -> T {
        let inner = self.lock();
        let (ebpf, name) = match tunnel {
            false => (&inner.from_pod, FROM_POD_PROGRAM),
            true => (&inner.from_tunnel, FROM_TUNNEL_PROGRAM),
        };
        let program: &SchedClassifier = ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded");
        f(program)
    }

    /// For the tests: runs `f` with the loaded `sk_lookup` program.
    #[cfg(test)]
    pub(crate) fn with_sk_lookup<T>(&self, f: impl FnOnce(&SkLookup) -> T) -> T {
        let inner = self.lock();
        let program: &SkLookup = inner
            ._sk_lookup
            .program(SK_LOOKUP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded");
        f(program)
    }
}
