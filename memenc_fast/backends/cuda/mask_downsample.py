"""``mask_downsample`` on the CUDA kernels of ``csrc/mask_downsample.cu``: ``mask_stem_kernel``
(the mask transform and stages 1-2 chained, CUDA cores), then ``conv3x3s2_ln_gelu_kernel`` per later
stage (implicit GEMM on tensor cores). Features stay channels-last between the launches. A launch the
GPU refuses runs the torch op for those stages instead (``kernel_args.launch_or_fall_back``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...structure import MaskStage, is_exact_gelu
from .. import torch_ops
from ..kernel_args import check_tensor, eager_or_custom_op, launch_or_fall_back, new_output
from . import library
from .library import contiguous_aligned, parameter, parameter_dtype, precise_conv_fp32

__all__ = ["mask_stem", "conv3x3s2_ln_gelu", "unsupported_reason", "mask_downsample"]


def conv_out(size: int) -> int:
    """The output size of a 3x3, stride 2, padding 1 convolution."""
    return (size - 1) // 2 + 1


_GELU = nn.GELU()  # the activation of the stages the kernels run, for the torch op's records


def _kernel_stage(weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                  eps: float) -> MaskStage:
    """The record of a stage the kernels run (conv3x3 stride 2 padding 1, exact GELU), for the torch op."""
    return MaskStage(weight, bias, norm_weight, norm_bias, eps, (2, 2), (1, 1), _GELU)


def _torch_stages(x: torch.Tensor, stages: Sequence[MaskStage], apply_sigmoid: bool = False, scale: float = 1.0,
                  bias: float = 0.0) -> torch.Tensor:
    """``torch_ops.mask_downsample`` of (B, C, H, W) ``x`` as the kernels return it: channels-last
    tokens (B, h, w, C')."""
    return torch_ops.mask_downsample(x, stages, None, apply_sigmoid, scale, bias).permute(0, 2, 3, 1).contiguous()


def mask_stem(masks: torch.Tensor, conv1_weight: torch.Tensor, conv1_bias: torch.Tensor,
              norm1_weight: torch.Tensor, norm1_bias: torch.Tensor, eps1: float, conv2_weight: torch.Tensor,
              conv2_bias: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, eps2: float,
              apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    """Mask stages 1 and 2 fused: masks (B, 1, H, W), any strides -> (B, H2, W2, C2) channels-last.

    ``sigmoid`` when ``apply_sigmoid``, then ``* scale + bias``, then per stage conv3x3 stride 2
    padding 1 (``conv*_weight`` (C_out, C_in, 3, 3), ``conv*_bias``) -> LayerNorm over channels
    (``norm*_weight``, ``norm*_bias``, ``eps*``) -> exact GELU. Parameters in the masks' dtype or
    float32.
    """
    op = "mask_stem"
    check_tensor(op, "masks", masks, shape=(None, 1, None, None))
    weight_dtype = parameter_dtype(masks.dtype, conv1_weight, conv1_bias, norm1_weight, norm1_bias, conv2_weight,
                                   conv2_bias, norm2_weight, norm2_bias)
    conv1_weight = parameter(op, "conv1_weight", conv1_weight, weight_dtype, (None, 1, 3, 3))
    channels1 = conv1_weight.shape[0]
    conv2_weight = parameter(op, "conv2_weight", conv2_weight, weight_dtype, (None, channels1, 3, 3))
    channels2 = conv2_weight.shape[0]
    params = {"conv1_weight": conv1_weight, "conv2_weight": conv2_weight}
    for name, t, channels in (("conv1_bias", conv1_bias, channels1), ("norm1_weight", norm1_weight, channels1),
                              ("norm1_bias", norm1_bias, channels1), ("conv2_bias", conv2_bias, channels2),
                              ("norm2_weight", norm2_weight, channels2), ("norm2_bias", norm2_bias, channels2)):
        params[name] = parameter(op, name, t, weight_dtype, (channels,))
    device = library.kernel_device(op, masks=masks, **params)
    batch, _, height, width = masks.shape

    def launch() -> torch.Tensor:
        out = new_output((batch, conv_out(conv_out(height)), conv_out(conv_out(width)), channels2), masks.dtype,
                         masks.device)
        stride_b, _, stride_h, stride_w = masks.stride()
        library.launch(op, device, dtype=library.dtype_code(masks.dtype),
                       weight_dtype=library.dtype_code(weight_dtype), masks=masks.data_ptr(),
                       masks_stride_b=stride_b if batch > 1 else 0, masks_stride_h=stride_h, masks_stride_w=stride_w,
                       batch=batch, height=height, width=width, apply_sigmoid=int(apply_sigmoid), scale=scale,
                       bias=bias, channels1=channels1, channels2=channels2, eps1=eps1, eps2=eps2, out=out.data_ptr(),
                       **{name: t.data_ptr() for name, t in params.items()})
        return out

    def fall_back() -> torch.Tensor:
        stages = (_kernel_stage(conv1_weight, conv1_bias, norm1_weight, norm1_bias, eps1),
                  _kernel_stage(conv2_weight, conv2_bias, norm2_weight, norm2_bias, eps2))
        return _torch_stages(masks, stages, apply_sigmoid, scale, bias)

    return launch_or_fall_back("mf::mask_stem_kernel", device, (masks.dtype, weight_dtype), launch, fall_back)


def conv3x3s2_ln_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                      norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """One mask stage on tensor cores: x (B, H, W, C_in) channels-last -> conv3x3 stride 2 padding 1
    (``weight`` (C_out, C_in, 3, 3)) -> LayerNorm over C_out -> exact GELU -> (B, Ho, Wo, C_out).
    Parameters in x's dtype or float32; fp32 in TF32 where torch gives an ``nn.Conv2d`` TF32."""
    op = "conv3x3s2_ln_gelu"
    check_tensor(op, "x", x, shape=(None, None, None, None))
    batch, height, width, in_channels = x.shape
    weight_dtype = parameter_dtype(x.dtype, weight, bias, norm_weight, norm_bias)
    weight = parameter(op, "weight", weight, weight_dtype, (None, in_channels, 3, 3))
    out_channels = weight.shape[0]
    bias, norm_weight, norm_bias = (parameter(op, name, t, weight_dtype, (out_channels,)) for name, t in (
        ("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)))
    device = library.kernel_device(op, x=x, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias)
    x = contiguous_aligned(x)  # read in 16-byte vectors

    def launch() -> torch.Tensor:
        out = new_output((batch, conv_out(height), conv_out(width), out_channels), x.dtype, x.device)
        library.launch(op, device, dtype=library.dtype_code(x.dtype), weight_dtype=library.dtype_code(weight_dtype),
                       x=x.data_ptr(), batch=batch, height=height, width=width, in_channels=in_channels,
                       out_channels=out_channels, weight=weight.data_ptr(), bias=bias.data_ptr(),
                       norm_weight=norm_weight.data_ptr(), norm_bias=norm_bias.data_ptr(), eps=eps,
                       precise=int(precise_conv_fp32()), out=out.data_ptr())
        return out

    def fall_back() -> torch.Tensor:
        return _torch_stages(x.permute(0, 3, 1, 2), (_kernel_stage(weight, bias, norm_weight, norm_bias, eps),))

    return launch_or_fall_back("mf::conv3x3s2_ln_gelu_kernel", device,
                               (x.dtype, weight_dtype, in_channels, out_channels), launch, fall_back)


# ---- custom ops: what torch.compile and torch.export trace (the fakes give shapes and dtypes) ----


@torch.library.custom_op("memenc_fast::cuda_mask_stem", mutates_args=())
def _mask_stem_op(masks: torch.Tensor, conv1_weight: torch.Tensor, conv1_bias: torch.Tensor,
                  norm1_weight: torch.Tensor, norm1_bias: torch.Tensor, eps1: float, conv2_weight: torch.Tensor,
                  conv2_bias: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, eps2: float,
                  apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    return mask_stem(masks, conv1_weight, conv1_bias, norm1_weight, norm1_bias, eps1, conv2_weight, conv2_bias,
                     norm2_weight, norm2_bias, eps2, apply_sigmoid, scale, bias)


@_mask_stem_op.register_fake
def _(masks, conv1_weight, conv1_bias, norm1_weight, norm1_bias, eps1, conv2_weight, conv2_bias, norm2_weight,
      norm2_bias, eps2, apply_sigmoid, scale, bias):
    batch, _, height, width = masks.shape
    return masks.new_empty((batch, conv_out(conv_out(height)), conv_out(conv_out(width)), conv2_weight.shape[0]))


@torch.library.custom_op("memenc_fast::cuda_conv3x3s2_ln_gelu", mutates_args=())
def _conv3x3s2_ln_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                          norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    return conv3x3s2_ln_gelu(x, weight, bias, norm_weight, norm_bias, eps)


@_conv3x3s2_ln_gelu_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, conv_out(height), conv_out(width), weight.shape[0]))


# ---- the op --------------------------------------------------------------------------------------


def unsupported_reason(stages: Sequence[MaskStage]) -> Optional[str]:
    """Why the kernels cannot run these mask stages, or None when they can."""
    if len(stages) < 2:
        return f"the fused mask path needs at least 2 stages; this downsampler has {len(stages)}"
    for i, stage in enumerate(stages, start=1):
        kernel = tuple(stage.weight.shape[-2:])
        if kernel != (3, 3) or stage.stride != (2, 2) or stage.padding != (1, 1):
            return (f"mask stage {i} is a {kernel} conv with stride {stage.stride} and padding {stage.padding}; "
                    "the kernels run 3x3 stride 2 padding 1 (sam2's configs)")
        if not is_exact_gelu(stage.activation):
            return f"mask stage {i} does not use exact GELU"
    channels = [stages[0].weight.shape[1]] + [stage.weight.shape[0] for stage in stages]
    if not library.has_kernel("mask_stem", in_channels=channels[0], mid_channels=channels[1],
                              out_channels=channels[2]):
        return f"no CUDA kernel for mask stages 1-2 with channels {' -> '.join(map(str, channels[:3]))}"
    for i in range(2, len(stages)):
        if not library.has_kernel("conv3x3s2_ln_gelu", in_channels=channels[i], out_channels=channels[i + 1]):
            return f"no CUDA kernel for mask stage {i + 1} with channels {channels[i]} -> {channels[i + 1]}"
    return None


def mask_downsample(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                    apply_sigmoid: bool, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """``torch_ops.mask_downsample`` on the CUDA kernels: (B, C, h, w) with channels-last memory."""
    if interpol_size is not None and tuple(masks.shape[-2:]) != tuple(interpol_size):
        # SAM 3's resize comes after the transform: both run here and the kernels get the result.
        masks = torch_ops.transformed_mask(masks, interpol_size, apply_sigmoid, scale, bias)
        apply_sigmoid, scale, bias = False, 1.0, 0.0
    first, second = stages[:2]
    x = eager_or_custom_op(mask_stem, _mask_stem_op)(
        masks, first.weight, first.bias, first.norm_weight, first.norm_bias, float(first.eps), second.weight,
        second.bias, second.norm_weight, second.norm_bias, float(second.eps), apply_sigmoid, scale, bias)
    for stage in stages[2:]:
        x = eager_or_custom_op(conv3x3s2_ln_gelu, _conv3x3s2_ln_gelu_op)(
            x, stage.weight, stage.bias, stage.norm_weight, stage.norm_bias, float(stage.eps))
    return x.permute(0, 3, 1, 2)
