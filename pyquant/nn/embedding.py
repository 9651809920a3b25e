"""`StableEmbedding`: a drop-in for bitsandbytes.nn.StableEmbedding (0.50.2).

An nn.Embedding with Xavier-uniform initialisation, a LayerNorm after the lookup (computed in torch's default
dtype, the result cast back to the weight's dtype), and its weight's optimizer states kept in float32 by every
pyquant 8-bit optimizer (`pyquant.optim.override(weight, optim_bits=32)`), as bitsandbytes' does through its
GlobalOptimManager. Same constructor, defaults, random-number use and outputs as bitsandbytes', with one fix:
`device` and `dtype` mean what they mean for nn.Embedding (bitsandbytes 0.50.2 passes them into the wrong
arguments: its `device="cpu"` gives a frozen weight, and any `dtype` raises a TypeError).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyquant.optim.overrides import ATTRIBUTE, override

__all__ = ["StableEmbedding"]


class StableEmbedding(torch.nn.Embedding):
    """An embedding followed by a LayerNorm, with float32 optimizer states for its weight (bitsandbytes' design for
    stable training with 8-bit optimizers). Arguments are torch.nn.Embedding's.

    The LayerNorm is made on `device` in the default dtype whatever `dtype` is, and the forward pass normalises in
    the default dtype, as bitsandbytes' does."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Tensor | None = None, device=None, dtype=None) -> None:
        # By keyword: bitsandbytes 0.50.2 passes device and dtype positionally into nn.Embedding's `_freeze` and
        # `device` slots, so its device="cpu" freezes the weight and any dtype raises a TypeError.
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
                         _weight, device=device, dtype=dtype)
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)

    # The override is an attribute of the weight tensor (pyquant/optim/overrides.py says why), so it is set again
    # wherever torch may put a new Parameter object in its place: an assignment (including
    # load_state_dict(assign=True)), a conversion that does not keep the object (_apply: meta -> device, swapped
    # tensors), and copy.deepcopy / unpickling (__setstate__). bitsandbytes looks the module's weight up at the
    # optimizer's first step instead.
    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "weight":
            self._mark_weight()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._mark_weight()
        return result

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._mark_weight()

    def _mark_weight(self) -> None:
        weight = self._parameters.get("weight")
        if weight is not None and (getattr(weight, ATTRIBUTE, None) or {}).get("optim_bits") != 32:
            override(weight, optim_bits=32)

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def _fill_padding_idx_with_zero(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def forward(self, input: Tensor) -> Tensor:
        emb = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        # the LayerNorm in the default dtype (bitsandbytes: "always apply layer norm in full precision")
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)
