#!/bin/bash
# A CPU library for timing experiments on the SIMD 8-bit kernels, built in about a minute instead of the full
# build's 6-11 (blockwise.cpp, compiled once per instruction set, is most of it):
#
#     bench/fast_kernel_build.sh OUT.so ["-DFLAG ..."]
#
# It compiles csrc/ as it is now, with every dtype dispatch of blockwise.cpp cut to float32 (so the float16 and
# bfloat16 paths of its kernels are wrong in OUT.so: use it only with bench/compare_libs.py, whose tensors are
# float32). The first run compiles every object into $PQ_FAST_BUILD (default /tmp/pq-fast-build) from the commands of
# the regular build in build/cp311-cp311-linux_x86_64 (pip install -e . makes it); later runs recompile only the
# avx512vbmi build of blockwise.cpp (PQ_FAST_ISA=avx512 or avx2: that build's instead, to be timed with
# PYQUANT_CPU_ISA set to the same), with the extra flags given (e.g. -DSOME_VARIANT for a timing-only variant).
# Compare OUT.so against a fast build of the unchanged sources, not against the regular library.
set -euo pipefail
out=$(realpath -m "$1")
extra=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build/cp311-cp311-linux_x86_64
work=${PQ_FAST_BUILD:-/tmp/pq-fast-build}
rm -rf "$work/csrc" && mkdir -p "$work/obj" && cp -r "$root/csrc" "$work/csrc"
sed -i 's/with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>/with_value<PQ_DTYPE_FLOAT32>/g' \
  "$work/csrc/cpu/blockwise.cpp"
# The regular build's compile commands, reading $work/csrc and writing $work/obj (no dependency files).
(cd "$build" && ninja -t commands libpyquant_cpu.so) | grep -- ' -c ' |
  sed -E "s#$root/csrc#$work/csrc#g; s# -MD -MT [^ ]+ -MF [^ ]+##; s# -o CMakeFiles/([^ ]+)\.o# -o $work/obj/\1.o#" \
  > "$work/commands"
isa=${PQ_FAST_ISA:-avx512vbmi}
kernel="pq_cpu_$isa.dir/csrc/cpu/blockwise.cpp.o"
cd "$build"
if [ ! -f "$work/obj/pq_cpu_scalar.dir/csrc/cpu/blockwise.cpp.o" ]; then  # the first run: every other object
  grep -o -- "-o $work/obj/[^ ]*" "$work/commands" | cut -c4- | xargs -n1 dirname | sort -u | xargs mkdir -p
  grep -v "$kernel" "$work/commands" | xargs -P "$(nproc)" -I{} bash -c '{}'
fi
command=$(grep "$kernel" "$work/commands")
bash -c "${command/-DPQ_ISA=$isa/-DPQ_ISA=$isa $extra}"
g++ -shared -fPIC -O3 -fopenmp -o "$out" $(find "$work/obj" -name '*.o' | sort)
echo "$out"
