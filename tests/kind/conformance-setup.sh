#!/usr/bin/env bash
# Builds what tests/kind/conformance.sh needs to run Kubernetes' own `[sig-network]
# [Conformance]` specs against Veil on kind, from the package registries only:
#   - e2e.test of the pinned release (`go test -c k8s.io/kubernetes/test/e2e` in a wrapper
#     module, as tests/scripts/setup.sh builds the components), agnhost from the same
#     module, and ginkgo at the version Kubernetes' go.mod pins;
#   - the images those specs run, on a Debian bookworm rootfs (debootstrap), tagged exactly
#     as the release's test/utils/image/manifest.go names them, so pods never pull.
# Cached (binaries by path, images by tag) and idempotent; FORCE=1 rebuilds. Writes the
# list of images to $E2E_DIR/images, which conformance.sh loads into the nodes.
set -euo pipefail
SCRIPT_NAME=conformance-setup
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
FORCE="${FORCE:-0}"

E2E_DIR="$VEIL_CACHE/kubernetes-$KUBE_VERSION/e2e"
E2E_SRC="$E2E_DIR/src"
E2E_ROOTFS_IMAGE=veil/e2e-rootfs:bookworm
# What the images' commands use: dig/nslookup (DNS specs), curl, nc, wget, ip/ss, iperf
# (agnhost's upstream Dockerfile adds these to Alpine), nginx for the nginx image.
E2E_ROOTFS_PACKAGES=bind9-dnsutils,curl,wget,netcat-openbsd,iproute2,iperf,bash,procps,ca-certificates,nginx

kube_module() { # FIELD: Dir or GoMod of k8s.io/kubernetes@KUBE_VERSION in the module cache
  go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n "s/.*\"$1\": \"\\(.*\\)\",/\\1/p"
}

# The wrapper module (see build_kubernetes in tests/scripts/setup.sh): it requires
# k8s.io/kubernetes and replaces every staging module (v0.0.0 in its go.mod) with the
# published v0.<minor>.<patch>.
wrapper_module() {
  [ -f "$E2E_SRC/go.mod" ] && return
  mkdir -p "$E2E_SRC"
  local modfile
  modfile=$(kube_module GoMod)
  {
    echo "module veil.dev/kubernetes-e2e-build"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$modfile" \
      | awk -v v="v0.${KUBE_VERSION#v1.}" '{print "replace " $1 " => " $1 " " v}'
  } >"$E2E_SRC/go.mod"
}

# Version ldflags as hack/lib/version.sh sets them (the e2e framework logs them).
version_ldflags() {
  local major minor pkg flags="-s -w"
  major=$(echo "$KUBE_VERSION" | cut -d. -f1 | tr -d v)
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

# e2e.test as hack/lib/golang.sh builds test binaries (`go test -c`, -trimpath, tags
# selinux,notest,grpcnotrace). CGO is off, unlike upstream's e2e.test: the binary is then
# static and shares the Go build cache with the components tests/scripts/setup.sh built.
build_e2e_test() {
  if [ -x "$E2E_DIR/e2e.test" ] && [ "$FORCE" != 1 ]; then
    say "e2e.test $KUBE_VERSION: cached"
    return
  fi
  say "e2e.test $KUBE_VERSION: building (≈ 6 min with a warm Go cache, much longer cold)"
  wrapper_module
  (
    cd "$E2E_SRC"
    GOFLAGS=-mod=mod go mod download k8s.io/kubernetes
    CGO_ENABLED=0 GOFLAGS=-mod=mod go test -c -trimpath -tags selinux,notest,grpcnotrace \
      -ldflags "$(version_ldflags)" -o "$E2E_DIR/e2e.test.new" k8s.io/kubernetes/test/e2e
  )
  mv "$E2E_DIR/e2e.test.new" "$E2E_DIR/e2e.test"
  say "e2e.test $KUBE_VERSION: built"
}

# agnhost as its Makefile builds it (CGO off), from the same module.
build_agnhost() {
  if [ -x "$E2E_DIR/agnhost" ] && [ "$FORCE" != 1 ]; then
    say "agnhost: cached"
    return
  fi
  wrapper_module
  (
    cd "$E2E_SRC"
    CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" \
      -o "$E2E_DIR/agnhost" k8s.io/kubernetes/test/images/agnhost
  )
  say "agnhost: built"
}

# ginkgo at the version k8s.io/kubernetes requires (the e2e.test binary's own library).
install_ginkgo() {
  local version
  version=$(awk '$1 == "github.com/onsi/ginkgo/v2" {print $2; exit}' "$(kube_module GoMod)")
  [ -n "$version" ] || die "no github.com/onsi/ginkgo/v2 in k8s.io/kubernetes@$KUBE_VERSION's go.mod"
  local dest="$TOOLS_BIN/ginkgo-$version"
  if [ -x "$dest" ] && [ "$FORCE" != 1 ]; then
    say "ginkgo $version: cached"
  else
    local gobin
    gobin=$(mktemp -d)
    CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath "github.com/onsi/ginkgo/v2/ginkgo@$version"
    mv "$gobin/ginkgo" "$dest"
    rm -rf "$gobin"
    say "ginkgo $version: built"
  fi
  ln -sfn "$dest" "$TOOLS_BIN/ginkgo"
  ln -sfn "$dest" "$E2E_DIR/ginkgo"
}

# e2e_image ID: the image the release's e2e framework uses for imageutils.ID, read from
# test/utils/image/manifest.go (`configs[ID] = Config{list.REGISTRY, "name", "tag"}` and
# the registry's default in initRegistry).
e2e_image() {
  local manifest line registry_field name tag registry
  manifest="$(kube_module Dir)/test/utils/image/manifest.go"
  line=$(grep -E "^\s*configs\[$1\] = Config\{list\.[A-Za-z0-9]+, \"[^\"]+\", \"[^\"]+\"\}" "$manifest" | head -1) \
    || die "imageutils.$1 not found in $manifest"
  read -r registry_field name tag < <(sed -E 's/.*list\.([A-Za-z0-9]+), "([^"]+)", "([^"]+)".*/\1 \2 \3/' <<<"$line")
  registry=$(grep -E "^\s*$registry_field:\s+\"" "$manifest" | head -1 | sed -E 's/.*"([^"]+)".*/\1/')
  [ -n "$registry" ] || die "registry $registry_field not found in $manifest"
  echo "$registry/$name:$tag"
}

# build_image TAG DOCKERFILE [FILE...]: a --network none build with FILEs in the context.
build_image() {
  local tag=$1 dockerfile=$2
  shift 2
  if have_image "$tag" && [ "$FORCE" != 1 ]; then
    say "$tag: cached"
    return
  fi
  local ctx
  ctx=$(mktemp -d)
  if [ $# -gt 0 ]; then cp -L "$@" "$ctx/"; fi
  printf '%s\n' "$dockerfile" >"$ctx/Dockerfile"
  "$DOCKER" build -q --network none -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
  say "$tag: built"
}

build_images() {
  local kube_dir agnhost nginx dnsutils pause coredns
  kube_dir=$(kube_module Dir)
  agnhost=$(e2e_image Agnhost)
  nginx=$(e2e_image Nginx)
  dnsutils=$(e2e_image JessieDnsutils)
  pause=$(e2e_image Pause)
  # The agnhost tag must be the version of the agnhost source built here.
  [ "${agnhost##*:}" = "$(cat "$kube_dir/test/images/agnhost/VERSION")" ] \
    || die "manifest.go wants $agnhost but test/images/agnhost/VERSION is $(cat "$kube_dir/test/images/agnhost/VERSION")"
  coredns=$(command -v coredns) || die "no coredns binary: run tests/scripts/setup.sh"
  debootstrap_image "$E2E_ROOTFS_IMAGE" "$E2E_ROOTFS_PACKAGES"

  # test/images/agnhost/Dockerfile on Debian instead of Alpine: the binary at / with the
  # agnhost-2 link, CoreDNS, porter's certificates, /uploads, iperf in /usr/local/bin and
  # the user 1000 in group 50000 (SupplementalGroups specs).
  build_image "$agnhost" "FROM $E2E_ROOTFS_IMAGE
COPY agnhost coredns localhost.crt localhost.key /
RUN ln -s agnhost /agnhost-2 && mkdir /uploads && ln -s /usr/bin/iperf /usr/local/bin/iperf \\
 && useradd -u 1000 -U -m user-defined-in-image \\
 && groupadd -g 50000 group-defined-in-image \\
 && usermod -a -G group-defined-in-image user-defined-in-image
EXPOSE 80 8080 8081 9376 5000
ENTRYPOINT [\"/agnhost\"]
CMD [\"pause\"]" \
    "$E2E_DIR/agnhost" "$coredns" "$kube_dir/test/images/agnhost/porter/localhost.crt" \
    "$kube_dir/test/images/agnhost/porter/localhost.key"

  # test/images/jessie-dnsutils: dnsutils (dig) and CoreDNS at /.
  build_image "$dnsutils" "FROM $E2E_ROOTFS_IMAGE
COPY coredns /coredns
CMD [\"/bin/bash\"]" "$coredns"

  # test/images/nginx: nginx in the foreground on port 80, logs to the container's output.
  build_image "$nginx" "FROM $E2E_ROOTFS_IMAGE
RUN ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log \\
 && cp /usr/share/nginx/html/index.html /var/www/html/index.html
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD [\"nginx\", \"-g\", \"daemon off;\"]"

  # The sandbox image tests/kind/setup.sh builds (kubeadm's tag is the e2e framework's too).
  have_image "$pause" || die "no $pause: run tests/kind/setup.sh (make setup)"

  printf '%s\n' "$agnhost" "$dnsutils" "$nginx" "$pause" >"$E2E_DIR/images"
  say "e2e images (listed in $E2E_DIR/images):"
  sed 's/^/  /' "$E2E_DIR/images"
}

main() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, docker)"
  command -v go >/dev/null || die "needs Go (run tests/scripts/setup.sh first)"
  mkdir -p "$E2E_DIR" "$TOOLS_BIN"
  bash "$here/dockerd.sh"
  install_ginkgo
  build_agnhost
  build_images
  build_e2e_test
  say "conformance tier ready in $E2E_DIR ($(($(date +%s) - STARTED)) s)"
}

main "$@"
