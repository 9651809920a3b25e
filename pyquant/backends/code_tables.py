"""The quantisers' 65536-entry bin -> code index tables (docs/numerics.md section 2, step 5), built once per code.

Every backend's quantiser looks its table up here; the table is built by the "code_table" kernel of the backend
selected for the code's device (all builders give the same bits; tests/test_blockwise.py checks it)."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from pyquant.backends import implementation

_by_content: dict[tuple, torch.Tensor] = {}
# The same code tensor (the optimizers' maps) is looked up every step: find it by identity and version first,
# so that a GPU step does not copy the code to the host to build the content key.
_by_tensor = WeakIdKeyDictionary()


def cached_code_table(code: torch.Tensor) -> torch.Tensor:
    hit = _by_tensor.get(code)
    if hit is not None and hit[0] == code._version:
        return hit[1]
    key = (code.device, code.detach().cpu().numpy().tobytes())
    table = _by_content.get(key)
    if table is None:
        table = _by_content[key] = implementation("code_table", code.device.type)(code.detach())
    _by_tensor[code] = (code._version, table)
    return table
