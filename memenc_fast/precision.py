"""Whether torch lets an fp32 op use TF32, per op, as torch itself decides it right now.

The reference's layers obey different flags: an ``nn.Conv2d`` (the mask stages, the 1x1 convs,
``pix_feat_proj``, ``out_proj``) runs on cuDNN and obeys ``torch.backends.cudnn.allow_tf32``
(default True); an ``nn.Linear`` (the CXBlock MLP) runs on cuBLAS and obeys
``torch.backends.cuda.matmul.allow_tf32`` (default False). torch 2.9 added a per-op API
(``torch.backends.cudnn.conv.fp32_precision``, ``torch.backends.cuda.matmul.fp32_precision``,
falling back to ``torch.backends.cudnn.fp32_precision`` and ``torch.backends.fp32_precision``)
that the legacy flags write through; these readers resolve it the way torch's kernels do,
without the legacy getters' error when a user mixed both APIs. Each read costs about 0.2 µs, so
the ops read the flags at every launch (and the CUDA-graph key holds them), never caching them.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

__all__ = ["conv_tf32", "matmul_tf32", "tf32_flags"]

_getter: Callable[[str, str], str] = getattr(torch._C, "_get_fp32_precision_getter", None)
# Triton's TF32 dots exist on NVIDIA GPUs (and one AMD generation): ROCm builds keep IEEE.
_NVIDIA = torch.version.hip is None


def _resolved(op: str) -> bool:
    """Whether torch's CUDA precision for ``op`` resolves to TF32: the op's own setting, else the
    CUDA backend's, else the generic one (torch's ``Context::float32Precision``)."""
    precision = _getter("cuda", op)
    if precision == "none":
        precision = _getter("cuda", "all")
        if precision == "none":
            precision = _getter("generic", "all")
    return precision == "tf32"


def conv_tf32() -> bool:
    """Whether an fp32 ``nn.Conv2d`` on CUDA may use TF32 (cuDNN's conv precision)."""
    if _getter is None:
        return _NVIDIA and torch.backends.cudnn.allow_tf32
    return _NVIDIA and _resolved("conv")


def matmul_tf32() -> bool:
    """Whether an fp32 ``nn.Linear`` on CUDA may use TF32 (cuBLAS's matmul precision)."""
    if _getter is None:
        return _NVIDIA and torch.backends.cuda.matmul.allow_tf32
    return _NVIDIA and _resolved("matmul")


def tf32_flags() -> Tuple[bool, bool]:
    """``(conv_tf32(), matmul_tf32())``: what a cache of compiled or captured work must key on."""
    return conv_tf32(), matmul_tf32()
