#!/usr/bin/env bash
# Builds the pinned helm, prometheus and promtool from the Go module proxy into a cache outside the
# clone and prints the directory holding them as its last line. A warm call only checks the cache.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

cache=${XDG_CACHE_HOME:-$HOME/.cache}/imdsgate/tools/helm-${HELM_VERSION}-prometheus-${PROMETHEUS_VERSION}
bins=(helm prometheus promtool)

have_all() {
  for b in "${bins[@]}"; do [ -x "$cache/$b" ] || return 1; done
}
if have_all; then
  echo "$cache"
  exit 0
fi

command -v go >/dev/null || { echo "tool-bins: 'go' is not on PATH; install Go to build helm and prometheus" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

# build NAME MODULE VERSION LDFLAGS PACKAGE...: one throwaway module requiring MODULE@VERSION, then
# `go build` of the packages into the cache.
build() {
  local name=$1 module=$2 version=$3 ldflags=$4
  shift 4
  echo "tool-bins: building $name $version (first run only; a few minutes)" >&2
  local mod="$work/$name"
  mkdir -p "$mod"
  cd "$mod"
  go mod init "imdsgate.local/$name" >/dev/null 2>&1
  echo "require $module $version" >>go.mod
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
    printf ')\n'
  } >tools.go
  go mod tidy >"$work/$name-tidy.log" 2>&1 || { tail -30 "$work/$name-tidy.log" >&2; echo "tool-bins: go mod tidy for $name failed" >&2; exit 1; }
  go build -trimpath -ldflags "-s -w $ldflags" -o "$cache/" "$@" >"$work/$name-build.log" 2>&1 ||
    { tail -30 "$work/$name-build.log" >&2; echo "tool-bins: building $name failed" >&2; exit 1; }
}

[ -x "$cache/helm" ] || build helm helm.sh/helm/v3 "$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm
{ [ -x "$cache/prometheus" ] && [ -x "$cache/promtool" ]; } || build prometheus github.com/prometheus/prometheus \
  "$PROMETHEUS_VERSION" "" github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
have_all || { echo "tool-bins: binaries missing in $cache after build" >&2; exit 1; }
echo "$cache"
