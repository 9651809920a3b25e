"""The Triton fused Adam step (pyquant.kernels.adam) as the "triton" backend."""

from __future__ import annotations

from pyquant.backends import kernel
from pyquant.backends.code_tables import cached_code_table
from pyquant.kernels import adam


@kernel("adam_step", "triton")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    return adam.adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, table1, table2,
                          nonfinite)
