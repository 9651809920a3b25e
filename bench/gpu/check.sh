#!/usr/bin/env bash
# pyquant's GPU validation and benchmark in one command (docs/gpu.md).
#
#   bash bench/gpu/check.sh            # on the GPU machine, from the repository root, with .whl/ beside it
#   bash bench/gpu/check.sh --smoke    # the same stages on a CPU-only machine: tiny sizes, Triton interpreted
#
# Stages, each under its own time limit (a stage that fails or times out is reported and the next one runs):
#   setup    install the wheels of .whl/ (bench/gpu/fetch_wheels.sh) into a target folder and build pyquant with
#            CUDA for this GPU against the torch that is here (--no-deps --no-build-isolation: never another torch);
#            with --smoke: compile-check the CUDA sources and use the pyquant already installed
#   tests    the gpu-marked tests and the Triton tests
#   env      versions, the GPU, which backends load
#   bits     CUDA = Triton = reference on the GPU; GPU against CPU; against bitsandbytes' kernels
#   bench    the 8-bit step, quantize, unscale, matmul, LowRankConv2d (CUDA events, medians)
#   profile  a torch.profiler trace of one training step, Nsight Compute metrics of the Adam kernel
#   study    the quick preset of the study on the GPU
# Output, in $OUT (default ./gpu-out): gpu_report.md, results.json, trace.json.gz, pytest.log, setup.log, ncu.txt.
# Exit status 0 when every stage passed, 1 otherwise.
# Environment: PYTHON (default python3), OUT, PYQUANT_GPU_CHECK_WORK (scratch folder, default a new temp dir),
# PYQUANT_GPU_CHECK_STAGES (the stages after setup to run, default all: "tests env bits bench profile study").
set -uo pipefail

smoke=""
if [ "${1:-}" = "--smoke" ]; then
  smoke="--smoke"
elif [ $# -gt 0 ]; then
  echo "usage: bash bench/gpu/check.sh [--smoke]" >&2
  exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="${PYQUANT_GPU_CHECK_WORK:-$(mktemp -d)}"
mkdir -p "$work"
: >"$work/stages.tsv"
export PYTHONUNBUFFERED=1
start_all=$(date +%s)

# run_stage NAME LIMIT_SECONDS COMMAND...: run it under `timeout`, log exit status and time, rebuild the report.
run_stage() {
  local name="$1" limit="$2" t0 code
  shift 2
  echo "=== stage $name (limit ${limit}s) ==="
  t0=$(date +%s%N)
  # `timeout` runs programs, not shell functions: the stage runs in a child bash that has them (export -f).
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@"
  code=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$((($(date +%s%N) - t0) / 1000000))" "$limit" >>"$work/stages.tsv"
  echo "=== stage $name: exit $code ==="
  report
}

report() {
  "$python" -P bench/gpu/check.py report --work "$work" --out "$out" $smoke || echo "report failed"
}

check_py() {  # check_py STAGE [ARGS...]
  local stage="$1"
  shift
  "$python" -P bench/gpu/check.py "$stage" --work "$work" --out "$out" $smoke "$@"
}

setup_gpu() {
  local site="$work/site"
  mkdir -p "$site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || return 1
  else
    echo "no wheels in .whl/ (run bench/gpu/fetch_wheels.sh where there is network): bitsandbytes will be missing"
  fi
  local arch
  arch="$("$python" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}{minor}")')" \
    || return 1
  echo "building pyquant with CUDA for sm_$arch against torch $("$python" -c 'import torch; print(torch.__version__)')"
  PYQUANT_CUDA=ON CMAKE_ARGS="-DPYQUANT_CUDA_ARCHS=$arch" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$python" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/wheel" . || return 1
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$work"/wheel/pyquant-*.whl || return 1
  PYTHONPATH="$site" "$python" -P -c 'import pyquant, pyquant.backends.capi as n; print("pyquant from", pyquant.__file__); assert n.cuda_library() is not None, "no CUDA library"'
}

setup_smoke() {
  PYQUANT_CUDA_ARCHS=90 bash .ci/compile_cuda.sh || return 1
  "$python" -P -c 'import pyquant; print("pyquant from", pyquant.__file__)'
}

tests() {
  local selection=(-m gpu tests)
  # The Triton tests of quantize/dequantize, the Adam step (what tests/test_triton.py held before the tests were
  # split by op family) and the one-state step; `-m triton tests` would add those of amp, matmul and lowrank.
  local triton=(-m triton tests/test_blockwise.py tests/test_optimizer_kernels.py tests/test_optim_family.py)
  if [ -n "$smoke" ]; then
    triton+=(-k "quantize and float32")  # the interpreter is slow: a sample keeps the script's wiring tested
  fi
  local parallel=()
  # Triton compiles each kernel specialisation on the CPU: spread the tests over processes where xdist is there.
  if [ -z "$smoke" ] && "$python" -c 'import xdist' 2>/dev/null; then
    parallel=(-n 8)
  fi
  selection+=("${parallel[@]}")
  triton+=("${parallel[@]}")
  local code=0
  { echo "--- pytest ${selection[*]}"; "$python" -P -m pytest -q -p no:cacheprovider -rfEs "${selection[@]}" 2>&1; } \
    | tee "$out/pytest.log" | tail -n 3 || code=1
  { echo "--- pytest ${triton[*]}"; "$python" -P -m pytest -q -p no:cacheprovider -rfEs "${triton[@]}" 2>&1; } \
    | tee -a "$out/pytest.log" | tail -n 3 || code=1
  check_py tests-summary || code=1
  return $code
}

export python work out smoke
export -f report check_py setup_gpu setup_smoke tests
if [ -n "$smoke" ]; then
  run_stage setup 240 setup_smoke 2>&1 | tee "$out/setup.log"
else
  # Set before setup fills it, so that the report after setup already finds pyquant there.
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  run_stage setup 180 setup_gpu 2>&1 | tee "$out/setup.log"
fi
stages=" ${PYQUANT_GPU_CHECK_STAGES:-tests env bits bench profile study} "
wanted() { [[ "$stages" == *" $1 "* ]]; }
wanted tests && run_stage tests 150 tests
wanted env && run_stage env 60 check_py env
wanted bits && run_stage bits 90 check_py bits
wanted bench && run_stage bench 100 check_py bench
wanted profile && run_stage profile 100 check_py profile
wanted study && run_stage study 110 check_py study --study-timeout 100
echo "all stages: $(($(date +%s) - start_all)) s; report: $out/gpu_report.md"
grep -E '^\| (setup|tests|env|bits|bench|profile|study) ' "$out/gpu_report.md"
# The exit status says whether every stage that ran passed (the report says which did not).
awk -F'\t' '$2 != 0 { failed = 1 } END { exit failed }' "$work/stages.tsv"
