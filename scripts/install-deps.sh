#!/usr/bin/env bash
# Installs the Debian packages Loom needs, idempotently: packages already present are skipped, and
# apt is not touched at all when nothing is missing. Selects OpenBLAS (OpenMP build) as the BLAS that
# Debian's LibTorch links against: the reference BLAS runs at_mm at ~6.6 GFLOP/s on two cores,
# OpenBLAS at 200-390 GFLOP/s.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev
  libopenblas0-openmp libopenblas-openmp-dev
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev
  libisal-dev
  libsentencepiece-dev
  fortunes
  clang-format
)
# --fuzz adds clang and its runtime (libFuzzer, ASan, UBSan) for scripts/fuzz.sh.
# --bench adds Debian's PyTorch (python3-torch, the same 1.13 as libtorch-dev): the eager peer that
# benchmarks/train_throughput compares against. Tests and the demo do not need it.
if [ "${1:-}" = "--bench" ]; then PACKAGES+=(python3-torch); fi
if [ "${1:-}" = "--fuzz" ]; then PACKAGES+=(clang libclang-rt-dev); fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: all ${#PACKAGES[@]} packages present"
fi

# Point the BLAS/LAPACK alternatives at OpenBLAS (OpenMP). LibTorch links libblas.so.3 and
# liblapack.so.3, which resolve through these alternatives.
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for lib in libblas.so.3 liblapack.so.3; do
  target="/usr/lib/${arch}/openblas-openmp/${lib}"
  name="${lib}-${arch}"
  if [ -e "$target" ]; then
    current=$(update-alternatives --query "$name" 2>/dev/null | awk '/^Value:/{print $2}')
    if [ "$current" != "$target" ]; then
      $SUDO update-alternatives --set "$name" "$target" >/dev/null
      echo "install-deps: ${name} -> ${target}"
    fi
  fi
done
