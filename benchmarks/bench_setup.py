"""Shared parameters of the pytest-benchmark suite (the fixtures are in conftest.py).

Run: ``python -m pytest benchmarks --benchmark-only`` (add ``--benchmark-json FILE`` to keep it).
Sizes: the SAM 2 preset by default (``MEMENC_FAST_BENCH_PRESET=sam3|small`` to change); batches
1 and 8 on a GPU, 1 on the CPU (``MEMENC_FAST_BENCH_BATCHES=1,4``).
"""

import os

import torch

import memenc_fast as mf
from memenc_fast.backends import triton_interpreted
from memenc_fast.tools.presets import PRESETS
from memenc_fast.tools.reporting import parse_ints

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = PRESETS[os.environ.get("MEMENC_FAST_BENCH_PRESET", "sam2")]
BATCHES = parse_ints(os.environ.get("MEMENC_FAST_BENCH_BATCHES", "1,8" if DEVICE.type == "cuda" else "1"))
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
# Interpreted Triton runs on the CPU for correctness only; timing it means nothing.
BACKENDS = [b for b in mf.available_backends(DEVICE)
            if b != "reference" and not (b == "triton" and DEVICE.type != "cuda" and triton_interpreted())]


def synchronized(fn):
    """``fn`` followed by a device sync, so the benchmark timer sees the whole GPU work."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return call
