#!/usr/bin/env bash
# Compile-only check of the CUDA library's sources (csrc/cuda/*.cu), for machines without a GPU.
#
# Builds an object of each source for each architecture in PYQUANT_CUDA_ARCHS (default "80 90", the archs of
# CMakeLists.txt) with the numerics flags of the real build (-O3 --fmad=false and nvcc's IEEE defaults
# -prec-div=true -prec-sqrt=true -ftz=false, which are deliberately not repeated here so that the check sees
# what CMake's flags give), with warnings as errors, and then checks the generated PTX for the numerics
# contract (docs/numerics.md):
#   - no approximate instruction (div.approx, div.full, rcp.approx, sqrt.approx, rsqrt.approx, ex2/lg2/sin/cos.approx):
#     float32 `/`, 1/x and sqrtf must be the correctly rounded div.rn / rcp.rn / sqrt.rn;
#   - no flush-to-zero (.ftz): subnormals are kept;
#   - no float32 add/sub/mul without an explicit rounding mode (ptxas may fuse those into an fma), and no mad.f32:
#     the only fused multiply-adds are the fma.rn.f32 of the explicit fmaf() calls in blockwise.h.
# (ptxas later expands div.rn/sqrt.rn into MUFU seeds plus refinement; that expansion is exact, so the
# PTX is the level where an approximation would be chosen and the level this script inspects.)
#
# PYQUANT_NVCC_EXTRA_FLAGS adds nvcc flags last (the tests use it to show that --use_fast_math is caught).
# Without nvcc it prints a notice and succeeds. Run from anywhere: paths are relative to the repository root.
set -euo pipefail

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA compile check"
  exit 0
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sources=("$root"/csrc/cuda/*.cu)
archs="${PYQUANT_CUDA_ARCHS:-80 90}"
# Extra nvcc flags, appended last (tests use this to prove that the PTX checks catch e.g. --use_fast_math).
read -r -a extra_flags <<<"${PYQUANT_NVCC_EXTRA_FLAGS:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

gencode=()
for arch in $archs; do
  gencode+=(-gencode "arch=compute_${arch},code=[sm_${arch},compute_${arch}]")
done

echo "nvcc: $(nvcc --version | tail -n 1)"
echo "compiling ${sources[*]#"$root/"} for sm_${archs// /, sm_}"
start_ns=$(date +%s%N)
# One nvcc per source, all at once (the check's time is the slowest file's, not the sum).
pids=()
for src in "${sources[@]}"; do
  nvcc -c "$src" -o "$tmp/$(basename "$src" .cu).o" \
    -I "$root/csrc/include" \
    -std=c++17 -O3 --fmad=false \
    "${gencode[@]}" \
    -Werror all-warnings \
    -Xcompiler -Wall,-Wextra,-Werror \
    -Xptxas -warn-spills,-warn-lmem-usage \
    --keep --keep-dir "$tmp" \
    ${extra_flags[@]+"${extra_flags[@]}"} &
  pids+=("$!")
done
compiled=0
for pid in "${pids[@]}"; do wait "$pid" || compiled=1; done
if [ "$compiled" -ne 0 ]; then
  echo "error: nvcc failed" >&2
  exit 1
fi
elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
printf 'compiled in %d.%03d s\n' $((elapsed_ms / 1000)) $((elapsed_ms % 1000))

shopt -s nullglob
ptx_files=("$tmp"/*.ptx)
if [ "${#ptx_files[@]}" -eq 0 ]; then
  echo "error: nvcc produced no PTX to inspect" >&2
  exit 1
fi

status=0
check_absent() {  # check_absent <regex> <what>
  local hits
  hits="$(grep -nE "$1" "${ptx_files[@]}" || true)"
  if [ -n "$hits" ]; then
    echo "error: the PTX contains $2:" >&2
    echo "$hits" | sed -n 1,20p >&2  # sed reads all of it: head exiting early made echo die of SIGPIPE (set -o pipefail)
    status=1
  fi
}
check_absent '\.approx' "approximate instructions"
check_absent '\bdiv\.full\.' "approximate division (div.full)"
check_absent '\.ftz\b' "flush-to-zero instructions"
check_absent '\b(add|sub|mul)\.f32\b' "float32 add/sub/mul without a rounding mode (contractible into fma)"
check_absent '\bmad\.[a-z.]*f32\b' "mad.f32 (a contracted multiply-add)"

for ptx in "${ptx_files[@]}"; do
  echo "$(basename "$ptx"): $(grep -cE '\b(div|rcp|sqrt)\.rn\.f32\b' "$ptx") correctly rounded div/rcp/sqrt," \
    "$(grep -cE '\bfma\.rn\.f32\b' "$ptx") fma.rn.f32 (the fmaf calls of blockwise.h)"
done

if [ "$status" -ne 0 ]; then
  echo "CUDA compile check FAILED: the PTX breaks the numerics contract" >&2
  exit "$status"
fi
echo "CUDA compile check passed: no approximate, flush-to-zero or contracted float32 instructions"
