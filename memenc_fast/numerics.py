"""The project's accuracy rule (DESIGN.md, "Numerics"), shared by the tests and ``check``.

Outputs are compared with the reference run in float64 on the same inputs:
``rel = ||out - ref|| / ||ref||``. fp32 with IEEE math: < 1e-5; with TF32 matmuls allowed:
< 1e-3; bf16/fp16 (and autocast): < 1e-2 and no worse than the reference run in that same dtype (for
outputs of at least SAME_DTYPE_MIN_ELEMENTS values). NaN never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["relative_error", "tolerance", "Verdict", "judge", "SAME_DTYPE_SLACK", "SAME_DTYPE_MIN_ELEMENTS"]

SAME_DTYPE_SLACK = 1.25
"""'No worse than the reference in the same dtype' allows this factor: both runs round
differently, so the fused result may land on either side of the reference's error."""

SAME_DTYPE_MIN_ELEMENTS = 512
"""Below this many output elements the same-dtype comparison is left out (the absolute bound
still applies): a handful of values carries a handful of rounding events, and which run gets
the unluckier ones says nothing about its accuracy."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN if either has a NaN, inf if ``ref`` is zero."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise ValueError(f"relative_error: shapes differ: out {tuple(out64.shape)} vs ref {tuple(ref64.shape)}")
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return math.nan
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / denom


def tolerance(dtype: torch.dtype, device_type: str = "cpu", allow_tf32: Optional[bool] = None) -> float:
    """The relative-error bound for results computed in ``dtype`` on ``device_type``."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        if allow_tf32 is None:
            allow_tf32 = device_type == "cuda" and (
                torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
            )
        return 1e-3 if allow_tf32 else 1e-5
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    raise TypeError(f"no tolerance defined for dtype {dtype}; expected float16, bfloat16, float32 or float64")


@dataclass(frozen=True)
class Verdict:
    """The comparison of one output with the float64 reference."""

    error: float
    bound: float
    same_dtype_reference_error: Optional[float]
    passed: bool

    def describe(self) -> str:
        text = f"rel err {self.error:.3g} (bound {self.bound:.3g}"
        if self.same_dtype_reference_error is not None:
            text += f", reference in same dtype {self.same_dtype_reference_error:.3g}"
        return text + ")"


def judge(
    out: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype,
    device_type: str = "cpu",
    same_dtype_ref: Optional[torch.Tensor] = None,
    allow_tf32: Optional[bool] = None,
) -> Verdict:
    """Applies the accuracy rule to ``out`` (computed in ``dtype``) against the float64 ``ref64``.

    For bf16/fp16, ``same_dtype_ref`` (the reference run in that dtype) is required.
    """
    error = relative_error(out, ref64)
    bound = tolerance(dtype, device_type, allow_tf32)
    same_error = None
    if dtype in (torch.float16, torch.bfloat16):
        if same_dtype_ref is None:
            raise ValueError(f"judge: {dtype} results need the reference run in the same dtype")
        same_error = relative_error(same_dtype_ref, ref64)
        if math.isfinite(same_error) and out.numel() >= SAME_DTYPE_MIN_ELEMENTS:
            bound = min(bound, SAME_DTYPE_SLACK * same_error)
    passed = math.isfinite(error) and error < bound
    return Verdict(error, bound, same_error, passed)
