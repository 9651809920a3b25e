#!/usr/bin/env bash
# The fuzz test of the C entry points and the optimizer tests against a CPU library built with AddressSanitizer.
#
# Builds csrc/ with -fsanitize=address into build/asan (ignored by git; the installed library is untouched),
# then runs pytest with that library (PYQUANT_LIB_DIR) and the ASan runtime preloaded into Python, which is not
# built with it: the tests on the AVX2 kernels, then the fuzzer on the scalar ones. Leak checking is off:
# Python and torch keep memory until exit on purpose. An out-of-bounds read or write aborts the process with
# ASan's report, and the test fails. Extra arguments go to pytest (default: tests/test_safety.py
# tests/test_optim.py). Needs the venv of README's test command. Takes 20-30 minutes on two cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="$root/build/asan"
flags="-fsanitize=address -fno-omit-frame-pointer -g"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address" >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
# libstdc++ after the runtime: triton's extension throws C++ exceptions, which ASan's __cxa_throw interceptor
# cannot forward unless libstdc++ is loaded before it is looked up ("real___cxa_throw != 0" CHECK failure).
runtime="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
[ "$#" -gt 0 ] || set -- tests/test_safety.py tests/test_optim.py
export PYQUANT_LIB_DIR="$build" LD_PRELOAD="$runtime" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
# AVX2 and scalar kernels: ASan instruments their loads and stores, not all of the AVX-512 kernels' masked ones
# (a write past a tensor in the AVX-512 Adam kernel went unreported; the same write in the others is caught).
PYQUANT_CPU_ISA=avx2 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
PYQUANT_CPU_ISA=scalar .venv/bin/python tests/fuzz_native.py 300
