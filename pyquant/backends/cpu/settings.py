"""Switches of the cpu backend that change which instructions (and so which bits) its kernels use."""

from __future__ import annotations

from pyquant.backends.capi import cpu_library

_bf16_dot = True


def set_bf16_dot(enabled: bool) -> bool:
    """Let (True, the default) or forbid the cpu backend's kernels to use the AVX512-BF16 dot product for
    bfloat16 operands on CPUs that have it: pyquant::matmul, pyquant::im2col_matmul and the low-rank
    convolution alike. Returns the previous setting.

    Forbidden, every product is the float32 path (the same bits as on a CPU without the instruction); allowed,
    pairs of k are summed per instruction, about twice as fast (docs/low_precision.md, docs/compress.md)."""
    global _bf16_dot
    previous, _bf16_dot = _bf16_dot, bool(enabled)
    lib = cpu_library()
    if lib is not None:
        lib.pq_lowrank_set_bf16_dot(int(_bf16_dot))  # the low-rank kernel reads a library global
    return previous


def bf16_dot_flags() -> int:
    """The `flags` argument of pq_matmul / pq_matmul_im2col for the current setting (PQ_MATMUL_BF16_DOT)."""
    return int(_bf16_dot)
