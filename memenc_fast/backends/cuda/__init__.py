"""The ``cuda`` backend: the CUDA kernels of ``csrc/`` where they apply, cuBLAS (through torch) for
the remaining GEMMs, and the ``torch`` op, per op, for configurations without a kernel.

- ``mask_downsample``: ``mask_stem_kernel`` (sigmoid/scale/bias + stages 1-2 chained, CUDA cores),
  then ``conv3x3s2_ln_gelu_kernel`` per later stage (implicit GEMM on tensor cores);
- ``proj_add``: ``proj_add_kernel`` (concatenated-K GEMM on tensor cores, biases in the epilogue);
- ``cxblock``: ``dwconv_ln_kernel`` (dwconv + LayerNorm with its affine, and the residual), then the
  MLP on cuBLAS through torch;
- ``out_proj``: no kernel of its own; torch runs it, in fp32 as the conv it is (:func:`out_proj`).

The ops have the signatures of ``torch_ops`` (the op vocabulary) and read the module's live
parameters; features between ops are channels-last tokens. Each kernel launch has a validated
wrapper that checks its inputs before anything is launched, and a ``torch.library`` custom op
(``memenc_fast::cuda_*``) with a fake implementation that compiled and exported code traces.
Whether the kernels can run a structure on a device is answered in one place, :func:`unsupported_ops`;
a launch the GPU refuses anyway runs the torch op (``kernel_args.launch_or_fall_back``).

The launch configurations are chosen per GPU by the library (each launcher's plan);
:func:`report_launches` reads them for any GPU without one, for the kernel report. Precision follows
torch per layer: the kernels' fp32 GEMMs replace ``nn.Conv2d`` layers and take TF32 where
``torch.backends.cudnn.allow_tf32`` allows it; the MLP's cuBLAS GEMMs obey
``torch.backends.cuda.matmul.allow_tf32`` as ``nn.Linear`` does.

Where the library's runtime cannot serve the machine (a driver older than it, no driver) the backend
is unavailable (``library.unavailable_reason``); where it cannot serve a device, every op is refused
there (:func:`unsupported_ops`), which is also where the kernels are first made ready on a device.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ...gpus import GpuSpec
from ...structure import Pointwise, Structure
from .. import torch_ops
from . import cxblock as _cxblock
from . import library
from . import mask_downsample as _mask_downsample
from . import proj_add as _proj_add
from .cxblock import cxblock
from .mask_downsample import mask_downsample
from .proj_add import proj_add

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "unsupported_ops", "auto_skip_reason",
           "report_launches"]

_OPS = ("mask_downsample", "proj_add", "cxblock", "out_proj")


def out_proj(x: torch.Tensor, layer: Optional[Pointwise]) -> torch.Tensor:
    """``torch_ops.out_proj``: tokens (B, H, W, C) -> NCHW output (B, N, H, W), contiguous; the 1x1
    conv if any, at the precision the reference's ``nn.Conv2d`` gets.

    torch's op is one cuBLAS GEMM, which obeys ``torch.backends.cuda.matmul.allow_tf32`` (default
    False), while the layer it replaces obeys ``torch.backends.cudnn.allow_tf32`` (default True). In
    fp32 it therefore runs as the conv it is, on cuDNN over the tokens' channels-last view, which reads
    the conv's flag when it runs (eagerly, compiled or captured alike), then one pass to NCHW. 16-bit
    dtypes have no TF32 question: torch's op writes NCHW directly.
    """
    if layer is None or x.dtype != torch.float32:
        return torch_ops.out_proj(x, layer)
    return F.conv2d(x.permute(0, 3, 1, 2), layer.weight.to(x.dtype), layer.bias.to(x.dtype)).contiguous()


def unsupported_ops(structure: Structure, device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """The ops of this backend that cannot run ``structure`` on ``device`` in ``dtype`` (op name ->
    why); those run the torch op. Every op is refused, for one reason, where the library has no code
    for the GPU, its code there does not serve ``dtype`` (bf16 before sm_80) or its runtime cannot use
    the device; otherwise the structure decides (parameters may be in any dtype). Asking readies the
    kernels on ``device`` (``library.device_refusal``), outside any capture's rules."""
    refusal = library.device_refusal(device, dtype)
    if refusal is not None:
        return dict.fromkeys(_OPS, refusal)
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


def auto_skip_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``auto`` should pass this backend over on ``device`` in ``dtype``: never. Where the
    kernels serve a GPU at all (``unsupported_ops``), each runs the generation's fastest path the
    library has (tensor cores where the arch has them for the dtype, fp32 on CUDA cores on sm_75),
    fused where torch is not, and the MLPs run on cuBLAS as torch's do."""
    return None


def report_launches(batch: int, dtype: torch.dtype, weight_dtype: torch.dtype, spec: GpuSpec, *,
                    mask_size: int = 1024, feature_size: int = 64) -> List[Dict[str, object]]:
    """The kernel launches of one SAM 2 forward (masks ``mask_size``², features ``feature_size``²,
    channels 1 -> 4 -> 16 -> 64 -> 256, two CXBlocks of dim 256 with 7x7 dwconvs; SAM 3: 1152 and 72)
    of ``batch`` objects in ``dtype`` with parameters in ``weight_dtype``, as the library's plans
    choose them for a GPU like ``spec`` running its native code: per launch, ``kernel`` (the
    instantiation's name as c++filt prints it), ``grid`` (blocks), ``block`` (threads),
    ``dynamic_smem`` (bytes), ``config`` (the tile), and ``small_grid_reason`` where the grid has
    fewer blocks than the GPU has SMs (why that is the faster choice). Empty where that GPU's code
    does not serve ``dtype``. Needs the library (built), not a GPU.

    Raises ValueError where ``feature_size`` is not what the mask path makes of ``mask_size``.
    """
    loaded = library.load()
    major, minor = spec.capability
    if 10 * major + minor < loaded.min_arch(dtype):
        return []
    conv_out = _mask_downsample.conv_out
    stage1 = conv_out(mask_size)
    stage2 = conv_out(stage1)
    stage3 = conv_out(stage2)
    if conv_out(stage3) != feature_size:
        raise ValueError(f"report_launches: masks of {mask_size}² make {conv_out(stage3)}² features, "
                         f"not {feature_size}²")
    dtypes = dict(dtype=library.dtype_code(dtype), weight_dtype=library.dtype_code(weight_dtype))
    pixels, dim = feature_size * feature_size, 256
    precise = int(library.precise_conv_fp32())
    plans = [
        loaded.plan("mask_stem", spec, **dtypes, batch=batch, height=mask_size, width=mask_size, channels1=4,
                    channels2=16),
        loaded.plan("conv3x3s2_ln_gelu", spec, **dtypes, batch=batch, height=stage2, width=stage2, in_channels=16,
                    out_channels=64, precise=precise),
        loaded.plan("conv3x3s2_ln_gelu", spec, **dtypes, batch=batch, height=stage3, width=stage3, in_channels=64,
                    out_channels=dim, precise=precise),
        # As SAM 2 calls it: the mask features channels-last (the mask path's), pix_feat NCHW.
        loaded.plan("proj_add", spec, **dtypes, batch=batch, pixels=pixels, mask_channels=dim, pix_channels=dim,
                    out_channels=dim, mask_stride_b=pixels * dim if batch > 1 else 0, mask_stride_c=1,
                    mask_stride_p=dim, pix_stride_b=dim * pixels if batch > 1 else 0, pix_stride_c=pixels,
                    pix_stride_p=1, precise=precise),
    ]
    plans += [loaded.plan("dwconv_ln", spec, **dtypes, batch=batch, height=feature_size, width=feature_size,
                          channels=dim, kernel_size=7)] * 2
    return [dict(kernel=plan.kernel, grid=plan.blocks, block=plan.block, dynamic_smem=plan.dynamic_smem,
                 config=plan.config, **({} if plan.small_grid_reason is None else
                                        {"small_grid_reason": plan.small_grid_reason}))
            for plan in plans]
