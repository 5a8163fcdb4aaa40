/* Covered pods as clients. Table VEIL_COVERED_TABLE sends every TCP packet for a covered
 * pod to the node, answers to the pod's own outgoing connections included; those must
 * reach the pod instead. from_pod remembers the connections a covered pod opens (its SYN,
 * by source port), and every ingress that can carry answers to them (pod veths, the
 * WireGuard device) marks such answers VEIL_UPSTREAM_MARK, which the rule of that mark
 * routes by the main table, to the pod. */
#ifndef VEIL_OUTBOUND_H
#define VEIL_OUTBOUND_H

#include <linux/tcp.h>

#include "lib/maps.h"

/* A covered pod `ip` sent `tcp`: remember the connection if it opens one. */
static __always_inline void veil_remember_outbound(__be32 ip, const struct tcphdr *tcp)
{
	struct veil_pod_port key = {
		.ipv4 = ip,
		.port = tcp->source,
	};
	__u8 one = 1;

	if (tcp->syn && !tcp->ack)
		bpf_map_update_elem(&veil_outbound, &key, &one, BPF_ANY);
}

/* TCP for `daddr`: route it to the pod when it answers a connection the covered pod
 * opened itself. */
static __always_inline void veil_mark_answer(struct __sk_buff *skb, __be32 daddr,
					     const struct tcphdr *tcp)
{
	struct veil_pod_port key = {
		.ipv4 = daddr,
		.port = tcp->dest,
	};

	if (!bpf_map_lookup_elem(&veil_covered, &daddr))
		return;
	if (bpf_map_lookup_elem(&veil_outbound, &key))
		skb->mark = (skb->mark & ~VEIL_MARK_MASK) | VEIL_UPSTREAM_MARK;
}

#endif
