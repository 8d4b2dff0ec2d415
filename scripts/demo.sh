#!/usr/bin/env bash
# Set-up, build, and run the main job. Until the trainer lands this is the communication benchmark
# on 4 ranks: every collective validated (#wrong) and timed against raw MPI.
source "$(dirname "$0")/common.sh"
loom_setup_and_build
NP="${NP:-4}"
echo "== comm_bench on ${NP} ranks (mpirun)"
loom_mpirun -np "$NP" build/cpu/benchmarks/comm_bench --max-bytes "${MAX_BYTES:-16M}" --factor 4 "$@"
