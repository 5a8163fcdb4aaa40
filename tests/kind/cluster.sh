#!/usr/bin/env bash
# Veil on a real kind cluster, built and installed the way a user does it:
#   tests/kind/cluster.sh up       kind (1 control-plane, 2 workers) from the local node
#                                  image, Veil's images built and loaded, `helm install`,
#                                  demo workloads and an L7Policy, all Ready
#   tests/kind/cluster.sh images   rebuild and load Veil's images only
#   tests/kind/cluster.sh down     delete the cluster, its network and firewall rule
# Works unchanged where Docker and kind already exist (what is present is used as it is).
# Settings: VEIL_KIND_DIR (kubeconfig etc., default /var/tmp/veil-kind), HELM_SET (extra
# `--set` values, comma-separated), CARGO_PROFILE (debug|release, default debug).
set -euo pipefail
SCRIPT_NAME=kind-cluster
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

CLUSTER=veil
NETWORK=veil-kind
NETWORK_SUBNET=198.18.200.0/24
NETWORK_GATEWAY=198.18.200.1
POD_CIDR=198.18.128.0/18
SERVICE_CIDR=198.18.192.0/22
NAMESPACE=veil-system
VEIL_KIND_DIR="${VEIL_KIND_DIR:-/var/tmp/veil-kind}"
KUBECONFIG_FILE="$VEIL_KIND_DIR/kubeconfig"
CARGO_PROFILE="${CARGO_PROFILE:-debug}"
HELM_SET="${HELM_SET:-}"
EGRESS_COMMENT=veil-kind-egress
# kind reads the network to use from this (the name "kind" may belong to someone else).
export KIND_EXPERIMENTAL_DOCKER_NETWORK=$NETWORK

kubectl() { command kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# The cluster's own docker network, on 198.18.200.0/24 with masquerade off, and a
# DOCKER-USER rule that drops whatever would leave its bridge for another interface: the
# cluster never reaches off this machine (the rule's counter is the proof).
ensure_network() {
  if "$DOCKER" network inspect "$NETWORK" >/dev/null 2>&1; then
    say "docker network $NETWORK: present"
  else
    "$DOCKER" network create -d bridge --subnet "$NETWORK_SUBNET" --gateway "$NETWORK_GATEWAY" \
      -o com.docker.network.bridge.name="$NETWORK" \
      -o com.docker.network.bridge.enable_ip_masquerade=false \
      "$NETWORK" >/dev/null
    say "docker network $NETWORK: created on $NETWORK_SUBNET"
  fi
  if ! iptables -C DOCKER-USER -i "$NETWORK" ! -o "$NETWORK" -m comment --comment "$EGRESS_COMMENT" -j DROP 2>/dev/null; then
    iptables -I DOCKER-USER -i "$NETWORK" ! -o "$NETWORK" -m comment --comment "$EGRESS_COMMENT" -j DROP
    say "egress from $NETWORK to other interfaces: dropped (DOCKER-USER)"
  fi
}

# The kind config, plus what this host needs: without CAP_SYS_RESOURCE in the bounding
# set the kubelet cannot lower oom_score_adj, and containerd must not ask it to.
kind_config() {
  local out="$VEIL_KIND_DIR/kind-config.yaml"
  cp "$here/kind-config.yaml" "$out"
  local capbnd
  capbnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  if (( (16#$capbnd >> 24 & 1) == 0 )); then
    cat >>"$out" <<'YAML'
containerdConfigPatches:
  - |-
    [plugins."io.containerd.grpc.v1.cri"]
      restrict_oom_score_adj = true
YAML
  fi
  echo "$out"
}

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "kind cluster $CLUSTER: present"
    kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" >/dev/null 2>&1
    return
  fi
  have_image "$NODE_IMAGE" || die "no node image $NODE_IMAGE: run make setup"
  say "kind cluster $CLUSTER: creating (node image $NODE_IMAGE)"
  kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --config "$(kind_config)" \
    --kubeconfig "$KUBECONFIG_FILE"
  # No name leaves the machine: CoreDNS answers the cluster's names only (no `forward`),
  # and the nodes resolve each other from /etc/hosts (kube-proxy's and the kubelet's
  # kubeconfigs name the control-plane node), their own resolver pointing nowhere.
  kubectl -n kube-system create configmap coredns --dry-run=client -o yaml \
    --from-file=Corefile="$here/Corefile" | kubectl replace -f - >/dev/null
  local node hosts=""
  for node in $(kind get nodes --name "$CLUSTER"); do
    hosts+="$("$DOCKER" inspect -f "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "$node") $node"$'\n'
  done
  for node in $(kind get nodes --name "$CLUSTER"); do
    printf '%s' "$hosts" | "$DOCKER" exec -i "$node" bash -c 'cat >>/etc/hosts && echo "nameserver 127.0.0.1" >/etc/resolv.conf'
  done
  say "kind cluster $CLUSTER: created"
}

# Veil's images from the workspace's binaries (debug info stripped to keep them small).
build_images() {
  say "building Veil's binaries ($CARGO_PROFILE)"
  local flag=()
  [ "$CARGO_PROFILE" = release ] && flag=(--release)
  (cd "$repo" && cargo build -q "${flag[@]}" --workspace --bins)
  local target="${CARGO_TARGET_DIR:-$repo/target}/$CARGO_PROFILE"
  local image dockerfile bins ctx b
  while read -r image dockerfile bins; do
    ctx=$(mktemp -d)
    mkdir "$ctx/bin"
    for b in ${bins//,/ }; do
      objcopy --strip-debug "$target/$b" "$ctx/bin/$b"
    done
    cp "$repo/$dockerfile" "$ctx/Dockerfile"
    "$DOCKER" build -q --network none -t "$image" "$ctx" >/dev/null
    rm -rf "$ctx"
    say "image $image: built"
  done <<EOF_IMAGES
veil/agent:dev mesh-agent/Dockerfile mesh-agent,mesh-cni,meshctl
veil/issuer:dev identity/Dockerfile veil-issuer
veil/test-workload:dev tests/workloads/Dockerfile veil-echo,veil-client,veil-svid
EOF_IMAGES
}

load_images() {
  local image
  for image in veil/agent:dev veil/issuer:dev veil/test-workload:dev; do
    load_image "$CLUSTER" "$image"
    say "image $image: loaded into every node"
  done
}

install_veil() {
  local sets=(--set "clusterPodCIDR=$POD_CIDR" --set "serviceCIDR=$SERVICE_CIDR")
  [ -n "$HELM_SET" ] && sets+=(--set "$HELM_SET")
  say "helm upgrade --install veil ($NAMESPACE)"
  helm upgrade --install veil "$repo/charts/veil" --kubeconfig "$KUBECONFIG_FILE" \
    --namespace "$NAMESPACE" --create-namespace "${sets[@]}" --wait --timeout 10m
  kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite >/dev/null
}

wait_ready() {
  say "waiting for nodes, DNS, Veil and the demo workloads"
  kubectl wait --for=condition=Ready nodes --all --timeout=5m
  kubectl -n kube-system rollout status deployment/coredns --timeout=5m
  kubectl -n "$NAMESPACE" rollout status daemonset/veil-agent --timeout=5m
  kubectl apply -f "$here/demo.yaml" >/dev/null
  kubectl -n demo wait --for=condition=Ready pod --all --timeout=5m
}

up() {
  mkdir -p "$VEIL_KIND_DIR"
  bash "$here/dockerd.sh"
  ensure_network
  create_cluster
  build_images
  load_images
  install_veil
  wait_ready
  say "ready in $(($(date +%s) - STARTED)) s"
  cat <<MSG

Veil runs on kind cluster '$CLUSTER' (3 nodes). Try:
  export KUBECONFIG=$KUBECONFIG_FILE
  kubectl -n demo exec client -- veil-client http http://echo.demo.svc.cluster.local:8080/hello
  kubectl -n $NAMESPACE exec ds/veil-agent -c agent -- meshctl wireguard
  kubectl -n demo exec client -- veil-svid
Remove it all with: make cluster-down
MSG
}

down() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE"
  fi
  while iptables -D DOCKER-USER -i "$NETWORK" ! -o "$NETWORK" -m comment --comment "$EGRESS_COMMENT" -j DROP 2>/dev/null; do :; done
  "$DOCKER" network rm "$NETWORK" >/dev/null 2>&1 || true
  rm -rf "$VEIL_KIND_DIR"
  say "cluster $CLUSTER removed"
}

case "${1:-}" in
  up) up ;;
  images) mkdir -p "$VEIL_KIND_DIR"; build_images; load_images ;;
  down) down ;;
  *) echo "usage: $0 up|images|down" >&2; exit 64 ;;
esac
