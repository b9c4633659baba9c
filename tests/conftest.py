"""Shared fixtures: seeded encoders with non-trivial weights, inputs, and sam2 loading."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is imported: without a GPU, run its kernels on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import build_encoder, randomize_parameters  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
