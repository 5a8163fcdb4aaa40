/* sk_lookup on the node's network namespace: every new TCP connection whose local
 * (destination) IPv4 address is a covered pod's goes to one of the proxy's listening
 * sockets (veil_proxy_socks, one per worker thread), whatever the port. Routing delivered
 * the SYN locally in the first place (table VEIL_COVERED_TABLE), after kube-proxy's DNAT,
 * so Service traffic is caught too and conntrack stays intact.
 *
 * The worker is chosen by a hash of the client's address and port, so connections spread
 * over the workers and each lives on one thread. Not a SO_REUSEPORT group: any root
 * process on the node could join one by binding the same port and take a share of the
 * covered connections unjudged; a sockmap slot can only be written by the agent.
 *
 * No socket for the connection (agent or proxy away): SK_DROP. Covered connections fail
 * closed: the SYN is dropped and the client times out. Not "refused": with SK_PASS (tried)
 * no listener is found either, but the kernel cannot send the RST, whose source (the
 * pod's address) is no address of the node and needs a transparent socket to be sent
 * from (ip_send_unicast_reply without IP_REPLY_ARG_NOSRCCHECK), so the client hung the
 * same way, measured here. SK_DROP also keeps a node process listening on 0.0.0.0:<port>
 * from receiving the connection. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "lib/maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif

SEC("sk_lookup")
int veil_sk_lookup(struct bpf_sk_lookup *ctx)
{
	__be32 local = ctx->local_ip4;
	__u32 zero = 0, slot, hash, *workers;
	struct bpf_sock *sk;
	long err;

	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (!bpf_map_lookup_elem(&veil_covered, &local))
		return SK_PASS;
	workers = bpf_map_lookup_elem(&veil_proxy_workers, &zero);
	if (!workers || *workers == 0 || *workers > VEIL_MAX_PROXY_WORKERS)
		return SK_DROP;
	/* Fibonacci hashing of address and port; the high bits are the well-mixed ones. */
	hash = (ctx->remote_ip4 ^ (ctx->remote_port << 16) ^ ctx->remote_port) * 0x9e3779b1u;
	slot = (hash >> 16) % *workers;
	sk = bpf_map_lookup_elem(&veil_proxy_socks, &slot);
	if (!sk)
		return SK_DROP;
	/* The slot's own socket, never a reuseport sibling somebody else bound. */
	err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
