/* tc ingress on a pod's host-side veth: every packet the pod sends passes here.
 *
 * 1. Counts packets and bytes per interface (entries the agent created only, so
 *    interfaces Veil does not manage are never counted).
 * 2. Anti-spoofing, for interfaces with a veil_pods entry: IPv4 whose source is not the
 *    pod's address is dropped, counted and reported on veil_spoof_events. ARP passes
 *    (the pod needs it to reach its gateway). IPv6 passes only from link-local (fe80::/10)
 *    or unspecified (::, duplicate address detection) sources, so neighbour discovery
 *    works; Veil gives pods no other IPv6 address, so any other IPv6 source is spoofed.
 *    Any other EtherType is dropped likewise: a pod has no business sending it.
 * 3. Reply steering: a covered pod's TCP segment that belongs to one of the proxy's
 *    transparent upstream connections (its destination is the proxied client, which is not
 *    this node) is assigned to that socket and marked VEIL_TO_PROXY_MARK, so the rule for
 *    that mark delivers it locally (Cilium's proxy return path).
 * 4. Covered pods as clients (lib/outbound.h): their SYNs are remembered, and answers
 *    to them from local pods are routed to the pod, not to the proxy. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"
#include "lib/outbound.h"

static __always_inline void report_spoof(struct __sk_buff *skb, __u32 ifindex,
					 struct pod_counters *c, __u8 family, __be32 saddr,
					 __be32 daddr, __u8 protocol)
{
	struct veil_spoof_event *ev;

	if (c) {
		c->spoofed_packets += 1;
		c->spoofed_bytes += skb->len;
	}
	/* A full ring drops the event; the counter above stays exact. */
	ev = bpf_ringbuf_reserve(&veil_spoof_events, sizeof(*ev), 0);
	if (!ev)
		return;
	ev->ifindex = ifindex;
	ev->saddr = saddr;
	ev->daddr = daddr;
	ev->family = family;
	ev->protocol = protocol;
	ev->reserved = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* A covered pod's TCP: remembers the connections it opens, and assigns its replies to
 * the proxy's upstream socket they belong to. Returns whether it assigned. */
static __always_inline int from_covered(struct __sk_buff *skb, const struct iphdr *ip,
					const struct tcphdr *tcp)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *skc, *sk;
	int assigned = 0;

	veil_remember_outbound(ip->saddr, tcp);
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = tcp->source;
	tuple.ipv4.dport = tcp->dest;
	/* The node's namespace: the veth's host side lives there, and so does the proxy. */
	skc = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!skc)
		return 0;
	/* Only full sockets carry a mark; a timewait socket is left to the kernel. */
	sk = bpf_sk_fullsock(skc);
	if (sk && sk->mark == VEIL_UPSTREAM_MARK && sk->state != BPF_TCP_LISTEN) {
		if (bpf_sk_assign(skb, sk, 0) == 0) {
			skb->mark = (skb->mark & ~VEIL_MARK_MASK) | VEIL_TO_PROXY_MARK;
			assigned = 1;
		}
	}
	bpf_sk_release(skc);
	return assigned;
}

static __always_inline void steer_tcp(struct __sk_buff *skb, const struct iphdr *ip,
				      __u32 l4_off)
{
	struct tcphdr tcp;

	if (bpf_skb_load_bytes(skb, l4_off, &tcp, sizeof(tcp)) < 0)
		return;
	if (bpf_map_lookup_elem(&veil_covered, &ip->saddr) && from_covered(skb, ip, &tcp))
		return;
	veil_mark_answer(skb, ip->daddr, &tcp);
}

SEC("classifier")
int veil_from_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct pod_counters *c = bpf_map_lookup_elem(&veil_pod_counters, &ifindex);
	struct veil_pod *pod;

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
	pod = bpf_map_lookup_elem(&veil_pods, &ifindex);
	if (!pod)
		return TC_ACT_UNSPEC;

	switch (skb->protocol) {
	case bpf_htons(ETH_P_ARP):
		return TC_ACT_UNSPEC;
	case bpf_htons(ETH_P_IPV6): {
		struct ipv6hdr ip6;
		__u32 w0;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			goto drop_other;
		w0 = bpf_ntohl(ip6.saddr.in6_u.u6_addr32[0]);
		if ((w0 & 0xffc00000) == 0xfe800000)
			return TC_ACT_UNSPEC;
		if (!(ip6.saddr.in6_u.u6_addr32[0] | ip6.saddr.in6_u.u6_addr32[1] |
		      ip6.saddr.in6_u.u6_addr32[2] | ip6.saddr.in6_u.u6_addr32[3]))
			return TC_ACT_UNSPEC;
		report_spoof(skb, ifindex, c, VEIL_FAMILY_IPV6, 0, 0, ip6.nexthdr);
		return TC_ACT_SHOT;
	}
	case bpf_htons(ETH_P_IP): {
		struct iphdr ip;
		__u32 l4_off;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			goto drop_other;
		if (ip.saddr != pod->ipv4) {
			report_spoof(skb, ifindex, c, VEIL_FAMILY_IPV4, ip.saddr, ip.daddr,
				     ip.protocol);
			return TC_ACT_SHOT;
		}
		/* Fragments after the first carry no TCP header. */
		if (ip.protocol == IPPROTO_TCP && !(ip.frag_off & bpf_htons(0x1fff))) {
			l4_off = ETH_HLEN + ((__u32)ip.ihl & 0xf) * 4;
			steer_tcp(skb, &ip, l4_off);
		}
		return TC_ACT_UNSPEC;
	}
	default:
		break;
	}
drop_other:
	report_spoof(skb, ifindex, c, VEIL_FAMILY_OTHER, 0, 0, 0);
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
