"""``cxblock`` on the CUDA kernel of ``csrc/cxblock.cu`` (depthwise conv + LayerNorm with its affine,
and the residual ``x + gamma * b2``) and cuBLAS through torch for the MLP, whose second GEMM
accumulates into that residual with ``gamma[:, None] * w2``. A launch the GPU refuses runs the kernel's
computation in torch instead (``kernel_args.launch_or_fall_back``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ...structure import Block, is_exact_gelu
from ..kernel_args import check_tensor, eager_or_custom_op, launch_or_fall_back, new_output
from . import library
from .library import contiguous_aligned, optional_parameter, parameter, parameter_dtype

__all__ = ["MLP_CHUNK_TOKENS", "dwconv_ln", "unsupported_reason", "cxblock"]

MLP_CHUNK_TOKENS = 8192
"""Tokens per MLP chunk: the 1024-wide hidden of 8192 tokens is 16 MB in bf16, which stays in an
H100's 50 MB L2 between the GEMM that writes it, GELU and the GEMM that reads it."""


def dwconv_ln(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, norm_weight: torch.Tensor,
              norm_bias: torch.Tensor, eps: float, b2: torch.Tensor,
              gamma: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depthwise KxK conv ("same" padding) + LayerNorm over channels with its affine, on tokens
    x (B, H, W, C) -> (normalized tokens, residual ``x + gamma * b2``), both (B, H, W, C).

    ``dw_weight`` (C, 1, K, K); ``gamma`` None means no layer scale. Parameters in x's dtype or
    float32.
    """
    op = "dwconv_ln"
    check_tensor(op, "x", x, shape=(None, None, None, None))
    batch, height, width, channels = x.shape
    weight_dtype = parameter_dtype(x.dtype, dw_weight, dw_bias, norm_weight, norm_bias, b2, gamma)
    dw_weight = parameter(op, "dw_weight", dw_weight, weight_dtype, (channels, 1, None, None))
    kernel_size = dw_weight.shape[2]
    check_tensor(op, "dw_weight", dw_weight, weight_dtype, (channels, 1, kernel_size, kernel_size))
    dw_bias, norm_weight, norm_bias, b2 = (parameter(op, name, t, weight_dtype, (channels,)) for name, t in (
        ("dw_bias", dw_bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("b2", b2)))
    gamma = optional_parameter(op, "gamma", gamma, weight_dtype, (channels,))
    params = dict(dw_weight=dw_weight, dw_bias=dw_bias, norm_weight=norm_weight, norm_bias=norm_bias, b2=b2)
    device = library.kernel_device(op, x=x, **params, **({} if gamma is None else {"gamma": gamma}))
    x = contiguous_aligned(x)  # read in channel pairs

    def launch() -> Tuple[torch.Tensor, torch.Tensor]:
        normed, residual = new_output(x.shape, x.dtype, x.device), new_output(x.shape, x.dtype, x.device)
        library.launch(op, device, dtype=library.dtype_code(x.dtype), weight_dtype=library.dtype_code(weight_dtype),
                       x=x.data_ptr(), batch=batch, height=height, width=width, channels=channels,
                       kernel_size=kernel_size, eps=eps, gamma=None if gamma is None else gamma.data_ptr(),
                       normed=normed.data_ptr(), residual=residual.data_ptr(),
                       **{name: t.data_ptr() for name, t in params.items()})
        return normed, residual

    def fall_back() -> Tuple[torch.Tensor, torch.Tensor]:
        return _dwconv_ln_in_torch(x, dw_weight, dw_bias, norm_weight, norm_bias, eps, b2, gamma)

    return launch_or_fall_back("mf::dwconv_ln_kernel", device, (x.dtype, weight_dtype, channels, kernel_size), launch,
                               fall_back)


def _dwconv_ln_in_torch(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, norm_weight: torch.Tensor,
                        norm_bias: torch.Tensor, eps: float, b2: torch.Tensor,
                        gamma: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """What ``dwconv_ln``'s kernel computes, in torch: the depthwise conv in x's dtype, LayerNorm
    with its affine and the residual ``x + gamma * b2`` in float32, each rounded once."""
    channels, dtype = x.shape[-1], x.dtype
    mixed = F.conv2d(x.permute(0, 3, 1, 2), _as(dw_weight, dtype), _as(dw_bias, dtype),
                     padding=dw_weight.shape[-1] // 2, groups=channels)
    normed = F.layer_norm(mixed.permute(0, 2, 3, 1).float(), (channels,), norm_weight.float(), norm_bias.float(), eps)
    shift = b2.float() if gamma is None else gamma.float() * b2.float()
    return normed.to(dtype).contiguous(), (x.float() + shift).to(dtype)


@torch.library.custom_op("memenc_fast::cuda_dwconv_ln", mutates_args=())
def _dwconv_ln_op(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, norm_weight: torch.Tensor,
                  norm_bias: torch.Tensor, eps: float, b2: torch.Tensor,
                  gamma: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return dwconv_ln(x, dw_weight, dw_bias, norm_weight, norm_bias, eps, b2, gamma)


@_dwconv_ln_op.register_fake
def _(x, dw_weight, dw_bias, norm_weight, norm_bias, eps, b2, gamma):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def unsupported_reason(block: Block) -> Optional[str]:
    """Why the kernel cannot run this block, or None when it can."""
    channels, per_group, height, width = block.dw_weight.shape
    if per_group != 1 or block.groups != channels:
        return "the dwconv is not depthwise"
    if height != width:
        return f"the dwconv is {height}x{width}; the kernel runs square convs"
    if not is_exact_gelu(block.activation):
        return "the MLP does not use exact GELU"
    if not library.has_kernel("dwconv_ln", kernel_size=height, channels=channels):
        return f"no CUDA kernel for {channels} channels and a {height}x{width} dwconv"
    return None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _second_layer_weight(block: Block, dtype: torch.dtype) -> torch.Tensor:
    """``gamma[:, None] * w2`` in ``dtype``: one small elementwise op per call (in the parameters'
    precision, rounded once), only when there is a gamma or the dtypes differ."""
    if block.gamma is None:
        return _as(block.w2, dtype)
    return torch.mul(block.gamma[:, None], block.w2, out=torch.empty(block.w2.shape, dtype=dtype,
                                                                     device=block.w2.device))


def _mlp_into(out_rows: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor) -> None:
    """``out_rows += GELU(rows @ w1^T + b1) @ w2^T``."""
    out_rows.addmm_(F.gelu(torch.addmm(b1, rows, w1.t())), w2.t())


def cxblock(x: torch.Tensor, block: Block) -> torch.Tensor:
    """``torch_ops.cxblock``: dwconv + LayerNorm (and the residual) on CUDA, the MLP on cuBLAS.

    The MLP runs over chunks of tokens so that its 4x-wide hidden stays in L2; the second GEMM
    accumulates into the residual the kernel wrote, so the add costs no pass.
    """
    normed, out = eager_or_custom_op(dwconv_ln, _dwconv_ln_op)(
        x, block.dw_weight, block.dw_bias, block.norm_weight, block.norm_bias, float(block.eps), block.b2,
        block.gamma)
    dtype, channels = x.dtype, x.shape[-1]
    w1, b1, w2 = _as(block.w1, dtype), _as(block.b1, dtype), _second_layer_weight(block, dtype)
    rows, out_rows = normed.view(-1, channels), out.view(-1, channels)
    if torch.compiler.is_compiling():
        # As in torch_ops: under a compiler the hidden's lifetime is the compiler's business.
        _mlp_into(out_rows, rows, w1, b1, w2)
        return out
    for start in range(0, rows.shape[0], MLP_CHUNK_TOKENS):
        chunk = slice(start, start + MLP_CHUNK_TOKENS)
        _mlp_into(out_rows[chunk], rows[chunk], w1, b1, w2)
    return out
