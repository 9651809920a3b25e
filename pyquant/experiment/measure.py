"""Measurements: peak memory per phase, synchronised time, energy counters, FLOPs, optimizer-state bytes, and the
environment a run ran in.

Memory. CUDA: the caching allocator's peak allocated bytes, reset at the start of each phase. CPU: the process's
peak resident set size (VmHWM) after resetting it through /proc/self/clear_refs at the start of each phase; where
that reset is refused, VmRSS sampled every 5 ms by a thread. The CPU number is the whole process (Python, torch,
the data held in memory), so compare settings with each other, not with a GPU's figure. Optimizer-state bytes are
counted exactly from the optimizer's state tensors.

Energy. NVML's total-energy counter on GPU (pynvml), RAPL package counters on CPU
(/sys/class/powercap/intel-rapl:N/energy_uj), read at phase boundaries. RAPL counts the whole CPU package, other
processes included. On a CPU without readable RAPL counters the energy is estimated, not measured, with the model
CodeCarbon uses for a process when it has no counter: the process's CPU time x the power of one logical CPU, taken as
the processor's TDP / the number of logical CPUs (ESTIMATE). The record then says ``estimated: true`` and the
constants used. On CUDA without NVML the record says ``available: false`` and why (CPU time says nothing of a GPU).
"""

from __future__ import annotations

import glob
import math
import os
import platform
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (and ``m.method``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None  # in use when the phase began (CUDA: allocated; CPU: RSS)
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            self.method = "CUDA peak allocated (torch.cuda.max_memory_allocated, reset per phase)"
        elif _reset_hwm() and _status_kib("VmHWM") is not None:
            self.method = "process peak RSS (VmHWM, reset per phase via /proc/self/clear_refs)"
            self.start_bytes = 1024 * (_status_kib("VmRSS") or 0)
        else:
            self.method = "process RSS sampled every 5 ms (VmRSS)"
            self._sampled = _status_kib("VmRSS") or 0
            self.start_bytes = 1024 * self._sampled
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _status_kib("VmRSS") or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is None:
            self.peak_bytes = 1024 * (_status_kib("VmHWM") or 0)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = 1024 * max(self._sampled, _status_kib("VmRSS") or 0)

    @property
    def growth_bytes(self) -> int:
        """How far the peak rose above the memory in use when the phase began."""
        return max(0, (self.peak_bytes or 0) - (self.start_bytes or 0))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state; tensors shared between parameters (code maps) count once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view or a shared tensor counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class SavedActivations:
    """``with SavedActivations(model) as saved: model(x)`` then ``saved.bytes``: the bytes of the tensors autograd
    keeps for the backward pass (each storage once; the model's parameters and buffers excluded). That is what a
    training step holds at its peak besides parameters, gradients and optimizer states, counted exactly on any
    device (on CPU the process's peak memory cannot separate it from the interpreter and the data)."""

    def __init__(self, model: torch.nn.Module):
        self._own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._own and storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())  # saved tensors stay alive until backward, so no address is reused
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, autocast=None) -> int:
    """Bytes saved for backward by one training-mode forward pass of the batch ``x`` (under ``autocast``, a
    context manager). The model's buffers (batch-norm statistics) and the random state are left as they were."""
    import contextlib

    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), SavedActivations(model) as saved:
            model.train()
            with autocast or contextlib.nullcontext():
                model(x)
    finally:
        with torch.no_grad():
            for b, kept in zip(model.buffers(), buffers):
                b.copy_(kept)
        model.train(was_training)
    return saved.bytes


def memory_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer, activations_saved_bytes: int | None = None,
                     allocator_peak_bytes: int | None = None) -> dict:
    """Where a training step's memory goes: parameters, buffers, gradients (one per trainable parameter, in its
    dtype), optimizer states (as the optimizer holds them after a step), activations.

    Activations are the allocator's training peak minus everything else when ``allocator_peak_bytes`` is given (a
    CUDA figure: it also holds temporaries, the batch and workspaces), otherwise the bytes saved for backward
    (``activations_saved_bytes``, from :func:`saved_activation_bytes`)."""
    params = list(model.parameters())
    breakdown = {
        "parameters_bytes": _storage_bytes(params),
        "buffers_bytes": _storage_bytes(list(model.buffers())),
        "gradients_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
    }
    rest = sum(breakdown.values())
    if allocator_peak_bytes is not None:
        breakdown["activations_bytes"] = max(0, int(allocator_peak_bytes) - rest)
        breakdown["activations_method"] = "allocator training peak minus parameters, buffers, gradients and states"
    elif activations_saved_bytes is not None:
        breakdown["activations_bytes"] = int(activations_saved_bytes)
        breakdown["activations_method"] = "tensors saved for backward by one training forward pass (exact)"
    else:
        breakdown["activations_bytes"], breakdown["activations_method"] = None, "not measured"
    breakdown["saved_for_backward_bytes"] = activations_saved_bytes
    breakdown["total_bytes"] = rest + (breakdown["activations_bytes"] or 0)
    return breakdown


# CodeCarbon's estimate for a process on a CPU without power counters (codecarbon.external.hardware.CPU, "cpu_load"
# mode, tracking_mode="process"): power = TDP x (process CPU seconds per second) / logical CPUs, so over a phase
# energy = CPU seconds x TDP / logical CPUs. TDP: PYQUANT_CPU_TDP_W when set (the processor's data sheet), else
# CodeCarbon's value for a processor missing from its TDP table (POWER_CONSTANT = 85 W).
DEFAULT_CPU_TDP_W = 85.0
ESTIMATE = "CPU time x TDP / logical CPUs (CodeCarbon's per-process model)"


def cpu_tdp_w() -> tuple[float, str]:
    """The TDP the estimate uses, and where it came from."""
    value = os.environ.get("PYQUANT_CPU_TDP_W")
    if value is None:
        return DEFAULT_CPU_TDP_W, "CodeCarbon's default for a processor not in its TDP table"
    try:
        watts = float(value)
    except ValueError:
        watts = math.nan
    if not math.isfinite(watts) or watts <= 0:
        raise ValueError(f"PYQUANT_CPU_TDP_W must be a positive number of watts, got {value!r}")
    return watts, "PYQUANT_CPU_TDP_W"


class EnergyMeter:
    """Cumulative energy in joules: ``read()`` (None when unavailable), ``available``, ``estimated``, ``source``,
    ``reason``. A counter (NVML, RAPL) where there is one; on a CPU without one, the CPU-time estimate."""

    def __init__(self, device: torch.device):
        self.source, self.reason, self._read, self.estimated, self._model = None, "", None, False, None
        if device.type == "cuda":
            self._try_nvml(device)
        else:
            self._try_rapl()
            if self._read is None:
                self._estimate()
        self.available = self._read is not None

    def _estimate(self) -> None:
        tdp, tdp_source = cpu_tdp_w()
        cpus = os.cpu_count() or 1
        self.estimated, self.source = True, "estimate: " + ESTIMATE
        self._model = {"tdp_w": tdp, "tdp_source": tdp_source, "logical_cpus": cpus, "watts_per_cpu": tdp / cpus,
                       "no_counter": self.reason,
                       "counts": "this process's CPU time (all its threads; not DataLoader workers or other DDP ranks)"}
        self._read = lambda: time.process_time() * tdp / cpus

    def _try_nvml(self, device: torch.device) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None else torch.cuda.current_device())
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises when unsupported
        except ImportError:
            self.reason = "NVML unavailable: pynvml (nvidia-ml-py) is not installed"
            return
        except Exception as e:  # noqa: BLE001 - NVML raises its own error types
            self.reason = f"NVML total energy counter unavailable ({type(e).__name__}: {e})"
            return
        self.source = "nvml"
        self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ -> J

    def _try_rapl(self) -> None:
        zones = sorted(p for p in glob.glob("/sys/class/powercap/intel-rapl:*") if p.count(":") == 1)
        if not zones:
            self.reason = "no RAPL counters: /sys/class/powercap/intel-rapl:* does not exist on this machine"
            return
        try:
            ranges = [int(Path(z, "max_energy_range_uj").read_text()) for z in zones]
            [int(Path(z, "energy_uj").read_text()) for z in zones]
        except (OSError, ValueError) as e:
            self.reason = f"RAPL counters not readable ({type(e).__name__}: {e}); reading energy_uj usually needs root"
            return
        self.source = "rapl (" + ", ".join(Path(z, "name").read_text().strip() for z in zones) + ")"
        self._last = None
        self._total = 0.0

        def read() -> float:
            now = [int(Path(z, "energy_uj").read_text()) for z in zones]
            if self._last is not None:
                for i, (a, b) in enumerate(zip(self._last, now)):
                    self._total += ((b - a) % (ranges[i] + 1)) / 1e6  # the counter wraps at max_energy_range_uj
            self._last = now
            return self._total

        self._read = read

    def read(self) -> float | None:
        return None if self._read is None else self._read()

    def describe(self) -> dict:
        if self.estimated:
            return {"available": True, "estimated": True, "source": self.source, "reason": None, "model": self._model}
        return {"available": self.available, "estimated": False, "source": self.source, "reason": self.reason or None}


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int | None:
    """FLOPs of one forward pass (torch.utils.flop_counter: 2 per multiply-add, matmul/conv/attention only)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(example)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - an op the counter cannot trace should not fail the run
        return None
    finally:
        model.train(was_training)


_PACKAGES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "bitsandbytes", "pyquant", "matplotlib")


def _git_revision() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(device: torch.device) -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "packages": versions,
        "git": _git_revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        from pyquant import backends

        env["pyquant_backend"] = backends.select(device.type)
    except Exception:  # noqa: BLE001
        env["pyquant_backend"] = None
    return env
