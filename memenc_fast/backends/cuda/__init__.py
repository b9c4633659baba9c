"""The ``cuda`` backend: the CUDA kernels of ``csrc/`` where they apply, cuBLAS (through torch) for
the remaining GEMMs, and the ``torch`` op, per op, for configurations without a kernel.

- ``mask_downsample``: ``mask_stem_kernel`` (sigmoid/scale/bias + stages 1-2 chained, CUDA cores),
  then ``conv3x3s2_ln_gelu_kernel`` per later stage (implicit GEMM on tensor cores);
- ``proj_add``: ``proj_add_kernel`` (concatenated-K GEMM on tensor cores, biases in the epilogue);
- ``cxblock``: ``dwconv_ln_kernel`` (dwconv + LayerNorm with its affine, and the residual), then the
  MLP on cuBLAS through torch;
- ``out_proj``: the torch op (cuBLAS).

The ops have the signatures of ``torch_ops`` (the op vocabulary) and read the module's live
parameters; features between ops are channels-last tokens. Each kernel launch has a validated
wrapper that checks its inputs before anything is launched, and a ``torch.library`` custom op
(``memenc_fast::cuda_*``) with a fake implementation that compiled and exported code traces.
Whether the kernels can run a structure is answered in one place, :func:`unsupported_ops`.
"""

from __future__ import annotations

from typing import Dict

import torch

from ...structure import Structure
from . import cxblock as _cxblock
from . import mask_downsample as _mask_downsample
from . import proj_add as _proj_add
from .cxblock import cxblock
from .mask_downsample import mask_downsample
from .proj_add import proj_add

__all__ = ["mask_downsample", "proj_add", "cxblock", "unsupported_ops"]


def unsupported_ops(structure: Structure, device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """The ops of this backend that cannot run ``structure`` (op name -> why); those run the torch
    op. Every kernel serves each device and dtype the registry gives this backend, with parameters in
    any dtype, so the structure alone decides."""
    reasons = {
        "mask_downsample": _mask_downsample.unsupported_reason(structure.stages),
        "proj_add": _proj_add.unsupported_reason(structure.projection),
    }
    for i, block in enumerate(structure.blocks):
        reason = _cxblock.unsupported_reason(block)
        if reason is not None:
            reasons["cxblock"] = f"fuser.layers.{i}: {reason}"
            break
    return {op: reason for op, reason in reasons.items() if reason is not None}
