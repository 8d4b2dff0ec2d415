# Shared by scripts/*.sh: set-up and build with the cpu preset.
set -euo pipefail
LOOM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$LOOM_ROOT"

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
