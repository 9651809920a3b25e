#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that the GPU machine lacks: it has no network, Python 3.12 and
# its own torch, so these are cp312 manylinux x86-64 wheels fetched without their dependencies (which are
# there already). Run from anywhere on a machine with the package index; bench/gpu/check.sh installs them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="$root/.whl"
mkdir -p "$dest"
# pip matches each manylinux tag exactly, so name every glibc level a wheel of these packages is published for.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" bitsandbytes==0.50.2 nvtx pydicom
ls -l "$dest"
du -sh "$dest"
