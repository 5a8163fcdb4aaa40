/* tc ingress on a pod's host-side veth: every packet the pod sends passes here.
 * Counts packets and bytes per interface; the agent creates the entry when it attaches,
 * so interfaces Veil does not manage are never counted. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/counters.h"

/* Per-CPU, so concurrent packets on different CPUs never contend; the agent sums. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct pod_counters);
} POD_TX SEC(".maps");

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct pod_counters *c = bpf_map_lookup_elem(&POD_TX, &ifindex);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
