"""The Triton fused optimizer steps (pyquant.kernels.adam, pyquant.kernels.one_state, pyquant.kernels.ademamix,
pyquant.kernels.adam4bit) and the norm passes of LAMB and LARS (pyquant.kernels.trust_ratio) as the "triton" backend."""

from __future__ import annotations

import torch

from pyquant.backends import kernel
from pyquant.backends.capi import (
    check_adam4bit_operands, check_adam_operands, check_ademamix_operands, check_lars_norms_operands,
    check_one_state_operands,
)
from pyquant.backends.code_tables import cached_code_table
from pyquant.backends.reference.optimizer import sum_of_block_sums
from pyquant.kernels import adam, adam4bit, ademamix, one_state, trust_ratio


@kernel("adam_step", "triton")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    return adam.adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, table1, table2,
                          nonfinite)


@kernel("one_state_step", "triton")
def one_state_step(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    check_one_state_operands(params, grads, state1, absmax1, constants, code1, rule, nonfinite)
    return one_state.one_state_step(params, grads, state1, absmax1, constants, code1, cached_code_table(code1), rule,
                                    nonfinite)


@kernel("ademamix_step", "triton")
def ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_ademamix_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    return ademamix.ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2,
                                  cached_code_table(code1), cached_code_table(code2), nonfinite)


@kernel("adam4bit_step", "triton")
def adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    check_adam4bit_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite)
    return adam4bit.adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1,
                                  nonfinite)
# ---- LAMB's and LARS' norm passes (pyquant.kernels.trust_ratio): block sums on the device, then the tensors' sums in
# the fixed order of every backend (reference sum_of_block_sums) ----
def _tensor_sums(block_sums: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([sum_of_block_sums(b.view(-1, 2)) for b in block_sums])


@kernel("lamb_norms", "triton")
def lamb_norms(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    return _tensor_sums(trust_ratio.lamb_block_sums(params, grads, state1, state2, absmax1, absmax2, constants, code1,
                                                    code2, nonfinite))


@kernel("lars_norms", "triton")
def lars_norms(params, grads, constants, nonfinite):
    check_lars_norms_operands(params, grads, constants, nonfinite)
    return _tensor_sums(trust_ratio.lars_block_sums(params, grads, constants, nonfinite))
