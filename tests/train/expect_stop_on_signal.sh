#!/usr/bin/env bash
# A pre-empted job saves and ends: starts a long training job, sends SIGNAL to process PICK of the
# job once it has logged a few steps, and checks that the job ends within LIMIT seconds with status
# 0, says it stopped on the signal and left a complete checkpoint under CKPT_DIR.
#   expect_stop_on_signal.sh LIMIT SIGNAL PICK CKPT_DIR command [args...]
# PICK: "launcher" (the command's own process, e.g. a single-process job) or a pgrep pattern whose
# newest match gets the signal (e.g. one rank of an mpirun job).
set -u
limit=$1 sig=$2 pick=$3 ckpt=$4
shift 4
rm -rf "$ckpt"
out=$(mktemp)
"$@" >"$out" 2>&1 &
job=$!
for _ in $(seq 1 600); do  # wait (up to 60 s) for step 3
  grep -qE "step +3/" "$out" && break
  kill -0 "$job" 2>/dev/null || break
  sleep 0.1
done
if [ "$pick" = launcher ]; then target=$job; else target=$(pgrep -n -f "$pick"); fi
start=$(date +%s.%N)
kill "-$sig" "$target"
( sleep "$limit"; kill -KILL "$job" ) >/dev/null 2>&1 &
watchdog=$!
wait "$job"
rc=$?
pkill -P "$watchdog" sleep 2>/dev/null
kill "$watchdog" 2>/dev/null
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
tail -n 15 "$out"
if [ "$rc" -ne 0 ]; then
  echo "FAIL: the job ended with status $rc (killed after ${limit} s if 137), not 0"
  exit 1
fi
if ! grep -q "received: stopping after step" "$out"; then
  echo "FAIL: the job does not say that it stopped on the signal"
  exit 1
fi
if ! ls "$ckpt"/step-*/state.safetensors >/dev/null 2>&1; then
  echo "FAIL: no complete checkpoint under $ckpt"
  exit 1
fi
rm -rf "$out" "$ckpt"
echo "OK: stopped on SIG$sig after ${elapsed} s with a checkpoint"
