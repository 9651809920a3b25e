"""The Triton fused optimizer steps (pyquant.kernels.adam, pyquant.kernels.one_state, pyquant.kernels.ademamix) as the
"triton" backend."""

from __future__ import annotations

from pyquant.backends import kernel
from pyquant.backends.reference import optimizer as reference_optimizer
from pyquant.backends.capi import check_ademamix_operands, check_one_state_operands
from pyquant.backends.code_tables import cached_code_table
from pyquant.kernels import adam, ademamix, one_state


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


# LAMB's and LARS' norm passes: the reference backend's torch code, run on the device (no triton kernel of their own
# yet). Its square root is torch's on the device, IEEE on a GPU as the triton steps' own; its sums are in the C++
# library's fixed order, so the ratios are the same for any launch configuration.
kernel("lamb_norms", "triton")(reference_optimizer.lamb_norms)
kernel("lars_norms", "triton")(reference_optimizer.lars_norms)
