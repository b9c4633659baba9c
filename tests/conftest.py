"""Test session setup: Triton's interpreter where there is no GPU, and a fixed seed per test."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is imported: without a GPU, run its kernels on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device where there is one, skips or runs on the CPU "
                                       "without (`pytest -m gpu` runs only these)")
    config.addinivalue_line("markers", "heavy: a GPU test too big for the compute-sanitizer runs (over 20 GiB "
                                       "of device memory, or a whole SAM 2 model)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
