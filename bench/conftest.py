import os

import pytest

try:
    import bitsandbytes
except ImportError:  # the benchmarks compare against bitsandbytes when it is there
    bitsandbytes = None


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))


@pytest.fixture
def bnb():
    if bitsandbytes is None:
        pytest.skip("bitsandbytes is not installed (pip install -e '.[test]')")
    return bitsandbytes
