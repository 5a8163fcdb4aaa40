//! Pod address management for one node: addresses from the node's `spec.podCIDR`, each
//! allocation a file on disk so that an agent restart keeps every pod's address.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::cni::protocol::AttachmentKey;
use crate::netns::NsId;

/// Where files that are no allocation of this pool are moved, beside the pool directory:
/// kept for an operator to look at, out of the way of the next start.
const STALE_DIR: &str = "ipam-stale";

/// Errors of address management.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every usable address of the pool is allocated.
    #[error(
        "no free address in pod CIDR {pool} ({allocated} of {usable} usable addresses allocated)"
    )]
    Exhausted {
        /// The node's pool.
        pool: Ipv4Net,
        /// Addresses in use.
        allocated: usize,
        /// Addresses the pool offers to pods.
        usable: usize,
    },
    /// The pool is too small to hold a pod after the reserved addresses.
    #[error("pod CIDR {0} is too small: it needs room for the network, node and broadcast addresses and a pod (/29 or larger)")]
    PoolTooSmall(Ipv4Net),
    /// Reading or writing the state directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An allocation file could not be understood.
    #[error("allocation file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// What one allocation file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    container_id: String,
    ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    /// Added after the first release: files written before it load with `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<String>,
    /// The namespace's identity when it was attached, so a restarted agent can tell
    /// whether the path still names the same namespace. Absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns_id: Option<NsId>,
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The attachment holding it.
    pub key: AttachmentKey,
    /// `namespace/name` of the pod, when the runtime said.
    pub pod: Option<String>,
    /// The pod's network namespace path (`CNI_NETNS`), so a restarted agent can attest
    /// the pod's processes again.
    pub netns: Option<String>,
    /// The identity of that namespace at ADD (nsfs device and inode).
    pub netns_id: Option<NsId>,
}

impl Allocation {
    /// The pod's namespace and name, when the runtime said.
    pub fn pod_key(&self) -> Option<(String, String)> {
        let (ns, name) = self.pod.as_deref()?.split_once('/')?;
        Some((ns.to_string(), name.to_string()))
    }
}

/// Reads one allocation file, or says why it is none of this pool's.
fn read_record(path: &Path, name: &str, pool: Ipv4Net) -> Result<(Ipv4Addr, Allocation), String> {
    let ip: Ipv4Addr = name
        .parse()
        .map_err(|_| "file name is not an IPv4 address".to_string())?;
    if !pool.contains(&ip) {
        return Err(format!(
            "address is outside the node's pod CIDR {pool}; did the node's podCIDR change?"
        ));
    }
    let meta = fs::symlink_metadata(path).map_err(|e| format!("stat: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "not a regular file of at most {MAX_RECORD_BYTES} bytes"
        ));
    }
    let bytes = fs::read(path).map_err(|e| format!("read: {e}"))?;
    let record: Record =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a record: {e}"))?;
    let key = AttachmentKey {
        container_id: record.container_id,
        ifname: record.ifname,
    };
    key.validate().map_err(|e| e.msg)?;
    Ok((
        ip,
        Allocation {
            key,
            pod: record.pod,
            netns: record.netns,
            netns_id: record.netns_id,
        },
    ))
}

/// Moves a file that is no allocation into [`STALE_DIR`] beside `dir`, and reports it.
fn set_aside(dir: &Path, path: &Path, reason: &str) {
    let stale = dir.with_file_name(STALE_DIR);
    let moved = fs::create_dir_all(&stale).and_then(|()| {
        let name = path.file_name().unwrap_or_default();
        fs::rename(path, stale.join(name))
    });
    match moved {
        Ok(()) => {
            tracing::error!(file = %path.display(), moved_to = %stale.display(), reason, "not an allocation of this node; set aside")
        }
        Err(e) => {
            tracing::error!(file = %path.display(), reason, error = %e, "not an allocation of this node, and it cannot be moved; ignored")
        }
    }
}

/// An allocation record is a few hundred bytes; anything much larger is not one.
const MAX_RECORD_BYTES: u64 = 64 << 10;

struct State {
    by_ip: BTreeMap<Ipv4Addr, Allocation>,
    /// Allocation continues after the last address handed out, so a freed address is not
    /// reused at once (a late packet for the old pod must not reach a new one).
    last: Ipv4Addr,
}

/// The address pool of one node.
pub struct Ipam {
    pool: Ipv4Net,
    dir: PathBuf,
    state: Mutex<State>,
}

impl Ipam {
    /// Opens the pool, reading back every allocation recorded under `dir`.
    pub fn open(pool: Ipv4Net, dir: &Path) -> Result<Self, IpamError> {
        let pool = pool.trunc();
        if pool.prefix_len() > 29 {
            return Err(IpamError::PoolTooSmall(pool));
        }
        fs::create_dir_all(dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| IpamError::Io {
                action: "create",
                path: dir.into(),
                source,
            })?;
        let mut by_ip = BTreeMap::new();
        let entries = fs::read_dir(dir).map_err(|source| IpamError::Io {
            action: "read",
            path: dir.into(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| IpamError::Io {
                action: "read",
                path: dir.into(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                // A temporary file from a write that never finished renaming: not an allocation.
                let _ = fs::remove_file(&path);
                continue;
            }
            match read_record(&path, &name, pool) {
                Ok((ip, allocation)) => {
                    by_ip.insert(ip, allocation);
                }
                // Refusing to start would crash-loop the agent and take every pod's network
                // management down with one bad file; moving it aside loses nothing.
                Err(reason) => set_aside(dir, &path, &reason),
            }
        }
        let last = by_ip
            .keys()
            .next_back()
            .copied()
            .unwrap_or_else(|| pool.network());
        Ok(Ipam {
            pool,
            dir: dir.to_path_buf(),
            state: Mutex::new(State { by_ip, last }),
        })
    }

    /// The pool this node hands addresses out of.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// The first host address, kept for the node itself.
    pub fn node_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pool.network()) + 1)
    }

    fn usable(&self) -> impl Iterator<Item = Ipv4Addr> + Clone {
        // Network, node and broadcast addresses are never handed to pods.
        let first = u32::from(self.pool.network()) + 2;
        let last = u32::from(self.pool.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    /// Allocates an address for `key`, or returns the one it already has (ADD is retried
    /// by runtimes, and a retry must not take a second address).
    pub fn allocate(&self, key: &AttachmentKey, pod: Option<&str>) -> Result<Ipv4Addr, IpamError> {
        self.allocate_in(key, pod, None, None)
    }

    /// [`Ipam::allocate`], recording the pod's network namespace path and identity too.
    pub fn allocate_in(
        &self,
        key: &AttachmentKey,
        pod: Option<&str>,
        netns: Option<&str>,
        netns_id: Option<NsId>,
    ) -> Result<Ipv4Addr, IpamError> {
        let mut state = self.state.lock().expect("ipam lock poisoned");
        if let Some((ip, _)) = state.by_ip.iter().find(|(_, a)| a.key == *key) {
            return Ok(*ip);
        }
        let usable: Vec<Ipv4Addr> = self.usable().collect();
        let start = usable.iter().position(|ip| *ip > state.last).unwrap_or(0);
        let free = usable[start..]
            .iter()
            .chain(&usable[..start])
            .find(|ip| !state.by_ip.contains_key(ip))
            .copied()
            .ok_or(IpamError::Exhausted {
                pool: self.pool,
                allocated: state.by_ip.len(),
                usable: usable.len(),
            })?;
        let allocation = Allocation {
            key: key.clone(),
            pod: pod.map(str::to_string),
            netns: netns.map(str::to_string),
            netns_id,
        };
        self.write_record(free, &allocation)?;
        state.by_ip.insert(free, allocation);
        state.last = free;
        Ok(free)
    }

    /// Frees the address of `key`; `None` when it had none (DEL must be idempotent).
    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Ipv4Addr>, IpamError> {
        let mut state = self.state.lock().expect("ipam lock poisoned");
        let Some(ip) = state
            .by_ip
            .iter()
            .find(|(_, a)| a.key == *key)
            .map(|(ip, _)| *ip)
        else {
            return Ok(None);
        };
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IpamError::Io {
                    action: "remove",
                    path,
                    source,
                })
            }
        }
        // The removal must survive a crash too, or a restart would resurrect the address.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| IpamError::Io {
                action: "sync",
                path: self.dir.clone(),
                source,
            })?;
        state.by_ip.remove(&ip);
        Ok(Some(ip))
    }

    /// The address `key` holds, if any.
    pub fn lookup(&self, key: &AttachmentKey) -> Option<Ipv4Addr> {
        let state = self.state.lock().expect("ipam lock poisoned");
        state
            .by_ip
            .iter()
            .find(|(_, a)| a.key == *key)
            .map(|(ip, _)| *ip)
    }

    /// The allocation of `key`, if any.
    pub fn allocation(&self, key: &AttachmentKey) -> Option<Allocation> {
        let state = self.state.lock().expect("ipam lock poisoned");
        state.by_ip.values().find(|a| a.key == *key).cloned()
    }

    /// Every allocation, in address order.
    pub fn allocations(&self) -> Vec<(Ipv4Addr, Allocation)> {
        let state = self.state.lock().expect("ipam lock poisoned");
        state.by_ip.iter().map(|(ip, a)| (*ip, a.clone())).collect()
    }

    /// Writes the record through a temporary file and a rename, then syncs the directory,
    /// so a crash leaves either no allocation or a whole one.
    fn write_record(&self, ip: Ipv4Addr, allocation: &Allocation) -> Result<(), IpamError> {
        let record = Record {
            container_id: allocation.key.container_id.clone(),
            ifname: allocation.key.ifname.clone(),
            pod: allocation.pod.clone(),
            netns: allocation.netns.clone(),
            netns_id: allocation.netns_id,
        };
        let tmp = self.dir.join(format!(".{ip}.tmp"));
        let path = self.dir.join(ip.to_string());
        fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
            let path = path.to_path_buf();
            move |source| IpamError::Io {
                action,
                path,
                source,
            }
        }
        let bytes = serde_json::to_vec(&record).map_err(|e| IpamError::Corrupt {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        // Records name pods and their namespaces: root-only, whatever the umask.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?
        };
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn cni_ipam_skips_reserved_and_exhausts_a_28() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open("198.19.0.0/28".parse().unwrap(), dir.path()).unwrap();
        let ips: Vec<_> = (0..13)
            .map(|i| ipam.allocate(&key(&format!("c{i}")), None).unwrap())
            .collect();
        assert_eq!(ips[0], "198.19.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ips[12], "198.19.0.14".parse::<Ipv4Addr>().unwrap());
        let err = ipam.allocate(&key("c13"), None).unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::Exhausted {
                    allocated: 13,
                    usable: 13,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            13,
            "a failed allocation leaves no file"
        );
    }

    #[test]
    fn cni_ipam_survives_reopen_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let pool = "198.19.1.0/24".parse().unwrap();
        let first = Ipam::open(pool, dir.path())
            .unwrap()
            .allocate(&key("a"), None)
            .unwrap();
        let ipam = Ipam::open(pool, dir.path()).unwrap();
        assert_eq!(ipam.lookup(&key("a")), Some(first));
        assert_eq!(
            ipam.allocate(&key("a"), None).unwrap(),
            first,
            "a retried ADD keeps its address"
        );
        assert_ne!(ipam.allocate(&key("b"), None).unwrap(), first);
    }

    #[test]
    fn cni_ipam_release_is_idempotent_and_does_not_reuse_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open("198.19.2.0/24".parse().unwrap(), dir.path()).unwrap();
        let a = ipam.allocate(&key("a"), None).unwrap();
        assert_eq!(ipam.release(&key("a")).unwrap(), Some(a));
        assert_eq!(ipam.release(&key("a")).unwrap(), None);
        assert_ne!(ipam.allocate(&key("b"), None).unwrap(), a);
    }

    #[test]
    fn cni_ipam_keeps_the_netns_and_reads_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let pool = "198.19.5.0/24".parse().unwrap();
        // A record written before the netns was kept.
        fs::write(
            dir.path().join("198.19.5.2"),
            br#"{"containerId":"old","ifname":"eth0","pod":"default/old"}"#,
        )
        .unwrap();
        let ipam = Ipam::open(pool, dir.path()).unwrap();
        let id = NsId {
            dev: 4,
            ino: 4026532000,
        };
        ipam.allocate_in(
            &key("new"),
            Some("default/new"),
            Some("/run/netns/new"),
            Some(id),
        )
        .unwrap();
        let ipam = Ipam::open(pool, dir.path()).unwrap();
        let old = ipam.allocation(&key("old")).unwrap();
        assert_eq!(old.netns, None);
        assert_eq!(old.pod_key(), Some(("default".into(), "old".into())));
        let new = ipam.allocation(&key("new")).unwrap();
        assert_eq!(new.netns.as_deref(), Some("/run/netns/new"));
        assert_eq!(new.netns_id, Some(id));
        assert_eq!(new.pod_key(), Some(("default".into(), "new".into())));
    }

    #[test]
    fn hardening_ipam_stray_corrupt_and_foreign_files_are_set_aside_not_fatal() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ipam");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("198.19.3.9"), b"{oops").unwrap();
        fs::write(dir.join("README"), b"stray").unwrap();
        // From before a podCIDR change: outside today's pool.
        fs::write(
            dir.join("198.19.7.2"),
            br#"{"containerId":"old","ifname":"eth0"}"#,
        )
        .unwrap();
        // A record whose key could not have come from a runtime.
        fs::write(
            dir.join("198.19.3.10"),
            br#"{"containerId":"../../etc","ifname":"eth0"}"#,
        )
        .unwrap();
        fs::write(
            dir.join("198.19.3.11"),
            br#"{"containerId":"good","ifname":"eth0"}"#,
        )
        .unwrap();
        let ipam = Ipam::open("198.19.3.0/24".parse().unwrap(), &dir).unwrap();
        assert_eq!(ipam.allocations().len(), 1, "only the good record is kept");
        assert!(ipam.lookup(&key("good")).is_some());
        let stale: Vec<_> = fs::read_dir(root.path().join(STALE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(stale.len(), 4, "{stale:?}");
        // New records and the directory are root-only.
        let ip = ipam.allocate(&key("new"), None).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(ip.to_string())), 0o600);
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn cni_ipam_concurrent_allocations_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let ipam =
            std::sync::Arc::new(Ipam::open("198.19.4.0/24".parse().unwrap(), dir.path()).unwrap());
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let ipam = ipam.clone();
                std::thread::spawn(move || ipam.allocate(&key(&format!("c{i}")), None).unwrap())
            })
            .collect();
        let mut ips: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 50);
    }
}
