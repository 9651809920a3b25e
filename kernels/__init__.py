"""The triton backend: Triton kernels for block-wise quantisation and the fused Adam step.

Installed as `pyquant.kernels` (import it by that name). `OPS` has the keys and signatures of pyquant._cpu.OPS.
The kernels take their code tables from `pyquant.functional.cached_code_table`, which builds them with
this backend's "code_table" (a Triton binary search per bin) when it is the selected one.
Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported). Numerics: docs/numerics.md, per element as csrc/include/pyquant/blockwise.h.
Multi-tensor Adam: one launch per (param dtype, grad dtype) of a call, normally one per parameter group
(see pyquant.kernels.adam).
"""

from pyquant.kernels.adam import adam_step
from pyquant.kernels.blockwise import code_table, dequantize_blockwise, quantize_blockwise

OPS = {
    "code_table": code_table,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "adam_step": adam_step,
}
