#!/usr/bin/env bash
# The native LSTM kernel's checks beyond pytest (for .ci/run):
#   1. `jaxseq native build` at this CPU's vector width with -Werror (-Wall -Wextra are always on), into a
#      scratch cache; tests/test_native_build.py builds the AVX2 and SSE widths with -Werror.
#   2. jaxseq/native/selftest.cc (the FFI handlers called directly at several shapes, thread counts and from
#      two threads at once, checked against a float64 LSTM) under ThreadSanitizer, then under AddressSanitizer
#      with UndefinedBehaviorSanitizer. Python and XLA are not instrumented, so the sanitizers run on this
#      driver rather than on python with the library.
# Any warning, mismatch or sanitizer report fails the script (sanitizer exit codes 66, 67, 68).
# Usage: scripts/check_native.sh   (PYTHON and CXX override the interpreter and the compiler; x86-64 Linux)
# Takes about 50 s of CPU: 6 s to build the library, 18 s for TSan, 16 s for ASan+UBSan, the rest Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
CXX="${CXX:-c++}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
stage() { printf '%s: %s\n' "check_native" "$*"; SECONDS=0; }
took() { printf '%s: %s s\n' "check_native" "$SECONDS"; }

stage "jaxseq native build, -Werror"
JAXSEQ_NATIVE_CXXFLAGS=-Werror JAXSEQ_CACHE_DIR="$scratch/cache" "$PYTHON" -m jaxseq.cli native build
took

include="$("$PYTHON" -c "import jax; print(jax.ffi.include_dir())")"
flags=(-g -fno-omit-frame-pointer -march=native -std=c++17 -fno-math-errno -pthread -Wall -Wextra -Werror
       -isystem "$include" jaxseq/native/selftest.cc)

stage "ThreadSanitizer"
$CXX -O1 "${flags[@]}" -fsanitize=thread -o "$scratch/selftest-tsan"
TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1" "$scratch/selftest-tsan"
took

stage "AddressSanitizer + UndefinedBehaviorSanitizer"
# -O0: a quarter of -O1's compile time with UBSan (7 against 29 s of CPU), for 9 s of run time against 4.
$CXX -O0 "${flags[@]}" -fsanitize=address,undefined -fno-sanitize-recover=all -o "$scratch/selftest-asan"
ASAN_OPTIONS="halt_on_error=1 exitcode=67 detect_leaks=1 detect_stack_use_after_return=1" \
  UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1 exitcode=68" "$scratch/selftest-asan"
took
echo "check_native: all clean"
