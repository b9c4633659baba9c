"""The ``torch`` backend: the fused pipeline in plain PyTorch, on any device and dtype.

It is the fallback for every op another backend lacks, so its signatures define the op
vocabulary (see ``dispatch.OPS``). Features between ops are channels-last tokens ``(B, H, W, C)``,
contiguous. The weights are the module's live parameters (``structure``'s records), cast to the
compute dtype where they differ from it (autocast).

The CPU twin of the GPU fusion plan: proj+add as two GEMMs accumulating into one output (no
concatenated copy), LayerNorm on contiguous channels (finite wherever sam2's is), gamma folded
into the second MLP weight per call (one pass over 256x1024 values, against 10^9 multiply-adds of
the block), and each CXBlock MLP with its bias, GELU and residual in oneDNN GEMM epilogues on
the CPU, or over chunks of tokens elsewhere so its 4x-wide hidden stays in cache.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..reference import resize_mask
from ..structure import Block, MaskStage, Pointwise, Projection, is_exact_gelu

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "pointwise_tokens", "transformed_mask",
           "auto_skip_reason", "MLP_CHUNK_TOKENS"]

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

PER_OBJECT_MIN_PIXELS = 1 << 19
"""Masks of at least this many pixels go through the mask path one object at a time. On the
2-core CI machine (fp32, B=2 and 4), batched vs one at a time: 128² masks 1.1/1.4 vs 1.5/2.8 ms,
512² 6.6/13.6 vs 8.2/14.8 ms, but 1024² 50/78 vs 28/58 ms: past the cache, one object's stages
chained back to back win."""

MLP_CHUNK_TOKENS = 2048
"""Tokens per MLP chunk: 2048 x 1024 hidden x 4 B = 8 MB, about what a core's share of L2/L3 holds."""

ONEDNN_CHUNK_TOKENS = 8192
"""Tokens per oneDNN MLP call: a 32 MB fp32 hidden at most (SAM 2's 4096 tokens in one call
measured as fast as in chunks of 512 to 2048)."""


def auto_skip_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``auto`` runs the reference rather than this backend on ``device`` in ``dtype``.

    The cost rule, measured on the 2-core CI machine (min of 15-41 runs, the reference's time
    over this backend's, no grad): fp32 at 32², 64², 128², 256², 512², 1024² and 1152² masks,
    B 1 to 16, 1.06x-1.95x; bf16 and bf16 autocast 1.14x-1.33x; float64 0.65x-0.77x (oneDNN,
    which runs this backend's channels-last convolutions and fused GEMMs, has no float64
    kernels). So everywhere but float64 on the CPU this backend is the faster path.
    """
    if device.type == "cpu" and dtype == torch.float64:
        return "on the CPU in float64 the reference is faster (0.65x-0.77x measured: oneDNN has no float64 kernels)"
    return None


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
    Large masks run one object at a time (outside compiled code), so each object's intermediates
    stay in cache between stages (see ``PER_OBJECT_MIN_PIXELS``).
    """
    pixels = masks.shape[-2] * masks.shape[-1]
    if torch.compiler.is_compiling() or masks.shape[0] <= 1 or pixels < PER_OBJECT_MIN_PIXELS:
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


def _layer_norm_formula(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        dim: int) -> torch.Tensor:
    """sam2's LayerNorm formula over ``dim`` (channels), in at least float32, then ``* weight +
    bias`` in x's dtype. Where squares overflow (inputs of ~1e19 and more) the variance is
    infinite and the output finite, as sam2's is (``F.layer_norm`` returns NaN there). A separate
    affine also gets its gradients reduced in float32 (torch's CPU layer_norm backward sums them in
    the input's dtype: in bf16 over a mask stage's 10^6 pixels ~50% off)."""
    dtype = x.dtype
    wide = x.float() if dtype in (torch.bfloat16, torch.float16) else x
    centered = wide - wide.mean(dim, keepdim=True)
    normed = centered * torch.rsqrt(centered.square().mean(dim, keepdim=True) + eps)
    shape = (-1,) + (1,) * (x.dim() - 1 - dim % x.dim())  # the channel axis of x, for broadcasting
    return torch.addcmul(_cast(bias, dtype).view(shape), normed.to(dtype), _cast(weight, dtype).view(shape))


def _affine_layer_norm(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of tokens, then ``* weight + bias``; finite wherever
    sam2's LayerNorm2d is.

    On the CPU, eagerly, ``torch.native_layer_norm`` (two passes over the data; the formula
    written out takes six: a third of a B=1 forward) runs first, and the formula only where a
    row's 1/std is not finite (its variance overflowed). Elsewhere the formula runs: compilers fuse
    it, and a finiteness check would cost a device sync.
    """
    dtype = tokens.dtype
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and dtype in (torch.bfloat16, torch.float16)
            and (weight.requires_grad or bias.requires_grad)):
        out, _, rstd = torch.native_layer_norm(tokens, [tokens.shape[-1]], _cast(weight, dtype),
                                               _cast(bias, dtype), eps)
        if torch.isfinite(rstd.sum()):
            return out
    return _layer_norm_formula(tokens, weight, bias, eps, -1)


NCHW_LAYER_NORM_MAX_CHANNELS = 16
"""Mask stages this narrow normalize in NCHW, across channel planes: layer_norm over rows of 4 or
16 channels is slow (SAM 2 at 1024²: 5.3 ms vs 0.8 for stage 1's 4 channels, 1.0 vs 0.65 for
stage 2's 16, on the 2-core CI machine); wider ones run layer_norm on channels-last rows."""


def _mask_stages(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                 apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    x = transformed_mask(masks, interpol_size, apply_sigmoid, scale, bias)
    dtype = masks.dtype
    for stage in stages:
        narrow = stage.weight.shape[0] <= NCHW_LAYER_NORM_MAX_CHANNELS
        x = x.contiguous(memory_format=torch.contiguous_format if narrow else torch.channels_last)
        x = F.conv2d(x, _cast(stage.weight, dtype), _cast(stage.bias, dtype), stride=stage.stride,
                     padding=stage.padding)
        if narrow:
            x = _activate(stage.activation, _layer_norm_formula(x.contiguous(), stage.norm_weight,
                                                                stage.norm_bias, stage.eps, 1))
        else:
            tokens = _affine_layer_norm(x.permute(0, 2, 3, 1).contiguous(), stage.norm_weight, stage.norm_bias,
                                        stage.eps)
            x = _activate(stage.activation, tokens).permute(0, 3, 1, 2)
    return x


def _matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1x1 conv weight (N, C, 1, 1) as the (N, C) matrix, in ``dtype``."""
    return _cast(weight.flatten(1), dtype)


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``W_m m + b_m + W_p p + b_p`` -> tokens (B, H, W, C): two GEMMs accumulating into one
    output, each reading its source where it lies (pix_feat NCHW as transposed tokens), so no
    concatenated copy of the inputs is made."""
    batch, pix_channels, height, width = pix_feat.shape
    dtype = pix_feat.dtype
    mask_weight, pix_weight = _matrix(projection.mask_weight, dtype), _matrix(projection.pix_weight, dtype)
    bias = _cast(projection.mask_bias, dtype) + _cast(projection.pix_bias, dtype)
    pix_tokens = pix_feat.reshape(batch, pix_channels, height * width).transpose(1, 2)
    out = torch.baddbmm(bias, pix_tokens, pix_weight.t().expand(batch, -1, -1))
    mask_tokens = mask_features.permute(0, 2, 3, 1).reshape(-1, mask_weight.shape[1])
    out.view(-1, out.shape[-1]).addmm_(mask_tokens, mask_weight.t())
    return out.view(batch, height, width, out.shape[-1])


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
    if _onednn_fuses(normed, block.activation):
        return _onednn_mlp(normed, x.view(-1, channels), w1, b1, w2, b2).view(x.shape)
    out = x + b2
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        # Under a compiler or exporter the hidden's lifetime is the compiler's business, and
        # slicing by the token count would specialize a dynamic batch size; autograd keeps every
        # chunk's hidden anyway.
        hidden = _activate(block.activation, torch.addmm(b1, normed, w1.t()))
        return out + torch.mm(hidden, w2.t()).view(out.shape)
    out_rows = out.view(-1, channels)
    for start in range(0, normed.shape[0], MLP_CHUNK_TOKENS):
        rows = slice(start, start + MLP_CHUNK_TOKENS)
        hidden = _activate(block.activation, torch.addmm(b1, normed[rows], w1.t()))
        out_rows[rows].addmm_(hidden, w2.t())
    return out


def _onednn_fuses(normed: torch.Tensor, activation: torch.nn.Module) -> bool:
    # oneDNN's fused ops have no autograd formula and are not for compilers to trace.
    return (normed.device.type == "cpu" and normed.dtype in (torch.float32, torch.bfloat16)
            and _ONEDNN_LINEAR and is_exact_gelu(activation)
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _onednn_mlp(normed: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``residual + GELU(normed @ w1^T + b1) @ w2^T + b2`` as two oneDNN GEMMs with the bias and
    GELU, then the bias and the residual, in their epilogues: no bias broadcast copies, no
    separate passes over the 4x-wide hidden or the output (SAM 2, 2-core CI machine: 21.4 vs
    24.5 ms a block at B=1 for addmm, GELU and addmm_ into the residual). Chunks of
    ``ONEDNN_CHUNK_TOKENS`` bound the hidden's size at large batches."""
    chunks = [torch.ops.mkldnn._linear_pointwise.binary(
        torch.ops.mkldnn._linear_pointwise(normed[start:start + ONEDNN_CHUNK_TOKENS], w1, b1, "gelu", [], "none"),
        residual[start:start + ONEDNN_CHUNK_TOKENS], w2, b2, "add")
        for start in range(0, max(normed.shape[0], 1), ONEDNN_CHUNK_TOKENS)]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


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
