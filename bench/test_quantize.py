"""quantize_blockwise / dequantize_blockwise of 16M float32 values: pyquant cpu against bitsandbytes cpu."""

import pytest
import torch

import pyquant.functional as F

N = 16 * 1024 * 1024
BLOCK = 256
# Bytes each op must move: quantize reads 4 B and writes 1 B per element (+4 B per block); dequantize the reverse.
QUANT_BYTES = N * 5 + (N // BLOCK) * 4


@pytest.fixture(scope="module")
def data():
    x = torch.randn(N, generator=torch.Generator().manual_seed(0))
    q, absmax = F.quantize_blockwise(x, blocksize=BLOCK)
    return x, q, absmax


def _record(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["elements"] = N
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.benchmark(group="quantize 16M float32")
def test_quantize_pyquant(benchmark, data):
    x = data[0]
    benchmark.pedantic(F.quantize_blockwise, args=(x,), kwargs={"blocksize": BLOCK}, rounds=10, warmup_rounds=2)
    _record(benchmark, QUANT_BYTES)


@pytest.mark.benchmark(group="quantize 16M float32")
def test_quantize_bitsandbytes(benchmark, data, bnb):
    x = data[0]
    benchmark.pedantic(bnb.functional.quantize_blockwise, args=(x,), kwargs={"blocksize": BLOCK}, rounds=10, warmup_rounds=2)
    _record(benchmark, QUANT_BYTES)


@pytest.mark.benchmark(group="dequantize 16M float32")
def test_dequantize_pyquant(benchmark, data):
    _, q, absmax = data
    benchmark.pedantic(F.dequantize_blockwise, args=(q, absmax), kwargs={"blocksize": BLOCK}, rounds=10, warmup_rounds=2)
    _record(benchmark, QUANT_BYTES)


@pytest.mark.benchmark(group="dequantize 16M float32")
def test_dequantize_bitsandbytes(benchmark, data, bnb):
    x = data[0]
    qb, state = bnb.functional.quantize_blockwise(x, blocksize=BLOCK)
    benchmark.pedantic(bnb.functional.dequantize_blockwise, args=(qb, state), rounds=10, warmup_rounds=2)
    _record(benchmark, QUANT_BYTES)
