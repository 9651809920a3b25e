"""Triton kernel of the fused low-rank convolution (pyquant.ops.lowrank_conv2d, the "triton" backend).

One program computes BLOCK_P output pixels of one image for every output channel:

1. the rank-R intermediate t[R_PAD, BLOCK_P] as an implicit GEMM over K = C * kh * kw: per step of
   BLOCK_K, the input values each (channel, tap) needs are gathered with zero padding computed from the
   indices (no im2col buffer), and `tl.dot(w1 block, x block)` accumulates in float32;
2. y[o, p] = bias[o] + (w2 @ t)[o, p] for BLOCK_O output channels at a time, from the same registers:
   the intermediate is never written to memory (unless KEEP, for the backward pass).

Operands are widened to float32 (exactly, with pyquant.kernels.blockwise.load_f32) and the dots run with
input_precision="ieee": no TF32 on a GPU, so float32 inputs keep float32 products; the output is rounded
once (store_f32: round to nearest even, also for bfloat16 under the interpreter). The order of the sums
differs from torch's convolutions and from the CPU kernel, hence the tolerances of docs/compress.md.
Tested under TRITON_INTERPRET=1 on small shapes (tests/test_lowrank.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant.kernels.blockwise import DTYPE_CODES, load_f32, storage_view, store_f32

BLOCK_P = 32  # output pixels per program
BLOCK_K = 32  # reduction steps (channel, tap) per dot
BLOCK_O = 32  # output channels per second-stage dot


@triton.jit
def _lowrank_conv_kernel(
    x_ptr, w1_ptr, w2_ptr, b_ptr, y_ptr, t_ptr,
    C, H, W, R, O, HO, WO,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, KEEP: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    npix = HO * WO
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < npix
    oh = p // WO
    ow = p % WO
    r = tl.arange(0, R_PAD)
    rmask = r < R
    K = C * KH * KW
    t = tl.zeros([R_PAD, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        c = kk // (KH * KW)
        tap = kk % (KH * KW)
        ih = oh[None, :] * SH - PH + (tap // KW)[:, None] * DH
        iw = ow[None, :] * SW - PW + (tap % KW)[:, None] * DW
        inside = kmask[:, None] & pmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = ((n * C + c[:, None]) * H + ih) * W + iw
        xv = load_f32(x_ptr, tl.where(inside, x_offs, 0), inside, DTYPE)  # [BLOCK_K, BLOCK_P]
        w_offs = r[:, None] * K + kk[None, :]
        wmask = rmask[:, None] & kmask[None, :]
        wv = load_f32(w1_ptr, tl.where(wmask, w_offs, 0), wmask, DTYPE)  # [R_PAD, BLOCK_K]
        t = tl.dot(wv, xv, acc=t, input_precision="ieee")
    if KEEP:
        t_offs = (n * R + r[:, None]) * npix + p[None, :]
        tmask = rmask[:, None] & pmask[None, :]
        store_f32(t_ptr, tl.where(tmask, t_offs, 0), t, tmask, DTYPE)
    for o0 in range(0, O, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        omask = o < O
        w2_offs = o[:, None] * R + r[None, :]
        w2mask = omask[:, None] & rmask[None, :]
        w2v = load_f32(w2_ptr, tl.where(w2mask, w2_offs, 0), w2mask, DTYPE)  # [BLOCK_O, R_PAD]
        y = tl.dot(w2v, t, input_precision="ieee")
        if HAS_BIAS:
            y += load_f32(b_ptr, tl.where(omask, o, 0), omask, DTYPE)[:, None]
        y_offs = (n * O + o[:, None]) * npix + p[None, :]
        ymask = omask[:, None] & pmask[None, :]
        store_f32(y_ptr, tl.where(ymask, y_offs, 0), y, ymask, DTYPE)


def lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    """(y, t or an empty tensor) for contiguous-able NCHW x, w1 [R, C, kh, kw], w2 [O, R], bias [O] or None."""
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    n, c, h, w = x.shape
    r, _, kh, kw = w1.shape
    o = w2.shape[0]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = torch.empty((n, o, ho, wo), dtype=x.dtype, device=x.device)
    t = torch.empty((n, r, ho, wo), dtype=x.dtype, device=x.device) if keep else x.new_empty(0)
    if y.numel() == 0:
        return y, t
    bias_arg = storage_view(bias.contiguous()) if bias is not None else storage_view(w2)
    grid = (triton.cdiv(ho * wo, BLOCK_P), n)
    _lowrank_conv_kernel[grid](
        storage_view(x), storage_view(w1), storage_view(w2), bias_arg, storage_view(y),
        storage_view(t) if keep else storage_view(y),
        c, h, w, r, o, ho, wo,
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        DTYPE=DTYPE_CODES[x.dtype], HAS_BIAS=bias is not None, KEEP=keep,
        R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, BLOCK_O=BLOCK_O,
        num_warps=4,
    )
    return y, t
