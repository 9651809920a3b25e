"""Low-rank layers: a convolution (or linear map) factorised through `rank` channels.

- `LowRankConv2d(in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1, bias=True)`:
  a k x k convolution into `rank` channels followed by a 1 x 1 convolution to `out_channels`, run as one
  fused op (`pyquant.ops.lowrank_conv2d`): the rank-channel intermediate is not written to memory at
  inference. Parameters `weight_first` [rank, in, kh, kw], `weight_second` [out, rank, 1, 1] (the shapes
  of the two nn.Conv2d weights of the unfused pair) and `bias` [out].
- `LowRankLinear(in_features, out_features, rank, bias=True)`: `weight_first` [rank, in] then
  `weight_second` [out, rank], `bias` [out]; two matrix products (nothing to fuse: torch's are fine).

Both have `from_conv` / `from_linear` (truncated SVD, exact up to float error when the weight's rank is at
most `rank`), `dense_weight()` (the product of the factors), and `to_dense()` / `to_sequential()` to get
plain torch modules back. State dicts hold plain tensors only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyquant.ops.lowrank_conv import int_pair, lowrank_conv2d, resolve_padding
from pyquant.ops.lowrank_eager import eager_inference

__all__ = ["LowRankConv2d", "LowRankLinear", "svd_factors", "max_rank"]


def max_rank(weight: torch.Tensor) -> int:
    """The largest useful rank of a conv or linear weight: min(out, in * kh * kw)."""
    return min(weight.shape[0], math.prod(weight.shape[1:]))


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a 2-D `matrix` [m, n] in float64: (first [rank, n], second [m, rank], singular values).

    first = sqrt(S) V^T and second = U sqrt(S) (the singular values split evenly between the factors, so
    neither is badly scaled for half precision or fine-tuning); second @ first is the best rank-`rank`
    approximation of `matrix` in the Frobenius norm (Eckart-Young). All singular values are returned.
    """
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :], s


def _check_rank(rank, limit: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if rank < 1 or rank > limit:
        raise ValueError(f"rank must be in [1, {limit}] for {what}, got {rank}")
    return rank


class LowRankConv2d(nn.Module):
    """conv2d(x, weight_first; stride, padding, dilation) into `rank` channels, then a 1 x 1 conv to
    `out_channels` (+ bias), fused. Input [N, in, H, W] or [in, H, W]; float32, float16, bfloat16
    (float32 accumulation, one rounding) or float64 (reference math)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride = int_pair(stride, "stride", 1)
        self.dilation = int_pair(dilation, "dilation", 1)
        self.padding = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.rank = _check_rank(rank, in_channels * self.kernel_size[0] * self.kernel_size[1], "this convolution")
        factory = {"device": device, "dtype": dtype}
        self.weight_first = nn.Parameter(torch.empty((rank, in_channels, *self.kernel_size), **factory))
        self.weight_second = nn.Parameter(torch.empty((out_channels, rank, 1, 1), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._eager_plan = None  # pyquant.ops.lowrank_eager.EagerPlan of the last eager CPU inference call
        # Opt-in for inference: keep the kernel's packed weights between calls until a weight's version counter
        # moves (3-8% of a call). Off by default: writes through .data, numpy or DLPack views do not move it,
        # and the layer would compute with stale weights until reset_eager_plan().
        self.cache_packed_weights = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As two nn.Conv2d layers would be initialised; the bias as the dense conv's (fan_in = in * kh * kw).
        nn.init.kaiming_uniform_(self.weight_first, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.weight_second, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager CPU inference calls the kernel through a plan checked once per input shape and weights, with
        # the weights packed once per change (EagerPlan); everything else takes the general path. The
        # parameters are read from _parameters and the plan stored in __dict__: nn.Module's attribute hooks
        # cost 2 us a call, 5% of a small layer (pruned or parametrized weights are not there: general path).
        params = self._parameters
        w1, w2, bias = params.get("weight_first"), params.get("weight_second"), params.get("bias")
        if w1 is not None and w2 is not None and (bias is not None or self.bias is None):
            plan = self._eager_plan
            y, new_plan = eager_inference(plan, x, w1, w2, bias, self.stride, self.padding, self.dilation,
                                          self.cache_packed_weights)
            if new_plan is not plan:
                self.__dict__["_eager_plan"] = new_plan
            if y is not None:
                return y
        return lowrank_conv2d(
            x, self.weight_first, self.weight_second, self.bias, self.stride, self.padding, self.dilation
        )

    def reset_eager_plan(self) -> None:
        """Forget the packed weights of eager inference: with `cache_packed_weights`, needed after writing the
        weights in a way that bypasses PyTorch's version counter (through `.data`, a numpy or DLPack view);
        in-place torch operations on the parameters, optimizer steps, `load_state_dict` and `.to()` are seen."""
        self._eager_plan = None

    def _apply(self, fn, recurse=True):
        self._eager_plan = None  # .to() / .half() / .cuda(): new tensors; drop the plan's hold on the old ones
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_eager_plan": None}  # ctypes arguments do not pickle; the plan is rebuilt on use

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense conv weight [out, in, kh, kw] (the product of the factors, in float64 then
        cast to the parameters' dtype)."""
        first = self.weight_first.to(torch.float64).reshape(self.rank, -1)
        second = self.weight_second.to(torch.float64).reshape(self.out_channels, self.rank)
        return (second @ first).reshape(self.out_channels, self.in_channels, *self.kernel_size).to(self.weight_first.dtype)

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d computing the same function (one conv with the product weight)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=self.bias is not None, device=self.weight_first.device, dtype=self.weight_first.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_sequential(self) -> nn.Sequential:
        """The unfused pair as two nn.Conv2d layers (same parameters, copied)."""
        factory = {"device": self.weight_first.device, "dtype": self.weight_first.dtype}
        first = nn.Conv2d(self.in_channels, self.rank, self.kernel_size, self.stride, self.padding, self.dilation,
                          bias=False, **factory)
        second = nn.Conv2d(self.rank, self.out_channels, 1, bias=self.bias is not None, **factory)
        with torch.no_grad():
            first.weight.copy_(self.weight_first)
            second.weight.copy_(self.weight_second)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return nn.Sequential(first, second)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """Factorise `conv` by truncated SVD of its weight reshaped [out, in * kh * kw] (Denton et al. 2014).

        Exact up to float error when that matrix has rank <= `rank`; otherwise the best rank-`rank`
        approximation in the Frobenius norm. Only ordinary convolutions: groups=1, padding_mode='zeros',
        symmetric padding; `rank` in [1, min(out, in * kh * kw)].
        """
        if not isinstance(conv, nn.Conv2d) or type(conv).__name__ == "LazyConv2d":
            raise TypeError(f"from_conv needs a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"cannot factorise a grouped convolution (groups={conv.groups})")
        if conv.padding_mode != "zeros":
            raise ValueError(f"cannot factorise a convolution with padding_mode={conv.padding_mode!r} (only 'zeros')")
        if getattr(conv, "transposed", False):
            raise ValueError("cannot factorise a transposed convolution")
        w = conv.weight
        rank = _check_rank(rank, max_rank(w), f"a weight of shape {tuple(w.shape)}")
        padding = resolve_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))
        layer = cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), rank, conv.stride, padding, conv.dilation,
            bias=conv.bias is not None, device=w.device, dtype=w.dtype,
        )
        first, second, _ = svd_factors(w.reshape(w.shape[0], -1), rank)
        with torch.no_grad():
            layer.weight_first.copy_(first.reshape(layer.weight_first.shape))
            layer.weight_second.copy_(second.reshape(layer.weight_second.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s


class LowRankLinear(nn.Module):
    """x @ weight_first.T @ weight_second.T + bias: a linear map through `rank` features."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rank = _check_rank(rank, in_features, "this linear layer")
        factory = {"device": device, "dtype": dtype}
        self.weight_first = nn.Parameter(torch.empty((rank, in_features), **factory))
        self.weight_second = nn.Parameter(torch.empty((out_features, rank), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_first, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.weight_second, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_first), self.weight_second, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return (self.weight_second.to(torch.float64) @ self.weight_first.to(torch.float64)).to(self.weight_first.dtype)

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight_first.device, dtype=self.weight_first.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """Truncated SVD of `linear.weight`; exact up to float error when its rank is <= `rank`."""
        if not isinstance(linear, nn.Linear) or type(linear).__name__ == "LazyLinear":
            raise TypeError(f"from_linear needs a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        rank = _check_rank(rank, max_rank(w), f"a weight of shape {tuple(w.shape)}")
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        first, second, _ = svd_factors(w, rank)
        with torch.no_grad():
            layer.weight_first.copy_(first)
            layer.weight_second.copy_(second)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
