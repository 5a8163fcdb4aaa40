/* Every map Veil's programs use, in one place so every object declares them alike: the
 * agent pins each by name under its pin directory (aya's map_pin_path), so the programs
 * of from_pod.o and sk_lookup.o share them and an agent restart keeps their contents. */
#ifndef VEIL_MAPS_H
#define VEIL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/veil.h"
#include "lib/counters.h"

/* Pod interface index -> the address it may send from (anti-spoofing). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VEIL_MAX_PODS);
	__type(key, __u32);
	__type(value, struct veil_pod);
} veil_pods SEC(".maps");

/* Pod interface index -> counters. Per-CPU, so concurrent packets never contend; the
 * agent sums. The agent creates the entry when it attaches. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, VEIL_MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_counters);
} veil_pod_counters SEC(".maps");

/* Covered pod IPv4 (network byte order) -> 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VEIL_MAX_COVERED);
	__type(key, __be32);
	__type(value, __u8);
} veil_covered SEC(".maps");

/* Connections covered pods opened themselves (their SYN passed from_pod): the answers
 * to them, addressed to the covered pod, must go to the pod, not to the proxy, so
 * from_pod marks them VEIL_UPSTREAM_MARK (main table) instead of letting
 * VEIL_COVERED_TABLE deliver them locally. Value: 1. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, VEIL_MAX_OUTBOUND);
	__type(key, struct veil_pod_port);
	__type(value, __u8);
} veil_outbound SEC(".maps");

/* Slot i: the listening socket of the proxy's worker thread i. A layout change takes a
 * new name (this map was veil_proxy_sock, one slot): a pinned map is reopened by name
 * whatever its layout, so the agent removes retired names' pins instead. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, VEIL_MAX_PROXY_WORKERS);
	__type(key, __u32);
	/* A socket descriptor on update: 4 bytes, as aya's SockMap insists. */
	__type(value, __u32);
} veil_proxy_socks SEC(".maps");

/* Slot 0: how many slots of veil_proxy_socks hold the proxy's workers (0: no proxy). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} veil_proxy_workers SEC(".maps");

/* Slot 0: the cookie of the node's network namespace (SO_NETNS_COOKIE), whose TCP
 * sockets node_connect marks (0: none, node_connect marks nothing). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} veil_node_netns SEC(".maps");

/* (covered pod, port) the node's own connections reach directly, not through the proxy:
 * the kubelet's tcpSocket and gRPC probes. Value: 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VEIL_MAX_NODE_DIRECT);
	__type(key, struct veil_pod_port);
	__type(value, __u8);
} veil_node_direct SEC(".maps");

/* struct veil_spoof_event records for the agent's flow log. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, VEIL_SPOOF_RING_BYTES);
	/* Not a map attribute (aya ignores unknown members): it only puts the record's type
	 * into the object's BTF, where veil-bpf's layout test reads it (report_spoof is
	 * inlined, so no function signature carries it). */
	__type(record, struct veil_spoof_event);
} veil_spoof_events SEC(".maps");

#endif
