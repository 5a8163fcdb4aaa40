//! Which nodes this node trusts as WireGuard peers, and which pod CIDRs stay routed into
//! the WireGuard device (and so dropped) although no peer serves them.
//!
//! Node objects are checked before they are trusted: a podCIDR that is `/0` or overlaps
//! this node's or an older node's, or an InternalIP that is this node's, an older node's,
//! or inside a pod range, would let one object capture other nodes' traffic or loop the
//! tunnel into itself. Such a node is excluded and reported; the older node keeps its
//! place, so a new object cannot push a real node out.
//!
//! Strictness must not depend on `--cluster-pod-cidr`: every pod CIDR that ever belonged
//! to an accepted peer is remembered on disk, and stays routed into the device after its
//! Node is deleted or becomes unreadable, so its pods are never reached in clear text.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use crate::k8s::NodeInfo;

/// The most pod CIDRs remembered: far more nodes than a cluster has, small enough that
/// the file and the route table stay bounded whatever Node objects come and go.
pub const MAX_KNOWN_CIDRS: usize = 4096;

/// The file of remembered CIDRs at its largest: [`MAX_KNOWN_CIDRS`] entries of a CIDR
/// and a Node name (at most 253 bytes) each.
const MAX_KNOWN_FILE_BYTES: u64 = MAX_KNOWN_CIDRS as u64 * 300;

/// A Node as the watch saw it, before it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The Node's name.
    pub name: String,
    /// When it was created (RFC 3339, sorts by time), so older nodes win a conflict.
    pub created: String,
    /// What it says, or why it cannot be read.
    pub info: Result<NodeInfo, String>,
}

/// A Node left out of the peer set, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Excluded {
    /// The Node's name.
    pub node: String,
    /// Why it is not trusted.
    pub reason: String,
}

/// The outcome of checking every Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    /// Trusted peers, by name.
    pub peers: Vec<NodeInfo>,
    /// Nodes left out, by name.
    pub excluded: Vec<Excluded>,
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn inside(ip: IpAddr, net: &Ipv4Net) -> bool {
    matches!(ip, IpAddr::V4(v4) if net.contains(&v4))
}

/// Checks every Node against this node (`own`), the cluster pod range (`catch_all`) and
/// the older Nodes.
///
/// Nodes that were there first win a conflict: peers already trusted with the same pod
/// CIDR (`incumbent`), then older ones (creation times have whole seconds only, so a
/// Node created in the same second as a real one must not win by its name).
pub fn validate(
    own: &NodeInfo,
    catch_all: Option<Ipv4Net>,
    nodes: &[Candidate],
    incumbent: impl Fn(&NodeInfo) -> bool,
) -> PeerSet {
    let newcomer = |c: &Candidate| !c.info.as_ref().is_ok_and(&incumbent);
    let mut nodes: Vec<&Candidate> = nodes.iter().collect();
    nodes.sort_by(|a, b| {
        (newcomer(a), &a.created, &a.name).cmp(&(newcomer(b), &b.created, &b.name))
    });
    let mut set = PeerSet::default();
    for node in nodes {
        if node.name == own.name {
            continue;
        }
        let verdict = node.info.as_ref().map_err(String::clone).and_then(|info| {
            let cidr = info.pod_cidr;
            let ip = info.internal_ip;
            if cidr.prefix_len() == 0 {
                return Err(format!("podCIDR {cidr} covers every address"));
            }
            if overlaps(&cidr, &own.pod_cidr) {
                return Err(format!(
                    "podCIDR {cidr} overlaps this node's {}",
                    own.pod_cidr
                ));
            }
            if ip == own.internal_ip {
                return Err(format!("InternalIP {ip} is this node's"));
            }
            if inside(ip, &cidr)
                || inside(ip, &own.pod_cidr)
                || catch_all.is_some_and(|c| inside(ip, &c))
            {
                return Err(format!("InternalIP {ip} lies in a pod range"));
            }
            if inside(own.internal_ip, &cidr) {
                return Err(format!("podCIDR {cidr} holds this node's InternalIP"));
            }
            for older in &set.peers {
                if overlaps(&cidr, &older.pod_cidr) {
                    return Err(format!(
                        "podCIDR {cidr} overlaps node {}'s {}",
                        older.name, older.pod_cidr
                    ));
                }
                if ip == older.internal_ip {
                    return Err(format!("InternalIP {ip} is also node {}'s", older.name));
                }
                if inside(ip, &older.pod_cidr) || inside(older.internal_ip, &cidr) {
                    return Err(format!(
                        "InternalIP and podCIDR clash with node {}",
                        older.name
                    ));
                }
            }
            Ok(info)
        });
        match verdict {
            Ok(info) => set.peers.push(info.clone()),
            Err(reason) => set.excluded.push(Excluded {
                node: node.name.clone(),
                reason,
            }),
        }
    }
    set.peers.sort_by(|a, b| a.name.cmp(&b.name));
    set.excluded.sort_by(|a, b| a.node.cmp(&b.node));
    set
}

/// Pod CIDRs of every peer ever accepted, kept in a file so that they stay routed into
/// the device across Node deletions and agent restarts.
pub struct KnownCidrs {
    path: PathBuf,
    /// Each range and the Node that last held it.
    cidrs: BTreeMap<Ipv4Net, String>,
}

impl KnownCidrs {
    /// Reads the file at `path`; a missing or unreadable file starts empty (and is
    /// reported), since the live Node list refills it.
    pub fn load(path: &Path) -> Self {
        // Bounded like everything read from outside: the whole file, at most, or an error.
        let read = std::fs::File::open(path).and_then(|f| {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(f, MAX_KNOWN_FILE_BYTES + 1),
                &mut bytes,
            )?;
            if bytes.len() as u64 > MAX_KNOWN_FILE_BYTES {
                return Err(std::io::Error::other(format!(
                    "larger than {MAX_KNOWN_FILE_BYTES} bytes"
                )));
            }
            Ok(bytes)
        });
        let cidrs = match read {
            Ok(bytes) => match serde_json::from_slice::<BTreeMap<Ipv4Net, String>>(&bytes) {
                Ok(cidrs) => cidrs.into_iter().take(MAX_KNOWN_CIDRS).collect(),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "known pod CIDRs unreadable; starting from the Node list");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "read known pod CIDRs");
                BTreeMap::new()
            }
        };
        KnownCidrs {
            path: path.to_path_buf(),
            cidrs,
        }
    }

    /// Whether `node` is the peer last trusted with its pod CIDR.
    pub fn holds(&self, node: &NodeInfo) -> bool {
        self.cidrs.get(&node.pod_cidr) == Some(&node.name)
    }

    /// Adds the peers' CIDRs; writes the file when something changed.
    pub fn remember(&mut self, peers: &[NodeInfo]) {
        let mut changed = false;
        for peer in peers {
            if self.holds(peer) {
                continue;
            }
            if self.cidrs.len() >= MAX_KNOWN_CIDRS && !self.cidrs.contains_key(&peer.pod_cidr) {
                tracing::warn!(
                    limit = MAX_KNOWN_CIDRS,
                    "too many pod CIDRs to remember; newer ones are not kept after their Node goes"
                );
                break;
            }
            self.cidrs.insert(peer.pod_cidr, peer.name.clone());
            changed = true;
        }
        if changed {
            if let Err(e) = self.save() {
                tracing::error!(file = %self.path.display(), error = %e, "write known pod CIDRs");
            }
        }
    }

    fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.cidrs)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// The CIDRs to keep routed into the device besides the peers': every remembered one
    /// that no longer overlaps this node's pods and holds no peer's endpoint (a route
    /// into the device for an endpoint would loop the tunnel into itself).
    pub fn strict_drops(&self, own: &NodeInfo, peers: &[NodeInfo]) -> Vec<Ipv4Net> {
        self.cidrs
            .keys()
            .filter(|c| !overlaps(c, &own.pod_cidr))
            .filter(|c| {
                !inside(own.internal_ip, c) && !peers.iter().any(|p| inside(p.internal_ip, c))
            })
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, cidr: &str, ip: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidr: cidr.parse().unwrap(),
            internal_ip: ip.parse().unwrap(),
            wireguard: None,
        }
    }

    fn candidate(created: &str, info: NodeInfo) -> Candidate {
        Candidate {
            name: info.name.clone(),
            created: created.into(),
            info: Ok(info),
        }
    }

    #[test]
    fn hardening_nodes_that_would_capture_traffic_are_excluded_and_older_nodes_win() {
        let own = info("n0", "198.19.0.0/24", "198.18.0.10");
        let catch_all = Some("198.19.0.0/16".parse().unwrap());
        let nodes = vec![
            candidate(
                "2026-01-01T00:00:00Z",
                info("n1", "198.19.1.0/24", "198.18.0.11"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("zero", "0.0.0.0/0", "198.18.0.20"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("mine", "198.19.0.128/25", "198.18.0.21"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("copy", "198.19.1.0/25", "198.18.0.22"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("sameip", "198.19.3.0/24", "198.18.0.11"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("ownip", "198.19.4.0/24", "198.18.0.10"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("inpods", "198.19.5.0/24", "198.19.9.9"),
            ),
            candidate(
                "2026-01-02T00:00:00Z",
                info("holdsme", "198.18.0.0/24", "198.18.0.23"),
            ),
            Candidate {
                name: "broken".into(),
                created: "2026-01-02T00:00:00Z".into(),
                info: Err("status.addresses has no InternalIP".into()),
            },
            candidate(
                "2026-01-03T00:00:00Z",
                info("n2", "198.19.2.0/24", "198.18.0.12"),
            ),
            candidate("2026-01-01T00:00:00Z", own.clone()),
        ];
        let set = validate(&own, catch_all, &nodes, |_| false);
        let names: Vec<_> = set.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["n1", "n2"]);
        let excluded: Vec<_> = set.excluded.iter().map(|e| e.node.as_str()).collect();
        assert_eq!(
            excluded,
            ["broken", "copy", "holdsme", "inpods", "mine", "ownip", "sameip", "zero"]
        );
        let copy = set.excluded.iter().find(|e| e.node == "copy").unwrap();
        assert!(copy.reason.contains("n1"), "{copy:?}");
    }

    #[test]
    fn hardening_a_trusted_peer_keeps_its_place_against_a_same_second_newcomer() {
        let own = info("n0", "198.19.0.0/24", "198.18.0.10");
        let real = info("node-1", "198.19.1.0/24", "198.18.0.11");
        let impostor = info("impostor", "198.19.1.0/25", "198.18.0.12");
        let nodes = vec![
            candidate("2026-01-01T00:00:00Z", real.clone()),
            candidate("2026-01-01T00:00:00Z", impostor),
        ];
        let set = validate(&own, None, &nodes, |_| false);
        assert_eq!(
            set.peers[0].name, "impostor",
            "by name alone the newcomer wins"
        );
        let set = validate(&own, None, &nodes, |n| *n == real);
        assert_eq!(set.peers, vec![real]);
        assert_eq!(set.excluded[0].node, "impostor");
    }

    #[test]
    fn hardening_known_cidrs_outlive_their_nodes_and_never_capture_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known-pod-cidrs.json");
        let own = info("n0", "198.19.0.0/24", "198.18.0.10");
        let n1 = info("n1", "198.19.1.0/24", "198.18.0.11");
        let mut known = KnownCidrs::load(&path);
        known.remember(std::slice::from_ref(&n1));
        // The Node is gone; a restarted agent still keeps its pods' range strict.
        let known = KnownCidrs::load(&path);
        assert_eq!(
            known.strict_drops(&own, &[]),
            vec!["198.19.1.0/24".parse::<Ipv4Net>().unwrap()]
        );
        // A range that now holds a peer's endpoint is not routed into the device.
        let moved = info("n9", "198.19.7.0/24", "198.19.1.5");
        assert!(known.strict_drops(&own, &[moved]).is_empty());
        // A valid file grown past its bound (whitespace) is refused whole, not read.
        let mut big = br#"{"198.19.1.0/24":"n1"}"#.to_vec();
        big.resize(MAX_KNOWN_FILE_BYTES as usize + 1, b' ');
        std::fs::write(&path, &big).unwrap();
        assert!(KnownCidrs::load(&path).strict_drops(&own, &[]).is_empty());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(KnownCidrs::load(&path).strict_drops(&own, &[]).is_empty());
    }
}
