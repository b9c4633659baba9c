"""The ``torch`` backend: the fused pipeline in plain PyTorch, on any device and dtype.

It is the fallback for every op another backend lacks, so its signatures define the op
vocabulary. Features between ops are channels-last tokens ``(B, H, W, C)``, contiguous.

The CPU twin of the GPU fusion plan: one GEMM over the concatenated K for proj+add, LayerNorm
affine and gamma pre-folded into the MLP weights, LayerNorm on contiguous channels, and each
CXBlock MLP run over chunks of tokens so its 4x-wide hidden stays in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import PackedBlock, PackedEncoder, is_exact_gelu
from ..reference import resize_mask

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "resized_mask", "MLP_CHUNK_TOKENS"]

MLP_CHUNK_TOKENS = 2048
"""Tokens per MLP chunk: 2048 x 1024 hidden x 4 B = 8 MB, about what a core's share of L2/L3 holds."""


def _activate(activation: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) if is_exact_gelu(activation) else activation(x)


def mask_downsample(
    masks: torch.Tensor, packed: PackedEncoder, apply_sigmoid: bool, scale: float = 1.0, bias: float = 0.0
) -> torch.Tensor:
    """Mask logits (B, 1, Hm, Wm) -> last stage's features (B, C, h, w), any memory layout.

    Applies ``sigmoid`` when asked, then ``* scale + bias`` (SAM 2's caller transform), the
    optional resize, then every conv -> LayerNorm2d -> activation stage. The final 1x1 conv is
    not applied here: it is part of ``proj_add``'s concatenated GEMM. Runs one object at a time
    (outside compiled code), so each object's intermediates stay in cache between stages.
    """
    if torch.compiler.is_compiling() or masks.shape[0] <= 1:
        return _mask_stages(masks, packed, apply_sigmoid, scale, bias)
    return torch.cat([_mask_stages(masks[i:i + 1], packed, apply_sigmoid, scale, bias)
                      for i in range(masks.shape[0])]).contiguous(memory_format=torch.channels_last)


def resized_mask(masks: torch.Tensor, packed: PackedEncoder, apply_sigmoid: bool, scale: float,
                 bias: float) -> torch.Tensor:
    """The mask after the optional sigmoid, ``* scale + bias`` and SAM 3's resize, in the masks'
    dtype. Kernels that fuse the first three call it only when a resize is due."""
    x = torch.sigmoid(masks) if apply_sigmoid else masks
    if scale != 1.0:
        x = x * scale
    if bias != 0.0:
        x = x + bias
    if packed.interpol_size is not None and list(x.shape[-2:]) != packed.interpol_size:
        x = resize_mask(x, packed.interpol_size).to(masks.dtype)
    return x


def _affine_layer_norm(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, then ``* weight + bias``."""
    if (torch.is_grad_enabled() and tokens.dtype in (torch.bfloat16, torch.float16)
            and (weight.requires_grad or bias.requires_grad)):
        # torch's CPU layer_norm backward sums the weight and bias gradients over all rows in the
        # input's dtype: in bf16 over a mask stage's 10^6 pixels they come out ~50% wrong. A
        # separate affine has its gradients reduced in float32, like the reference's.
        return torch.addcmul(bias, F.layer_norm(tokens, (tokens.shape[-1],), eps=eps), weight)
    return F.layer_norm(tokens, (tokens.shape[-1],), weight, bias, eps)


def _mask_stages(masks: torch.Tensor, packed: PackedEncoder, apply_sigmoid: bool, scale: float,
                 bias: float) -> torch.Tensor:
    x = resized_mask(masks, packed, apply_sigmoid, scale, bias).contiguous(memory_format=torch.channels_last)
    for stage in packed.stages:
        x = F.conv2d(x, stage.weight, stage.bias, stride=stage.stride, padding=stage.padding)
        tokens = x.permute(0, 2, 3, 1).contiguous()
        tokens = _affine_layer_norm(tokens, stage.norm_weight, stage.norm_bias, stage.norm_eps)
        x = _activate(stage.activation, tokens).permute(0, 3, 1, 2)
    return x


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, packed: PackedEncoder) -> torch.Tensor:
    """``W_m m + W_p p + b`` as one GEMM over the concatenated channels -> tokens (B, H, W, C)."""
    batch, _, height, width = pix_feat.shape
    concat = torch.cat([mask_features.permute(0, 2, 3, 1), pix_feat.permute(0, 2, 3, 1)], dim=3)
    out = torch.addmm(packed.proj_bias, concat.view(-1, concat.shape[-1]), packed.proj_weight.t())
    return out.view(batch, height, width, packed.proj_weight.shape[0])


def cxblock(x: torch.Tensor, block: PackedBlock) -> torch.Tensor:
    """One CXBlock on tokens (B, H, W, C): dwconv -> LayerNorm -> MLP (folded) -> + residual."""
    channels = x.shape[-1]
    mixed = F.conv2d(x.permute(0, 3, 1, 2), block.dw_weight, block.dw_bias, padding=block.padding,
                     groups=block.groups)
    normed = F.layer_norm(mixed.permute(0, 2, 3, 1).contiguous(), (channels,), eps=block.norm_eps)
    normed = normed.view(-1, channels)
    out = x + block.b2
    out_rows = out.view(-1, channels)
    if torch.compiler.is_compiling():
        # Under a compiler or exporter the hidden's lifetime is the compiler's business, and
        # slicing by the token count would specialize a dynamic batch size.
        _mlp_into(out_rows, normed, block)
        return out
    for start in range(0, normed.shape[0], MLP_CHUNK_TOKENS):
        rows = slice(start, start + MLP_CHUNK_TOKENS)
        _mlp_into(out_rows[rows], normed[rows], block)
    return out


def _mlp_into(out: torch.Tensor, normed: torch.Tensor, block: PackedBlock) -> None:
    """``out += act(normed @ w1^T + b1) @ w2^T`` for one slab of tokens."""
    hidden = _activate(block.activation, torch.addmm(block.b1, normed, block.w1.t()))
    out.addmm_(hidden, block.w2.t())


def out_proj(x: torch.Tensor, packed: PackedEncoder) -> torch.Tensor:
    """Tokens (B, H, W, C) -> NCHW output (B, C_out, H, W), contiguous; the 1x1 conv if any."""
    batch, height, width, channels = x.shape
    tokens = x.view(batch, height * width, channels)
    if packed.out_weight is None:
        return tokens.transpose(1, 2).reshape(batch, channels, height, width).contiguous()
    # W @ X^T writes channels-first directly: no transpose pass over the output.
    out = torch.matmul(packed.out_weight, tokens.transpose(1, 2)) + packed.out_bias[:, None]
    return out.view(batch, packed.out_weight.shape[0], height, width)
