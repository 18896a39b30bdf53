#!/usr/bin/env bash
# imdsgate's benchmarks, on the test bed, written to BENCHMARKS.md with the machine and the date:
# the hot path against a bare hyper server through the same DNAT path, a 200-pod start storm,
# memory at 250 pods per node and 10,000 pods per cluster, STS economy, server fan-in; CPU
# instructions and allocations per hot-path request (valgrind); the cluster-scale section that
# scripts/scale.sh wrote (scripts/bench-scale.md), appended as it is.
# Needs root (network namespaces). Takes about 10 minutes after the release build.
#
#   scripts/bench.sh [--seconds N] [--server-pods N] [--rounds N] [--out FILE]
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
# Instructions and allocations per hot-path request, under valgrind (counts, not times).
if ! command -v valgrind >/dev/null; then
  echo "==> apt-get install valgrind" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >&2
fi
echo "==> imdsgate-hotpath count (valgrind)" >&2
target/release/imdsgate-hotpath count > target/bench-hotpath.md
RUST_LOG=warn target/release/imdsgate-bench all --out "$out" --hotpath target/bench-hotpath.md "${args[@]}"
