/* cgroup/connect4 and cgroup/connect6 on the node's cgroup2 root: every connect() made
 * by a process of the node. A TCP socket of the node's own network namespace (kubelet,
 * host-network pods, anything on the node) gets VEIL_NODE_MARK before it routes its SYN,
 * so rule VEIL_NODE_CONNECT_RULE_PRIORITY looks it up in VEIL_COVERED_TABLE first: a
 * connection the node opens to a covered pod (directly, or to a ClusterIP that kube-proxy
 * DNATs to one: the DNAT reroutes with the socket's mark) is delivered locally and
 * sk_lookup hands it to the proxy, like any other. Sockets the node accepts never pass
 * here, so its answers to covered pods' own connections still leave by rule
 * VEIL_LOCAL_OUT_RULE_PRIORITY, unproxied.
 *
 * Left alone: sockets of other namespaces (pods: a cgroup program sees every process
 * below the cgroup, whatever its namespace), sockets that already carry a mark in
 * VEIL_MARK_MASK (the proxy's own, or someone else's marking we must not change), and
 * connections to a (covered pod, port) in veil_node_direct: the ports of the kubelet's
 * tcpSocket and gRPC probes, which must reach the pod itself to mean anything (a proxy
 * completes the handshake before it reaches the pod).
 *
 * Never refuses a connection: returns 1 (proceed) on every path. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
#ifndef SO_MARK
#define SO_MARK 36
#endif

/* Marks the socket behind `ctx`, connecting to `ip4`, when it is the node's own TCP. */
static __always_inline void mark_node_socket(struct bpf_sock_addr *ctx, __be32 ip4)
{
	struct veil_pod_port direct = {};
	struct bpf_sock *sk = ctx->sk;
	__u64 *netns;
	__u32 zero = 0, mark;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return;
	netns = bpf_map_lookup_elem(&veil_node_netns, &zero);
	if (!netns || *netns == 0 || bpf_get_netns_cookie(ctx) != *netns)
		return;
	direct.ipv4 = ip4;
	/* The port in network byte order, in the low 16 bits. */
	direct.port = (__be16)ctx->user_port;
	if (bpf_map_lookup_elem(&veil_node_direct, &direct))
		return;
	if (!sk || (sk->mark & VEIL_MARK_MASK))
		return;
	mark = sk->mark | VEIL_NODE_MARK;
	/* A failure leaves the socket unmarked: the connection goes straight to the pod,
	 * as it did before Veil steered node connections (nothing else can fail here). */
	bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
}

SEC("cgroup/connect4")
int veil_node_connect4(struct bpf_sock_addr *ctx)
{
	mark_node_socket(ctx, ctx->user_ip4);
	return 1;
}

/* An IPv6 socket reaches IPv4 pods through v4-mapped addresses (::ffff:a.b.c.d). */
SEC("cgroup/connect6")
int veil_node_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	    ctx->user_ip6[2] == bpf_htonl(0x0000ffff))
		mark_node_socket(ctx, ctx->user_ip6[3]);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
