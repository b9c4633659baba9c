"""``out_proj``: the 1x1 conv from tokens to the NCHW output, on ``proj_add``'s pointwise GEMM
kernel (one source, channels-first stores). The fused variant, as the last CXBlock's epilogue,
is in ``cxblock.py``.
"""

from __future__ import annotations

import torch

from memenc_fast.backends import torch_ops
from memenc_fast.backends.kernel_args import check_tensor
from memenc_fast.packing import PackedEncoder

from ._common import REPORT_SM_COUNT
from .proj_add import launch_pointwise, plan_pointwise

__all__ = ["out_proj", "report_specs"]


def out_proj(x: torch.Tensor, packed: PackedEncoder) -> torch.Tensor:
    """The ``out_proj`` op (see ``torch_ops.out_proj``): tokens (B, H, W, C) -> NCHW output
    (B, C_out, H, W), contiguous. Without an out_proj (Identity) it is a layout change only,
    which the torch op does."""
    if packed.out_weight is None:
        return torch_ops.out_proj(x, packed)
    check_tensor("out_proj", "x", x, shape=(None, None, None, packed.out_weight.shape[1]))
    return launch_pointwise("out_proj", x.permute(0, 3, 1, 2), None, packed.out_weight, packed.out_bias, False)


def report_specs(batch: int, dtype: torch.dtype) -> list:
    """The kernel report's launch of the unfused out_proj at the SAM 2 shape (64x64, 256 -> 64)."""
    tokens = torch.empty((batch, 64, 64, 256), dtype=dtype, device="meta")
    weight = torch.empty((64, 256), dtype=dtype, device="meta")
    bias = torch.empty((64,), dtype=dtype, device="meta")
    launch, _ = plan_pointwise("out_proj", tokens.permute(0, 3, 1, 2), None, weight, bias, False,
                               REPORT_SM_COUNT, for_interpreter=False)
    return [launch.spec()]
