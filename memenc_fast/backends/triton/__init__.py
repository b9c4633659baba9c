"""The ``triton`` backend: the op vocabulary of ``torch_ops`` (same signatures and semantics) on
the Triton kernels of ``memenc_fast.kernels``, on CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``).

One module per op (``mask_downsample``, ``proj_add``, ``cxblock``, ``out_proj``), each with its
validated wrapper and its ``torch.library`` custom op (``memenc_fast::triton_*``, with a fake),
which compiled and exported code traces; eager calls run the wrapper directly. Beyond the four
ops, ``cxblock_out_proj(x, block, layer)`` is ``out_proj(cxblock(x, block), layer)`` with out_proj
in the block's MLP epilogue, for the last block.

``unsupported_ops`` is the one place that says which of these ops cannot run a structure on a
device; the dispatcher runs the torch op for those, and the wrappers only validate tensors (and
run the torch op where a GPU refuses a launch all the same). ``auto_skip_reason`` says where
``auto`` should leave this backend to others although it can run.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ...dispatch import OPS, constant_while_tracing
from ...kernels._common import tensor_core_dots
from ...kernels.cxblock import MAX_CHANNELS as BLOCK_MAX_CHANNELS
from ...kernels.cxblock import fuses_out_proj
from ...kernels.mask_downsample import MAX_CHANNELS as STAGE_MAX_CHANNELS
from ...kernels.mask_downsample import MAX_STAGES
from ...structure import Structure, is_exact_gelu
from ._common import device_spec
from .cxblock import cxblock, cxblock_out_proj
from .mask_downsample import mask_downsample
from .out_proj import out_proj
from .proj_add import proj_add

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "cxblock_out_proj", "unsupported_ops",
           "auto_skip_reason"]


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


def _fused_out_proj_reason(structure: Structure, device: torch.device, dtype: torch.dtype,
                           block_reason: Optional[str]) -> Optional[str]:
    if block_reason is not None:
        return block_reason
    layer = structure.out_projection
    if layer is None:
        return "out_proj is an Identity: there is nothing to fuse"
    if not structure.blocks:
        return "the fuser has no block to fuse out_proj into"
    last = structure.blocks[-1]
    if not _fuses_out_proj(device, dtype, last.w1.dtype, last.w2.dtype, layer.weight.dtype):
        return ("out_proj runs as a kernel of its own in fp32 (whose dots follow TF32 flags read at every call) "
                "and where the MLP's epilogue spilled with it: 16-bit dots on CUDA cores (sm_75), or weights wider "
                "than the activations on sm_100")
    if layer.weight.shape[0] > BLOCK_MAX_CHANNELS:
        return (f"out_proj has {layer.weight.shape[0]} output channels; the MLP's epilogue holds at most "
                f"{BLOCK_MAX_CHANNELS}")
    return None


# unsupported_ops and auto_skip_reason also run while torch.compile traces: what they read of the
# GPU is answered outside the trace (constant_while_tracing), from constant arguments.


@constant_while_tracing
def _fuses_out_proj(device: torch.device, dtype: torch.dtype, *weights: torch.dtype) -> bool:
    """``kernels.cxblock.fuses_out_proj`` on ``device`` for the widest of ``weights``."""
    return fuses_out_proj(dtype, max(weights, key=lambda w: w.itemsize), device_spec(device))


@constant_while_tracing
def _device_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why no kernel runs ``dtype`` on ``device`` (a GPU without it), or None."""
    if device.type != "cuda":
        return None
    spec = device_spec(device)
    if dtype == torch.bfloat16 and not spec.bf16:
        return f"bf16 needs sm_80; this is {spec.arch} ({spec.name})"
    return None


def unsupported_ops(structure: Structure, device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """The ops this backend cannot run for ``structure`` on ``device`` in ``dtype`` (op -> why):
    the dispatcher runs those as torch ops (``cxblock_out_proj`` as ``cxblock`` then
    ``out_proj``); every op where the GPU cannot serve the dtype (bf16 before sm_80)."""
    device_reason = _device_reason(device, dtype)
    if device_reason is not None:
        return {op: device_reason for op in OPS}
    block_reason = _block_reason(structure)
    reasons = {"mask_downsample": _mask_path_reason(structure), "cxblock": block_reason,
               "cxblock_out_proj": _fused_out_proj_reason(structure, device, dtype, block_reason)}
    return {op: reason for op, reason in reasons.items() if reason is not None}


@constant_while_tracing
def auto_skip_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``auto`` should prefer another backend for ``dtype`` on ``device`` although this one
    runs there, or None: Triton emits no tensor-core code before sm_80 (T4), so its 16-bit
    matrix work runs on CUDA cores, where torch's cuBLAS/cuDNN calls use tensor cores."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    spec = device_spec(device)
    if not tensor_core_dots(dtype, spec):
        return (f"Triton has no tensor-core code for {spec.arch} ({spec.name}): its {str(dtype)[6:]} dots run on "
                f"CUDA cores")
    return None
