#!/usr/bin/env bash
# Installs everything Veil's build and tests need on a fresh Debian machine, from the
# package registries only: Debian packages, and the pinned Kubernetes components, helm
# and cnitool built from the Go module proxy into a cache outside the repository.
# Idempotent: a second run only checks. Prints progress for the long steps.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"   # minor <= 1.34: 1.35 kubelets refuse cgroup v1 hosts
HELM_VERSION="${HELM_VERSION:-v3.21.4}"
CNI_VERSION="${CNI_VERSION:-v1.3.1}"
# wireguard-go publishes no tags; this is the newest pseudo-version on the proxy when pinned.
WIREGUARD_GO_VERSION="${WIREGUARD_GO_VERSION:-v0.0.0-20260522210424-ecfc5a8d5446}"
# The kind tier (tests/kind/): the versions kubeadm v1.34 expects, and kind itself.
KIND_VERSION="${KIND_VERSION:-v0.33.0}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.1}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.34.0}"
HELM_DOCS_VERSION="${HELM_DOCS_VERSION:-v1.14.2}"
VEIL_CACHE="${VEIL_CACHE:-/var/cache/veil}"

KUBE_BIN="$VEIL_CACHE/kubernetes-$KUBE_VERSION/bin"
TOOLS_BIN="$VEIL_CACHE/tools/bin"
DEB_PACKAGES=(clang llvm libbpf-dev iproute2 etcd-server containerd runc buildah iperf3
  tcpdump wrk wireguard-tools bpftool jq curl ca-certificates kmod iputils-ping procps
  docker.io debootstrap iptables shellcheck nginx-light haproxy
  nghttp2-client)

STARTED=$(date +%s)
say() { printf '[setup %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - STARTED))" "$*"; }

install_debian_packages() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "debian packages: all present"
    return
  fi
  say "debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # nginx and HAProxy are the benchmark's reference proxies, started by it alone: their
  # packages must not start system services (policy-rc.d 101 = "not now"), nor may others.
  local no_start=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    no_start=/usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$no_start" ]; then rm -f "$no_start"; fi
  # Debian's etcd-server and containerd packages start services through systemd, which
  # is not PID 1 here; tests start their own instances, so nothing else is needed.
}

# Builds the four Kubernetes binaries from the k8s.io/kubernetes module. Its go.mod pins
# every staging module at v0.0.0 with local replaces that do not apply to a dependent,
# so a wrapper module replaces each with the published v0.<minor>.<patch>.
build_kubernetes() {
  # The first four run the netns test bed; kubeadm, kubectl and kube-proxy the kind tier.
  local want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubeadm kubectl kube-proxy)
  local have=1
  for b in "${want[@]}"; do [ -x "$KUBE_BIN/$b" ] || have=0; done
  if [ $have -eq 1 ]; then
    say "kubernetes $KUBE_VERSION: cached in $KUBE_BIN"
    return
  fi
  say "kubernetes $KUBE_VERSION: building ${want[*]} (tens of minutes on 2 cores, once)"
  local work="$VEIL_CACHE/kubernetes-$KUBE_VERSION/src"
  mkdir -p "$work" "$KUBE_BIN"
  local staging_version="v0.${KUBE_VERSION#v1.}"
  local modfile
  modfile=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  {
    echo "module veil.dev/kubernetes-build"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$modfile" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } >"$work/go.mod"
  local ldflags="-s -w"
  local pkg=k8s.io/component-base/version
  local major minor
  major=$(echo "$KUBE_VERSION" | cut -d. -f1 | tr -d v)
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  ldflags="$ldflags -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  ldflags="$ldflags -X $pkg/verflag.programName=kubernetes"
  (
    cd "$work"
    GOFLAGS=-mod=mod go mod download k8s.io/kubernetes
    local pkgs=()
    for b in "${want[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -tags selinux,notest \
      -ldflags "$ldflags" -o "$KUBE_BIN/" "${pkgs[@]}"
  )
  say "kubernetes $KUBE_VERSION: built"
}

go_install_tool() {
  local name=$1 module=$2 version=$3
  local dest="$TOOLS_BIN/$name-$version"
  if [ -x "$dest" ]; then
    say "$name $version: cached"
  else
    say "$name $version: building from $module"
    local gobin
    gobin=$(mktemp -d)
    CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath "$module@$version"
    # The binary is named after the module's last element (wireguard-go installs as "wireguard").
    local built
    built=$(ls "$gobin")
    mv "$gobin/$built" "$dest"
    rm -rf "$gobin"
  fi
  ln -sfn "$dest" "$TOOLS_BIN/$name"
}

# Builds `package` of `module@version` inside a wrapper module, for modules whose own
# replace directives make `go install` refuse them (etcd's server module).
go_build_wrapped() {
  local name=$1 module=$2 version=$3 package=$4
  local dest="$TOOLS_BIN/$name-$version"
  if [ -x "$dest" ]; then
    say "$name $version: cached"
  else
    say "$name $version: building $package"
    local work="$VEIL_CACHE/build/$name-$version"
    mkdir -p "$work"
    printf 'module veil.dev/%s-build\n\ngo 1.24\n\nrequire %s %s\n' "$name" "$module" "$version" >"$work/go.mod"
    (cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$dest" "$package")
  fi
  ln -sfn "$dest" "$TOOLS_BIN/$name"
}

# The pause binary of the pod sandbox image, from the Kubernetes module's C source.
build_pause() {
  local dest="$TOOLS_BIN/pause-$KUBE_VERSION"
  if [ -x "$dest" ]; then
    say "pause $KUBE_VERSION: cached"
  else
    local dir
    dir=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
    gcc -Os -static -o "$dest" "$dir/build/pause/linux/pause.c"
    say "pause $KUBE_VERSION: built"
  fi
  ln -sfn "$dest" "$TOOLS_BIN/pause"
}

mount_bpffs() {
  if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf && say "bpffs mounted on /sys/fs/bpf"
  fi
}

main() {
  [ "$(id -u)" -eq 0 ] || { echo "setup must run as root (it installs packages)" >&2; exit 1; }
  command -v go >/dev/null || { echo "setup needs Go to build the Kubernetes test components" >&2; exit 1; }
  mkdir -p "$TOOLS_BIN"
  install_debian_packages
  go_install_tool cnitool github.com/containernetworking/cni/cnitool "$CNI_VERSION"
  go_install_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
  go_install_tool wireguard-go golang.zx2c4.com/wireguard "$WIREGUARD_GO_VERSION"
  go_install_tool helm-docs github.com/norwoodj/helm-docs/cmd/helm-docs "$HELM_DOCS_VERSION"
  build_kubernetes
  ln -sfn "$KUBE_BIN" "$VEIL_CACHE/kubernetes"
  mount_bpffs
  # The kind tier: kind, crictl (`kind load` needs it in the node), etcd, CoreDNS, pause,
  # then Docker and the locally built node image (tests/kind/setup.sh).
  go_install_tool kind sigs.k8s.io/kind "$KIND_VERSION"
  go_install_tool crictl sigs.k8s.io/cri-tools/cmd/crictl "$CRICTL_VERSION"
  go_build_wrapped etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3
  go_install_tool coredns github.com/coredns/coredns "$COREDNS_VERSION"
  build_pause
  KUBE_VERSION="$KUBE_VERSION" ETCD_VERSION="$ETCD_VERSION" COREDNS_VERSION="$COREDNS_VERSION" \
    bash "$(dirname "$0")/../kind/setup.sh"
  say "ready: kubernetes in $VEIL_CACHE/kubernetes, tools in $TOOLS_BIN"
}

main "$@"
