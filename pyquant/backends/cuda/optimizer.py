"""The CUDA library's fused optimizer step (csrc/cuda): one launch per parameter group."""

from __future__ import annotations

import ctypes

import torch

from pyquant._contract import DTYPE_CODES, OPTIMIZER_BLOCK, blocks_of
from pyquant.backends import kernel
from pyquant.backends.capi import AdamConstants, AdamTensor, check_adam_operands
from pyquant.backends.code_tables import cached_code_table
from pyquant.backends.cuda.launch import check, library, stream

ptr = torch.Tensor.data_ptr


@kernel("adam_step", "cuda")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    """One launch for the group; returns the number of non-finite gradient elements skipped, as a 0-dim
    int64 tensor on the parameters' device (not synchronised: read it only when needed)."""
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    lib = library()
    count = len(params)
    if count == 0:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    descriptors = (AdamTensor * count)()
    first_block = (ctypes.c_int64 * count)()
    rows = constants.tolist()
    total_blocks = 0
    for i, (d, p, g, s1, s2, a1, a2, row) in enumerate(
        zip(descriptors, params, grads, state1, state2, absmax1, absmax2, rows)
    ):
        d.param, d.grad, d.state1, d.state2 = ptr(p), ptr(g), ptr(s1), ptr(s2)
        d.absmax1, d.absmax2 = ptr(a1), ptr(a2)
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        d.k = AdamConstants(*row)
        first_block[i] = total_blocks
        total_blocks += blocks_of(p.numel(), OPTIMIZER_BLOCK)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    if total_blocks == 0:
        return bad
    # One host-to-device copy for both arrays: the descriptors, then (8-byte aligned) the int64 first-block
    # indices. torch's allocator aligns `on_device` far beyond the descriptors' 8 bytes.
    offset = -(-ctypes.sizeof(descriptors) // 8) * 8
    host = bytearray(offset + ctypes.sizeof(first_block))
    host[:offset] = bytes(descriptors)
    host[offset:] = bytes(first_block)
    on_device = torch.frombuffer(host, dtype=torch.uint8).to(device)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    with torch.cuda.device(device):
        error = lib.pq_cuda_adam_step(
            ptr(on_device), ptr(on_device) + offset, count, total_blocks,
            ptr(code1), ptr(code2), ptr(table1), ptr(table2), nonfinite, ptr(bad), stream(device),
        )
    check(error, "adam_step")
    return bad
