"""pyquant's 8-bit optimizers: drop-ins for bitsandbytes 0.50.2's (same bits on CPU, same state_dict layout).

- `Adam8bit`, `AdamW8bit` (adam.py);
- `Adam4bit`, `AdamW4bit` (adam4bit.py): 4-bit states (Li, Chen & Zhu 2023);
- `Lion8bit`, `SGD8bit`, `RMSprop8bit`, `Adagrad8bit` (one_state.py): one 8-bit state each;
- `AdEMAMix8bit`, `AdEMAMix` (optim_bits 32 or 8), `AdEMAMix32bit` (ademamix.py): two 8-bit states, one of them
  the fast and slow EMAs stacked;
- `LAMB8bit`, `LAMB` (optim_bits 32 or 8), `LAMB32bit`, `LARS8bit`, `LARS`, `LARS32bit` (trust_ratio.py): LAMB and
  LARS with their layer-wise trust ratios (a norm pass, then Adam's or the momentum step), which bitsandbytes' 8-bit
  classes lack;
- `override(param, optim_bits=32, lr=...)` (overrides.py): per-parameter options, bitsandbytes'
  GlobalOptimManager.override_config; the same keys may be put in a parameter group;
- `from_torch` / `to_torch`: switch with the float32 torch optimizer mid-training (Adam, AdamW, SGD, RMSprop,
  Adagrad; torch has no Lion);
- `Optimizer8bit` (_base.py): what they share.
"""

from pyquant.optim._base import Optimizer8bit, from_torch, to_torch
from pyquant.optim.ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit
from pyquant.optim.adam import Adam8bit, AdamW8bit
from pyquant.optim.adam4bit import Adam4bit, AdamW4bit
from pyquant.optim.one_state import Adagrad8bit, Lion8bit, RMSprop8bit, SGD8bit
from pyquant.optim.overrides import override, overrides_of
from pyquant.optim.trust_ratio import LAMB, LAMB8bit, LAMB32bit, LARS, LARS8bit, LARS32bit

__all__ = [
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "Adam4bit", "Adam8bit", "AdamW4bit", "AdamW8bit", "Adagrad8bit",
    "LAMB", "LAMB8bit", "LAMB32bit", "LARS", "LARS8bit", "LARS32bit", "Lion8bit", "Optimizer8bit", "RMSprop8bit",
    "SGD8bit", "from_torch", "override", "overrides_of", "to_torch",
]
