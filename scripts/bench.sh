#!/usr/bin/env bash
# imdsgate's benchmarks, on the test bed, written to BENCHMARKS.md with the machine and the date:
# the hot path against a bare hyper server through the same DNAT path, a 200-pod start storm,
# memory at 250 pods per node and 10,000 pods per cluster, STS economy, server fan-in.
# Needs root (network namespaces). Takes about 5 minutes after the release build.
#
#   scripts/bench.sh [--seconds N] [--server-pods N] [--out FILE]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
[ "$(id -u)" -eq 0 ] || { echo "bench.sh: needs root (network namespaces)" >&2; exit 1; }
# Debian packages and the virtualenv (messages on stderr); the Kubernetes binaries\' directory on stdout.
IMDSGATE_K8S_BIN_DIR=$("$here/setup.sh" base)
export IMDSGATE_K8S_BIN_DIR
echo "==> cargo build --release" >&2
cargo build --release --locked --workspace --bins
out=BENCHMARKS.md
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
RUST_LOG=warn target/release/imdsgate-bench all --out "$out" "${args[@]}"
