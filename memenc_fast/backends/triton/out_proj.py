"""The triton ``out_proj`` op: the 1x1 conv from tokens to the NCHW output on the pointwise
kernel (``memenc_fast.kernels.out_proj``), on the live weight; the torch op where the GPU refuses
the launch."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...kernels._common import Launch
from ...kernels.out_proj import plan_out_proj
from ...precision import conv_tf32
from ...structure import Pointwise
from .. import torch_ops
from ..kernel_args import check_tensor, eager_or_custom_op, new_output
from ._common import check_device, check_parameters, device_spec, run_or_fall_back

__all__ = ["out_proj", "out_proj_nchw"]

_OP = "out_proj"


def out_proj_nchw(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``weight . x + bias`` per pixel: tokens (B, H, W, C) contiguous -> (B, N, H, W) contiguous,
    in x's dtype; ``weight`` (N, C, 1, 1) and ``bias`` (N,) in any float dtype."""
    check_tensor(_OP, "x", x, shape=(None, None, None, None), contiguous=True)
    device = check_device(_OP, x=x)
    batch, height, width, channels = x.shape
    n = weight.shape[0]
    check_parameters(_OP, device, [("weight", weight, (n, channels, 1, 1)), ("bias", bias, (n,))])
    tf32 = x.dtype == torch.float32 and conv_tf32()  # an nn.Conv2d in the reference, read at every call

    def plan() -> Tuple[List[Launch], torch.Tensor]:
        out = new_output((batch, n, height, width), x.dtype, x.device)
        if not out.numel():
            return [], out
        return [plan_out_proj(x, weight.contiguous(), bias.contiguous(), out, device_spec(device), tf32=tf32)], out

    return run_or_fall_back(_OP, device, (x.shape, x.dtype, weight.shape, weight.dtype, tf32), plan,
                            lambda: torch_ops.out_proj(x, Pointwise(weight, bias)))


@torch.library.custom_op("memenc_fast::triton_out_proj", mutates_args=())
def _out_proj_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return out_proj_nchw(x, weight, bias)


@_out_proj_op.register_fake
def _(x, weight, bias):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, weight.shape[0], height, width))


def out_proj(x: torch.Tensor, layer: Optional[Pointwise]) -> torch.Tensor:
    """The ``out_proj`` op (see ``torch_ops.out_proj``): tokens (B, H, W, C) -> NCHW output
    (B, N, H, W), contiguous. Without an out_proj (Identity) it is a layout change only, which
    the torch op does."""
    if layer is None:
        return torch_ops.out_proj(x, None)
    return eager_or_custom_op(out_proj_nchw, _out_proj_op)(x, layer.weight, layer.bias)
