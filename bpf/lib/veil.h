/* Constants shared by the eBPF programs and the agent. This header is the ONE place they
 * are written: veil-bpf's build script turns every numeric `#define VEIL_*` below into a
 * Rust `pub const` (see build.rs), so the two sides cannot drift. Keep each define on one
 * line as `#define VEIL_NAME <decimal or 0x hex>`. */
#ifndef VEIL_VEIL_H
#define VEIL_VEIL_H

/* SO_MARK of the proxy's sockets (its listener and its transparent upstream sockets).
 * Rule VEIL_UPSTREAM_RULE_PRIORITY sends packets with it to the main table, so the proxy's
 * own connections to covered pods leave by the pod's veth instead of looping back into
 * VEIL_COVERED_TABLE; from_pod recognises the proxy's upstream sockets by it. */
#define VEIL_UPSTREAM_MARK 0x0a00
/* skb->mark from_pod sets on a covered pod's reply it assigned to a proxy socket. */
#define VEIL_TO_PROXY_MARK 0x0b00
/* SO_MARK node_connect gives the TCP sockets the node itself opens: rule
 * VEIL_NODE_CONNECT_RULE_PRIORITY looks them up in VEIL_COVERED_TABLE first. */
#define VEIL_NODE_MARK 0x0c00
/* The bits of skb->mark Veil owns (the rules match under this mask). */
#define VEIL_MARK_MASK 0x0f00

/* Table of `local <covered pod>/32 dev lo` routes. */
#define VEIL_COVERED_TABLE 0x78
/* Table with `local 0.0.0.0/0 dev lo`: replies assigned to a proxy socket. */
#define VEIL_TO_PROXY_TABLE 0x79

/* fwmark VEIL_NODE_MARK/VEIL_MARK_MASK ipproto tcp lookup VEIL_COVERED_TABLE: connections
 * the node opens (node_connect marked their sockets) to covered pods go to the proxy;
 * anything else falls through to the rules below. */
#define VEIL_NODE_CONNECT_RULE_PRIORITY 0x6e
/* iif lo ipproto tcp lookup main: the rest of the node's own TCP (its answers to covered
 * pods' connections, the proxy's sockets, the kubelet's tcpSocket/gRPC probes) is never
 * delivered back to the node by VEIL_COVERED_TABLE: a SYN-ACK of a node socket to a
 * covered pod would otherwise loop to the proxy's listener. */
#define VEIL_LOCAL_OUT_RULE_PRIORITY 0x6f
/* fwmark VEIL_UPSTREAM_MARK/VEIL_MARK_MASK lookup main. from_pod also sets this mark on
 * packets that answer a covered pod's own outgoing connection (see veil_outbound). */
#define VEIL_UPSTREAM_RULE_PRIORITY 0x70
/* fwmark VEIL_TO_PROXY_MARK/VEIL_MARK_MASK lookup VEIL_TO_PROXY_TABLE. */
#define VEIL_TO_PROXY_RULE_PRIORITY 0x71
/* ipproto tcp lookup VEIL_COVERED_TABLE. */
#define VEIL_COVERED_RULE_PRIORITY 0x72

/* Slots of veil_proxy_socks: the proxy runs at most this many worker threads. */
#define VEIL_MAX_PROXY_WORKERS 64

/* veil_spoof_event.family */
#define VEIL_FAMILY_IPV4 4
#define VEIL_FAMILY_IPV6 6
/* veil_spoof_event.family for a frame that is neither ARP, IPv4 nor IPv6. */
#define VEIL_FAMILY_OTHER 0

/* Capacities. */
#define VEIL_MAX_PODS 65536
#define VEIL_MAX_COVERED 65536
/* (pod, port) pairs the node's own connections reach directly (tcpSocket/gRPC probes). */
#define VEIL_MAX_NODE_DIRECT 16384
/* Covered pods' outgoing connections remembered at once (LRU: the oldest go first). */
#define VEIL_MAX_OUTBOUND 65536
/* Bytes of the spoof-event ring (a power of two, a multiple of the page size): 2730
 * events of 24 bytes incl. the ring's 8-byte header, enough for a burst between two
 * polls; when full, events are dropped and the per-pod counters stay exact. */
#define VEIL_SPOOF_RING_BYTES 0x10000

#endif
