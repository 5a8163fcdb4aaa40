#!/usr/bin/env bash
# Removes what killed test runs left: test bed bridges, node and pod namespaces, etcd data.
set -u
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^veil[0-9]+(n[0-9]+|p-)'); do
  ip netns del "$ns" && echo "removed netns $ns"
done
for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | grep -E '^veilbr[0-9]+$'); do
  ip link del "$br" && echo "removed bridge $br"
done
# The beds' FORWARD accept rules (tests/src/net.rs), which outlive a killed test process.
for tool in iptables ip6tables; do
  command -v "$tool" >/dev/null || continue
  "$tool" -S FORWARD 2>/dev/null | grep -- '--comment veil-testbed' | sed 's/^-A //' | while read -r rule; do
    # shellcheck disable=SC2086 # the rule is a list of words, as iptables -S printed it
    "$tool" -D $rule && echo "removed $tool rule: $rule"
  done
done
rm -rf /dev/shm/veil-etcd-* 2>/dev/null
# The beds' eBPF pins (tests/src/bed.rs BPF_PIN_PREFIX) and those of the redirect tests
# (tests/tests/redirect.rs): links first (a pinned cgroup link keeps node_connect attached
# to the machine's cgroup2 root), then maps.
for dir in /sys/fs/bpf/veil-bed-* /sys/fs/bpf/veil-test-redirect-*; do
  [ -d "$dir" ] || continue
  rm -f "$dir"/links/* 2>/dev/null
  rmdir "$dir/links" 2>/dev/null
  rm -f "$dir"/* 2>/dev/null
  rmdir "$dir" && echo "removed eBPF pins $dir"
done
exit 0
