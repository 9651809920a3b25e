"""What every launch into the CUDA library needs: the library, torch's current stream, the error check.

Kernels are queued on torch's current stream of the tensors' device and nothing here synchronises with the
GPU. Importing this module does no CUDA work, so it imports on machines without CUDA."""

from __future__ import annotations

import ctypes

import torch

from pyquant.backends.capi import cuda_library


def library() -> ctypes.CDLL:
    lib = cuda_library()
    if lib is None:
        raise RuntimeError(
            "pyquant: the CUDA library is not available (it needs a CUDA device and a build with PYQUANT_CUDA=ON)"
        )
    return lib


def stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def check(error: int, op: str) -> None:
    if error != 0:
        message = library().pq_cuda_error_string(error).decode(errors="replace")
        raise RuntimeError(f"pyquant: CUDA {op} launch failed: {message} (cudaError {error})")
