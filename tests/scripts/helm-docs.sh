#!/usr/bin/env bash
# Generates charts/veil/README.md from charts/veil/README.md.gotmpl and the `# --`
# comments in charts/veil/values.yaml, with a pinned helm-docs built from its Go module
# (package registries only, like tests/scripts/setup.sh's tools).
#
#   bash tests/scripts/helm-docs.sh           # regenerate README.md
#   bash tests/scripts/helm-docs.sh --check   # exit 1 with a diff when README.md is stale
#
# Every value must carry a `# --` comment: a row without a description fails the run.
set -euo pipefail

HELM_DOCS_VERSION="${HELM_DOCS_VERSION:-v1.14.2}"
VEIL_CACHE="${VEIL_CACHE:-/var/cache/veil}"
TOOLS_BIN="$VEIL_CACHE/tools/bin"
export PATH="$PATH:/usr/local/go/bin"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
chart="$repo/charts/veil"

check=false
case "${1:-}" in
  "") ;;
  --check) check=true ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# helm-docs has no --version flag, so the pin lives in the file name (as setup.sh does
# for its tools): a different pinned version is built beside the old one, never confused
# with it.
bin="$TOOLS_BIN/helm-docs-$HELM_DOCS_VERSION"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "helm-docs.sh: Go is needed to build helm-docs" >&2; exit 1; }
  echo "helm-docs $HELM_DOCS_VERSION: building from github.com/norwoodj/helm-docs" >&2
  mkdir -p "$TOOLS_BIN"
  gobin=$(mktemp -d)
  trap 'rm -rf "$gobin"' EXIT
  CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath \
    "github.com/norwoodj/helm-docs/cmd/helm-docs@$HELM_DOCS_VERSION"
  mv "$gobin/helm-docs" "$bin"
  ln -sfn "$bin" "$TOOLS_BIN/helm-docs"
fi

# --chart-search-root limits helm-docs to this chart (it would otherwise walk the whole
# repository, target/ included); the template and values file are the chart's own.
# (helm-docs' own --documentation-strict-mode is not used: v1.14.2 reports every key of
# this chart undocumented and then skips the chart with only a warning.)
args=(
  --chart-search-root "$chart"
  --template-files README.md.gotmpl
  --log-level warning
)

# --dry-run prints what would be written; helm-docs skips a chart it cannot parse with a
# mere warning and exit status 0, so any log line counts as a failure here.
want=$(mktemp)
log=$(mktemp)
trap 'rm -f "$want" "$log"' EXIT
"$bin" "${args[@]}" --dry-run > "$want" 2> "$log"
if [ -s "$log" ] || [ ! -s "$want" ]; then
  cat "$log" >&2
  echo "helm-docs.sh: helm-docs did not render charts/veil/README.md" >&2
  exit 1
fi
# A value row whose last column (the description) is empty: a value without `# --`.
undocumented=$(grep -E '^\| [^|]+ \| [^|]+ \| .* \| *\|$' "$want" | cut -d'|' -f2 || true)
if [ -n "$undocumented" ]; then
  echo "helm-docs.sh: values without a '# --' comment in charts/veil/values.yaml:" >&2
  echo "$undocumented" >&2
  exit 1
fi

if ! $check; then
  cp "$want" "$chart/README.md"
  exit 0
fi

if ! diff -u --label "charts/veil/README.md (committed)" --label "charts/veil/README.md (generated)" \
  "$chart/README.md" "$want"; then
  echo "charts/veil/README.md is stale: run 'bash tests/scripts/helm-docs.sh' and commit the result" >&2
  exit 1
fi
