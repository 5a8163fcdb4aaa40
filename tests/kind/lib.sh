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
