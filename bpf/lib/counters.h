/* Map value types shared with the agent (veil-bpf's src/lib.rs mirrors them; a test
 * there compares them with the compiled objects' BTF). */
#ifndef VEIL_COUNTERS_H
#define VEIL_COUNTERS_H

#include <linux/types.h>

/* Per pod interface and CPU: what the pod sent, and what from_pod dropped as spoofed. */
struct pod_counters {
	__u64 packets;
	__u64 bytes;
	__u64 spoofed_packets;
	__u64 spoofed_bytes;
};

/* veil_pods value: the address a pod interface may send from. */
struct veil_pod {
	__be32 ipv4;     /* network byte order */
	__u32 flags;     /* reserved, 0 */
};

/* veil_spoof_events record: one dropped packet. Addresses in network byte order; for
 * IPv6 and other frames they are 0 and `protocol` is the next header / 0. */
struct veil_spoof_event {
	__u32 ifindex;
	__be32 saddr;
	__be32 daddr;
	__u8 family;     /* VEIL_FAMILY_* */
	__u8 protocol;   /* IPPROTO_* */
	__u16 reserved;
};

/* A pod's address and one of its ports (both network byte order): the key of
 * veil_outbound (the source port of a connection a covered pod opened) and of
 * veil_node_direct (a port of a probe). */
struct veil_pod_port {
	__be32 ipv4;
	__be16 port;
	__u16 reserved;
};

#endif
