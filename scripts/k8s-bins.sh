#!/usr/bin/env bash
# Builds the pinned kube-apiserver, kubectl and etcd from the Go module proxy into a cache outside the
# clone and prints the directory holding them as its last line. A warm call only checks the cache.
# `k8s-bins.sh cluster` also builds what a real cluster runs: kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy and CoreDNS (scripts/cluster.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

cache=${XDG_CACHE_HOME:-$HOME/.cache}/imdsgate/k8s/${K8S_VERSION}-etcd-${ETCD_VERSION}
k8s_cmds=(kube-apiserver kubectl)
if [ "${1:-}" = cluster ]; then
  k8s_cmds+=(kube-controller-manager kube-scheduler kubelet kube-proxy)
  bins=("${k8s_cmds[@]}" etcd coredns)
else
  bins=("${k8s_cmds[@]}" etcd)
fi

have_all() {
  for b in "${bins[@]}"; do [ -x "$cache/$b" ] || return 1; done
}

if have_all; then
  echo "$cache"
  exit 0
fi

command -v go >/dev/null || { echo "k8s-bins: 'go' is not on PATH; install Go to build kube-apiserver and etcd" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

build_k8s() {
  echo "k8s-bins: building ${k8s_cmds[*]} $K8S_VERSION (first run only; several minutes)" >&2
  local mod="$work/k8s"
  mkdir -p "$mod"
  cd "$mod"
  go mod init imdsgate.local/k8sbins >/dev/null 2>&1
  # k8s.io/kubernetes replaces its staging modules with local paths; point each at its published v0.N.M.
  local gomod staging_version
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging_version="v0.${K8S_VERSION#v1.}"
  {
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/' "$gomod" | awk '{print $1}' | while read -r m; do
      echo "replace $m => $m $staging_version"
    done
  } >>go.mod
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in "${k8s_cmds[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
    printf ')\n'
  } >tools.go
  go mod tidy >"$work/k8s-tidy.log" 2>&1 || { tail -30 "$work/k8s-tidy.log" >&2; echo "k8s-bins: go mod tidy for kubernetes failed" >&2; exit 1; }
  go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${K8S_VERSION#v1.}" \
    -o "$cache/" "${k8s_cmds[@]/#/k8s.io/kubernetes/cmd/}" \
    >"$work/k8s-build.log" 2>&1 || { tail -30 "$work/k8s-build.log" >&2; echo "k8s-bins: building ${k8s_cmds[*]} failed" >&2; exit 1; }
}

# build_module NAME MODULE VERSION: one throwaway module requiring MODULE@VERSION, then `go build`
# of its main package into $cache/NAME (etcd's server, CoreDNS).
build_module() {
  local name=$1 module=$2 version=$3
  echo "k8s-bins: building $name $version (first run only)" >&2
  local mod="$work/$name"
  mkdir -p "$mod"
  cd "$mod"
  go mod init "imdsgate.local/${name}bin" >/dev/null 2>&1
  echo "require $module $version" >>go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$module" >tools.go
  go mod tidy >"$work/$name-tidy.log" 2>&1 || { tail -30 "$work/$name-tidy.log" >&2; echo "k8s-bins: go mod tidy for $name failed" >&2; exit 1; }
  go build -trimpath -ldflags "-s -w" -o "$cache/$name" "$module" \
    >"$work/$name-build.log" 2>&1 || { tail -30 "$work/$name-build.log" >&2; echo "k8s-bins: building $name failed" >&2; exit 1; }
}

[ -x "$cache/etcd" ] || build_module etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
for c in "${k8s_cmds[@]}"; do
  [ -x "$cache/$c" ] || { build_k8s; break; }
done
if [ "${1:-}" = cluster ] && [ ! -x "$cache/coredns" ]; then
  build_module coredns github.com/coredns/coredns "$COREDNS_VERSION"
fi
have_all || { echo "k8s-bins: binaries missing in $cache after build" >&2; exit 1; }
echo "$cache"
