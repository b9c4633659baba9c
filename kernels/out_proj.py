"""``out_proj``: the 1x1 conv from tokens to the NCHW output, on ``proj_add``'s pointwise kernel
with one source and channels-first stores. Fused into the last CXBlock's epilogue instead, it is
in ``cxblock.py``.
"""

from __future__ import annotations

from typing import List

import torch

from ._common import INTERPRETED, DeviceLimits, Launch, report_tf32_settings
from .cxblock import fuses_out_proj
from .proj_add import plan_pointwise

__all__ = ["plan_out_proj", "report_launches"]


def plan_out_proj(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                  device: DeviceLimits, for_interpreter: bool = INTERPRETED, tf32: bool = False) -> Launch:
    """The out_proj launch: tokens ``x`` (B, H, W, C) contiguous, ``weight`` (N, C, 1, 1)
    contiguous and ``bias`` (N,) in any float dtype, into ``out`` (B, N, H, W) contiguous;
    ``tf32``: whether torch allows the conv TF32 (``torch.backends.cudnn.allow_tf32``)."""
    return plan_pointwise("out_proj", x.permute(0, 3, 1, 2), weight, bias, None, None, None, out, device,
                          for_interpreter, tf32)


def report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> List[Launch]:
    """The kernel report's unfused out_proj launches at the SAM 2 shape (64x64, 256 -> 64), with
    weights in ``dtype`` and, for bf16/fp16, also in fp32 (autocast): where SAM 2's pipeline runs
    them, that is where out_proj is not in the last block's MLP (``fuses_out_proj``); fp32 with
    IEEE and with TF32 dots."""
    x = torch.empty((batch, 64, 64, 256), dtype=dtype, device="meta")
    out = torch.empty((batch, 64, 64, 64), dtype=dtype, device="meta")
    return [plan_out_proj(x, torch.empty((64, 256, 1, 1), dtype=weights, device="meta"),
                          torch.empty((64,), dtype=weights, device="meta"), out, device, for_interpreter=False,
                          tf32=tf32)
            for weights in dict.fromkeys((dtype, torch.float32)) if not fuses_out_proj(dtype, weights, device)
            for tf32 in report_tf32_settings(dtype)]
