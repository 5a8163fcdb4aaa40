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
}

impl Allocation {
    /// The pod's namespace and name, when the runtime said.
    pub fn pod_key(&self) -> Option<(String, String)> {
        let (ns, name) = self.pod.as_deref()?.split_once('/')?;
        Some((ns.to_string(), name.to_string()))
    }
}

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
        fs::create_dir_all(dir).map_err(|source| IpamError::Io {
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
            let ip: Ipv4Addr = name.parse().map_err(|_| IpamError::Corrupt {
                path: path.clone(),
                reason: "file name is not an IPv4 address".into(),
            })?;
            let bytes = fs::read(&path).map_err(|source| IpamError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            let record: Record =
                serde_json::from_slice(&bytes).map_err(|e| IpamError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if !pool.contains(&ip) {
                return Err(IpamError::Corrupt {
                    path,
                    reason: format!("address is outside the node's pod CIDR {pool}; did the node's podCIDR change?"),
                });
            }
            by_ip.insert(
                ip,
                Allocation {
                    key: AttachmentKey {
                        container_id: record.container_id,
                        ifname: record.ifname,
                    },
                    pod: record.pod,
                    netns: record.netns,
                },
            );
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
        self.allocate_in(key, pod, None)
    }

    /// [`Ipam::allocate`], recording the pod's network namespace path as well.
    pub fn allocate_in(
        &self,
        key: &AttachmentKey,
        pod: Option<&str>,
        netns: Option<&str>,
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
        let mut file = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&serde_json::to_vec(&record).expect("records serialise"))
            .map_err(io("write", &tmp))?;
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
        ipam.allocate_in(&key("new"), Some("default/new"), Some("/run/netns/new"))
            .unwrap();
        let ipam = Ipam::open(pool, dir.path()).unwrap();
        let old = ipam.allocation(&key("old")).unwrap();
        assert_eq!(old.netns, None);
        assert_eq!(old.pod_key(), Some(("default".into(), "old".into())));
        let new = ipam.allocation(&key("new")).unwrap();
        assert_eq!(new.netns.as_deref(), Some("/run/netns/new"));
        assert_eq!(new.pod_key(), Some(("default".into(), "new".into())));
    }

    #[test]
    fn cni_ipam_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("198.19.3.9"), b"{oops").unwrap();
        let err = Ipam::open("198.19.3.0/24".parse().unwrap(), dir.path())
            .err()
            .unwrap();
        assert!(err.to_string().contains("198.19.3.9"), "{err}");
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
