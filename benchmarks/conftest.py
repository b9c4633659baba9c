"""Fixtures of the pytest-benchmark suite: dtype and batch, from bench_setup's lists."""

import pytest

from bench_setup import BATCHES, DTYPES


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(params=BATCHES, ids=lambda b: f"B{b}")
def batch(request):
    return request.param
