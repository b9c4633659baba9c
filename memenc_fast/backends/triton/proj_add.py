"""The triton ``proj_add`` op: the downsampler's final 1x1 conv plus ``pix_feat_proj``, added,
in one kernel (``memenc_fast.kernels.proj_add``) on the two live weights; the torch op where the
GPU refuses the launch."""

from __future__ import annotations

from typing import List, Tuple

import torch

from ...kernels._common import Launch
from ...kernels.proj_add import plan_proj_add
from ...precision import conv_tf32
from ...structure import Projection
from .. import torch_ops
from ..kernel_args import check_tensor, eager_or_custom_op, new_output
from ._common import check_device, check_parameters, device_spec, run_or_fall_back

__all__ = ["proj_add", "proj_add_tokens"]

_OP = "proj_add"


def _pixel_indexable(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, C, H, W) itself when its H and W collapse into one pixel index (NCHW,
    channels-last, a single row), else a contiguous copy."""
    return t if t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()


def proj_add_tokens(mask_features: torch.Tensor, pix_feat: torch.Tensor, mask_weight: torch.Tensor,
                    mask_bias: torch.Tensor, pix_weight: torch.Tensor, pix_bias: torch.Tensor) -> torch.Tensor:
    """``mask_weight . mask_features + mask_bias + pix_weight . pix_feat + pix_bias`` per pixel ->
    tokens (B, H, W, C) contiguous, in pix_feat's dtype.

    ``mask_features`` (B, C_m, H, W) and ``pix_feat`` (B, C_p, H, W) in one dtype, any memory
    layout; the weights (C, C_m, 1, 1) and (C, C_p, 1, 1), the biases (C,), any float dtype.
    """
    check_tensor(_OP, "pix_feat", pix_feat, shape=(None, None, None, None))
    batch, c_p, height, width = pix_feat.shape
    c_m = mask_weight.shape[1] if mask_weight.dim() == 4 else None
    check_tensor(_OP, "mask_features", mask_features, dtype=pix_feat.dtype, shape=(batch, c_m, height, width))
    device = check_device(_OP, mask_features=mask_features, pix_feat=pix_feat)
    channels = mask_weight.shape[0]
    check_parameters(_OP, device, [("mask_weight", mask_weight, (channels, mask_features.shape[1], 1, 1)),
                                   ("mask_bias", mask_bias, (channels,)),
                                   ("pix_weight", pix_weight, (channels, c_p, 1, 1)),
                                   ("pix_bias", pix_bias, (channels,))])

    # Both layers are nn.Conv2d in the reference: cuDNN's TF32 flag, read at every call.
    tf32 = pix_feat.dtype == torch.float32 and conv_tf32()

    def plan() -> Tuple[List[Launch], torch.Tensor]:
        out = new_output((batch, height, width, channels), pix_feat.dtype, pix_feat.device)
        if not out.numel():
            return [], out
        return [plan_proj_add(_pixel_indexable(mask_features), _pixel_indexable(pix_feat), mask_weight.contiguous(),
                              mask_bias.contiguous(), pix_weight.contiguous(), pix_bias.contiguous(), out,
                              device_spec(device), tf32=tf32)], out

    def torch_op() -> torch.Tensor:
        projection = Projection(mask_weight, mask_bias, pix_weight, pix_bias)
        return torch_ops.proj_add(mask_features, pix_feat, projection).contiguous()

    signature = (mask_features.shape, pix_feat.shape, mask_weight.shape[0], pix_feat.dtype, mask_weight.dtype,
                 pix_weight.dtype, tf32)
    return run_or_fall_back(_OP, device, signature, plan, torch_op)


@torch.library.custom_op("memenc_fast::triton_proj_add", mutates_args=())
def _proj_add_op(mask_features: torch.Tensor, pix_feat: torch.Tensor, mask_weight: torch.Tensor,
                 mask_bias: torch.Tensor, pix_weight: torch.Tensor, pix_bias: torch.Tensor) -> torch.Tensor:
    return proj_add_tokens(mask_features, pix_feat, mask_weight, mask_bias, pix_weight, pix_bias)


@_proj_add_op.register_fake
def _(mask_features, pix_feat, mask_weight, mask_bias, pix_weight, pix_bias):
    batch, _, height, width = pix_feat.shape
    return pix_feat.new_empty((batch, height, width, mask_weight.shape[0]))


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, projection: Projection) -> torch.Tensor:
    """The ``proj_add`` op (see ``torch_ops.proj_add``): mask features (B, C_m, H, W) and pix_feat
    (B, C_p, H, W), any layout -> tokens (B, H, W, C) contiguous."""
    return eager_or_custom_op(proj_add_tokens, _proj_add_op)(
        mask_features, pix_feat, projection.mask_weight, projection.mask_bias, projection.pix_weight,
        projection.pix_bias)
