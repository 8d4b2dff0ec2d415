# Shared by scripts/*.sh: set-up and build with the cpu preset.
set -euo pipefail
LOOM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$LOOM_ROOT"

# OPENBLAS_CORETYPE forces an OpenBLAS kernel family; measured here, Haswell kernels on an AVX-512
# machine run the fp32 GEMM at 106 GFLOP/s against 198 with auto-detection. Loom logs the BLAS
# core at start-up; the scripts drop the override unless asked to keep it.
if [ -n "${OPENBLAS_CORETYPE:-}" ] && [ -z "${LOOM_KEEP_OPENBLAS_CORETYPE:-}" ]; then
  echo "note: unsetting OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE (set LOOM_KEEP_OPENBLAS_CORETYPE=1 to keep it)"
  unset OPENBLAS_CORETYPE
fi

loom_setup_and_build() {
  bash scripts/install-deps.sh
  export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
  cmake --preset cpu >/dev/null
  cmake --build --preset cpu -j "$(nproc)"
}

# mpirun with the flags a laptop, a container or CI needs: more ranks than cores, and root.
loom_mpirun() {
  local flags=(--oversubscribe -x OMP_NUM_THREADS=1)
  if [ "$(id -u)" -eq 0 ]; then flags+=(--allow-run-as-root); fi
  mpirun "${flags[@]}" "$@"
}

# The demo corpus (data/demo): Debian's fortunes (15k short documents) and the licence texts (17
# long ones), tokenised byte-level into Megatron .bin/.idx files by tools/preprocess_data.
loom_demo_corpus() {
  local fortunes licenses
  fortunes=$(ls /usr/share/games/fortunes/* | grep -v -E '\.(dat|u8)$' | paste -sd,)
  licenses=$(ls /usr/share/common-licenses/* | paste -sd,)
  build/cpu/tools/preprocess_data --input "$fortunes" --format text --split separator \
    --output-prefix data/demo/fortunes 2>&1 | tail -1
  build/cpu/tools/preprocess_data --input "$licenses" --format text --split file \
    --output-prefix data/demo/licenses 2>&1 | tail -1
}
