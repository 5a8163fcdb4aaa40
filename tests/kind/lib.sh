# Shared by the kind scripts: logging with elapsed time, the docker client, image names.
# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this

VEIL_CACHE="${VEIL_CACHE:-/var/cache/veil}"
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
TOOLS_BIN="$VEIL_CACHE/tools/bin"
KUBE_BIN="$VEIL_CACHE/kubernetes-$KUBE_VERSION/bin"
export PATH="$TOOLS_BIN:$KUBE_BIN:$PATH"
STARTED=${STARTED:-$(date +%s)}

# Debian's docker 20.10 client builds without BuildKit; a newer client elsewhere on the
# PATH may lack buildx, so builds use the classic builder explicitly.
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
export DOCKER_BUILDKIT=0

# Images built here (no registry: they exist only in the local engine and in the nodes).
DEBIAN_IMAGE=veil/debian:bookworm
NODE_BASE_IMAGE=veil/kind-base:bookworm
NODE_IMAGE="veil/kind-node:$KUBE_VERSION"

say() { printf '[%s %s +%ss] %s\n' "${SCRIPT_NAME:-kind}" "$(date +%H:%M:%S)" "$(($(date +%s) - STARTED))" "$*"; }
die() { printf '[%s] error: %s\n' "${SCRIPT_NAME:-kind}" "$*" >&2; exit 1; }
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# load_image CLUSTER IMAGE: IMAGE from the local engine into every node of kind cluster
# CLUSTER, as `kind load docker-image` does, without its dependence on the node's crictl.
load_image() {
  local cluster=$1 image=$2 node
  for node in $(kind get nodes --name "$cluster"); do
    "$DOCKER" save "$image" | "$DOCKER" exec -i "$node" \
      ctr --namespace=k8s.io images import --all-platforms --digests - >/dev/null
  done
}

# The Debian mirror apt uses here (debootstrap takes the same).
mirror() {
  local uri
  uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
    | grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//')
  echo "${uri:-http://deb.debian.org/debian}"
}

# debootstrap_image TAG PACKAGES: a minbase bookworm rootfs with PACKAGES, imported as TAG
# (the local Debian base has no apt lists and builds run with --network none).
debootstrap_image() {
  local tag=$1 packages=$2
  if have_image "$tag" && [ "${FORCE:-0}" != 1 ]; then
    say "$tag: cached"
    return
  fi
  say "$tag: debootstrap bookworm from $(mirror) with $packages"
  local root
  root=$(mktemp -d /var/tmp/veil-rootfs.XXXXXX)
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$(mirror)" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; die "debootstrap $tag failed (log $root.log)"; }
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root.log"
  tar -C "$root" -c . | "$DOCKER" import - "$tag" >/dev/null
  rm -rf "$root"
  say "$tag: imported"
}
