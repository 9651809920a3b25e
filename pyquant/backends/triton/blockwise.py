"""The Triton block-wise quantisation kernels (pyquant.kernels.blockwise) as the "triton" backend."""

from __future__ import annotations

import torch

from pyquant.backends import kernel
from pyquant.backends.code_tables import cached_code_table
from pyquant.kernels import blockwise

kernel("code_table", "triton")(blockwise.code_table)  # a Triton binary search per bin
kernel("dequantize_blockwise", "triton")(blockwise.dequantize_blockwise)


@kernel("quantize_blockwise", "triton")
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    return blockwise.quantize_blockwise(x, cached_code_table(code), blocksize)
