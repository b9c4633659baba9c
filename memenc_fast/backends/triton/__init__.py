"""The ``triton`` backend: the op vocabulary of ``torch_ops`` (same signatures and semantics) on
the Triton kernels of ``memenc_fast.kernels``, on CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``).

One module per op (``mask_downsample``, ``proj_add``, ``cxblock``, ``out_proj``), each with its
validated wrapper and its ``torch.library`` custom op (``memenc_fast::triton_*``, with a fake),
which compiled and exported code traces; eager calls run the wrapper directly. Beyond the four
ops, ``cxblock_out_proj(x, block, layer)`` is ``out_proj(cxblock(x, block), layer)`` with out_proj
in the block's MLP epilogue, for the last block.

``unsupported_ops`` is the one place that says which of these ops cannot run a structure; the
dispatcher runs the torch op for those, and the wrappers only validate tensors.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ...kernels.cxblock import MAX_CHANNELS as BLOCK_MAX_CHANNELS
from ...kernels.mask_downsample import MAX_CHANNELS as STAGE_MAX_CHANNELS
from ...kernels.mask_downsample import MAX_STAGES
from ...structure import Structure, is_exact_gelu
from .cxblock import cxblock, cxblock_out_proj
from .mask_downsample import mask_downsample
from .out_proj import out_proj
from .proj_add import proj_add

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "cxblock_out_proj", "unsupported_ops"]


def _mask_path_reason(structure: Structure) -> Optional[str]:
    stages = structure.stages
    if not stages:
        return "the mask downsampler has no conv stage"
    if len(stages) > MAX_STAGES:
        return f"the kernel unrolls at most {MAX_STAGES} stages; this downsampler has {len(stages)}"
    first = stages[0]
    for i, stage in enumerate(stages):
        if (stage.weight.shape[-2:], stage.stride, stage.padding) != (first.weight.shape[-2:], first.stride,
                                                                       first.padding):
            return f"stage {i} has another kernel size, stride or padding than stage 0; the kernel runs one for all"
        if stage.weight.shape[0] > STAGE_MAX_CHANNELS:
            return (f"stage {i} has {stage.weight.shape[0]} output channels; the kernel takes at most "
                    f"{STAGE_MAX_CHANNELS}")
        if not is_exact_gelu(stage.activation):
            return f"stage {i}'s activation is not exact GELU, the one the kernel fuses"
    return None


def _block_reason(structure: Structure) -> Optional[str]:
    for i, block in enumerate(structure.blocks):
        channels = block.dw_weight.shape[0]
        if block.groups != channels or block.dw_weight.shape[1] != 1:
            return f"block {i}'s dwconv is not depthwise"
        if channels > BLOCK_MAX_CHANNELS:
            return f"block {i} has dim {channels}; the MLP kernel holds at most {BLOCK_MAX_CHANNELS} channels"
        if not is_exact_gelu(block.activation):
            return f"block {i}'s activation is not exact GELU, the one the kernel fuses"
    return None


def _fused_out_proj_reason(structure: Structure, dtype: torch.dtype, block_reason: Optional[str]) -> Optional[str]:
    if block_reason is not None:
        return block_reason
    layer = structure.out_projection
    if layer is None:
        return "out_proj is an Identity: there is nothing to fuse"
    if dtype == torch.float32:
        return "fp32 runs out_proj as a kernel of its own (in the MLP's epilogue its CUDA-core dot spilled)"
    if layer.weight.shape[0] > BLOCK_MAX_CHANNELS:
        return (f"out_proj has {layer.weight.shape[0]} output channels; the MLP's epilogue holds at most "
                f"{BLOCK_MAX_CHANNELS}")
    return None


def unsupported_ops(structure: Structure, device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """The ops this backend cannot run for ``structure`` in ``dtype`` (op -> why): the
    dispatcher runs those as torch ops (``cxblock_out_proj`` as ``cxblock`` then ``out_proj``).
    Inputs on ``device`` in ``dtype`` are served alike on every device this backend serves."""
    block_reason = _block_reason(structure)
    reasons = {"mask_downsample": _mask_path_reason(structure), "cxblock": block_reason,
               "cxblock_out_proj": _fused_out_proj_reason(structure, dtype, block_reason)}
    return {op: reason for op, reason in reasons.items() if reason is not None}
