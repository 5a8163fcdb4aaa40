/* tc ingress on the WireGuard device (veil-wg0): decrypted packets from other nodes' pods.
 * Marks the answers to connections that covered pods here opened themselves, so routing
 * gives them to the pod and not to the proxy (lib/outbound.h). A TUN device carries no
 * Ethernet header: the IPv4 header is at offset 0. The source needs no check here: the
 * agent accepts a decrypted packet only from the peer whose pod CIDR holds its source. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"
#include "lib/outbound.h"

SEC("classifier")
int veil_from_tunnel(struct __sk_buff *skb)
{
	struct tcphdr tcp;
	struct iphdr ip;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return TC_ACT_UNSPEC;
	if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(0x1fff)))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, ((__u32)ip.ihl & 0xf) * 4, &tcp, sizeof(tcp)) < 0)
		return TC_ACT_UNSPEC;
	veil_mark_answer(skb, ip.daddr, &tcp);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
