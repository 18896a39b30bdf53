#!/usr/bin/env bash
# imdsgate end to end on this machine: a real kube-apiserver + etcd, the STS emulator, the server,
# an agent with its iptables rule in a node network namespace, and pods as network namespaces
# asking 169.254.169.254 for credentials with the aws CLI. Needs root (network namespaces).
#
#   scripts/demo.sh                 the whole demo in one go, then tear down
#   scripts/demo.sh up              start everything in the background
#   scripts/demo.sh pod NS/NAME [--role ROLE] [--namespace-permits REGEX]
#   scripts/demo.sh exec NS/NAME -- CMD...
#   scripts/demo.sh down
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: needs root (it creates network namespaces and iptables rules inside them)" >&2
  exit 1
fi
case "${1:-run}" in
  run|up)
    echo "==> installing prerequisites (first run only: Debian packages, .venv, Kubernetes binaries)" >&2
    # Debian packages and the virtualenv (messages on stderr); the Kubernetes binaries\' directory on stdout.
    IMDSGATE_K8S_BIN_DIR=$("$here/setup.sh" base)
    export IMDSGATE_K8S_BIN_DIR
    echo "==> building imdsgate (cargo build)" >&2
    cargo build --quiet --locked --workspace --bins
    ;;
  *)
    if [ ! -x target/debug/imdsgate-demo ]; then
      echo "demo.sh: run 'scripts/demo.sh up' first" >&2
      exit 1
    fi
    ;;
esac
IMDSGATE_K8S_BIN_DIR=${IMDSGATE_K8S_BIN_DIR:-$("$here/k8s-bins.sh" | tail -n 1)}
export IMDSGATE_K8S_BIN_DIR
exec target/debug/imdsgate-demo "$@"
