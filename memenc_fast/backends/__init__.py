"""Registers the backends this build ships. Each backend's ops live in its own module, imported
only when the backend is first used."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..dispatch import Backend, register_backend

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def triton_interpreted() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rocm_reason(kernels: str) -> Optional[str]:
    """Why a kernel backend's ``kernels`` do not run under this torch, or None: a ROCm build reports
    AMD GPUs as device type ``cuda``, and the kernels were written and checked for NVIDIA GPUs only
    (32-thread warps, their cache hints and memory ordering)."""
    if torch.version.hip is None:
        return None
    return (f"torch is a ROCm build (HIP {torch.version.hip}): {kernels} are written for NVIDIA GPUs (32-thread "
            "warps, their cache hints and memory ordering), not AMD's; the torch backend serves AMD GPUs")


def _triton_unavailable_reason() -> Optional[str]:
    amd = rocm_reason("its Triton kernels")
    if amd is not None:
        return amd
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if importlib.util.find_spec("memenc_fast.kernels") is None:
        # kernels/ becomes memenc_fast.kernels only through setup.py's package mapping.
        return "memenc_fast.kernels is missing: install the package (pip install -e .), not just PYTHONPATH"
    if not triton_interpreted() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return None


register_backend(
    Backend(
        name="torch",
        priority=10,
        device_types=None,
        dtypes=_FLOAT_DTYPES,
        ops_module=".backends.torch_ops",
        unavailable_reason=lambda: None,
        differentiable=True,
    )
)

register_backend(
    Backend(
        name="triton",
        priority=20,
        # Under the interpreter the kernels take CPU tensors; auto never picks that (it is slow).
        device_types=frozenset({"cuda", "cpu"}) if triton_interpreted() else frozenset({"cuda"}),
        auto_device_types=frozenset({"cuda"}),
        dtypes=_KERNEL_DTYPES,
        ops_module=".backends.triton",
        unavailable_reason=_triton_unavailable_reason,
    )
)


def _cuda_unavailable_reason() -> Optional[str]:
    from .cuda import library  # neither the library nor the GPU is touched at import

    return library.unavailable_reason()


register_backend(
    Backend(
        name="cuda",
        priority=30,
        device_types=frozenset({"cuda"}),
        dtypes=_KERNEL_DTYPES,
        ops_module=".backends.cuda",
        unavailable_reason=_cuda_unavailable_reason,
    )
)
