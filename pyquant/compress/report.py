"""The report both compression methods return: `CompressionReport`, one `LayerReport` row per layer.

A row holds what was done to the layer, its parameters and FLOPs before and after, and the fields of the
method that made it (low rank: rank, retained energy, reconstruction error; pruning: neuron counts and the
saliency of the last removal), or why the layer was skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["CompressionReport", "LayerReport"]


@dataclass
class LayerReport:
    """One layer of a compression report. `action` is "factorised", "pruned" or "skipped" (see `reason`)."""

    name: str
    kind: str
    action: str
    params_before: int
    params_after: int
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    rank: Optional[int] = None  # lowrank: the chosen rank
    max_rank: Optional[int] = None  # lowrank: min(out, in * kh * kw)
    energy: Optional[float] = None  # lowrank: retained fraction of sum(sigma^2)
    rel_error: Optional[float] = None  # lowrank: ||W - W_r||_F / ||W||_F
    neurons_before: Optional[int] = None  # pruning
    neurons_after: Optional[int] = None
    saliency: Optional[float] = None  # pruning: saliency of the last neuron removed
    reason: Optional[str] = None  # why the layer was skipped


@dataclass
class CompressionReport:
    """Rows per layer, and the parameter count of the whole model before and after.

    For pruning, a row counts both layers it changes (the pruned layer and the next one), so consecutive
    rows share a layer; the model totals count every parameter once.
    """

    method: str
    rows: list[LayerReport] = field(default_factory=list)
    flops_unit: str = "per output position"
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def changed(self) -> list[LayerReport]:
        return [r for r in self.rows if r.action != "skipped"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.rows if r.action == "skipped"]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        head = ["layer", "kind", "action", "params", "FLOPs", "rank", "rel. error", "neurons", "note"]
        lines = [head]
        for r in self.rows:
            flops = "" if r.flops_before is None else f"{r.flops_before:,} -> {r.flops_after:,}"
            lines.append([
                r.name, r.kind, r.action, f"{r.params_before:,} -> {r.params_after:,}", flops,
                "" if r.rank is None else f"{r.rank}/{r.max_rank}",
                "" if r.rel_error is None else f"{r.rel_error:.3g}",
                "" if r.neurons_before is None else f"{r.neurons_before} -> {r.neurons_after}",
                r.reason or ("" if r.saliency is None else f"last saliency {r.saliency:.3g}"),
            ])
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
        out = [f"{self.method}: model parameters {self.model_params_before:,} -> {self.model_params_after:,}"
               f" (FLOPs {self.flops_unit})"]
        for i, row in enumerate(lines):
            out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)
