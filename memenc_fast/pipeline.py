"""The fused pipeline over a backend's op table: the ops in order, with batches split so that no
launch indexes more than 2^31 - 1 elements.

The same code runs eagerly and under ``torch.compile``/``torch.export``: every backend's ops are
ATen ops (``torch``) or custom ops with fake implementations (``triton``, ``cuda``), so compiled
code traces this op chain for every backend.
"""

from __future__ import annotations

from typing import Callable, Mapping, Tuple

import torch

from .backends.torch_ops import pointwise_tokens
from .structure import Structure

__all__ = ["Options", "run_ops", "objects_per_launch", "run_in_chunks"]

Options = Tuple[bool, float, float]
"""(apply the sigmoid, then ``* scale + bias``) to the masks, as the mask op takes them."""


def run_ops(ops: Mapping[str, Callable], structure: Structure, pix_feat: torch.Tensor, masks: torch.Tensor,
            apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    """Mask path, projection + add, (the fuser's input projection,) CXBlocks, output projection."""
    mask_features = ops["mask_downsample"](masks, structure.stages, structure.interpol_size(), apply_sigmoid,
                                           scale, bias)
    x = ops["proj_add"](mask_features, pix_feat, structure.projection)
    if structure.fuser_projection is not None:
        x = pointwise_tokens(x, structure.fuser_projection)
    blocks = structure.blocks
    fused_last = "cxblock_out_proj" in ops and len(blocks) > 0
    for block in blocks[:-1] if fused_last else blocks:
        x = ops["cxblock"](x, block)
    if fused_last:
        return ops["cxblock_out_proj"](x, blocks[-1], structure.out_projection)
    return ops["out_proj"](x, structure.out_projection)


def objects_per_launch(structure: Structure, mask_size: Tuple[int, int], feature_size: Tuple[int, int],
                       max_elements: int) -> int:
    """How many objects one pass of the fused ops may take so that no tensor a kernel indexes
    (the mask, each stage's output, the 4x-wide MLP hidden) exceeds ``max_elements``."""
    pixels = mask_size[0] * mask_size[1]
    interpol_size = structure.interpol_size()
    if interpol_size is not None:
        pixels = max(pixels, interpol_size[0] * interpol_size[1])
    tokens = feature_size[0] * feature_size[1]
    sizes = [pixels * structure.mask_channels]
    for (_, _, stride_h, stride_w, _, _), channels in zip(structure.geometry, structure.stage_channels):
        pixels = -(-pixels // (stride_h * stride_w))
        sizes.append(pixels * channels)
    concat = (structure.stage_channels[-1] if structure.stage_channels else structure.mask_channels)
    sizes += [tokens * (concat + structure.in_dim)] + [tokens * hidden for hidden in structure.hidden_channels]
    return max(1, max_elements // max(sizes))


def run_in_chunks(ops: Mapping[str, Callable], structure: Structure, pix_feat: torch.Tensor, masks: torch.Tensor,
                  options: Options, max_elements: int) -> torch.Tensor:
    """``run_ops`` over as few batch chunks as keep every launch within ``max_elements``."""
    mask_size, feature_size = tuple(masks.shape[-2:]), tuple(pix_feat.shape[-2:])
    if torch.compiler.is_compiling():  # sizes may be symbolic (unhashable) there
        chunk = objects_per_launch(structure, mask_size, feature_size, max_elements)
    else:
        key = (mask_size, feature_size, structure.interpol_size(), max_elements)
        chunk = structure.objects_per_launch.get(key)
        if chunk is None:
            chunk = structure.objects_per_launch[key] = objects_per_launch(structure, mask_size, feature_size,
                                                                           max_elements)
    if masks.shape[0] <= chunk:
        return run_ops(ops, structure, pix_feat, masks, *options)
    return torch.cat([run_ops(ops, structure, pix_feat[i:i + chunk], masks[i:i + chunk], *options)
                      for i in range(0, masks.shape[0], chunk)])
