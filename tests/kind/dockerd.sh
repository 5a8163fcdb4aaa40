#!/usr/bin/env bash
# Makes sure a Docker engine answers. When one already runs (a laptop, a CI runner), it is
# used as it is. Otherwise Debian's dockerd is started here (these machines have no
# systemd), with addresses from the benchmarking range 198.18.0.0/15 only, and, where the
# host's capability bounding set lacks CAP_SYS_RESOURCE, a runc wrapper that leaves it out
# (docker 20.10 asks for every capability for --privileged and runc then fails).
set -euo pipefail

VEIL_CACHE="${VEIL_CACHE:-/var/cache/veil}"
# docker0 and any network docker makes by itself; kind's own network is made by cluster.sh.
DOCKER_BIP="${DOCKER_BIP:-198.18.201.1/24}"
DOCKER_POOL="${DOCKER_POOL:-198.18.208.0/20}"
LOG=/var/log/veil-dockerd.log

say() { printf '[dockerd %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if docker info >/dev/null 2>&1; then
  say "a Docker engine already runs: using it"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "starting dockerd needs root" >&2; exit 1; }
command -v dockerd >/dev/null || { echo "no dockerd: run make setup (Debian's docker.io)" >&2; exit 1; }

args=(--bip "$DOCKER_BIP" --default-address-pool "base=$DOCKER_POOL,size=24")

# CAP_SYS_RESOURCE is capability 24; CapBnd is hexadecimal.
capbnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
if (( (16#$capbnd >> 24 & 1) == 0 )); then
  wrapper="$VEIL_CACHE/kind/runc-without-sys-resource"
  mkdir -p "$(dirname "$wrapper")"
  cat >"$wrapper" <<'WRAP'
#!/usr/bin/env bash
# runc, minus CAP_SYS_RESOURCE in every capability set of what it creates or execs: this
# host's bounding set lacks it, and asking for it fails the container.
set -euo pipefail
strip() { jq -c 'walk(if type == "array" then map(select(. != "CAP_SYS_RESOURCE")) else . end)' "$1" >"$1.veil" && mv "$1.veil" "$1"; }
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --bundle | -b) strip "${args[$((i + 1))]}/config.json" ;;
    --bundle=*) strip "${args[$i]#--bundle=}/config.json" ;;
    --process | -p) strip "${args[$((i + 1))]}" ;;
    --process=*) strip "${args[$i]#--process=}" ;;
  esac
done
exec runc "$@"
WRAP
  chmod 0755 "$wrapper"
  args+=(--add-runtime "veil-runc=$wrapper" --default-runtime veil-runc)
  say "CAP_SYS_RESOURCE is not in this host's bounding set: containers run through $wrapper"
fi

say "starting dockerd (log: $LOG)"
nohup dockerd "${args[@]}" >>"$LOG" 2>&1 &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    say "dockerd ready"
    exit 0
  fi
  sleep 1
done
echo "dockerd did not answer within 60 s; last lines of $LOG:" >&2
tail -20 "$LOG" >&2
exit 1
