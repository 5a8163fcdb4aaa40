//! The eBPF counter on every pod's host-side veth: loads `from_pod` once, attaches it at
//! tc ingress of each pod interface, and reads per-CPU counters back. Nothing is pinned and
//! no anti-spoofing entry is written, so this is the counting-only mode the agent used
//! before [`super::Redirect`]; `Redirect` offers the same counters with everything else.

use std::collections::HashMap;
use std::sync::Mutex;

use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use aya::programs::tc::{self, SchedClassifier, SchedClassifierLinkId, TcAttachType};
use aya::Ebpf;
use veil_bpf::{PodCounters as RawCounters, FROM_POD, FROM_POD_PROGRAM, POD_TX_MAP};

/// Errors of the eBPF counters.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    /// The object or program could not be loaded; the message carries the verifier's log.
    #[error("load eBPF program {program}: {message}")]
    Load {
        /// Program name.
        program: &'static str,
        /// What failed, with the verifier log where there is one.
        message: String,
    },
    /// Attaching to an interface failed.
    #[error("attach {program} to {ifname}: {message}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// The interface.
        ifname: String,
        /// What failed.
        message: String,
    },
    /// A map operation failed.
    #[error("eBPF map {map} for {ifname}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The interface.
        ifname: String,
        /// The underlying error.
        source: aya::maps::MapError,
    },
}

/// Packets and bytes a pod sent, and what anti-spoofing dropped of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// Packets dropped because their source was not the pod's address.
    pub spoofed_packets: u64,
    /// Bytes of those packets.
    pub spoofed_bytes: u64,
}

impl Counts {
    /// Sums per-CPU values.
    pub(crate) fn sum<'a>(values: impl IntoIterator<Item = &'a RawCounters>) -> Counts {
        values.into_iter().fold(Counts::default(), |acc, v| Counts {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            spoofed_packets: acc.spoofed_packets + v.spoofed_packets,
            spoofed_bytes: acc.spoofed_bytes + v.spoofed_bytes,
        })
    }
}

struct Loaded {
    ebpf: Ebpf,
    links: HashMap<String, (u32, SchedClassifierLinkId)>,
}

/// The loaded counter program and its map.
pub struct PodCounters {
    inner: Mutex<Loaded>,
    nr_cpus: usize,
}

impl PodCounters {
    /// Loads the program into the kernel (once per agent).
    pub fn load() -> Result<Self, CountersError> {
        let load_err = |message: String| CountersError::Load {
            program: FROM_POD_PROGRAM,
            message,
        };
        let mut ebpf = Ebpf::load(FROM_POD).map_err(|e| load_err(e.to_string()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(FROM_POD_PROGRAM)
            .ok_or_else(|| load_err("program missing from the object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| load_err(e.to_string()))?;
        // `{:?}` keeps the verifier's log, which Display drops.
        program.load().map_err(|e| load_err(format!("{e:?}")))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| load_err(format!("{what}: {e}")))?;
        Ok(PodCounters {
            inner: Mutex::new(Loaded {
                ebpf,
                links: HashMap::new(),
            }),
            nr_cpus,
        })
    }

    fn program(ebpf: &mut Ebpf) -> &mut SchedClassifier {
        ebpf.program_mut(FROM_POD_PROGRAM)
            .expect("loaded in PodCounters::load")
            .try_into()
            .expect("loaded as a classifier")
    }

    fn map(ebpf: &mut Ebpf) -> PerCpuHashMap<&mut MapData, u32, RawCounters> {
        PerCpuHashMap::try_from(ebpf.map_mut(POD_TX_MAP).expect("POD_TX is in the object"))
            .expect("POD_TX is a per-CPU hash of u32 to PodCounters")
    }

    /// Attaches the counter to `ifname` (index `ifindex`) with counters at zero.
    pub fn attach(&self, ifname: &str, ifindex: u32) -> Result<(), CountersError> {
        let attach_err = |message: String| CountersError::Attach {
            program: FROM_POD_PROGRAM,
            ifname: ifname.to_string(),
            message,
        };
        let mut inner = self.inner.lock().expect("counters lock poisoned");
        if let Some((old_index, link)) = inner.links.remove(ifname) {
            self.forget(&mut inner, ifname, old_index, link);
        }
        let zero = PerCpuValues::try_from(vec![RawCounters::default(); self.nr_cpus])
            .map_err(|e| attach_err(e.to_string()))?;
        Self::map(&mut inner.ebpf)
            .insert(ifindex, zero, 0)
            .map_err(|source| CountersError::Map {
                map: POD_TX_MAP,
                ifname: ifname.into(),
                source,
            })?;
        // Kernels before 6.6 attach through a clsact qdisc; on TCX kernels it is harmless.
        let _ = tc::qdisc_add_clsact(ifname);
        let program = Self::program(&mut inner.ebpf);
        let link = program
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|e| attach_err(format!("{e:?}")))?;
        inner.links.insert(ifname.to_string(), (ifindex, link));
        Ok(())
    }

    /// Detaches from `ifname` and drops its counters; unknown interfaces are ignored.
    pub fn detach(&self, ifname: &str) {
        let mut inner = self.inner.lock().expect("counters lock poisoned");
        if let Some((ifindex, link)) = inner.links.remove(ifname) {
            self.forget(&mut inner, ifname, ifindex, link);
        }
    }

    fn forget(&self, inner: &mut Loaded, ifname: &str, ifindex: u32, link: SchedClassifierLinkId) {
        let program = Self::program(&mut inner.ebpf);
        // The link is already gone when the veth was deleted first; that is fine.
        if let Err(e) = program.detach(link) {
            tracing::debug!(ifname, error = %e, "detach counter");
        }
        let _ = Self::map(&mut inner.ebpf).remove(&ifindex);
    }

    /// What the pod behind `ifname` has sent since the counter was attached.
    pub fn read(&self, ifname: &str) -> Option<Counts> {
        let mut inner = self.inner.lock().expect("counters lock poisoned");
        let ifindex = inner.links.get(ifname)?.0;
        let values = Self::map(&mut inner.ebpf).get(&ifindex, 0).ok()?;
        Some(Counts::sum(values.iter()))
    }
}
