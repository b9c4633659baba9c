"""The ``triton`` backend: the op vocabulary of ``torch_ops`` (same signatures and semantics) on
the Triton kernels in ``memenc_fast.kernels``, on CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``). Each op runs the torch op, with a one-time logged reason, for the
configurations its kernel does not cover.

Beyond the four ops: ``cxblock_out_proj(x, block, packed)`` is ``out_proj(cxblock(x, block),
packed)`` with out_proj fused into the block's MLP epilogue, for the last block.
"""

from __future__ import annotations

from ..kernels.cxblock import cxblock, cxblock_out_proj
from ..kernels.mask_downsample import mask_downsample
from ..kernels.out_proj import out_proj
from ..kernels.proj_add import proj_add

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "cxblock_out_proj"]
