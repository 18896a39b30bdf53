#!/usr/bin/env bash
# imdsgate's cluster-scale simulation on the test bed (e2e/src/bin/imdsgate-scale.rs): pods and
# namespaces on a real kube-apiserver + etcd, two server replicas, simulated agents with real
# node-bound tokens; initial sync, load, a relist and a reconnect storm. Writes a Markdown section
# to scripts/bench-scale.md (imdsgate-bench appends it to BENCHMARKS.md) unless --out says else.
# Needs root (like the other benchmarks) and, at full scale (the defaults: 100,000 pods in 5,000
# namespaces, 2,000 agents), about 6 GiB of memory and an open-files limit of ~10,000.
#
#   scripts/scale.sh [--pods N] [--namespaces N] [--agents N] [--nodes N] [--seconds N]
#                    [--rate CALLS_PER_S] [--sts fake|moto] [--concurrency N] [--out FILE]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
[ "$(id -u)" -eq 0 ] || { echo "scale.sh: needs root" >&2; exit 1; }
# Debian packages and the virtualenv (messages on stderr); the Kubernetes binaries' directory on stdout.
IMDSGATE_K8S_BIN_DIR=$("$here/setup.sh" base)
export IMDSGATE_K8S_BIN_DIR
echo "==> cargo build --release" >&2
cargo build --release --locked -p imdsgate-server -p imdsgate-e2e --bins
# Every simulated agent holds a connection to each replica, and each replica one per agent.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
RUST_LOG=warn exec target/release/imdsgate-scale "$@"
