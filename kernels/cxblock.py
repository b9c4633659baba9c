"""One CXBlock on channels-last tokens in two kernels, and its variant with ``out_proj`` fused.

1. ``_dwconv_ln_kernel``: the depthwise conv and the LayerNorm over channels (its affine is
   folded into ``w1``) for a TH x TW pixel tile with every channel in registers; writes the
   normalized tokens.
2. ``_mlp_kernel``: per BM tokens, ``x + b2 + GELU(n @ w1^T + b1) @ w2^T`` (gamma folded into
   w2/b2) with the 4C-wide hidden produced and consumed BH columns at a time: it never leaves
   the chip. The BM x C fp32 accumulator holds the whole output row, so the residual and bias
   land in the epilogue, and so can ``out_proj`` (``FUSE_OUT``: the block's output, rounded to
   the compute dtype as it would be stored, times ``W_out^T`` on tensor cores, stored NCHW).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from memenc_fast.backends import torch_ops
from memenc_fast.backends.kernel_args import check_tensor, new_output
from memenc_fast.packing import PackedBlock, PackedEncoder, derived

from ._common import (
    INTERPRETED,
    Launch,
    check_same_device,
    dot_precision,
    gelu,
    log_fallback,
    operand,
    rounded,
)
from .out_proj import out_proj

__all__ = ["cxblock", "cxblock_out_proj", "fuses_out_proj", "unsupported_reason", "DwconvConfig", "MlpConfig",
           "choose_dwconv_config", "choose_mlp_config", "plan_dwconv_ln", "plan_mlp", "report_specs",
           "MAX_CHANNELS"]

MAX_CHANNELS = 256
"""Widest block: the MLP's accumulator holds a whole BM x C row block in registers."""


@triton.jit
def _dwconv_ln_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, height, width, tiles_w, tiles_per_image,
    C: tl.constexpr, CP: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, EPS: tl.constexpr, UPCAST: tl.constexpr,
):
    """Normalized (no affine) depthwise conv of a TH x TW tile of tokens (B, H, W, C).

    ``w`` is the conv weight as (tap, C), so each tap reads one contiguous channel vector.
    """
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
        acc += v * tl.load(w_ptr + tap * C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(acc, axis=1) / C
    centered = tl.where(c_ok[None, :], acc - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / C
    normed = centered * tl.rsqrt(var + EPS)[:, None]
    tl.store(o_ptr + image + ((y * width + x) * C)[:, None] + c[None, :], rounded(normed, o_ptr, UPCAST),
             mask=inside[:, None] & c_ok[None, :])


@triton.jit
def _mlp_kernel(
    n_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, o_ptr, wo_ptr, bo_ptr, tokens, hw,
    C: tl.constexpr, CP: tl.constexpr, HID: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, FUSE_OUT: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """BM tokens of ``x + b2 + GELU(n @ w1^T + b1) @ w2^T`` (then ``@ wo^T + bo`` with FUSE_OUT).

    ``n``, ``x``: (tokens, C); ``w1``: (HID, C); ``w2``: (C, HID); ``wo``: (NO, C). Output:
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
        a = operand(tl.load(n_ptr + rows[:, None] + c[None, :], mask=tile_ok, other=0.0), w1_ptr, UPCAST)
    acc = tl.zeros((BM, CP), dtype=tl.float32)
    for h0 in range(0, HID, BH):
        h = h0 + tl.arange(0, BH)
        h_ok = h < HID
        if BK == CP:
            w1 = tl.load(w1_ptr + h[None, :] * C + c[:, None], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
            hidden = tl.dot(a, operand(w1, w1_ptr, UPCAST), input_precision=PREC)
        else:
            hidden = tl.zeros((BM, BH), dtype=tl.float32)
            for k0 in range(0, C, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < C
                ak = tl.load(n_ptr + rows[:, None] + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w1 = tl.load(w1_ptr + h[None, :] * C + k[:, None], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
                hidden = tl.dot(operand(ak, w1_ptr, UPCAST), operand(w1, w1_ptr, UPCAST), hidden,
                                input_precision=PREC)
        hidden = gelu(hidden + tl.load(b1_ptr + h, mask=h_ok, other=0.0).to(tl.float32)[None, :])
        w2 = tl.load(w2_ptr + c[None, :] * HID + h[:, None], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(operand(hidden, w1_ptr, UPCAST), operand(w2, w1_ptr, UPCAST), acc, input_precision=PREC)
    acc += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(x_ptr + rows[:, None] + c[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if FUSE_OUT:
        no = tl.arange(0, NOP)
        no_ok = no < NO
        wo = tl.load(wo_ptr + no[None, :] * C + c[:, None], mask=c_ok[:, None] & no_ok[None, :], other=0.0)
        out = tl.dot(operand(acc, w1_ptr, UPCAST), operand(wo, w1_ptr, UPCAST), input_precision=PREC)
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
        th = min(triton.next_power_of_2(height), 64)
        return DwconvConfig(th, min(triton.next_power_of_2(width), 4096 // th), 4)
    return DwconvConfig(4, 8, 4)


def choose_mlp_config(tokens: int, dtype: torch.dtype, for_interpreter: bool = False) -> MlpConfig:
    """The one place the MLP launch is configured (the launcher and the report use it).

    Read off the cubins (BM x 256 fp32 accumulator, hidden chunks of BH), with triton 3.6 and
    3.9: BM=64/BH=64 on 8 warps, double-buffered, is the largest tile that runs without spills
    on both sm_80 and sm_90a (BM=128 with BH=16..64 spilled 24-80 bytes on 8 or 16 warps; a third
    buffer exceeds sm_80's shared memory). fp32 dots run on CUDA cores, holding a whole K row
    of both operands per thread: K chunks of 16 for the first GEMM too.
    """
    if for_interpreter:
        return MlpConfig(min(4096, triton.next_power_of_2(max(tokens, 1))), 256, None, 4, 1)
    if dtype == torch.float32:
        return MlpConfig(64, 16, 16, 8, 1)
    return MlpConfig(64, 64, None, 8, 2)


def _dw_weight(block: PackedBlock) -> torch.Tensor:
    """The depthwise weight (C, 1, KH, KW) as (KH * KW, C): one contiguous vector per tap."""
    return derived(block, "dw_tap_major", [block.dw_weight],
                   lambda: block.dw_weight.flatten(1).t().contiguous())


def plan_dwconv_ln(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, kernel: Tuple[int, int],
                   padding: Tuple[int, int], eps: float,
                   for_interpreter: bool = INTERPRETED) -> Tuple[Launch, torch.Tensor]:
    """The dwconv + LayerNorm launch for tokens ``x`` (B, H, W, C) contiguous, and its output."""
    batch, height, width, channels = x.shape
    cfg = choose_dwconv_config(height, width, for_interpreter)
    out = new_output(x.shape, x.dtype, x.device)
    tiles_w = triton.cdiv(width, cfg.tw)
    tiles = triton.cdiv(height, cfg.th) * tiles_w
    args = dict(x_ptr=x, w_ptr=dw_weight, b_ptr=dw_bias, o_ptr=out, height=height, width=width,
                tiles_w=tiles_w, tiles_per_image=tiles)
    constexprs = dict(C=channels, CP=triton.next_power_of_2(channels), KH=kernel[0], KW=kernel[1],
                      PH=padding[0], PW=padding[1], TH=cfg.th, TW=cfg.tw, EPS=float(eps), UPCAST=INTERPRETED)
    numel = batch * height * width * channels
    launch = Launch(
        kernel="dwconv_ln", fn=_dwconv_ln_kernel, grid=(batch * tiles,), args=args, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=1, config=cfg.describe(), matrix_work=False,
        flops=numel * (2 * kernel[0] * kernel[1] + 8),
        min_bytes=(2 * numel + channels * (kernel[0] * kernel[1] + 1)) * x.element_size(),
    )
    return launch, out


def plan_mlp(normed: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, out_weight: Optional[torch.Tensor], out_bias: Optional[torch.Tensor],
             for_interpreter: bool = INTERPRETED) -> Tuple[Launch, torch.Tensor]:
    """The MLP launch for tokens (B, H, W, C) contiguous, and its output: tokens, or with
    ``out_weight`` the NCHW (B, C_out, H, W) result of out_proj."""
    batch, height, width, channels = x.shape
    hidden = w1.shape[0]
    tokens = batch * height * width
    fused = out_weight is not None
    cfg = choose_mlp_config(tokens, x.dtype, for_interpreter)
    n_out = out_weight.shape[0] if fused else channels
    out = new_output((batch, n_out, height, width) if fused else x.shape, x.dtype, x.device)
    args = dict(n_ptr=normed, x_ptr=x, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2, o_ptr=out,
                wo_ptr=out_weight if fused else w1, bo_ptr=out_bias if fused else b1,
                tokens=tokens, hw=height * width)
    constexprs = dict(C=channels, CP=triton.next_power_of_2(channels), HID=hidden, NO=n_out,
                      NOP=triton.next_power_of_2(n_out), BM=cfg.bm, BH=cfg.bh,
                      BK=cfg.bk or triton.next_power_of_2(channels), FUSE_OUT=fused,
                      UPCAST=INTERPRETED, PREC=dot_precision(x.dtype))
    flops = 4 * tokens * channels * hidden + (2 * tokens * channels * n_out if fused else 0)
    weights = 2 * channels * hidden + hidden + channels + ((channels + 1) * n_out if fused else 0)
    launch = Launch(
        kernel="cxblock_mlp_out" if fused else "cxblock_mlp", fn=_mlp_kernel, grid=(triton.cdiv(tokens, cfg.bm),),
        args=args, constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        config=cfg.describe(), matrix_work=True, flops=flops,
        min_bytes=(tokens * (2 * channels + n_out) + weights) * x.element_size(),
    )
    return launch, out


def unsupported_reason(x: torch.Tensor, block: PackedBlock) -> Optional[str]:
    """None when the kernels run this block on tokens ``x``, else why not."""
    channels = x.shape[-1]
    if block.groups != channels or block.dw_weight.shape[1] != 1:
        return "the dwconv is not depthwise"
    if channels > MAX_CHANNELS:
        return f"dim {channels} is wider than the {MAX_CHANNELS} channels the MLP kernel holds"
    if tuple(block.dw_weight.shape[-2:]) != tuple(2 * p + 1 for p in block.padding):
        return "the dwconv does not keep the spatial size"
    return None


def _run_block(x: torch.Tensor, block: PackedBlock, out_weight: Optional[torch.Tensor],
               out_bias: Optional[torch.Tensor]) -> torch.Tensor:
    op = "cxblock"
    channels = x.shape[-1]
    dtype = block.w1.dtype
    hidden = block.w1.shape[0]
    check_tensor(op, "x", x, dtype=dtype, shape=(None, None, None, channels), contiguous=True)
    check_tensor(op, "w1", block.w1, shape=(hidden, channels), contiguous=True)
    check_tensor(op, "w2", block.w2, dtype=dtype, shape=(channels, hidden), contiguous=True)
    tensors = dict(x=x, w1=block.w1, w2=block.w2, dw_weight=block.dw_weight)
    if out_weight is not None:
        check_tensor(op, "out_weight", out_weight, dtype=dtype, shape=(None, channels), contiguous=True)
        tensors["out_weight"] = out_weight
    check_same_device(op, **tensors)
    launch, normed = plan_dwconv_ln(x, _dw_weight(block), block.dw_bias, tuple(block.dw_weight.shape[-2:]),
                                    block.padding, block.norm_eps)
    mlp, out = plan_mlp(normed, x, block.w1, block.b1, block.w2, block.b2, out_weight, out_bias)
    if x.numel():
        launch.run()
        mlp.run()
    return out


def cxblock(x: torch.Tensor, block: PackedBlock) -> torch.Tensor:
    """The ``cxblock`` op (see ``torch_ops.cxblock``): tokens (B, H, W, C) -> tokens."""
    reason = unsupported_reason(x, block)
    if reason is not None:
        log_fallback("cxblock", reason)
        return torch_ops.cxblock(x, block)
    return _run_block(x, block, None, None)


def fuses_out_proj(dtype: torch.dtype) -> bool:
    """Whether ``cxblock_out_proj`` runs out_proj in the MLP's epilogue for ``dtype``: not for
    fp32, whose CUDA-core dot would hold all of W_out per thread (it spilled kilobytes)."""
    return dtype != torch.float32


def cxblock_out_proj(x: torch.Tensor, block: PackedBlock, packed: PackedEncoder) -> torch.Tensor:
    """``out_proj(cxblock(x, block), packed)``, with out_proj in the MLP kernel's epilogue where
    ``fuses_out_proj``: tokens (B, H, W, C) -> NCHW output (B, C_out, H, W), contiguous."""
    if packed.out_weight is None or not fuses_out_proj(x.dtype) or unsupported_reason(x, block) is not None:
        return out_proj(cxblock(x, block), packed)
    return _run_block(x, block, packed.out_weight, packed.out_bias)


def report_specs(batch: int, dtype: torch.dtype) -> list:
    """The kernel report's launches of one SAM 2 CXBlock (64x64 tokens, dim 256, hidden 1024):
    dwconv + LayerNorm, the MLP, and the MLP with out_proj (256 -> 64) fused where it is."""
    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    x = meta(batch, 64, 64, 256)
    dw, _ = plan_dwconv_ln(x, meta(49, 256), meta(256), (7, 7), (3, 3), 1e-6, for_interpreter=False)
    weights = (meta(1024, 256), meta(1024), meta(256, 1024), meta(256))
    mlp, _ = plan_mlp(x, x, *weights, None, None, for_interpreter=False)
    specs = [dw.spec(), mlp.spec()]
    if fuses_out_proj(dtype):
        fused, _ = plan_mlp(x, x, *weights, meta(64, 256), meta(64), for_interpreter=False)
        specs.append(fused.spec())
    return specs
