#!/usr/bin/env bash
# Kubernetes' own `[sig-network] ... [Conformance]` specs against Veil on the kind cluster
# tests/kind/cluster.sh made, with the e2e.test, ginkgo and images that
# tests/kind/conformance-setup.sh built (same KUBE_VERSION):
#   tests/kind/conformance.sh         load the e2e images into every node, run the specs,
#                                     check nothing left the machine
#   tests/kind/conformance.sh count   the number of specs the focus selects (no cluster)
# The last line is
#   RESULT conformance passed=N failed=N skipped=N seconds=N egress_dropped=N
# and the exit status is non-zero when a spec failed, fewer than all selected specs passed,
# or the cluster's egress drop rule (DOCKER-USER, comment veil-kind-egress) counted packets.
# Settings: VEIL_KIND_DIR (default /var/tmp/veil-kind), REPORT_ROOT (default
# /var/tmp/veil-conformance; one directory per run, `latest` links the newest),
# E2E_FOCUS / E2E_SKIP (ginkgo regular expressions), E2E_PROCS (default 2).
set -euo pipefail
SCRIPT_NAME=conformance
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

CLUSTER=veil
EGRESS_COMMENT=veil-kind-egress
VEIL_KIND_DIR="${VEIL_KIND_DIR:-/var/tmp/veil-kind}"
KUBECONFIG_FILE="$VEIL_KIND_DIR/kubeconfig"
E2E_DIR="$VEIL_CACHE/kubernetes-$KUBE_VERSION/e2e"
REPORT_ROOT="${REPORT_ROOT:-/var/tmp/veil-conformance}"
E2E_FOCUS="${E2E_FOCUS:-\[sig-network\].*\[Conformance\]}"
E2E_SKIP="${E2E_SKIP:-\[Serial\]|\[Disruptive\]}"
E2E_PROCS="${E2E_PROCS:-2}"

need_e2e() {
  local f
  for f in e2e.test ginkgo images; do
    [ -e "$E2E_DIR/$f" ] || die "no $E2E_DIR/$f: run tests/kind/conformance-setup.sh"
  done
  [ -x "$KUBE_BIN/kubectl" ] || die "no $KUBE_BIN/kubectl: run make setup"
  command -v jq >/dev/null || die "no jq: run make setup"
}

# The number of specs the focus and skip select in this release's e2e.test (ginkgo
# --dry-run: no cluster is contacted).
selected_specs() {
  local dir
  dir=$(mktemp -d)
  "$E2E_DIR/ginkgo" --dry-run --no-color --focus="$E2E_FOCUS" --skip="$E2E_SKIP" \
    --json-report=dry-run.json --output-dir="$dir" "$E2E_DIR/e2e.test" -- --provider=skeleton \
    >"$dir/dry-run.log" 2>&1 || { tail -20 "$dir/dry-run.log" >&2; die "ginkgo --dry-run failed"; }
  jq '.[0].PreRunStats.SpecsThatWillRun' "$dir/dry-run.json"
  rm -rf "$dir"
}

# Packets the DOCKER-USER rule commented veil-kind-egress (tests/kind/cluster.sh) dropped:
# whatever tried to leave the cluster's bridge for another interface.
egress_dropped() {
  iptables -L DOCKER-USER -v -x -n | awk -v c="/* $EGRESS_COMMENT */" '
    index($0, c) { n += $1; found = 1 }
    END { if (!found) exit 1; print n }' \
    || die "no DOCKER-USER rule commented $EGRESS_COMMENT: is this the cluster tests/kind/cluster.sh made?"
}

run() {
  need_e2e
  [ -f "$KUBECONFIG_FILE" ] || die "no $KUBECONFIG_FILE: run tests/kind/cluster.sh up"
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || die "no kind cluster $CLUSTER: run tests/kind/cluster.sh up"
  command kubectl --kubeconfig "$KUBECONFIG_FILE" get nodes >/dev/null || die "the cluster does not answer"
  [ "$(type -t load_image)" = function ] \
    || die "lib.sh has no load_image (the loader cluster.sh uses, moved to lib.sh)"

  local expected
  expected=$(selected_specs)
  say "ginkgo --dry-run: $expected specs selected by --focus='$E2E_FOCUS' --skip='$E2E_SKIP'"

  local image
  while read -r image; do
    have_image "$image" || die "no image $image: run tests/kind/conformance-setup.sh"
    load_image "$CLUSTER" "$image"
    say "image $image: loaded into every node"
  done <"$E2E_DIR/images"

  local report
  report="$REPORT_ROOT/$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$report"
  ln -sfn "$report" "$REPORT_ROOT/latest"

  local before after started seconds rc=0
  before=$(egress_dropped)
  started=$(date +%s)
  say "running the specs ($E2E_PROCS processes), reports in $report"
  "$E2E_DIR/ginkgo" --procs="$E2E_PROCS" --no-color --focus="$E2E_FOCUS" --skip="$E2E_SKIP" \
    --json-report=ginkgo.json --output-dir="$report" "$E2E_DIR/e2e.test" -- \
    --kubeconfig="$KUBECONFIG_FILE" --provider=skeleton --kubectl-path="$KUBE_BIN/kubectl" \
    --report-dir="$report" 2>&1 | tee "$report/ginkgo.log" || rc=$?
  seconds=$(($(date +%s) - started))
  after=$(egress_dropped)

  # Specs that ran (NumAttempts > 0; specs the focus left out are "skipped" with none),
  # and any suite node (BeforeSuite, ...) that did not pass counts as a failure.
  local passed=0 failed=0 skipped=0
  if [ -f "$report/ginkgo.json" ]; then
    read -r passed failed skipped < <(jq -r '[.[].SpecReports[]] as $r
      | ($r | map(select(.LeafNodeType == "It" and .NumAttempts > 0))) as $ran
      | [($ran | map(select(.State == "passed")) | length),
         ($r | map(select(.State != "passed" and .State != "skipped" and .State != "pending")) | length),
         ($ran | map(select(.State == "skipped")) | length)] | @tsv' "$report/ginkgo.json")
  else
    failed=1
    say "ginkgo wrote no report (exit status $rc)"
  fi
  local dropped=$((after - before))
  say "expected $expected passed specs; ginkgo exited with $rc; junit in $report"
  echo "RESULT conformance passed=$passed failed=$failed skipped=$skipped seconds=$seconds egress_dropped=$dropped"
  [ "$failed" -eq 0 ] && [ "$passed" -ge "$expected" ] && [ "$dropped" -eq 0 ] && [ "$rc" -eq 0 ]
}

case "${1:-run}" in
  run) run ;;
  count) need_e2e; selected_specs ;;
  *) echo "usage: $0 [run|count]" >&2; exit 64 ;;
esac
