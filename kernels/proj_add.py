"""``proj_add``: the downsampler's final 1x1 conv plus ``pix_feat_proj``, added, in one kernel.

``out = W_m . m + b_m + W_p . p + b_p``: each output tile runs two K loops into one accumulator,
over the mask features' channels with ``W_m`` and over pix_feat's with ``W_p`` (both 1x1 conv
weights (C, K, 1, 1) as stored, in their own dtype), and adds both biases in the epilogue. The
sources are read straight from their own layouts (the mask path's channels-last output,
pix_feat's NCHW) through strides. With one source the same kernel is ``out_proj``
(``out_proj.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    DeviceLimits,
    Launch,
    ceil_div,
    dot_precision,
    first_filling_wave,
    fits_shared_memory,
    fp32_dot_operands,
    needs_int64_offsets,
    operand,
    padded,
    pipelined_shared_bytes,
    report_tf32_settings,
    rounded,
    tensor_core_dots,
    type_name,
    widened,
    widest_dtype,
)

__all__ = ["PointwiseConfig", "choose_config", "plan_pointwise", "plan_proj_add", "report_launches"]


@triton.jit
def _accumulate(acc, src, s_c, s_p, p, p_ok, w_ptr, n, n_ok, compute_ptr,
                K: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    """acc += src[p, 0:K] @ w[n, 0:K]^T: src pixel p, channel k at ``src + k*s_c + p*s_p`` (int64
    offsets with WIDE); ``w`` a (N, K, 1, 1) conv weight as stored."""
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        a = tl.load(src + widened(k, WIDE)[None, :] * s_c + widened(p, WIDE)[:, None] * s_p,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(operand(a, compute_ptr, UPCAST), operand(w, compute_ptr, UPCAST), acc, input_precision=PREC)
    return acc


@triton.jit
def _pointwise_kernel(
    a_ptr, a_sb, a_sc, a_sp, wa_ptr, ba_ptr,
    c_ptr, c_sb, c_sc, c_sp, wc_ptr, bc_ptr,
    o_ptr, o_sb, o_sc, o_sp, hw, tiles_per_image,
    KA: tl.constexpr, KC: tl.constexpr, N: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    WIDE_A: tl.constexpr, WIDE_C: tl.constexpr,
):
    """One BM-pixel x BN-channel tile of one image: ``a @ wa^T + ba (+ c @ wc^T + bc)``.

    KC == 0 means no second source (its pointers are then never read). A tile never spans two
    images, so every address is (batch, channel, pixel) strided: the batch offset in int64, the
    offsets within an image of a source in int64 where it is a view reaching that far (WIDE_A,
    WIDE_C). The compute dtype is the output's.
    """
    pid = tl.program_id(0)
    b = pid // tiles_per_image
    p = (pid - b * tiles_per_image) * BM + tl.arange(0, BM)
    p_ok = p < hw
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    b64 = b.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, a_ptr + b64 * a_sb, a_sc, a_sp, p, p_ok, wa_ptr, n, n_ok, o_ptr, KA, BK, UPCAST, PREC,
                      WIDE_A)
    acc += tl.load(ba_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if KC > 0:
        acc = _accumulate(acc, c_ptr + b64 * c_sb, c_sc, c_sp, p, p_ok, wc_ptr, n, n_ok, o_ptr, KC, BK, UPCAST,
                          PREC, WIDE_C)
        acc += tl.load(bc_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # The output is this package's own contiguous allocation, under 2**31 elements per launch.
    offsets = n[None, :] * o_sc + p[:, None] * o_sp
    tl.store(o_ptr + b64 * o_sb + offsets, rounded(acc, o_ptr, UPCAST), mask=p_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class PointwiseConfig:
    """BM pixels x BN output channels per program, K in steps of BK."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        return f"BM={self.bm} BN={self.bn} BK={self.bk} w{self.num_warps} s{self.num_stages}"


@functools.lru_cache(maxsize=64)  # planning costs microseconds per call, as much as a B=1 launch
def choose_config(batch: int, hw: int, n: int, compute: torch.dtype, weights: torch.dtype, device: DeviceLimits,
                  tf32: bool = False, for_interpreter: bool = False) -> PointwiseConfig:
    """The one place the launch configuration is chosen (the wrappers and the report use it).

    Tensor cores: 128 x 128 tiles (128 x 256 spilled on sm_80), then 64 x 64 on 8 warps, 32 x 64
    and 16 x 64 on 4, until the grid fills a wave of the device's SMs (small batches: SAM 2's
    per-object call). K chunks of 64, 32 for weights wider than the activations (fp32 under bf16
    autocast); as many pipeline stages (3 at most) as the device's shared memory holds with the
    weights as loaded. fp32 takes the tensor-core tiles where TF32 is allowed (``tf32``, torch's
    flag for the conv the launch replaces). CUDA-core dots (IEEE fp32; sm_75, see
    ``tensor_core_dots``) hold both operands
    in registers: 32 x 64, then 16 x 64 tiles (64 x 64 spilled on sm_90a; a K step under 16 would
    not compile with triton 3.6). ``for_interpreter``: whole images per program (Python overhead
    per tl op, no registers).
    """
    n_pad = padded(n)
    if for_interpreter:
        return PointwiseConfig(min(4096, padded(hw)), n_pad, 64, 4, 1)

    def programs(tile: Tuple[int, int]) -> int:
        return batch * ceil_div(hw, tile[0]) * ceil_div(n, tile[1])

    if not tensor_core_dots(compute, device, tf32):
        bm, bn = first_filling_wave([(32, min(n_pad, 64)), (16, min(n_pad, 64))], programs, device)
        # sm_75's ptxas fit a 32 x 64 fp32 tile on 4 warps into 72 registers and spilled.
        return PointwiseConfig(bm, bn, 16, 8 if tuple(device.capability) < (8, 0) else 4, 2)
    # 64 x 128 tiles spilled with triton 3.6: on 4 warps on sm_86 and sm_89, on 8 on sm_80. TF32
    # operands take twice the registers of 16-bit ones where mma.sync reads them from registers
    # (all but sm_90's and sm_100's wgmma/tcgen05): 128 x 128 spilled on sm_80, sm_86 and sm_89.
    largest = (64, 64) if compute == torch.float32 and device.capability[0] not in (9, 10) else (128, 128)
    tiles = list(dict.fromkeys((bm, min(n_pad, bn)) for bm, bn in (largest, (64, 64), (32, 64), (16, 64))))
    bm, bn = first_filling_wave(tiles, programs, device)
    # Wider weights pass through registers for their conversion: a BK x BN fp32 tile of 64 x 128
    # spilled on sm_80 with triton 3.6.
    bk = 32 if weights.itemsize > compute.itemsize else 64
    stages = next(s for s in (3, 2, 1) if s == 1 or fits_shared_memory(
        pipelined_shared_bytes(s, compute, [(bm * bk, compute), (bk * bn, weights)]), device))
    # ptxas held 4 warps of a 64 x 64 tile to 128 registers and spilled (triton 3.6, sm_86/89).
    return PointwiseConfig(bm, bn, bk, 8 if bm * bn >= 64 * 64 else 4, stages)


def _pixel_view(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, channel, pixel) strides of a (B, C, H, W)-indexed tensor whose H and W collapse
    into one pixel index (NCHW, channels-last, or a single row)."""
    return t.stride(0), t.stride(1), t.stride(3)


def plan_pointwise(
    kernel: str,
    a: torch.Tensor,
    a_weight: torch.Tensor,
    a_bias: torch.Tensor,
    c: Optional[torch.Tensor],
    c_weight: Optional[torch.Tensor],
    c_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    device: DeviceLimits,
    for_interpreter: bool = INTERPRETED,
    tf32: bool = False,
) -> Launch:
    """The launch of ``a_weight . a + a_bias (+ c_weight . c + c_bias)`` per pixel into ``out``.

    ``a``, ``c`` and ``out`` are (B, C, H, W)-indexed views whose H and W collapse into one pixel
    index (any batch and channel strides); the weights are (N, K, 1, 1) contiguous, the biases
    (N,), each in any float dtype; the compute dtype is ``out``'s. ``tf32``: whether torch allows
    the 1x1 convs TF32 (``torch.backends.cudnn.allow_tf32``, read by the caller).
    """
    batch, ka, height, width = a.shape
    kc = 0 if c is None else c.shape[1]
    n = a_weight.shape[0]
    hw = height * width
    second = c is not None
    weights = widest_dtype([a_weight] if c_weight is None else [a_weight, c_weight])
    cfg = choose_config(batch, hw, n, out.dtype, weights, device, tf32, for_interpreter)
    tiles = ceil_div(hw, cfg.bm)
    a_sb, a_sc, a_sp = _pixel_view(a)
    c_sb, c_sc, c_sp = _pixel_view(c) if second else (a_sb, a_sc, a_sp)
    o_sb, o_sc, o_sp = _pixel_view(out)
    args = dict(
        a_ptr=a, a_sb=a_sb, a_sc=a_sc, a_sp=a_sp, wa_ptr=a_weight, ba_ptr=a_bias,
        c_ptr=c if second else a, c_sb=c_sb, c_sc=c_sc, c_sp=c_sp,
        wc_ptr=c_weight if second else a_weight, bc_ptr=c_bias if second else a_bias,
        o_ptr=out, o_sb=o_sb, o_sc=o_sc, o_sp=o_sp, hw=hw, tiles_per_image=tiles,
    )
    constexprs = dict(KA=ka, KC=kc, N=n, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                      UPCAST=fp32_dot_operands(out.dtype, device),
                      PREC=dot_precision(out.dtype, device, tf32), WIDE_A=needs_int64_offsets(a),
                      WIDE_C=second and needs_int64_offsets(c))
    weight_bytes = n * (ka + kc + 2) * weights.itemsize
    return Launch(
        kernel=kernel, fn=_pointwise_kernel, grid=(batch * tiles, ceil_div(n, cfg.bn)), args=args,
        constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        config=f"{cfg.describe()} W={type_name(weights)}", matrix_work=True,
        flops=2 * batch * hw * n * (ka + kc),
        min_bytes=batch * hw * (ka + kc + n) * out.element_size() + weight_bytes,
        tf32=dot_precision(out.dtype, device, tf32) == "tf32",
    )


def plan_proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, mask_weight: torch.Tensor,
                  mask_bias: torch.Tensor, pix_weight: torch.Tensor, pix_bias: torch.Tensor, out: torch.Tensor,
                  device: DeviceLimits, for_interpreter: bool = INTERPRETED, tf32: bool = False) -> Launch:
    """The proj_add launch: mask features (B, C_m, H, W) and pix_feat (B, C_p, H, W), as
    (B, C, H, W)-indexed views, into tokens ``out`` (B, H, W, C) contiguous; ``tf32`` as in
    ``plan_pointwise``."""
    return plan_pointwise("proj_add", mask_features, mask_weight, mask_bias, pix_feat, pix_weight, pix_bias,
                          out.permute(0, 3, 1, 2), device, for_interpreter, tf32)


def report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> List[Launch]:
    """The kernel report's proj_add launches at the SAM 2 shape (64x64 features, 256 + 256 -> 256),
    with weights in ``dtype`` and, for bf16/fp16, also in fp32 (autocast); fp32 with IEEE and
    with TF32 dots."""
    def meta(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    launches = []
    for weights in dict.fromkeys((dtype, torch.float32)):
        for tf32 in report_tf32_settings(dtype):
            mask_features = meta(batch, 64, 64, 256).permute(0, 3, 1, 2)
            launches.append(plan_proj_add(
                mask_features, meta(batch, 256, 64, 64), meta(256, 256, 1, 1, dtype=weights),
                meta(256, dtype=weights), meta(256, 256, 1, 1, dtype=weights), meta(256, dtype=weights),
                meta(batch, 64, 64, 256), device, for_interpreter=False, tf32=tf32))
    return launches
