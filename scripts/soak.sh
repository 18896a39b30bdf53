#!/usr/bin/env bash
# Soak run: `sudo scripts/soak.sh --minutes N [--pods N] [--sample-seconds S]` (default 30 minutes).
# Starts the real test bed (apiserver, moto, server, agent in a node namespace, pod namespaces),
# keeps pods asking while Pod objects are deleted and recreated with other roles, samples the
# agent's and server's RSS, file descriptors and request latency, and prints a table and the RSS
# trend (bounded: stops by itself). Exits 1 on a wrong answer or a dead process.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
IMDSGATE_K8S_BIN_DIR=$("$here/setup.sh" base)
export IMDSGATE_K8S_BIN_DIR
cargo build --locked -p imdsgate-e2e --bins -p imdsgate-agent -p imdsgate-server >&2
exec target/debug/imdsgate-soak "$@"
