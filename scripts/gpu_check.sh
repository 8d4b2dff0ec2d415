#!/usr/bin/env bash
# Builds the `cuda` preset on a GPU machine that has CUDA, CMake and a CUDA LibTorch inside its
# Python but no Debian packages, then runs the GPU tests, the kernel and training benchmarks and the
# third-party interoperability checks (transformers, TensorBoard, sentencepiece). Writes logs and
# JSON under $OUT (default build/gpu-out) and prints a short summary last.
#
#   scripts/gpu_check.sh [DEBS_DIR] [INTEROP_IN]
# DEBS_DIR: Debian packages to unpack for the build (../shared/device/prepare-carry.sh makes them).
# INTEROP_IN: Loom's HF exports, logits and a TensorBoard run (see tests/interop/device_interop.py).
set -uo pipefail
cd "$(dirname "$0")/.."
debs=${1:-.device-debs}
interop_in=${2:-.device-in}
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
t_start=$(date +%s)

if [ -d "$debs" ]; then
  mkdir -p /tmp/deps && for f in "$debs"/*.deb; do dpkg -x "$f" /tmp/deps; done
  export PATH=/tmp/deps/usr/bin:$PATH
  export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  prefix=/tmp/deps/usr
fi
torch_cmake=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
export CMAKE_PREFIX_PATH=${prefix:+$prefix:}$torch_cmake
export NCCL_ROOT=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null)
export LD_LIBRARY_PATH=${NCCL_ROOT:+$NCCL_ROOT/lib:}${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$summary"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$summary"

# The interop checks need no build: run them alongside it.
if [ -d "$interop_in" ]; then
  ( PYTHONUNBUFFERED=1 python3 tests/interop/device_interop.py "$interop_in" /tmp/interop > "$OUT/interop.log" 2>&1
    echo "interop exit $?" >> "$OUT/interop.log"
    tar -C /tmp/interop -czf "$OUT/interop.tar.gz" fixtures ) &
  interop_pid=$!
fi

grep -rn "dummy" "$torch_cmake" 2>&1 | head -5 | tee -a "$summary"
std=17
grep -q "202002L" "$(python3 -c 'import torch,os; print(os.path.dirname(torch.__file__))')/include/c10/util/C++17.h" 2>/dev/null && std=20
configure() {
  # LOOM_INSTALL_PACKAGE=OFF: with the pip wheel's Torch package, install(EXPORT) trips over a
  # target "dummy" unless protobuf is found first (it is, now; kept OFF on that machine anyway).
  cmake --preset cuda -DLOOM_CUDA_ARCHITECTURES=90 -DLOOM_INSTALL_PACKAGE=OFF -DCMAKE_CXX_STANDARD=$std -DLOOM_BUILD_EXAMPLES=OFF \
    -DCMAKE_CUDA_COMPILER=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) > "$OUT/build.log" 2>&1
}
build() { cmake --build build/cuda -j 16 --target test_gpu train_throughput kernel_bench >> "$OUT/build.log" 2>&1; }
if ! { configure && build; }; then
  if grep -q "C++20\|c++20\|202002" "$OUT/build.log" && [ $std = 17 ]; then
    std=20; note "retrying with C++20"; rm -rf build/cuda; configure && build
  fi
fi
if [ ! -x build/cuda/tests/test_gpu ]; then
  note "BUILD FAILED (C++$std), see build.log"; tail -40 "$OUT/build.log"
else
  note "build ok (C++$std) in $(( $(date +%s) - t_start )) s"
  build/cuda/tests/test_gpu 2>&1 | tee "$OUT/test_gpu.log" | tail -25
  note "test_gpu: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/test_gpu.log" | tr '\n' ' ')"
  build/cuda/benchmarks/kernel_bench --json "$OUT/kernel_bench.json" 2>&1 | tee -a "$summary"
  if [ -n "${LOOM_GPU_DEBUG:-}" ] && command -v cuda-gdb > /dev/null; then
    cuda-gdb -q -batch -ex run -ex bt --args build/cuda/benchmarks/train_throughput --device cuda --cases moe \
      --steps 2 --warmup 1 --python python3 2>&1 | tail -40 | tee -a "$summary"
  fi
  for run in "fp32 dense,moe" "bf16 dense_large,moe_large"; do
    set -- $run
    build/cuda/benchmarks/train_throughput --device cuda --precision $1 --cases $2 --steps 10 --warmup 3 \
      --python python3 --json "$OUT/train_throughput_$1.json" 2>&1 | tee -a "$summary"
  done
fi
if [ -n "${interop_pid:-}" ]; then
  wait $interop_pid
  grep -E "rel err|interop failures|reload|scalar tags|interop exit" "$OUT/interop.log" | tee -a "$summary"
fi
note "total $(( $(date +%s) - t_start )) s"
