#!/usr/bin/env bash
# The libFuzzer targets and the core unit tests under ASan + UBSan (fuzz/README.md), in build/fuzz
# with clang. Each fuzzer runs for LOOM_FUZZ_SECONDS (default 30) from the seed corpus in
# fuzz/corpus/<target> (copied, so new inputs stay in build/fuzz/corpus); a crash leaves its input
# as build/fuzz/crash-* and fails the script.
#   scripts/fuzz.sh [target...]     (default: every target)
source "$(dirname "$0")/common.sh"
bash scripts/install-deps.sh --fuzz
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
seconds="${LOOM_FUZZ_SECONDS:-30}"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(config hf_config safetensors indexed_dataset sample_cache)
fi
start=$(date +%s)
cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DLOOM_FUZZ=ON \
  -DLOOM_WITH_CUDA=OFF -DLOOM_BUILD_TESTS=OFF -DLOOM_BUILD_EXAMPLES=OFF \
  -DLOOM_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build/fuzz -j "$(nproc)" --target test_core_sanitized \
  $(printf 'fuzz_%s ' "${targets[@]}")
built=$(date +%s)
# ASan: fail on the first report; UBSan reports are fatal (-fno-sanitize-recover).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
echo "fuzz.sh: core unit tests under ASan + UBSan"
(cd build/fuzz && ./fuzz/test_core_sanitized --gtest_brief=1)
for t in "${targets[@]}"; do
  corpus="build/fuzz/corpus/$t"
  mkdir -p "$corpus"
  if [ -d "fuzz/corpus/$t" ]; then cp -n fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true; fi
  echo "fuzz.sh: fuzz_$t for ${seconds} s"
  log="build/fuzz/fuzz_$t.log"
  if ! (cd build/fuzz && ./fuzz/fuzz_"$t" -max_total_time="$seconds" -timeout=10 \
          -rss_limit_mb=4096 -print_final_stats=1 "corpus/$t") >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz.sh: fuzz_$t FAILED; the input is build/fuzz/crash-* (or timeout-*, oom-*)"
    exit 1
  fi
  grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
done
end=$(date +%s)
echo "fuzz.sh: set-up + build $((built - start)) s, runs $((end - built)) s"
