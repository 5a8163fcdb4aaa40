#!/usr/bin/env bash
# Builds the kind tier's images on this machine, with no registry: a Debian bookworm base
# (debootstrap), the Kubernetes component images tagged as kubeadm expects (from the
# binaries tests/scripts/setup.sh built), and the kind node image (kind's node layout on
# Debian's systemd/containerd/runc, kubeadm/kubelet/kubectl, the component images
# imported). Cached by image tag; FORCE=1 rebuilds. Called by tests/scripts/setup.sh.
set -euo pipefail
SCRIPT_NAME=kind-setup
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
KIND_VERSION="${KIND_VERSION:-v0.33.0}"
FORCE="${FORCE:-0}"

bash "$here/dockerd.sh"

# The images kubeadm pulls, as `kubeadm config images list` names them, plus kind's
# sandbox pause (its containerd config names registry.k8s.io/pause:3.10).
component_images() {
  local binary tag
  while read -r tag; do
    case "$tag" in
      */kube-apiserver:*) binary=kube-apiserver ;;
      */kube-controller-manager:*) binary=kube-controller-manager ;;
      */kube-scheduler:*) binary=kube-scheduler ;;
      */kube-proxy:*) binary=kube-proxy ;;
      */etcd:*) binary=etcd ;;
      */coredns:*) binary=coredns ;;
      */pause:*) binary=pause ;;
      *) die "kubeadm wants an image this script does not build: $tag" ;;
    esac
    echo "$binary $tag"
  done < <(kubeadm config images list --kubernetes-version "$KUBE_VERSION"; echo registry.k8s.io/pause:3.10)
}

build_component() {
  local binary=$1 tag=$2
  if have_image "$tag" && [ "$FORCE" != 1 ]; then
    return
  fi
  local ctx src
  ctx=$(mktemp -d)
  src=$(command -v "$binary") || die "$binary not built: run tests/scripts/setup.sh"
  cp -L "$src" "$ctx/$binary"
  cp "$here/component/Dockerfile" "$ctx/"
  "$DOCKER" build -q --network none --build-arg "BINARY=$binary" -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
  say "$tag: built"
}

build_node_base() {
  if have_image "$NODE_BASE_IMAGE" && [ "$FORCE" != 1 ]; then
    say "$NODE_BASE_IMAGE: cached"
    return
  fi
  local kind_dir ctx
  kind_dir=$(go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  ctx=$(mktemp -d)
  cp -r "$kind_dir/images/base/files" "$ctx/files"
  chmod -R u+w "$ctx/files"
  cp -L "$(command -v crictl)" "$ctx/crictl"
  cp "$here/node/Dockerfile" "$ctx/"
  cat >"$ctx/default-storage.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/host-path
YAML
  "$DOCKER" build -q --network none -t "$NODE_BASE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  say "$NODE_BASE_IMAGE: built"
}

# As `kind build node-image` does: a build container from the base, the node binaries
# copied in, containerd started inside to import the component images, then committed.
build_node_image() {
  if have_image "$NODE_IMAGE" && [ "$FORCE" != 1 ]; then
    say "$NODE_IMAGE: cached"
    return
  fi
  local id="veil-node-build-$$"
  "$DOCKER" rm -f "$id" >/dev/null 2>&1 || true
  "$DOCKER" run -d --name "$id" --entrypoint sleep --security-opt seccomp=unconfined \
    "$NODE_BASE_IMAGE" infinity >/dev/null
  # EXIT too: a failing step ends the script (set -e) without returning.
  trap '"$DOCKER" rm -f "$id" >/dev/null 2>&1 || true' RETURN EXIT
  local b
  for b in kubeadm kubelet kubectl; do
    "$DOCKER" cp "$KUBE_BIN/$b" "$id:/usr/bin/$b"
  done
  "$DOCKER" exec "$id" bash -c "echo $KUBE_VERSION >/kind/version && nohup containerd >/dev/null 2>&1 &"
  # shellcheck disable=SC2016 # expanded inside the container
  "$DOCKER" exec "$id" bash -c 'for i in $(seq 1 30); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1' \
    || die "containerd did not start in the build container"
  local binary tag
  while read -r binary tag; do
    "$DOCKER" save "$tag" | "$DOCKER" exec -i "$id" ctr --namespace=k8s.io images import \
      --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >/dev/null
  done < <(component_images)
  "$DOCKER" exec "$id" pkill containerd || true
  sleep 1
  # Back to the base's entrypoint (which also drops the build's CMD); the base's ENV and
  # STOPSIGNAL carry over (docker 20.10's commit cannot set STOPSIGNAL anyway).
  "$DOCKER" commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    "$id" "$NODE_IMAGE" >/dev/null
  say "$NODE_IMAGE: built"
}

debootstrap_image "$DEBIAN_IMAGE" ca-certificates,iproute2,iptables,nftables,conntrack,procps
debootstrap_image veil/kind-rootfs:bookworm \
  systemd,dbus,containerd,runc,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps,containernetworking-plugins,tcpdump
while read -r binary tag; do build_component "$binary" "$tag"; done < <(component_images)
build_node_base
build_node_image
say "kind images ready: node $NODE_IMAGE"
