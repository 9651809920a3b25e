"""pyquant's Triton kernels, importable as `pyquant.kernels` (and only so).

One module per op family: blockwise (quantise, dequantise, code tables), adam (the fused multi-tensor step),
one_state (the step of Lion, momentum, RMSprop, Adagrad, with adam's launch helpers), ademamix, trust_ratio (the norm
passes of LAMB's and LARS' trust ratios),
amp (unscale-and-check), matmul, lowrank_conv. Each holds the `@triton.jit` kernels and the host function
that launches them; pyquant.backends.triton registers those host functions as the "triton" backend.
Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported). Numerics: docs/numerics.md, per element as csrc/include/pyquant/blockwise.h.
"""
