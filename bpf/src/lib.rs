//! Veil's eBPF programs, compiled from C by this crate's build script and embedded for aya,
//! and the map value types both sides agree on.

/// The tc program for a pod's host-side veth (`bpf/from_pod.c`); program `from_pod`.
pub static FROM_POD: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_pod.o"));

/// Name of the program in [`FROM_POD`].
pub const FROM_POD_PROGRAM: &str = "from_pod";

/// Name of the per-CPU hash map, keyed by interface index, of [`PodCounters`].
pub const POD_TX_MAP: &str = "POD_TX";

/// What a pod sent, as `struct pod_counters` in `bpf/lib/counters.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

// SAFETY: plain old data, `repr(C)`, no padding (checked in the tests below).
unsafe impl aya::Pod for PodCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_counters_layout_matches_c() {
        assert_eq!(std::mem::size_of::<PodCounters>(), 16);
        assert_eq!(std::mem::offset_of!(PodCounters, packets), 0);
        assert_eq!(std::mem::offset_of!(PodCounters, bytes), 8);
    }

    #[test]
    fn from_pod_object_is_an_elf_for_bpf() {
        assert_eq!(&FROM_POD[..4], b"\x7fELF");
        // e_machine 247 is EM_BPF.
        assert_eq!(u16::from_le_bytes([FROM_POD[18], FROM_POD[19]]), 247);
    }
}
