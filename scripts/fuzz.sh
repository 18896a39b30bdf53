#!/usr/bin/env bash
# Longer runs of the bounded fuzzers of e2e/tests/fuzz.rs: raw HTTP from pods through the DNAT
# rule to the agent (imdsgate-fuzz), AdmissionReviews to the webhook, GetCredentials calls from an
# authenticated agent. The same three tests CI runs with a small fixed budget, here for N minutes
# in total (split evenly, less each test bed's start-up), with a seed of your choice (default: a
# new one, printed, so any run can be repeated).
#
#   sudo scripts/fuzz.sh --minutes N [--seed S]
#
# Needs root (network namespaces). Installs nothing beyond what scripts/setup.sh does (Debian
# packages, the virtualenv, the Kubernetes binaries), and stops by itself: each test stops
# fuzzing when its time is up, and the whole run is cut off N minutes plus a grace period after it
# started. Every summary is printed, and kept with the rest of the output in target/fuzz/.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

usage() { echo "usage: scripts/fuzz.sh --minutes N [--seed S]" >&2; exit 64; }
minutes=""
seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=${2:-}; shift 2 || usage ;;
    --seed) seed=${2:-}; shift 2 || usage ;;
    -h|--help) usage ;;
    *) usage ;;
  esac
done
[[ "$minutes" =~ ^[1-9][0-9]*$ ]] || usage
[ -z "$seed" ] && seed=$(( $(date +%s) % 1000000007 ))
[[ "$seed" =~ ^[0-9]+$ ]] || usage
[ "$(id -u)" -eq 0 ] || { echo "fuzz.sh: needs root (network namespaces)" >&2; exit 1; }

# Each test bed takes about this long to start and check (seconds), outside its fuzzing time.
overhead=30
per_test=$(( minutes * 60 / 3 - overhead ))
[ "$per_test" -lt 10 ] && per_test=10

step() { printf '\n==> %s\n' "$*" >&2; }

step "prerequisites (scripts/setup.sh base)"
# Debian packages and the virtualenv (messages on stderr); the Kubernetes binaries' directory on stdout.
IMDSGATE_K8S_BIN_DIR=$("$here/setup.sh" base | tail -n 1)
export IMDSGATE_K8S_BIN_DIR

step "cargo build (binaries and the fuzz tests)"
cargo build --workspace --bins --locked
cargo test -p imdsgate-e2e --test fuzz --locked --no-run

out_dir="$root/target/fuzz"
mkdir -p "$out_dir"
log="$out_dir/fuzz-$(date -u +%Y%m%dT%H%M%SZ)-seed-$seed.log"
step "fuzzing for $minutes minute(s): seed $seed, $per_test s per test; output in $log"
export IMDSGATE_FUZZ_SECONDS=$per_test IMDSGATE_FUZZ_SEED=$seed
start=$(date +%s)
status=0
timeout --signal=TERM --kill-after=30 $(( minutes * 60 + 300 )) \
  cargo test -p imdsgate-e2e --test fuzz --locked -- --test-threads=1 --nocapture 2>&1 | tee "$log" \
  || status=${PIPESTATUS[0]}

step "summaries (seed $seed, $(( $(date +%s) - start )) s)"
# The lines each test prints ahead of its JSON summary, and the verdicts.
grep -E '^(imdsgate-fuzz from|agent VmRSS|webhook fuzzing|gRPC fuzzing|[0-9]+ requests reached)|"(violation_count|violations|allowed_key_seen|timed_out|oversized_transport_errors|foreign_type_meta_answered|refusals_without_the_uid)"|^test |^test result' \
  "$log" | sed -E 's/^test (raw|webhook|grpc)[a-z_]* \.\.\. (.*)$/test \1 ... \2/' | cut -c1-300 || true
# What failed, if anything: each panic's place and message.
grep -E -A 3 "^thread '.*' \(?[0-9]*\)? ?panicked at" "$log" | grep -vE '^ +[0-9]+: |^ +at |^stack backtrace' | cut -c1-400 || true
if [ "$status" -eq 124 ]; then
  echo "fuzz.sh: the run was cut off after $(( minutes * 60 + 300 )) s" >&2
fi
left=$(ip netns list 2>/dev/null | grep -c '^imdsgate-e2e-' || true)
[ "${left:-0}" -gt 0 ] && echo "fuzz.sh: note: $left imdsgate-e2e network namespace(s) exist (other runs, or leftovers)" >&2
if [ "$status" -eq 0 ]; then
  echo "fuzz.sh: no violation (seed $seed); full output: $log" >&2
else
  echo "fuzz.sh: FAILED (exit $status, seed $seed); repeat with: scripts/fuzz.sh --minutes $minutes --seed $seed; full output: $log" >&2
fi
exit "$status"
