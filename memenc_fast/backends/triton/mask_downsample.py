"""The triton ``mask_downsample`` op: every conv -> LayerNorm2d -> GELU stage of the mask
downsampler in one kernel (``memenc_fast.kernels.mask_downsample``), on the stages' live
parameters; the torch op where the GPU refuses the launch."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ...kernels._common import Launch
from ...kernels.mask_downsample import MaskGeometry, plan_mask_path
from ...precision import conv_tf32
from ...structure import MaskStage
from .. import torch_ops
from ..kernel_args import check_tensor, eager_or_custom_op, new_output
from ._common import EXACT_GELU, check_device, check_parameters, device_spec, run_or_fall_back

__all__ = ["mask_downsample", "mask_path"]

_OP = "mask_downsample"


def _checked_geometry(masks: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                      norm_weights: Sequence[torch.Tensor], norm_biases: Sequence[torch.Tensor],
                      eps: Sequence[float], stride: Sequence[int], padding: Sequence[int]) -> MaskGeometry:
    """The geometry of the stages, once masks and parameters are checked against each other."""
    first = weights[0]
    check_tensor(_OP, "masks", masks, shape=(None, first.shape[1] if first.dim() == 4 else None, None, None))
    device = check_device(_OP, masks=masks)
    c_in, kernel = masks.shape[1], tuple(first.shape[-2:])
    expected: List[Tuple[str, torch.Tensor, Tuple[int, ...]]] = []
    for j, (weight, bias, norm_weight, norm_bias) in enumerate(zip(weights, biases, norm_weights, norm_biases)):
        c_out = weight.shape[0]
        expected += [(f"stage {j} conv weight", weight, (c_out, c_in, *kernel)),
                     (f"stage {j} conv bias", bias, (c_out,)),
                     (f"stage {j} norm weight", norm_weight, (c_out,)),
                     (f"stage {j} norm bias", norm_bias, (c_out,))]
        c_in = c_out
    check_parameters(_OP, device, expected)
    return MaskGeometry.of(weights, stride, padding, eps)


def mask_path(masks: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
              norm_weights: List[torch.Tensor], norm_biases: List[torch.Tensor], eps: List[float],
              stride: List[int], padding: List[int], apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    """Runs the mask-path kernel: masks (B, C_in, H, W), any strides -> the last stage's features
    (B, h, w, C) contiguous, in the masks' dtype.

    Per stage: conv weight (C_out, C_in, KH, KW) (one kernel size, ``stride`` and ``padding``
    for all), conv bias, LayerNorm weight and bias (C_out,), each in any float dtype, and the
    LayerNorm's ``eps``. ``sigmoid`` first when ``apply_sigmoid``, then ``* scale + bias``.
    """
    geometry = _checked_geometry(masks, weights, biases, norm_weights, norm_biases, eps, stride, padding)
    height, width = masks.shape[-2:]
    sizes = geometry.output_size(height, width)
    if min(min(size) for size in sizes) < 1:
        raise ValueError(f"{_OP}: masks of size {height}x{width} are too small for the downsampler: "
                         f"stage outputs would be {sizes}")

    tf32 = masks.dtype == torch.float32 and conv_tf32()  # nn.Conv2d stages in the reference, read at every call

    def plan() -> Tuple[List[Launch], torch.Tensor]:
        out = new_output((masks.shape[0], *sizes[-1], geometry.channels[-1]), masks.dtype, masks.device)
        if not out.numel():
            return [], out
        return [plan_mask_path(masks, geometry, [w.contiguous() for w in weights], [b.contiguous() for b in biases],
                               [w.contiguous() for w in norm_weights], [b.contiguous() for b in norm_biases],
                               apply_sigmoid, scale, bias, out, device_spec(masks.device), tf32=tf32)], out

    def torch_op() -> torch.Tensor:
        stages = [MaskStage(w, b, nw, nb, e, geometry.stride, geometry.padding, EXACT_GELU)
                  for w, b, nw, nb, e in zip(weights, biases, norm_weights, norm_biases, eps)]
        features = torch_ops.mask_downsample(masks, stages, None, apply_sigmoid, scale, bias)
        return features.permute(0, 2, 3, 1).contiguous()

    signature = (masks.shape, masks.dtype, geometry, tuple(w.dtype for w in weights), tf32)
    return run_or_fall_back(_OP, masks.device, signature, plan, torch_op)


@torch.library.custom_op("memenc_fast::triton_mask_downsample", mutates_args=())
def _mask_path_op(masks: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                  norm_weights: List[torch.Tensor], norm_biases: List[torch.Tensor], eps: List[float],
                  stride: List[int], padding: List[int], apply_sigmoid: bool, scale: float,
                  bias: float) -> torch.Tensor:
    return mask_path(masks, weights, biases, norm_weights, norm_biases, eps, stride, padding, apply_sigmoid,
                     scale, bias)


@_mask_path_op.register_fake
def _(masks, weights, biases, norm_weights, norm_biases, eps, stride, padding, apply_sigmoid, scale, bias):
    geometry = MaskGeometry.of(weights, stride, padding, eps)
    height, width = geometry.output_size(masks.shape[-2], masks.shape[-1])[-1]
    return masks.new_empty((masks.shape[0], height, width, geometry.channels[-1]))


def mask_downsample(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                    apply_sigmoid: bool, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """The ``mask_downsample`` op (see ``torch_ops.mask_downsample``): mask logits (B, C, Hm, Wm)
    -> the last stage's features (B, C', h, w), stored channels-last."""
    if interpol_size is not None and tuple(masks.shape[-2:]) != tuple(interpol_size):
        # SAM 3's resize runs in torch; the sigmoid and scale/bias must come before it.
        masks = torch_ops.transformed_mask(masks, interpol_size, apply_sigmoid, scale, bias)
        apply_sigmoid, scale, bias = False, 1.0, 0.0
    first = stages[0]
    features = eager_or_custom_op(mask_path, _mask_path_op)(
        masks, [s.weight for s in stages], [s.bias for s in stages], [s.norm_weight for s in stages],
        [s.norm_bias for s in stages], [float(s.eps) for s in stages], list(first.stride), list(first.padding),
        bool(apply_sigmoid), float(scale), float(bias))
    return features.permute(0, 3, 1, 2)
