//! What `from_pod` counted for one pod, summed over CPUs.

use veil_bpf::PodCounters as RawCounters;

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
