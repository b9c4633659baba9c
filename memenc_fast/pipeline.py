"""The fused pipeline over a backend's op table: the ops in order, batches split so no launch
indexes more than 2^31 - 1 elements, and the whole forward as one custom op for ``torch.compile``
where a backend's launchers cannot be traced.

A backend is traceable when its ops are ATen ops or custom ops with fake implementations
(``torch``, ``cuda``). The Triton launchers are Python that prepares and caches kernel arguments;
compiled code runs them behind ``memenc_fast::fused_forward``, whose fake gives the output's shape
and whose real implementation is the eager pipeline (batch splitting included).
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Tuple

import torch

from .dispatch import op_table
from .packing import PackedEncoder, flatten_packed, unflatten_packed

__all__ = ["run_ops", "objects_per_launch", "run_in_chunks", "opaque_forward"]

Options = Tuple[bool, float, float]
"""(apply the sigmoid, then ``* scale + bias``) to the masks, as the mask op takes them."""


def run_ops(ops: Mapping[str, Callable], packed: PackedEncoder, pix_feat: torch.Tensor, masks: torch.Tensor,
            apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    """The fused pipeline: mask path, concatenated-K projection + add, CXBlocks, output projection."""
    mask_features = ops["mask_downsample"](masks, packed, apply_sigmoid, scale, bias)
    x = ops["proj_add"](mask_features, pix_feat, packed)
    blocks = packed.blocks
    fused_last = "cxblock_out_proj" in ops and len(blocks) > 0
    for block in blocks[:-1] if fused_last else blocks:
        x = ops["cxblock"](x, block)
    if fused_last:
        return ops["cxblock_out_proj"](x, blocks[-1], packed)
    return ops["out_proj"](x, packed)


def objects_per_launch(packed: PackedEncoder, mask_size: Tuple[int, int], feature_size: Tuple[int, int],
                       max_elements: int) -> int:
    """How many objects one pass of the fused ops may take so that no tensor a kernel indexes
    (the mask, each stage's output, the 4x-wide MLP hidden) exceeds ``max_elements``."""
    mask_elements = mask_size[0] * mask_size[1]
    if packed.interpol_size is not None:
        mask_elements = max(mask_elements, packed.interpol_size[0] * packed.interpol_size[1])
    tokens = feature_size[0] * feature_size[1]
    sizes = [mask_elements, tokens * packed.proj_weight.shape[1]]  # the mask; [mask ; pix_feat] tokens
    pixels = mask_elements
    for stage in packed.stages:
        pixels = -(-pixels // (stage.stride[0] * stage.stride[1]))
        sizes.append(pixels * stage.weight.shape[0])
    sizes += [tokens * block.w1.shape[0] for block in packed.blocks]
    return max(1, max_elements // max(sizes))


def run_in_chunks(ops: Mapping[str, Callable], packed: PackedEncoder, pix_feat: torch.Tensor, masks: torch.Tensor,
                  options: Options, max_elements: int) -> torch.Tensor:
    """``run_ops`` over as few batch chunks as keep every launch within ``max_elements``."""
    chunk = objects_per_launch(packed, tuple(masks.shape[-2:]), tuple(pix_feat.shape[-2:]), max_elements)
    if masks.shape[0] <= chunk:
        return run_ops(ops, packed, pix_feat, masks, *options)
    return torch.cat([run_ops(ops, packed, pix_feat[i:i + chunk], masks[i:i + chunk], *options)
                      for i in range(0, masks.shape[0], chunk)])


@torch.library.custom_op("memenc_fast::fused_forward", mutates_args=())
def _fused_forward_op(backend: str, pix_feat: torch.Tensor, masks: torch.Tensor, weights: List[torch.Tensor],
                      layout: List[int], scalars: List[float], apply_sigmoid: bool, scale: float, bias: float,
                      max_elements: int) -> torch.Tensor:
    packed = unflatten_packed(weights, layout, scalars)
    out = run_in_chunks(op_table(backend), packed, pix_feat, masks, (apply_sigmoid, scale, bias), max_elements)
    return out.contiguous()


@_fused_forward_op.register_fake
def _(backend, pix_feat, masks, weights, layout, scalars, apply_sigmoid, scale, bias, max_elements):
    packed = unflatten_packed(weights, layout, scalars)
    channels = (packed.proj_weight if packed.out_weight is None else packed.out_weight).shape[0]
    return masks.new_empty((pix_feat.shape[0], channels, pix_feat.shape[2], pix_feat.shape[3]))


def opaque_forward(backend: str, packed: PackedEncoder, pix_feat: torch.Tensor, masks: torch.Tensor,
                   options: Options, max_elements: int) -> torch.Tensor:
    """``run_in_chunks`` on ``backend``'s ops as one ``memenc_fast::fused_forward`` call (what
    compiled code runs for backends it cannot trace); the output is contiguous (B, C, h, w)."""
    weights, layout, scalars = flatten_packed(packed)
    return _fused_forward_op(backend, pix_feat, masks, weights, layout, scalars, *options, max_elements)
