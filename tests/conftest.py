"""Test session setup: Triton's interpreter where there is no GPU, a fixed seed per test, and one
share of the cores per pytest-xdist worker."""

import os

import torch

# Under pytest-xdist (`-n N`) each worker is a process of its own: N workers each running torch on
# every core would oversubscribe the machine, so each gets its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _CORES // _WORKERS))

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
