#!/usr/bin/env bash
# Builds the native core with AddressSanitizer + UndefinedBehaviorSanitizer into a scratch copy of the
# package and runs the tests that drive native code on hostile and edge-case input under it.
# Usage: bash tests/sanitize.sh [pytest args...]   (default: the kernel, error and small-model tests)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$here/pyqrt" "$here/native" "$here/convert" "$here/tests" "$here/docs" "$here/pyproject.toml" "$work/"
rm -f "$work"/pyqrt/_qrz*.so "$work"/pyqrt/_qrz.c
(cd "$work" && QRZ_EXTRA_CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
   QRZ_EXTRA_LDFLAGS="-fsanitize=address,undefined" python pyqrt/_build.py >"$work/build.log" 2>&1) \
   || { cat "$work/build.log"; exit 1; }
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
cd "$work"
# leak checking is off: CPython itself keeps allocations alive at exit
LD_PRELOAD="$asan $ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  PYTHONPATH="$work" python -m pytest -q -p no:cacheprovider "${@:-tests/test_kernels.py}"

