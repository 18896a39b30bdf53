#!/usr/bin/env bash
# Installs what the test bed needs on a fresh machine, idempotently:
#   apt   Debian packages (iptables, iproute2, socat, procps, openssl, curl)
#   venv  the project's Python virtualenv (.venv) with the pinned moto[server] and aws CLI
#   k8s   the pinned kube-apiserver, kubectl and etcd (scripts/k8s-bins.sh); `all` also builds
#         what the real cluster runs (kubelet, kube-proxy, scheduler, controller-manager, CoreDNS)
#   tools the pinned helm, prometheus and promtool (scripts/tool-bins.sh)
# With no argument (or `all`) it does all four and prints the Kubernetes binaries' directory and
# then the tools' directory as the last two lines of stdout (everything else goes to stderr). A
# warm run takes a few seconds. `base` is all but the tools (the demo and benchmarks need no helm),
# printing only the Kubernetes binaries' directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

setup_apt() {
  local want=(iptables iproute2 socat procps openssl curl) missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then echo "setup: need root to install ${missing[*]}" >&2; exit 1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

setup_venv() {
  local venv="${IMDSGATE_VENV:-$root/.venv}" stamp
  stamp="moto[server]==$MOTO_VERSION awscli==$AWSCLI_VERSION"
  if [ -f "$venv/.imdsgate-stamp" ] && [ "$(cat "$venv/.imdsgate-stamp")" = "$stamp" ]; then
    return 0
  fi
  echo "setup: creating the virtualenv $venv ($stamp)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" "awscli==$AWSCLI_VERSION" boto3 >&2
  echo "$stamp" >"$venv/.imdsgate-stamp"
}

setup_k8s() {
  "$here/k8s-bins.sh" "$@" | tail -n 1
}

setup_tools() {
  "$here/tool-bins.sh" | tail -n 1
}

case "${1:-all}" in
  apt) setup_apt ;;
  venv) setup_venv ;;
  k8s) setup_k8s ;;
  tools) setup_tools ;;
  base) setup_apt; setup_venv; setup_k8s ;;
  all) setup_apt; setup_venv; setup_k8s cluster; setup_tools ;;
  *) echo "usage: scripts/setup.sh [apt|venv|k8s|tools|base|all]" >&2; exit 64 ;;
esac
