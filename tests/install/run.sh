#!/usr/bin/env bash
# Installs the built Loom into a temporary prefix, then configures, builds and runs a consumer
# project that uses find_package(Loom). Args: <loom build dir> <work dir>.
set -euo pipefail
build="$1"
work="$2"
rm -rf "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$(dirname "$0")" -B "$work/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" \
      -DCMAKE_CXX_COMPILER_LAUNCHER="$(command -v ccache || true)" >/dev/null
cmake --build "$work/consumer" >/dev/null
LD_LIBRARY_PATH="$work/prefix/lib:${LD_LIBRARY_PATH:-}" "$work/consumer/consumer"
