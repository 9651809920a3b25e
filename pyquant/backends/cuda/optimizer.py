"""The CUDA library's fused optimizer steps (csrc/cuda): one launch per parameter group.

Adam (`adam_step`, csrc/cuda/adam.cu), the one-state rules (`one_state_step`, csrc/cuda/one_state.cu: momentum,
Lion, RMSprop, Adagrad), AdEMAMix (`ademamix_step`, csrc/cuda/ademamix.cu), Adam with 4-bit states (`adam4bit_step`,
csrc/cuda/adam4bit.cu) and the norm passes of LAMB and LARS (`lamb_norms`, `lars_norms`, csrc/cuda/trust_ratio.cu) take the same arguments as the cpu backend's kernels and check
them with the same functions."""

from __future__ import annotations

import ctypes

import torch

from pyquant._contract import DTYPE_CODES, FOURBIT_BLOCK, OPTIMIZER_BLOCK, blocks_of
from pyquant.backends import kernel
from pyquant.backends.capi import (
    AdamConstants, AdamTensor, AdemamixConstants, AdemamixTensor, OneStateConstants, OneStateTensor,
    check_adam4bit_operands, check_adam_operands, check_ademamix_operands, check_lars_norms_operands,
    check_one_state_operands, describe_adam4bit,
)
from pyquant.backends.code_tables import cached_code_table
from pyquant.backends.cuda.launch import check, library, stream
from pyquant.backends.reference.optimizer import sum_of_block_sums

ptr = torch.Tensor.data_ptr


def launch_group(op: str, descriptor: type, constants_type: type, columns: tuple, constants, launch) -> torch.Tensor:
    """Describe a group's tensors to the device and launch its kernel once.

    `columns` holds one list of tensors per pointer field of `descriptor` (AdamTensor, OneStateTensor), in the
    field order: the parameters, the gradients, the first state, ... . `launch(descriptors, first_block, count,
    total_blocks, bad, stream)` calls the entry point with the device addresses. Returns the number of non-finite
    gradient elements skipped, as a 0-dim int64 tensor on the parameters' device (not synchronised: read it only
    when needed)."""
    params, grads = columns[:2]
    state1 = columns[2] if len(columns) > 2 else [params[0].new_empty(0)] * len(params)  # LARS' norms: no states
    count = len(params)
    if count == 0:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    pointer_names = [name for name, _ in descriptor._fields_[: len(columns)]]
    descriptors = (descriptor * count)()
    first_block = (ctypes.c_int64 * count)()
    total_blocks = 0
    for i, (d, row, *tensors) in enumerate(zip(descriptors, constants.tolist(), *columns)):
        for name, t in zip(pointer_names, tensors):
            setattr(d, name, ptr(t))
        d.numel = params[i].numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[params[i].dtype], DTYPE_CODES[grads[i].dtype]
        d.state_bits = 8 if state1[i].dtype == torch.uint8 else 32
        d.k = constants_type(*row)
        first_block[i] = total_blocks
        total_blocks += blocks_of(d.numel, OPTIMIZER_BLOCK)
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
    with torch.cuda.device(device):
        error = launch(ptr(on_device), ptr(on_device) + offset, count, total_blocks, ptr(bad), stream(device))
    check(error, op)
    return bad


@kernel("adam_step", "cuda")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    lib = library()
    columns = (params, grads, state1, state2, absmax1, absmax2)

    def launch(descriptors, first_block, count, total_blocks, bad, on_stream):
        table1, table2 = cached_code_table(code1), cached_code_table(code2)
        return lib.pq_cuda_adam_step(
            descriptors, first_block, count, total_blocks,
            ptr(code1), ptr(code2), ptr(table1), ptr(table2), nonfinite, bad, on_stream,
        )

    return launch_group("adam_step", AdamTensor, AdamConstants, columns, constants, launch)


@kernel("one_state_step", "cuda")
def one_state_step(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    check_one_state_operands(params, grads, state1, absmax1, constants, code1, rule, nonfinite)
    lib = library()

    def launch(descriptors, first_block, count, total_blocks, bad, on_stream):
        table1 = cached_code_table(code1)
        return lib.pq_cuda_one_state_step(
            descriptors, first_block, count, total_blocks, ptr(code1), ptr(table1), rule, nonfinite, bad, on_stream,
        )

    columns = (params, grads, state1, absmax1)
    return launch_group("one_state_step", OneStateTensor, OneStateConstants, columns, constants, launch)


@kernel("ademamix_step", "cuda")
def ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_ademamix_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    lib = library()

    def launch(descriptors, first_block, count, total_blocks, bad, on_stream):
        table1, table2 = cached_code_table(code1), cached_code_table(code2)
        return lib.pq_cuda_ademamix_step(
            descriptors, first_block, count, total_blocks,
            ptr(code1), ptr(code2), ptr(table1), ptr(table2), nonfinite, bad, on_stream,
        )

    columns = (params, grads, state1, state2, absmax1, absmax2)
    return launch_group("ademamix_step", AdemamixTensor, AdemamixConstants, columns, constants, launch)


@kernel("adam4bit_step", "cuda")
def adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    """Two launches (pass 1: the rank-1 tensors' new maxima; pass 2: the step), then the new maxima copied into
    the rank-1 tensors' absmax2 (csrc/cuda/adam4bit.cu)."""
    check_adam4bit_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite)
    count = len(params)
    if count == 0:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    descriptors = describe_adam4bit(params, grads, state1, state2, absmax1, absmax2, constants, rank1)
    first_block, maxima_offset, total_blocks, total_maxima = [], [], 0, 0
    for p, r in zip(params, rank1):
        first_block.append(total_blocks)
        maxima_offset.append(total_maxima)
        total_blocks += blocks_of(p.numel(), FOURBIT_BLOCK)
        total_maxima += sum(p.shape) if r else 0
    bad = torch.zeros((), dtype=torch.int64, device=device)
    if total_blocks == 0:
        return bad
    offset = -(-ctypes.sizeof(descriptors) // 8) * 8
    host = bytearray(offset + 16 * count)
    host[:offset] = bytes(descriptors)
    host[offset:] = bytes((ctypes.c_int64 * (2 * count))(*first_block, *maxima_offset))
    on_device = torch.frombuffer(host, dtype=torch.uint8).to(device)
    new_maxima = torch.zeros(max(total_maxima, 1), dtype=torch.float32, device=device)
    lib = library()
    with torch.cuda.device(device):
        for step_pass in ((1, 2) if total_maxima else (2,)):
            error = lib.pq_cuda_adam4bit_step(
                ptr(on_device), ptr(on_device) + offset, count, total_blocks, ptr(code1), ptr(code2), ptr(new_maxima),
                ptr(on_device) + offset + 8 * count, step_pass, nonfinite, ptr(bad), stream(device))
            check(error, "adam4bit_step")
    for a2, r, start, p in zip(absmax2, rank1, maxima_offset, params):
        if r:
            a2.copy_(new_maxima[start:start + sum(p.shape)])
    return bad


# ---- LAMB's and LARS' norm passes (csrc/cuda/trust_ratio.cu): block sums on the device, then each tensor's sum in
# the fixed order of every backend (reference sum_of_block_sums) ----
def _tensor_sums(params, block_sums: torch.Tensor) -> torch.Tensor:
    sums, first = [], 0
    for p in params:
        blocks = blocks_of(p.numel(), OPTIMIZER_BLOCK)
        sums.append(sum_of_block_sums(block_sums[first:first + blocks]))
        first += blocks
    return torch.stack(sums)


def _block_sums_buffer(params) -> torch.Tensor:
    total = sum(blocks_of(p.numel(), OPTIMIZER_BLOCK) for p in params)
    return torch.zeros((total, 2), dtype=torch.float64, device=params[0].device)


@kernel("lamb_norms", "cuda")
def lamb_norms(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    lib, block_sums = library(), _block_sums_buffer(params)

    def launch(descriptors, first_block, count, total_blocks, _bad, on_stream):
        return lib.pq_cuda_lamb_norms(descriptors, first_block, count, total_blocks, ptr(code1), ptr(code2), nonfinite,
                                      ptr(block_sums), on_stream)

    columns = (params, grads, state1, state2, absmax1, absmax2)
    launch_group("lamb_norms", AdamTensor, AdamConstants, columns, constants, launch)
    return _tensor_sums(params, block_sums)


@kernel("lars_norms", "cuda")
def lars_norms(params, grads, constants, nonfinite):
    check_lars_norms_operands(params, grads, constants, nonfinite)
    lib, block_sums = library(), _block_sums_buffer(params)

    def launch(descriptors, first_block, count, total_blocks, _bad, on_stream):
        return lib.pq_cuda_lars_norms(descriptors, first_block, count, total_blocks, nonfinite, ptr(block_sums),
                                      on_stream)

    launch_group("lars_norms", OneStateTensor, OneStateConstants, (params, grads), constants, launch)
    return _tensor_sums(params, block_sums)
