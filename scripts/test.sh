#!/usr/bin/env bash
# The one test command: installs what a fresh machine lacks, then runs formatting, lints and every
# test of the workspace, including the end-to-end tests on the real test bed (needs root).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

step() { printf '\n==> %s\n' "$*" >&2; }

# Namespaces and processes a killed test run may have left behind (tests clean up on their own).
cleanup_leftovers() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^imdsgate-e2e-' || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  local d
  for d in /tmp/imdsgate-e2e-realcluster-*; do
    [ -d "$d" ] && bash "$here/cluster.sh" down --dir "$d" >&2 || true
  done
}

start=$(date +%s)
step "installing prerequisites"
# Debian packages and the virtualenv (messages on stderr); the Kubernetes binaries' and the tools'
# (helm, prometheus, promtool) directories on stdout.
dirs=$("$here/setup.sh" all)
IMDSGATE_K8S_BIN_DIR=$(printf '%s\n' "$dirs" | tail -n 2 | head -n 1)
IMDSGATE_TOOLS_BIN_DIR=$(printf '%s\n' "$dirs" | tail -n 1)
export IMDSGATE_K8S_BIN_DIR IMDSGATE_TOOLS_BIN_DIR

if ! command -v cargo >/dev/null; then
  echo "test.sh: cargo is not on PATH; install Rust (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

cleanup_leftovers
trap cleanup_leftovers EXIT

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (binaries the end-to-end tests run)"
cargo build --workspace --bins --locked

step "cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${IMDSGATE_TEST_THREADS:-2}"

left=$(ip netns list 2>/dev/null | grep -c '^imdsgate-e2e-' || true)
if [ "${left:-0}" -gt 0 ]; then
  echo "test.sh: $left test namespace(s) left behind; a test's cleanup is broken" >&2
  exit 1
fi
step "all checks passed in $(( $(date +%s) - start ))s"
