#!/usr/bin/env bash
# Set-up, build and run every test (single-process and mpirun tests up to 8 ranks).
source "$(dirname "$0")/common.sh"
start=$(date +%s)
loom_setup_and_build
built=$(date +%s)
ctest --preset cpu "$@"
end=$(date +%s)
echo "scripts/test.sh: set-up + build $((built - start)) s, tests $((end - built)) s"
