"""The ``torch`` backend: the fused pipeline in plain PyTorch, on any device and dtype.

It is the fallback for every op another backend lacks, so its signatures define the op
vocabulary (see ``dispatch.OPS``). Features between ops are channels-last tokens ``(B, H, W, C)``,
contiguous. The weights are the module's live parameters (``structure``'s records), cast to the
compute dtype where they differ from it (autocast).

The CPU twin of the GPU fusion plan: one GEMM over the concatenated K for proj+add, LayerNorm on
contiguous channels (finite wherever sam2's is), gamma folded into the second MLP weight per call (one pass over 256x1024
values, against 10^9 multiply-adds of the block), and each CXBlock MLP run over chunks of tokens
so its 4x-wide hidden stays in cache.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..reference import resize_mask
from ..structure import Block, MaskStage, Pointwise, Projection, is_exact_gelu

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "pointwise_tokens", "transformed_mask",
           "MLP_CHUNK_TOKENS"]

MLP_CHUNK_TOKENS = 2048
"""Tokens per MLP chunk: 2048 x 1024 hidden x 4 B = 8 MB, about what a core's share of L2/L3 holds."""


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _activate(activation: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) if is_exact_gelu(activation) else type(activation).forward(activation, x)


def mask_downsample(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                    apply_sigmoid: bool, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """Mask logits (B, C, Hm, Wm) -> last stage's features (B, C', h, w), any memory layout.

    Applies ``sigmoid`` when asked, then ``* scale + bias`` (SAM 2's caller transform), the
    resize to ``interpol_size`` (SAM 3) when the masks have another size, then every conv ->
    LayerNorm2d -> activation stage. The downsampler's final 1x1 conv is part of ``proj_add``.
    Runs one object at a time (outside compiled code), so each object's intermediates stay in
    cache between stages.
    """
    if torch.compiler.is_compiling() or masks.shape[0] <= 1:
        return _mask_stages(masks, stages, interpol_size, apply_sigmoid, scale, bias)
    return torch.cat([_mask_stages(masks[i:i + 1], stages, interpol_size, apply_sigmoid, scale, bias)
                      for i in range(masks.shape[0])]).contiguous(memory_format=torch.channels_last)


def transformed_mask(masks: torch.Tensor, interpol_size: Optional[Tuple[int, int]], apply_sigmoid: bool,
                     scale: float, bias: float) -> torch.Tensor:
    """The mask after the optional sigmoid, ``* scale + bias`` and SAM 3's resize, in the masks'
    dtype. Kernels that fuse the first two call it only when a resize is due."""
    x = torch.sigmoid(masks) if apply_sigmoid else masks
    if scale != 1.0:
        x = x * scale
    if bias != 0.0:
        x = x + bias
    if interpol_size is not None and tuple(x.shape[-2:]) != tuple(interpol_size):
        x = resize_mask(x, interpol_size).to(masks.dtype)
    return x


def _affine_layer_norm(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, then ``* weight + bias``, in the tokens' dtype; finite
    wherever sam2's LayerNorm2d is.

    Where squares overflow (inputs of ~1e19 and more) sam2's formula gets an infinite variance
    and so a finite output, while ``F.layer_norm`` returns NaN. On the CPU, eagerly,
    ``F.layer_norm`` (two passes over the data; the formula written out takes six, a third of a
    B=1 forward) runs first and the written-out formula only where its result is not finite.
    Elsewhere the formula is written out: compilers fuse it, and a finiteness check would cost a
    device sync. A separate affine also gets its gradients reduced in float32 (torch's CPU
    layer_norm backward sums them in the input's dtype: in bf16 over a mask stage's 10^6 pixels
    ~50% off).
    """
    dtype = tokens.dtype
    weight, bias = _cast(weight, dtype), _cast(bias, dtype)
    channels = (tokens.shape[-1],)
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and dtype in (torch.bfloat16, torch.float16) and (
                weight.requires_grad or bias.requires_grad):
            out = torch.addcmul(bias, F.layer_norm(tokens, channels, eps=eps), weight)
        else:
            out = F.layer_norm(tokens, channels, weight, bias, eps)
        if torch.isfinite(out).all():
            return out
    x = tokens.float() if dtype in (torch.bfloat16, torch.float16) else tokens
    centered = x - x.mean(-1, keepdim=True)
    normed = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    return torch.addcmul(bias, normed.to(dtype), weight)


def _mask_stages(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                 apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    x = transformed_mask(masks, interpol_size, apply_sigmoid, scale, bias)
    x = x.contiguous(memory_format=torch.channels_last)
    dtype = masks.dtype
    for stage in stages:
        x = F.conv2d(x, _cast(stage.weight, dtype), _cast(stage.bias, dtype), stride=stage.stride,
                     padding=stage.padding)
        tokens = x.permute(0, 2, 3, 1).contiguous()
        tokens = _affine_layer_norm(tokens, stage.norm_weight, stage.norm_bias, stage.eps)
        x = _activate(stage.activation, tokens).permute(0, 3, 1, 2)
    return x


def _matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1x1 conv weight (N, C, 1, 1) as the (N, C) matrix, in ``dtype``."""
    return _cast(weight.flatten(1), dtype)


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``W_m m + b_m + W_p p + b_p`` as one GEMM over the concatenated channels -> tokens (B, H, W, C)."""
    batch, _, height, width = pix_feat.shape
    dtype = pix_feat.dtype
    concat = torch.cat([mask_features.permute(0, 2, 3, 1), pix_feat.permute(0, 2, 3, 1)], dim=3)
    weight = torch.cat([_matrix(projection.mask_weight, dtype), _matrix(projection.pix_weight, dtype)], dim=1)
    bias = _cast(projection.mask_bias, dtype) + _cast(projection.pix_bias, dtype)
    out = torch.addmm(bias, concat.view(-1, concat.shape[-1]), weight.t())
    return out.view(batch, height, width, weight.shape[0])


def pointwise_tokens(x: torch.Tensor, layer: Pointwise) -> torch.Tensor:
    """A 1x1 conv on tokens (B, H, W, C) -> tokens (B, H, W, N) (the fuser's input projection)."""
    return F.linear(x, _matrix(layer.weight, x.dtype), _cast(layer.bias, x.dtype))


def _folded_second_layer(block: Block, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``gamma * pwconv2``'s weight and bias, folded in at least float32 and cast to ``dtype``."""
    if block.gamma is None:
        return _cast(block.w2, dtype), _cast(block.b2, dtype)
    fold = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = block.gamma.to(fold)
    return (gamma[:, None] * block.w2.to(fold)).to(dtype), (gamma * block.b2.to(fold)).to(dtype)


def cxblock(x: torch.Tensor, block: Block) -> torch.Tensor:
    """One CXBlock on tokens (B, H, W, C): dwconv -> LayerNorm -> MLP -> gamma -> + residual."""
    channels = x.shape[-1]
    dtype = x.dtype
    mixed = F.conv2d(x.permute(0, 3, 1, 2), _cast(block.dw_weight, dtype), _cast(block.dw_bias, dtype),
                     padding=block.padding, groups=block.groups)
    normed = _affine_layer_norm(mixed.permute(0, 2, 3, 1).contiguous(), block.norm_weight, block.norm_bias,
                                block.eps).view(-1, channels)
    w1, b1 = _cast(block.w1, dtype), _cast(block.b1, dtype)
    w2, b2 = _folded_second_layer(block, dtype)
    out = x + b2
    out_rows = out.view(-1, channels)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        # Under a compiler or exporter the hidden's lifetime is the compiler's business, and
        # slicing by the token count would specialize a dynamic batch size; autograd keeps every
        # chunk's hidden anyway.
        return out + _mlp(normed, w1, b1, w2, block.activation).view(out.shape)
    for start in range(0, normed.shape[0], MLP_CHUNK_TOKENS):
        rows = slice(start, start + MLP_CHUNK_TOKENS)
        out_rows[rows].addmm_(_hidden(normed[rows], w1, b1, block.activation), w2.t())
    return out


def _hidden(normed: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, activation: torch.nn.Module) -> torch.Tensor:
    return _activate(activation, torch.addmm(b1, normed, w1.t()))


def _mlp(normed: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
         activation: torch.nn.Module) -> torch.Tensor:
    return torch.mm(_hidden(normed, w1, b1, activation), w2.t())


def out_proj(x: torch.Tensor, layer: Optional[Pointwise]) -> torch.Tensor:
    """Tokens (B, H, W, C) -> NCHW output (B, N, H, W), contiguous; the 1x1 conv if any."""
    batch, height, width, channels = x.shape
    tokens = x.view(batch, height * width, channels)
    if layer is None:
        return tokens.transpose(1, 2).reshape(batch, channels, height, width).contiguous()
    weight = _matrix(layer.weight, x.dtype)
    # W @ X^T writes channels-first directly: no transpose pass over the output.
    out = torch.matmul(weight, tokens.transpose(1, 2)) + _cast(layer.bias, x.dtype)[:, None]
    return out.view(batch, weight.shape[0], height, width)
