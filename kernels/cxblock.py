"""One CXBlock on channels-last tokens in two kernels, and its variant with ``out_proj`` fused.

1. ``_dwconv_ln_kernel``: the depthwise conv (weight (C, 1, KH, KW) as stored) and the LayerNorm
   over channels with its affine, for a TH x TW pixel tile with every channel in registers;
   writes the normalized tokens.
2. ``_mlp_kernel``: per BM tokens, ``x + gamma * (GELU(n @ w1^T + b1) @ w2^T + b2)`` with the
   4C-wide hidden produced and consumed BH columns at a time: it never leaves the chip. The
   BM x C fp32 accumulator holds the whole output row, so the bias, gamma and the residual land
   in the epilogue, and so can ``out_proj`` (``FUSE_OUT``: the block's output, rounded to the
   compute dtype as it would be stored, times ``W_out^T`` on tensor cores, stored NCHW).

Every weight is read as stored, in its own dtype; the compute dtype is the tokens'.
"""

from __future__ import annotations

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
    fits_shared_memory,
    gelu,
    next_power_of_2,
    operand,
    padded,
    pipelined_shared_bytes,
    rounded,
    type_name,
    widest_dtype,
)

__all__ = ["DwconvConfig", "MlpConfig", "choose_dwconv_config", "choose_mlp_config", "mlp_shared_bytes",
           "plan_dwconv_ln", "plan_mlp", "report_launches", "MAX_CHANNELS"]

MAX_CHANNELS = 256
"""Widest block (and fused out_proj): the MLP's accumulator holds a whole BM x C row block in
registers."""


@triton.jit
def _dwconv_ln_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, o_ptr, height, width, tiles_w, tiles_per_image,
    C: tl.constexpr, CP: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, EPS: tl.constexpr, UPCAST: tl.constexpr,
):
    """LayerNorm(depthwise conv) with affine ``g``, ``beta`` of a TH x TW tile of tokens (B, H, W, C)."""
    pid = tl.program_id(0)
    b = pid // tiles_per_image
    t = pid - b * tiles_per_image
    q = tl.arange(0, TH * TW)
    y = (t // tiles_w) * TH + q // TW
    x = (t % tiles_w) * TW + q % TW
    inside = (y < height) & (x < width)
    c = tl.arange(0, CP)
    c_ok = c < C
    image = b.to(tl.int64) * height * width * C
    acc = tl.zeros((TH * TW, CP), dtype=tl.float32)
    acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    for tap in range(KH * KW):
        yy = y + (tap // KW - PH)
        xx = x + (tap % KW - PW)
        ok = inside & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        v = tl.load(x_ptr + image + ((yy * width + xx) * C)[:, None] + c[None, :],
                    mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += v * tl.load(w_ptr + c * (KH * KW) + tap, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(acc, axis=1) / C
    centered = tl.where(c_ok[None, :], acc - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / C
    normed = centered * tl.rsqrt(var + EPS)[:, None]
    normed = (normed * tl.load(g_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
              + tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :])
    tl.store(o_ptr + image + ((y * width + x) * C)[:, None] + c[None, :], rounded(normed, o_ptr, UPCAST),
             mask=inside[:, None] & c_ok[None, :])


@triton.jit
def _mlp_kernel(
    n_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gamma_ptr, o_ptr, wo_ptr, bo_ptr, tokens, hw,
    C: tl.constexpr, CP: tl.constexpr, HID: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, HAS_GAMMA: tl.constexpr, FUSE_OUT: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """BM tokens of ``x + gamma * (GELU(n @ w1^T + b1) @ w2^T + b2)`` (then ``@ wo^T + bo`` with
    FUSE_OUT; without HAS_GAMMA, gamma is 1 and ``gamma_ptr`` is never read).

    ``n``, ``x``: (tokens, C); ``w1``: (HID, C); ``w2``: (C, HID); ``wo``: (NO, C, 1, 1). Output:
    tokens (tokens, C), or with FUSE_OUT NCHW (B, NO, H, W) with ``hw`` = H * W. With BK == CP
    the BM x C input tile is loaded once; a smaller BK re-reads it (from cache) in K chunks per
    hidden chunk, for CUDA-core (fp32) dots, which hold a whole K row of operands per thread.
    """
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = m < tokens
    rows = m.to(tl.int64) * C
    c = tl.arange(0, CP)
    c_ok = c < C
    tile_ok = m_ok[:, None] & c_ok[None, :]
    if BK == CP:
        a = operand(tl.load(n_ptr + rows[:, None] + c[None, :], mask=tile_ok, other=0.0), x_ptr, UPCAST)
    acc = tl.zeros((BM, CP), dtype=tl.float32)
    for h0 in range(0, HID, BH):
        h = h0 + tl.arange(0, BH)
        h_ok = h < HID
        if BK == CP:
            w1 = tl.load(w1_ptr + h[None, :] * C + c[:, None], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
            hidden = tl.dot(a, operand(w1, x_ptr, UPCAST), input_precision=PREC)
        else:
            hidden = tl.zeros((BM, BH), dtype=tl.float32)
            for k0 in range(0, C, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < C
                ak = tl.load(n_ptr + rows[:, None] + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w1 = tl.load(w1_ptr + h[None, :] * C + k[:, None], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
                hidden = tl.dot(operand(ak, x_ptr, UPCAST), operand(w1, x_ptr, UPCAST), hidden,
                                input_precision=PREC)
        hidden = gelu(hidden + tl.load(b1_ptr + h, mask=h_ok, other=0.0).to(tl.float32)[None, :])
        w2 = tl.load(w2_ptr + c[None, :] * HID + h[:, None], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(operand(hidden, x_ptr, UPCAST), operand(w2, x_ptr, UPCAST), acc, input_precision=PREC)
    acc += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        acc *= tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(x_ptr + rows[:, None] + c[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if FUSE_OUT:
        no = tl.arange(0, NOP)
        no_ok = no < NO
        wo = tl.load(wo_ptr + no[None, :] * C + c[:, None], mask=c_ok[:, None] & no_ok[None, :], other=0.0)
        out = tl.dot(operand(acc, x_ptr, UPCAST), operand(wo, x_ptr, UPCAST), input_precision=PREC)
        out += tl.load(bo_ptr + no, mask=no_ok, other=0.0).to(tl.float32)[None, :]
        image = m // hw
        offsets = (image.to(tl.int64) * NO * hw + m % hw)[:, None] + (no * hw)[None, :]
        tl.store(o_ptr + offsets, rounded(out, o_ptr, UPCAST), mask=m_ok[:, None] & no_ok[None, :])
    else:
        tl.store(o_ptr + rows[:, None] + c[None, :], rounded(acc, o_ptr, UPCAST), mask=tile_ok)


@dataclass(frozen=True)
class DwconvConfig:
    """TH x TW pixels (every channel) per program."""

    th: int
    tw: int
    num_warps: int

    def describe(self) -> str:
        return f"T={self.th}x{self.tw} w{self.num_warps} s1"


@dataclass(frozen=True)
class MlpConfig:
    """BM tokens per program, the hidden in chunks of BH, the first GEMM's K in chunks of BK
    (None: the whole channel row at once)."""

    bm: int
    bh: int
    bk: Optional[int]
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        k = "" if self.bk is None else f" BK={self.bk}"
        return f"BM={self.bm} BH={self.bh}{k} w{self.num_warps} s{self.num_stages}"


def choose_dwconv_config(height: int, width: int, for_interpreter: bool = False) -> DwconvConfig:
    """The one place the dwconv launch is configured: 4 x 8 pixels x all channels on 4 warps
    (a 7x7 window's reads hit L1 from the neighbouring pixels); whole images (up to 4096 px)
    under the interpreter, whose cost is per tl op."""
    if for_interpreter:
        th = min(next_power_of_2(height), 64)
        return DwconvConfig(th, min(next_power_of_2(width), 4096 // th), 4)
    return DwconvConfig(4, 8, 4)


def mlp_shared_bytes(cfg: MlpConfig, channels: int, compute: torch.dtype, weights: torch.dtype) -> int:
    """Shared memory of the MLP loop (an upper bound, see ``pipelined_shared_bytes``): the BM x C
    input tile, staged once, and per hidden chunk the w1 and w2 tiles."""
    cp = padded(channels)
    inputs = cfg.bm * cp * compute.itemsize
    return inputs + pipelined_shared_bytes(cfg.num_stages, compute, [(cp * cfg.bh, weights)] * 2)


def choose_mlp_config(tokens: int, channels: int, compute: torch.dtype, weights: torch.dtype,
                      device: DeviceLimits, for_interpreter: bool = False) -> MlpConfig:
    """The one place the MLP launch is configured (the wrappers and the report use it).

    Read off the cubins (BM x 256 fp32 accumulator, hidden chunks of BH), with triton 3.6 and
    3.9: BM=64 on 8 warps (BM=128 with BH=16..64 spilled 24-80 bytes on 8 or 16 warps). The
    widest hidden chunk, double-buffered where it can be, whose weight tiles as loaded fit the
    device's shared memory: fp32 weights under bf16 autocast take 192 KiB at BH=64, beyond
    sm_80's 163 KiB, which then runs BH=32 (single-buffered BH=64 spilled with fp32 weights on
    sm_90a; smaller devices go down to BH=16, single-buffered). fp32 dots run on CUDA cores,
    holding a whole K row of both operands per thread: K chunks of 16 for the first GEMM too.
    """
    if for_interpreter:
        return MlpConfig(min(4096, padded(tokens)), 256, None, 4, 1)
    if compute == torch.float32:
        return MlpConfig(64, 16, 16, 8, 1)
    candidates = [MlpConfig(64, bh, None, 8, stages) for bh, stages in ((64, 2), (32, 2), (32, 1), (16, 1))]
    return next((cfg for cfg in candidates if fits_shared_memory(mlp_shared_bytes(cfg, channels, compute, weights),
                                                                 device)), candidates[-1])


def plan_dwconv_ln(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: Tuple[int, int],
                   norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, out: torch.Tensor,
                   for_interpreter: bool = INTERPRETED) -> Launch:
    """The dwconv + LayerNorm launch for tokens ``x`` (B, H, W, C) contiguous into ``out`` (same
    shape, contiguous); ``dw_weight`` (C, 1, KH, KW) contiguous, the rest (C,), any float dtype."""
    batch, height, width, channels = x.shape
    kernel = tuple(dw_weight.shape[-2:])
    cfg = choose_dwconv_config(height, width, for_interpreter)
    tiles_w = ceil_div(width, cfg.tw)
    tiles = ceil_div(height, cfg.th) * tiles_w
    args = dict(x_ptr=x, w_ptr=dw_weight, b_ptr=dw_bias, g_ptr=norm_weight, beta_ptr=norm_bias, o_ptr=out,
                height=height, width=width, tiles_w=tiles_w, tiles_per_image=tiles)
    constexprs = dict(C=channels, CP=next_power_of_2(channels), KH=kernel[0], KW=kernel[1],
                      PH=padding[0], PW=padding[1], TH=cfg.th, TW=cfg.tw, EPS=float(eps), UPCAST=INTERPRETED)
    numel = batch * height * width * channels
    return Launch(
        kernel="dwconv_ln", fn=_dwconv_ln_kernel, grid=(batch * tiles,), args=args, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=1, config=f"{cfg.describe()} W={type_name(dw_weight.dtype)}",
        matrix_work=False, flops=numel * (2 * kernel[0] * kernel[1] + 10),
        min_bytes=2 * numel * x.element_size() + channels * (kernel[0] * kernel[1] + 3) * dw_weight.element_size(),
    )


def plan_mlp(normed: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, gamma: Optional[torch.Tensor], out_weight: Optional[torch.Tensor],
             out_bias: Optional[torch.Tensor], out: torch.Tensor, device: DeviceLimits,
             for_interpreter: bool = INTERPRETED) -> Launch:
    """The MLP launch for tokens ``normed`` and ``x`` (B, H, W, C) contiguous into ``out``: tokens
    (B, H, W, C), or with ``out_weight`` (N, C, 1, 1) the NCHW (B, N, H, W) result of out_proj.
    The weights are contiguous in their natural layouts (w1 (HID, C), w2 (C, HID)), any float
    dtype; ``gamma`` (C,) or None."""
    batch, height, width, channels = x.shape
    hidden = w1.shape[0]
    tokens = batch * height * width
    fused = out_weight is not None
    weights = widest_dtype([w1, w2, out_weight] if fused else [w1, w2])
    cfg = choose_mlp_config(tokens, channels, x.dtype, weights, device, for_interpreter)
    n_out = out_weight.shape[0] if fused else channels
    args = dict(n_ptr=normed, x_ptr=x, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2,
                gamma_ptr=gamma if gamma is not None else b2, o_ptr=out,
                wo_ptr=out_weight if fused else w1, bo_ptr=out_bias if fused else b1,
                tokens=tokens, hw=height * width)
    cp = padded(channels)
    constexprs = dict(C=channels, CP=cp, HID=hidden, NO=n_out, NOP=padded(n_out), BM=cfg.bm, BH=cfg.bh,
                      BK=cfg.bk or cp, HAS_GAMMA=gamma is not None, FUSE_OUT=fused, UPCAST=INTERPRETED,
                      PREC=dot_precision(x.dtype))
    flops = 4 * tokens * channels * hidden + (2 * tokens * channels * n_out if fused else 0)
    parameters = 2 * channels * hidden + hidden + 2 * channels + ((channels + 1) * n_out if fused else 0)
    return Launch(
        kernel="cxblock_mlp_out" if fused else "cxblock_mlp", fn=_mlp_kernel, grid=(ceil_div(tokens, cfg.bm),),
        args=args, constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        config=f"{cfg.describe()} W={type_name(weights)}", matrix_work=True, flops=flops,
        min_bytes=tokens * (2 * channels + n_out) * x.element_size() + parameters * weights.itemsize,
    )


def report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> List[Launch]:
    """The kernel report's launches of one SAM 2 CXBlock (64x64 tokens, dim 256, hidden 1024):
    dwconv + LayerNorm, the MLP, and (bf16/fp16) the MLP with out_proj (256 -> 64) fused, with
    weights in ``dtype`` and, for bf16/fp16, also in fp32 (autocast)."""
    def meta(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    x = meta(batch, 64, 64, 256)
    launches = []
    for weights in dict.fromkeys((dtype, torch.float32)):
        def vector(size: int) -> torch.Tensor:
            return meta(size, dtype=weights)

        launches.append(plan_dwconv_ln(x, meta(256, 1, 7, 7, dtype=weights), vector(256), (3, 3), vector(256),
                                       vector(256), 1e-6, x, for_interpreter=False))
        mlp = (meta(1024, 256, dtype=weights), vector(1024), meta(256, 1024, dtype=weights), vector(256), vector(256))
        launches.append(plan_mlp(x, x, *mlp, None, None, x, device, for_interpreter=False))
        if dtype != torch.float32:
            launches.append(plan_mlp(x, x, *mlp, meta(64, 256, 1, 1, dtype=weights), vector(64),
                                     meta(batch, 64, 64, 64), device, for_interpreter=False))
    return launches
