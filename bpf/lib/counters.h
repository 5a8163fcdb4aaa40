/* Map value types shared with the agent (veil-bpf's src/lib.rs mirrors them; a test
 * there checks sizes and offsets). */
#ifndef VEIL_COUNTERS_H
#define VEIL_COUNTERS_H

#include <linux/types.h>

struct pod_counters {
	__u64 packets;
	__u64 bytes;
};

#endif
