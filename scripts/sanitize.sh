#!/usr/bin/env bash
# The unit tests under AddressSanitizer + UndefinedBehaviorSanitizer: the whole library and the
# single-process test binaries (test_core, test_model: config, data, model, optimizer, trainer,
# checkpoints, interop) built with gcc -fsanitize=address,undefined in build/asan and run as one
# process each. Multi-rank tests stay in the normal build (Open MPI's own allocations are not
# instrumented). Leak checking is off (LibTorch and protobuf keep process-lifetime allocations), and
# so is container-overflow detection (LibTorch's uninstrumented std::vector code shares the
# containers with ours, which gives false reports).
source "$(dirname "$0")/common.sh"
bash scripts/install-deps.sh
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
start=$(date +%s)
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_FLAGS="$san" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DLOOM_WITH_CUDA=OFF -DLOOM_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build/asan -j "$(nproc)" --target test_core test_model
built=$(date +%s)
export ASAN_OPTIONS="detect_leaks=0:detect_container_overflow=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
(cd build/asan && ./tests/test_core --gtest_brief=1 && ./tests/test_model --gtest_brief=1)
end=$(date +%s)
echo "sanitize.sh: set-up + build $((built - start)) s, tests $((end - built)) s"
