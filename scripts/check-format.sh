#!/usr/bin/env bash
# Checks that the C++ and CUDA files changed since a base commit are clang-formatted (.clang-format:
# Google style, 100 columns). The base is .ci/format-base (the commit before which files were
# written without the check); every file touched since then must be formatted as a whole, so the
# formatted part of the tree only grows. `scripts/check-format.sh --fix` formats them in place.
#   scripts/check-format.sh [--fix] [base]
set -euo pipefail
cd "$(dirname "$0")/.."
fix=0
if [ "${1:-}" = "--fix" ]; then fix=1; shift; fi
base=${1:-$(cat .ci/format-base)}
if ! command -v clang-format >/dev/null; then
  echo "check-format: clang-format is not installed (scripts/install-deps.sh installs it)"
  exit 1
fi
if ! git cat-file -e "${base}^{commit}" 2>/dev/null; then
  # A shallow clone without the base: check the files of the newest commit instead.
  echo "check-format: base $base is not in this clone; checking the files of HEAD's commit"
  files=$(git show --name-only --diff-filter=d --pretty=format: HEAD)
else
  files=$( (git diff --name-only --diff-filter=d "$base" -- ; git ls-files --others --exclude-standard) | sort -u)
fi
files=$(echo "$files" | grep -E '\.(h|hpp|cpp|cc|cu|cuh)$' | grep -v '^tests/fixtures/' || true)
if [ -z "$files" ]; then
  echo "check-format: no C++ files changed since $base"
  exit 0
fi
if [ "$fix" -eq 1 ]; then
  echo "$files" | xargs clang-format -i
  echo "check-format: formatted $(echo "$files" | wc -l) file(s)"
  exit 0
fi
bad=()
for f in $files; do
  if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  echo "check-format: ${#bad[@]} changed file(s) are not clang-formatted (run scripts/check-format.sh --fix):"
  printf '  %s\n' "${bad[@]}"
  exit 1
fi
echo "check-format: $(echo "$files" | wc -l) changed file(s) are clang-formatted"
