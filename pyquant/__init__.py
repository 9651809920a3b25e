"""pyquant: train and run medical-imaging models on the hardware a hospital or a small lab has.

- `pyquant.Adam8bit` / `pyquant.AdamW8bit`: drop-ins for torch's Adam/AdamW and bitsandbytes' 8-bit ones;
- `pyquant.Lion8bit`, `SGD8bit`, `RMSprop8bit`, `Adagrad8bit`: bitsandbytes' 8-bit ones, same bits on CPU;
- `pyquant.AdEMAMix8bit`, `AdEMAMix` (optim_bits 32 or 8), `AdEMAMix32bit`: bitsandbytes' AdEMAMix ones, same bits;
- `pyquant.Adam4bit` / `pyquant.AdamW4bit`: 4-bit states (Li, Chen & Zhu 2023: rank-1 second moment);
- `pyquant.LAMB8bit`, `LARS8bit` (and `LAMB`, `LAMB32bit`, `LARS`, `LARS32bit`): bitsandbytes' signatures and
  checkpoints, with the layer-wise trust ratios its 8-bit classes lack;
- `pyquant.amp.GradScaler`: torch.amp.GradScaler's bits, and float16 gradients too;
- `pyquant.functional`: block-wise 8-bit quantisation (bitsandbytes-compatible bits);
- `pyquant.use_backend(name)`: force the reference, cpu, triton or cuda implementation of the ops.
"""

from pyquant import amp, functional
from pyquant.backends import use_backend
from pyquant.optim import (
    AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, Adagrad8bit, Adam4bit, Adam8bit, AdamW4bit, AdamW8bit, LAMB, LAMB8bit,
    LAMB32bit, LARS, LARS8bit, LARS32bit, Lion8bit, RMSprop8bit, SGD8bit,
)

__version__ = "0.1.0"
__all__ = [
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit",
    "Adagrad8bit", "Adam4bit", "Adam8bit", "AdamW4bit", "AdamW8bit", "LAMB", "LAMB8bit", "LAMB32bit", "LARS", "LARS8bit",
    "LARS32bit", "Lion8bit", "RMSprop8bit", "SGD8bit", "amp", "functional", "use_backend", "__version__"]
