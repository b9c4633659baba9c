"""``proj_add`` on the CUDA kernel of ``csrc/proj_add.cu``: ``W_m m + b_m + W_p p + b_p`` as one GEMM
over the concatenated channels (tensor cores), reading both 1x1 conv weights where the module keeps
them, the biases added in the epilogue. A launch the GPU refuses runs the torch op instead
(``kernel_args.launch_or_fall_back``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...structure import Projection
from .. import torch_ops
from ..kernel_args import check_tensor, eager_or_custom_op, launch_or_fall_back, new_output
from . import library
from .library import parameter, parameter_dtype, precise_conv_fp32

__all__ = ["proj_add_tokens", "unsupported_reason", "proj_add"]


def _gemm_source(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """(tensor, batch, channel and flattened-pixel strides) of a (B, C, H, W) GEMM input in a layout
    the kernel reads in 16-byte vectors: channels-last or channels-first as it lies, else a
    channels-last copy."""
    batch, channels, height, width = t.shape
    vec = 16 // t.element_size()
    stride_b, stride_c, stride_h, stride_w = t.stride()
    stride_b = stride_b if batch > 1 else 0
    aligned = t.data_ptr() % 16 == 0 and stride_b % vec == 0
    if aligned and stride_c == 1 and stride_h == width * stride_w and stride_w % vec == 0:
        return t, stride_b, 1, stride_w
    if aligned and stride_w == 1 and stride_h == width and stride_c % vec == 0 and (height * width) % vec == 0:
        return t, stride_b, stride_c, 1
    t = t.contiguous(memory_format=torch.channels_last)
    return t, (t.stride(0) if batch > 1 else 0), 1, channels


def proj_add_tokens(mask_features: torch.Tensor, pix_feat: torch.Tensor, mask_weight: torch.Tensor,
                    mask_bias: torch.Tensor, pix_weight: torch.Tensor, pix_bias: torch.Tensor) -> torch.Tensor:
    """``mask_weight . mask_features + mask_bias + pix_weight . pix_feat + pix_bias`` per pixel -> tokens
    (B, H, W, C_out).

    ``mask_features`` (B, C_m, H, W) and ``pix_feat`` (B, C_p, H, W), any memory layout (channels-last
    and NCHW are read in place); the weights are 1x1 conv weights (C_out, C_m, 1, 1) and
    (C_out, C_p, 1, 1), in the features' dtype or float32. fp32 in TF32 where torch gives an
    ``nn.Conv2d`` TF32 (the layers it replaces are 1x1 convs).
    """
    op = "proj_add"
    check_tensor(op, "mask_features", mask_features, shape=(None, None, None, None))
    batch, mask_channels, height, width = mask_features.shape
    dtype = mask_features.dtype
    pix_channels = check_tensor(op, "pix_feat", pix_feat, dtype, (batch, None, height, width)).shape[1]
    weight_dtype = parameter_dtype(dtype, mask_weight, mask_bias, pix_weight, pix_bias)
    mask_weight = parameter(op, "mask_weight", mask_weight, weight_dtype, (None, mask_channels, 1, 1))
    out_channels = mask_weight.shape[0]
    pix_weight = parameter(op, "pix_weight", pix_weight, weight_dtype, (out_channels, pix_channels, 1, 1))
    mask_bias = parameter(op, "mask_bias", mask_bias, weight_dtype, (out_channels,))
    pix_bias = parameter(op, "pix_bias", pix_bias, weight_dtype, (out_channels,))
    device = library.kernel_device(op, mask_features=mask_features, pix_feat=pix_feat, mask_weight=mask_weight,
                                   mask_bias=mask_bias, pix_weight=pix_weight, pix_bias=pix_bias)

    def launch() -> torch.Tensor:
        (m, m_b, m_c, m_p), (p, p_b, p_c, p_p) = _gemm_source(mask_features), _gemm_source(pix_feat)
        out = new_output((batch, height, width, out_channels), dtype, mask_features.device)
        library.launch(op, device, dtype=library.dtype_code(dtype), weight_dtype=library.dtype_code(weight_dtype),
                       mask_features=m.data_ptr(), mask_stride_b=m_b, mask_stride_c=m_c, mask_stride_p=m_p,
                       mask_channels=mask_channels, pix_feat=p.data_ptr(), pix_stride_b=p_b, pix_stride_c=p_c,
                       pix_stride_p=p_p, pix_channels=pix_channels, batch=batch, pixels=height * width,
                       out_channels=out_channels, mask_weight=mask_weight.data_ptr(), mask_bias=mask_bias.data_ptr(),
                       pix_weight=pix_weight.data_ptr(), pix_bias=pix_bias.data_ptr(), precise=int(precise_conv_fp32()),
                       out=out.data_ptr())
        return out

    def fall_back() -> torch.Tensor:
        return torch_ops.proj_add(mask_features, pix_feat, Projection(mask_weight, mask_bias, pix_weight, pix_bias))

    return launch_or_fall_back("mf::proj_add_kernel", device,
                               (dtype, weight_dtype, mask_channels, pix_channels, out_channels), launch, fall_back)


@torch.library.custom_op("memenc_fast::cuda_proj_add", mutates_args=())
def _proj_add_op(mask_features: torch.Tensor, pix_feat: torch.Tensor, mask_weight: torch.Tensor,
                 mask_bias: torch.Tensor, pix_weight: torch.Tensor, pix_bias: torch.Tensor) -> torch.Tensor:
    return proj_add_tokens(mask_features, pix_feat, mask_weight, mask_bias, pix_weight, pix_bias)


@_proj_add_op.register_fake
def _(mask_features, pix_feat, mask_weight, mask_bias, pix_weight, pix_bias):
    batch, _, height, width = mask_features.shape
    return mask_features.new_empty((batch, height, width, mask_weight.shape[0]))


def unsupported_reason(projection: Projection) -> Optional[str]:
    """Why the kernel cannot run this projection, or None when it can."""
    out_channels, mask_channels = projection.mask_weight.shape[:2]
    pix_channels = projection.pix_weight.shape[1]
    if not library.has_kernel("proj_add", mask_channels=mask_channels, pix_channels=pix_channels,
                              out_channels=out_channels):
        return f"no CUDA kernel for channels {mask_channels} + {pix_channels} -> {out_channels}"
    return None


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``torch_ops.proj_add`` as one CUDA GEMM over the concatenated channels -> tokens (B, H, W, C)."""
    return eager_or_custom_op(proj_add_tokens, _proj_add_op)(
        mask_features, pix_feat, projection.mask_weight, projection.mask_bias, projection.pix_weight,
        projection.pix_bias)
