#!/usr/bin/env bash
# Runs a job that is expected to fail and checks that it *ends*: within LIMIT seconds, with a
# non-zero status, and printing TEXT (a fixed string).
#   expect_job_ends.sh LIMIT TEXT command [args...]
set -u
limit=$1 text=$2
shift 2
out=$(mktemp)
start=$(date +%s.%N)
timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
rc=$?
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
cat "$out"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "FAIL: the job did not end within ${limit} s (it hangs)"
  exit 1
fi
if [ "$rc" -eq 0 ]; then
  echo "FAIL: the job exited with status 0; a failed rank must fail the job"
  exit 1
fi
if ! grep -qF -- "$text" "$out"; then
  echo "FAIL: the output does not say: $text"
  exit 1
fi
rm -f "$out"
echo "OK: the job ended with status $rc after ${elapsed} s and said what failed"
