#!/usr/bin/env bash
# Runs two commands and requires that the parts of their output matching PATTERN (an extended
# regular expression, as grep -o prints them) are identical and that there is at least one: e.g.
# two programs printing the same per-step losses (to the printed digits).
#   expect_same_lines.sh PATTERN "command A" "command B"
set -u
pattern=$1 a=$2 b=$3
out_a=$(mktemp) out_b=$(mktemp)
bash -c "$a" >"$out_a" 2>&1 || { cat "$out_a"; echo "FAIL: command A failed: $a"; exit 1; }
bash -c "$b" >"$out_b" 2>&1 || { cat "$out_b"; echo "FAIL: command B failed: $b"; exit 1; }
lines_a=$(grep -oE -- "$pattern" "$out_a" || true)
lines_b=$(grep -oE -- "$pattern" "$out_b" || true)
echo "--- A: $a"; echo "$lines_a"; echo "--- B: $b"; echo "$lines_b"
rm -f "$out_a" "$out_b"
if [ -z "$lines_a" ]; then echo "FAIL: no line matches '$pattern'"; exit 1; fi
if [ "$lines_a" != "$lines_b" ]; then echo "FAIL: the matching lines differ"; exit 1; fi
echo "OK: $(echo "$lines_a" | wc -l) matching line(s) identical"
