"""Adam and AdamW with 4-bit states (Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023).

The paper's default configuration (its code, lpmm, configs/default.yml), the numerics in docs/numerics.md:
- first moment m: block-wise scales (max |m| over 128 elements), the signed 4-bit dynamic-exponent map;
- second moment v: rank-1 scales (per element, the smaller of its row's and its column's max; for tensors of more
  dimensions the min over every dimension of the max over that dimension's slice), the linear 4-bit map without
  zero, so that no stored v is 0 (the paper's zero-point problem: a v quantised to 0 makes m / sqrt(v) explode);
  1-D tensors, and `rank1=False` (torchao's variant), take block-wise scales for v too (an empty matrix, such as an
  FSDP2 rank's empty shard, keeps rank-1 maxima, left at 0);
- two codes per byte; nearest rounding, ties to the lower code.
About 1.03 bytes of state per parameter on a large matrix (scales included) against 8 for float32 Adam.

The update is lpmm's: p = p (1 - lr wd) - (lr / c1) m / (sqrt(v) / c2 + eps) with decoupled weight decay, for
Adam4bit (weight_decay 0 by default) and AdamW4bit (1e-2) alike, as pyquant's Adam8bit. Tensors below
`min_4bit_size` elements keep float32 m and v. Everything else (master weights, the non-finite policy, GradScaler's
fused unscale, overrides with optim_bits=32, state_dict, from_torch(..., into=AdamW4bit) / to_torch) is
Optimizer8bit's (pyquant/optim/_base.py). One library call per parameter group and device: op
`pyquant::adam4bit_step_`. Under FSDP2 each rank's shard keeps its own blocks and rank-1 maxima (its rows, and its
columns over its rows): no communication, and every element's scale at most the unsharded one (docs/distributed.md).
"""

from __future__ import annotations

import torch

from pyquant import functional as F
from pyquant._contract import FOURBIT_BLOCK, RANK1_MAX_DIMS, blocks_of
from pyquant.backends.reference.adam4bit import pack_nibbles, unpack_nibbles
from pyquant.distributed import is_sharded, local_tensor, quantize_moment
from pyquant.optim._base import QUANT_STATE_KEY, Optimizer8bit
from pyquant.optim.adam import Adam8bit

__all__ = ["Adam4bit", "AdamW4bit"]


class Adam4bit(Adam8bit):
    """Adam with 4-bit states (see the module docstring).

    Args:
        params, lr, betas, eps: as for torch.optim.Adam.
        weight_decay: decoupled weight decay (p *= 1 - lr * wd), as the paper's AdamW and pyquant's Adam8bit.
        rank1: rank-1 normalisation of the second moment of tensors with 2 to 8 dimensions (the paper's default);
            False: block-wise scales for both moments (torchao's AdamW4bit).
        block_size: the first moment's block, 128 (the kernels' fixed block; another value is refused).
        min_4bit_size: tensors with fewer elements keep float32 states (default 4096).
        master_weights, nonfinite: Optimizer8bit's (pyquant/optim/_base.py).
    """

    _default_weight_decay = 0.0

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | None = None, *, rank1: bool = True, block_size: int = FOURBIT_BLOCK,
                 min_4bit_size: int = 4096, master_weights: bool = False, nonfinite: str = "skip"):
        name = type(self).__name__
        if block_size != FOURBIT_BLOCK or isinstance(block_size, bool):
            raise ValueError(f"{name}: block_size must be {FOURBIT_BLOCK} (the 4-bit kernels' block), got {block_size!r}")
        if not isinstance(rank1, bool):
            raise TypeError(f"{name}: rank1 must be True or False, got {rank1!r}")
        self.rank1 = rank1
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size=min_4bit_size,
                         master_weights=master_weights, nonfinite=nonfinite)

    @property
    def min_4bit_size(self) -> int:
        return self.min_8bit_size  # the base's size rule, under this optimizer's name

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), rank1=self.rank1)

    # ---- state: packed codes, ceil(n / 2) bytes per moment ----
    def _codes_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._codes:
            self._codes[device] = tuple(F.create_4bit_map(signed).to(device) for signed in self._signed)
        return self._codes[device]

    def _rank1_for(self, p: torch.Tensor) -> bool:
        return self.rank1 and 2 <= p.dim() <= RANK1_MAX_DIMS

    @staticmethod
    def _scale_count(p: torch.Tensor, rank1: bool) -> int:
        return sum(p.shape) if rank1 else blocks_of(p.numel(), FOURBIT_BLOCK)

    def _init_state(self, p: torch.Tensor, options: dict | None = None) -> dict:
        if not self._uses_8bit(p, options):
            return super()._init_state(p, options)  # float32 states
        state = self.state[p]
        state["step"] = 0
        shard = local_tensor(p)  # under FSDP2 this rank's shard: its own blocks and rank-1 maxima (module docstring)
        if self._keeps_master(p):
            state["master"] = shard.detach().float().contiguous()
        rank1 = self._rank1_for(p)
        packed = (shard.numel() + 1) // 2
        state["state1"] = torch.zeros(packed, dtype=torch.uint8, device=p.device)
        state["state2"] = torch.zeros(packed, dtype=torch.uint8, device=p.device)
        state["qmap1"], state["qmap2"] = self._codes_on(p.device)
        state["absmax1"] = torch.zeros(blocks_of(shard.numel(), FOURBIT_BLOCK), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(self._scale_count(shard, rank1), dtype=torch.float32, device=p.device)
        state["rank1"] = rank1
        return state

    def _check_state(self, p: torch.Tensor) -> dict:
        state, shard = self.state[p], local_tensor(p)
        s1 = state["state1"]
        if s1.dtype != torch.uint8:
            return super()._check_state(p)
        expected = ((shard.numel() + 1) // 2,)
        master = state.get("master")
        if s1.shape == expected and s1.device == p.device and (master is None or master.shape == shard.shape):
            return state
        if s1.device != p.device:
            raise RuntimeError(
                f"{type(self).__name__}: state 'state1' of parameter {self._index_of(p)} is on {s1.device} but the "
                f"parameter is on {p.device}; the parameter moved after its first step (move the optimizer too: "
                "state_dict() then load_state_dict())")
        raise RuntimeError(
            f"{type(self).__name__}: the 4-bit states of parameter {self._index_of(p)} hold {2 * s1.numel()} codes "
            f"but the parameter has {shard.numel()} elements (shape {tuple(shard.shape)}); the parameter changed size "
            "after its first step")

    def _checked_state(self, p: torch.Tensor, saved: dict, index) -> dict:
        """Optimizer8bit's checks for float32 states and FSDP2 shards; for 4-bit ones, every size against p and
        the layout."""
        flat = dict(saved)
        flat.update(flat.pop(QUANT_STATE_KEY, {}))
        if is_sharded(p):  # float32 moments as DTensors, quantised for this rank's shard
            state = super()._checked_state(p, saved, index)
            if state["state1"].dtype == torch.uint8:
                state["rank1"] = self._rank1_for(p)
            return state
        if not isinstance(flat.get("state1"), torch.Tensor) or flat["state1"].dtype != torch.uint8:
            return super()._checked_state(p, saved, index)
        where = f"state of parameter {index} (shape {tuple(p.shape)}, {p.dtype})"
        step = flat.get("step")
        step = step.item() if isinstance(step, torch.Tensor) else step
        if step is None or float(step) != int(step) or int(step) < 0:
            raise ValueError(f"{where}: 'step' must be a non-negative integer, got {flat.get('step')!r}")
        rank1 = flat.get("rank1")
        if not isinstance(rank1, bool):
            raise ValueError(f"{where}: 'rank1' must be True or False (the second moment's layout), got {rank1!r}")
        if rank1 and not 2 <= p.dim() <= RANK1_MAX_DIMS:
            raise ValueError(f"{where}: rank-1 scales need a parameter of 2 to {RANK1_MAX_DIMS} dimensions")
        state = {"step": int(step), "rank1": rank1}
        packed = (p.numel() + 1) // 2
        for key in self._states:
            t = flat.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != (packed,):
                raise ValueError(f"{where}: {key} must be uint8 of shape ({packed},) (two 4-bit codes a byte), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            state[key] = t.to(p.device).contiguous()
        sizes = {"absmax1": blocks_of(p.numel(), FOURBIT_BLOCK), "absmax2": self._scale_count(p, rank1)}
        for i, (key, expected) in enumerate(zip(sizes, self._codes_on(p.device)), 1):
            t = flat.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != sizes[key]:
                raise ValueError(f"{where}: {key} must be float32 with {sizes[key]} entries, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} with {getattr(t, 'numel', lambda: '?')()}")
            state[key] = t.to(p.device).reshape(-1).contiguous()
            self._refuse_values(where, key, state[key], torch.isnan(state[key]) | (state[key] < 0), "NaN or negative")
            q = flat.get(f"qmap{i}")
            if q is not None and not torch.equal(q.to(p.device), expected):
                raise ValueError(f"{where}: qmap{i} is not the 4-bit map these states were quantised with")
            state[f"qmap{i}"] = expected
        master = flat.get("master")
        if master is not None:
            if not isinstance(master, torch.Tensor) or master.dtype != torch.float32 or master.shape != p.shape:
                raise ValueError(f"{where}: master must be a float32 tensor of shape {tuple(p.shape)}")
            if self._keeps_master(p):
                state["master"] = master.to(p.device).contiguous()
        return state

    # ---- conversion with torch.optim.Adam / AdamW (Optimizer8bit.load_torch_state_dict, torch_state_dict) ----
    def _states_from_float(self, p, values, quantized):
        if not quantized:
            return super()._states_from_float(p, values, quantized)
        rank1 = self._rank1_for(p)
        out = {"rank1": rank1}
        for i, (key, x, code, r) in enumerate(zip(self._states, values, self._codes_on(p.device), (False, rank1)), 1):
            out[key], out[f"absmax{i}"] = F.quantize_4bit_state(x, p.shape, r, code)
        return out

    def _states_to_float(self, p, s):
        if s["state1"].dtype != torch.uint8:
            return super()._states_to_float(p, s)
        layouts = (False, s["rank1"])
        return [F.dequantize_4bit_state(s[key], s[f"absmax{i}"], p.shape, r, s[f"qmap{i}"]).reshape(p.shape)
                for i, (key, r) in enumerate(zip(self._states, layouts), 1)]

    # ---- FSDP2: a shard's 4-bit moments as float32 and back (pyquant/distributed.py) ----
    def _dequantized_moment(self, shard, number, values, absmax, state):
        rank1 = number == 2 and state["rank1"]
        return F.dequantize_4bit_state(values, absmax, shard.shape, rank1, state[f"qmap{number}"]).reshape(shard.shape)

    def _quantized_moment(self, x, number):
        code = self._codes_on(x.device)[number - 1]
        if number == 2:
            # v's map ends at 1, so every maximum (of a block, a row, a column) is stored exactly as 1 * scale:
            # quantising a dequantised v finds the same scales again, and each element lands on its own code
            # (x / scale is within an ulp of it, far from a midpoint). Plain quantisation gives it back.
            return F.quantize_4bit_state(x, x.shape, self._rank1_for(x), code)
        # m's signed map has no -1: a block led by a negative value needs quantize_moment's search for its scale.
        def plain(rows):
            packed, absmax = F.quantize_4bit_state(rows, (rows.numel(),), False, code)
            return unpack_nibbles(packed, rows.numel()).to(torch.uint8), absmax

        codes, absmax = quantize_moment(x, code, FOURBIT_BLOCK, plain)
        return pack_nibbles(codes), absmax

    # ---- the step ----
    def _fused_step(self, group, items, stepped, grads, inv_grad_scale, policy):
        states, codes = self._operands(items, stepped[0].device)
        constants = self._constants(group, items, inv_grad_scale)
        rank1 = [bool(s.get("rank1", False)) for _, s in items]
        return F.adam4bit_step_multi_tensor(stepped, grads, *states, constants, *codes, rank1, policy)

    def _prepare_step(self, group, items, grads):
        states, codes = self._operands(items, grads[0].device)
        rank1 = [bool(s.get("rank1", False)) for _, s in items]
        return F.prepare_adam4bit_step([p for p, _ in items], grads, *states, self._constants(group, items, 1.0),
                                       *codes, rank1)


class AdamW4bit(Adam4bit):
    """AdamW with 4-bit states: Adam4bit with weight decay defaulting to 0.01 (the paper's and torch's)."""

    _default_weight_decay = 1e-2
    _to_torch_class = torch.optim.AdamW
