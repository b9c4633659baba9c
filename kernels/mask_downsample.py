"""The whole mask path in one kernel: [sigmoid] -> *scale+bias -> every conv -> LayerNorm2d -> GELU
stage of the MaskDownSampler (the final 1x1 conv belongs to ``proj_add``'s GEMM).

Design
------
Each program owns TH x TW pixels of the last stage's output and walks the stages forward: stage
j computes exactly the region of its output grid that the next stage's region reads (a halo of
``(R - 1) * stride + kernel`` per side), as an implicit GEMM over K = kernel taps x input
channels with the LayerNorm over channels and the GELU in its epilogue (the whole channel row is
in the accumulator). Stage 1 reads the mask straight from memory, applying the sigmoid and the
caller's scale/bias in the operand load; the last stage writes the output. Triton has no
addressable shared memory, so the regions between stages live in a per-program scratch slot: a
persistent grid (one program per SM) reuses its slots tile after tile, so they stay in L2 and
the mask is the only input that comes from DRAM. A barrier separates the stages (each stage
reads pixels other threads wrote). For SAM 2 (4 stages of conv3x3/s2) an 8x16 output tile
reads a 143x271 mask patch and recomputes 10-17% of stages 1-3 in halos (8x8 tiles, used at
small batches: 13-23%); its slot holds 76k values (152 KB in bf16, 20 MB for 132 SMs).

Stages with fewer than 16 output channels (SAM 2's first: 4) are too narrow for tensor cores and
run as broadcast FMAs; the others use ``tl.dot`` with fp32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from memenc_fast.backends import torch_ops
from memenc_fast.backends.kernel_args import check_tensor, new_output
from memenc_fast.packing import PackedEncoder, derived

from ._common import (
    INTERPRETED,
    REPORT_SM_COUNT,
    Launch,
    check_same_device,
    dot_precision,
    gelu,
    log_fallback,
    operand,
    rounded,
    sm_count,
)

__all__ = ["mask_downsample", "launch_mask_path", "MaskGeometry", "MaskPathConfig", "choose_config",
           "unsupported_reason", "report_specs", "MAX_STAGES", "MAX_CHANNELS"]

MAX_STAGES = 4
"""Stages the kernel unrolls: sam2's configs have 4 (stride 2) or 2 (stride 4)."""

MAX_CHANNELS = 256
"""Widest stage output: its LayerNorm needs the whole channel row in one accumulator."""


@triton.jit
def _mask_operand(a, ok, scale, bias, FROM_MASK: tl.constexpr, APPLY_SIGMOID: tl.constexpr):
    """A loaded conv input in fp32; on the mask, the sigmoid and the caller's scale/bias."""
    a = a.to(tl.float32)
    if FROM_MASK:
        if APPLY_SIGMOID:
            a = tl.sigmoid(a)
        # The transform comes before the conv's zero padding, which must stay zero.
        a = tl.where(ok, a * scale + bias, 0.0)
    return a


@triton.jit
def _source_rows(oy, ox, m_ok, tap, src_sy, src_sx, src_ry, src_rx, src_h, src_w,
                 KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offsets and validity of tap ``tap``'s source pixel for each output pixel (oy, ox)."""
    gy = oy * SH + (tap // KW - PH)
    gx = ox * SW + (tap % KW - PW)
    ok = m_ok & (gy >= 0) & (gy < src_h) & (gx >= 0) & (gx < src_w)
    return (gy - src_ry) * src_sy + (gx - src_rx) * src_sx, ok


@triton.jit
def _conv_ln_gelu_region(
    src, src_sy, src_sx, src_sc, src_ry, src_rx, src_h, src_w,
    dst, dst_sy, dst_sx, dst_ry, dst_rx, dst_h, dst_w,
    oy0, ox0, prm, scale, bias,
    EPS: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr, CP_OUT: tl.constexpr,
    RH: tl.constexpr, RW: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, FROM_MASK: tl.constexpr, TO_OUTPUT: tl.constexpr, APPLY_SIGMOID: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One stage over the RH x RW region at (oy0, ox0) of its output grid.

    A source pixel (y, x, c) is at ``src + (y - src_ry) * src_sy + (x - src_rx) * src_sx +
    c * src_sc``; pixels outside ``src_h x src_w`` are the conv's zero padding. ``prm`` holds
    the stage's weight as (tap, c_in, c_out), then conv bias, LayerNorm weight and bias.
    MODE picks how K = taps x C_IN is walked (see ``_stage_mode``): 0 FMA per tap and input
    channel, 1 tl.dot over flattened K chunks (few input channels), 2 tl.dot per tap over
    contiguous channel chunks (vector loads).
    """
    K_TOT: tl.constexpr = KH * KW * C_IN
    n = tl.arange(0, CP_OUT)
    n_ok = n < C_OUT
    for m0 in range(0, RH * RW, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < RH * RW
        oy = oy0 + m // RW
        ox = ox0 + m % RW
        acc = tl.zeros((BM, CP_OUT), dtype=tl.float32)
        if MODE == 0:
            for tap in range(KH * KW):
                rows, ok = _source_rows(oy, ox, m_ok, tap, src_sy, src_sx, src_ry, src_rx, src_h, src_w,
                                        KW, SH, SW, PH, PW)
                for ci in tl.static_range(C_IN):
                    a = tl.load(src + rows + ci * src_sc, mask=ok, other=0.0)
                    a = _mask_operand(a, ok, scale, bias, FROM_MASK, APPLY_SIGMOID)
                    w = tl.load(prm + (tap * C_IN + ci) * C_OUT + n, mask=n_ok, other=0.0).to(tl.float32)
                    acc += a[:, None] * w[None, :]
        elif MODE == 1:
            for k0 in range(0, K_TOT, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < K_TOT
                tap = k // C_IN
                ci = k % C_IN
                gy = oy[:, None] * SH + (tap // KW - PH)[None, :]
                gx = ox[:, None] * SW + (tap % KW - PW)[None, :]
                ok = (m_ok[:, None] & k_ok[None, :] & (gy >= 0) & (gy < src_h) & (gx >= 0) & (gx < src_w))
                a = tl.load(src + (gy - src_ry) * src_sy + (gx - src_rx) * src_sx + ci[None, :] * src_sc,
                            mask=ok, other=0.0)
                a = _mask_operand(a, ok, scale, bias, FROM_MASK, APPLY_SIGMOID)
                w = tl.load(prm + k[:, None] * C_OUT + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(operand(a, prm, UPCAST), operand(w, prm, UPCAST), acc, input_precision=PREC)
        else:
            # One flat loop over (tap, channel chunk), so that the pipeliner overlaps its loads.
            for k0 in range(0, K_TOT, BK):
                tap = k0 // C_IN
                rows, ok = _source_rows(oy, ox, m_ok, tap, src_sy, src_sx, src_ry, src_rx, src_h, src_w,
                                        KW, SH, SW, PH, PW)
                ci = k0 % C_IN + tl.arange(0, BK)
                a = tl.load(src + rows[:, None] + ci[None, :] * src_sc, mask=ok[:, None], other=0.0)
                a = _mask_operand(a, ok[:, None], scale, bias, FROM_MASK, APPLY_SIGMOID)
                w = tl.load(prm + (k0 + tl.arange(0, BK))[:, None] * C_OUT + n[None, :], mask=n_ok[None, :],
                            other=0.0)
                acc = tl.dot(operand(a, prm, UPCAST), operand(w, prm, UPCAST), acc, input_precision=PREC)
        # LayerNorm over the channel row, statistics in fp32; padded channels hold zeros. The
        # per-channel vectors are loaded here, not before the loops: in the accumulator's layout
        # a thread holds a quarter of the row, and they would stay live through the K loop.
        y = acc + tl.load(prm + K_TOT * C_OUT + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        mean = tl.sum(y, axis=1) / C_OUT
        centered = tl.where(n_ok[None, :], y - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / C_OUT
        y = centered * tl.rsqrt(var + EPS)[:, None]
        y = y * tl.load(prm + K_TOT * C_OUT + C_OUT + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = gelu(y + tl.load(prm + K_TOT * C_OUT + 2 * C_OUT + n, mask=n_ok, other=0.0).to(tl.float32)[None, :])
        keep = m_ok[:, None] & n_ok[None, :]
        if TO_OUTPUT:
            keep = keep & ((oy < dst_h) & (ox < dst_w))[:, None]
        offsets = (oy - dst_ry)[:, None] * dst_sy + (ox - dst_rx)[:, None] * dst_sx + n[None, :]
        tl.store(dst + offsets, rounded(y, dst, UPCAST), mask=keep)


@triton.jit
def _mask_path_kernel(
    mask_ptr, out_ptr, scratch_ptr, params_ptr,
    mask_sb, mask_sc, mask_sy, mask_sx, mask_h, mask_w, scale, bias,
    tiles_w, tiles_per_image, num_tiles, slot_elems,
    NUM_STAGES: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, CP_OUT: tl.constexpr, EPS: tl.constexpr,
    RH: tl.constexpr, RW: tl.constexpr, ORG_Y: tl.constexpr, ORG_X: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr, PRM: tl.constexpr, BUF: tl.constexpr,
    APPLY_SIGMOID: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Persistent: program p runs tiles p, p + P, ... and owns scratch slot p.

    Per-stage constexprs are tuples indexed by stage. Stage j's region origin is
    ``tile origin * ORG_Y[j][0] - ORG_Y[j][1]`` (folding o_{j-1} = o_j * stride - padding).
    """
    pid = tl.program_id(0)
    slot = scratch_ptr + pid.to(tl.int64) * slot_elems
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b = tile // tiles_per_image
        t = tile - b * tiles_per_image
        # The tile's origin in the last stage's output grid.
        y0 = (t // tiles_w) * RH[NUM_STAGES - 1]
        x0 = (t % tiles_w) * RW[NUM_STAGES - 1]
        src_h = mask_h
        src_w = mask_w
        for j in tl.static_range(NUM_STAGES):
            dst_h = (src_h + 2 * PH - KH) // SH + 1
            dst_w = (src_w + 2 * PW - KW) // SW + 1
            oy = y0 * ORG_Y[j][0] - ORG_Y[j][1]
            ox = x0 * ORG_X[j][0] - ORG_X[j][1]
            if j == 0:
                src = mask_ptr + b.to(tl.int64) * mask_sb
                src_sy = mask_sy
                src_sx = mask_sx
                src_sc = mask_sc
                src_ry = 0
                src_rx = 0
            else:
                # Stage j - 1 wrote these pixels from other threads.
                tl.debug_barrier()
                src = slot + BUF[j - 1]
                src_sy = RW[j - 1] * C_OUT[j - 1]
                src_sx = C_OUT[j - 1]
                src_sc = 1
                src_ry = y0 * ORG_Y[j - 1][0] - ORG_Y[j - 1][1]
                src_rx = x0 * ORG_X[j - 1][0] - ORG_X[j - 1][1]
            if j == NUM_STAGES - 1:
                dst = out_ptr + b.to(tl.int64) * (dst_h * dst_w * C_OUT[j])
                dst_sy = dst_w * C_OUT[j]
                dst_ry = 0
                dst_rx = 0
            else:
                dst = slot + BUF[j]
                dst_sy = RW[j] * C_OUT[j]
                dst_ry = oy
                dst_rx = ox
            _conv_ln_gelu_region(
                src, src_sy, src_sx, src_sc, src_ry, src_rx, src_h, src_w,
                dst, dst_sy, C_OUT[j], dst_ry, dst_rx, dst_h, dst_w,
                oy, ox, params_ptr + PRM[j], scale, bias,
                EPS[j], C_IN[j], C_OUT[j], CP_OUT[j], RH[j], RW[j], BM[j], BK[j], MODE[j],
                KH, KW, SH, SW, PH, PW, j == 0, j == NUM_STAGES - 1, APPLY_SIGMOID, UPCAST, PREC,
            )
            src_h = dst_h
            src_w = dst_w
        # The next tile's first stage overwrites what this tile's last stage read.
        tl.debug_barrier()


@dataclass(frozen=True)
class MaskGeometry:
    """The downsampler as the kernel sees it: one conv shape for every stage, channels per stage."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    channels: Tuple[int, ...]  # (C_in of stage 1, C_out of stage 1, ..., C_out of the last)
    eps: Tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.channels) - 1

    def output_size(self, height: int, width: int) -> List[Tuple[int, int]]:
        """(h, w) after each stage for a (height, width) input."""
        sizes = []
        for _ in range(self.num_stages):
            height = (height + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
            width = (width + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1
            sizes.append((height, width))
        return sizes

    def flops(self, height: int, width: int) -> int:
        """Multiply-adds x 2 of every stage's conv for one (height, width) mask."""
        taps = self.kernel[0] * self.kernel[1]
        return sum(2 * taps * c_in * c_out * h * w for (h, w), c_in, c_out in
                   zip(self.output_size(height, width), self.channels[:-1], self.channels[1:]))


SAM2_GEOMETRY = MaskGeometry((3, 3), (2, 2), (1, 1), (1, 4, 16, 64, 256), (1e-6,) * 4)


def geometry_of(packed: PackedEncoder) -> MaskGeometry:
    """The MaskGeometry of packed weights (call unsupported_reason first)."""
    first = packed.stages[0]
    channels = (first.weight.shape[1],) + tuple(s.weight.shape[0] for s in packed.stages)
    return MaskGeometry(tuple(first.kernel_size), tuple(first.stride), tuple(first.padding), channels,
                        tuple(s.norm_eps for s in packed.stages))


def unsupported_reason(packed: PackedEncoder) -> Optional[str]:
    """None when the kernel runs this downsampler, else why not."""
    stages = packed.stages
    if not stages:
        return "the mask downsampler has no conv stage"
    if len(stages) > MAX_STAGES:
        return f"the kernel unrolls at most {MAX_STAGES} stages; this downsampler has {len(stages)}"
    first = stages[0]
    for i, stage in enumerate(stages):
        if (stage.kernel_size, stage.stride, stage.padding) != (first.kernel_size, first.stride, first.padding):
            return f"stage {i} has another kernel/stride/padding than stage 0"
        if stage.weight.shape[0] > MAX_CHANNELS:
            return f"stage {i} has {stage.weight.shape[0]} output channels; the kernel takes at most {MAX_CHANNELS}"
        made = stages[i - 1].weight.shape[0] if i else stage.weight.shape[1]
        if stage.weight.shape[1] != made:
            return f"stage {i} takes {stage.weight.shape[1]} channels; stage {i - 1} makes {made}"
    if not packed.all_activations_exact_gelu:
        return "the kernel fuses exact GELU only"
    return None


FMA, FLAT_DOT, TAP_DOT = 0, 1, 2
"""How a stage walks K = taps x input channels (the kernel's MODE)."""
_MODE_NAMES = {FMA: "fma", FLAT_DOT: "flat", TAP_DOT: "tap"}


@dataclass(frozen=True)
class MaskPathConfig:
    """Tile and blocking of one launch: TH x TW last-stage pixels per tile; per stage, BM
    pixels per block, the K walk (MODE) and its chunk BK."""

    th: int
    tw: int
    bm: Tuple[int, ...]
    bk: Tuple[int, ...]
    mode: Tuple[int, ...]
    num_warps: int
    num_stages: int
    programs_per_sm: int

    def describe(self) -> str:
        stages = " ".join(f"{_MODE_NAMES[d]}:{m}x{k}" for m, k, d in zip(self.bm, self.bk, self.mode))
        return (f"T={self.th}x{self.tw} [{stages}] w{self.num_warps} s{self.num_stages} "
                f"P={self.programs_per_sm}/SM")


def _region_sizes(geom: MaskGeometry, th: int, tw: int) -> List[Tuple[int, int]]:
    """Region (rows, cols) each stage computes for a th x tw tile of the last stage."""
    sizes = [(th, tw)]
    for _ in range(geom.num_stages - 1):
        rh, rw = sizes[0]
        sizes.insert(0, ((rh - 1) * geom.stride[0] + geom.kernel[0], (rw - 1) * geom.stride[1] + geom.kernel[1]))
    return sizes


def _stage_mode(c_in: int, c_out: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(MODE, BK) of a stage. Outputs narrower than 16 channels cannot feed tensor cores; 16 or
    more input channels (a multiple of 16) are read per tap as contiguous vectors."""
    if triton.next_power_of_2(c_out) < 16:
        return FMA, 1
    if c_in % 16 == 0:
        bk = 16 if dtype == torch.float32 else max(b for b in (16, 32, 64) if c_in % b == 0)
        return TAP_DOT, bk
    return FLAT_DOT, 16


def choose_config(geom: MaskGeometry, batch: int, out_size: Tuple[int, int], dtype: torch.dtype,
                  sms: int, for_interpreter: bool = False) -> MaskPathConfig:
    """The one place the launch configuration is chosen (the launcher and the report use it).

    Larger tiles cut the halo recompute and the weight traffic per output pixel; small batches
    take 8x8, then 4x8 tiles (16-bit: with fp32, 4x8 spilled on sm_80) so that the grid still
    covers the SMs (at B=1, 4x8 tiles halve each program's serial work). ``for_interpreter`` picks
    the largest blocks instead: the interpreter spends ~0.1 ms of Python per tl op whatever its
    size, and has no registers to run out of.
    """
    if for_interpreter:
        th, tw = min(out_size[0], 16), min(out_size[1], 16)
        modes = [_stage_mode(c_in, c_out, torch.bfloat16) for c_in, c_out in zip(geom.channels[:-1], geom.channels[1:])]
        bm = tuple(min(4096, triton.next_power_of_2(rh * rw)) for rh, rw in _region_sizes(geom, th, tw))
        return MaskPathConfig(th, tw, bm, tuple(k for _, k in modes), tuple(m for m, _ in modes), 8, 1, 1)
    def tiles(th: int, tw: int) -> int:
        return batch * triton.cdiv(out_size[0], th) * triton.cdiv(out_size[1], tw)

    th, tw = 8, 16
    if tiles(th, tw) < 2 * sms:
        tw = 8
        if dtype != torch.float32 and tiles(th, tw) < sms:
            th = 4
    regions = _region_sizes(geom, th, tw)
    # Accumulator budget per block, BM x channels fp32 values, read off the cubins: with 8 warps,
    # 64 x 256 leaves the LayerNorm/GELU epilogue room (128 x 256 spills on sm_80 and sm_90a).
    # fp32 dots run on CUDA cores and hold their operands in registers too: 16 x 256 and at most
    # 128 pixels (32 x 256, or 256 pixels in the narrow stages, spilled on sm_80).
    budget, max_bm = (64 * 256, 256) if dtype != torch.float32 else (16 * 256, 128)
    bm, bk, mode = [], [], []
    for (rh, rw), c_in, c_out in zip(regions, geom.channels[:-1], geom.channels[1:]):
        stage_mode, k = _stage_mode(c_in, c_out, dtype)
        m = budget // triton.next_power_of_2(c_out)
        bm.append(max(16, min(m, max_bm, triton.next_power_of_2(rh * rw))))
        bk.append(k)
        mode.append(stage_mode)
    # About 240 registers x 8 warps: one program per SM, which the persistent grid matches.
    # fp32's CUDA-core dots gain nothing from cp.async double buffering, and with 8 warps ptxas
    # squeezed them into 128 registers and spilled: 4 warps, single-buffered.
    if dtype == torch.float32:
        return MaskPathConfig(th, tw, tuple(bm), tuple(bk), tuple(mode), 4, 1, 1)
    return MaskPathConfig(th, tw, tuple(bm), tuple(bk), tuple(mode), 8, 2, 1)


def _params(packed: PackedEncoder) -> torch.Tensor:
    """Every stage's (tap, c_in, c_out) weight, conv bias, LayerNorm weight and bias, in one buffer."""
    sources = [t for s in packed.stages for t in (s.weight, s.bias, s.norm_weight, s.norm_bias)]

    def build() -> torch.Tensor:
        parts = []
        for s in packed.stages:
            parts += [s.weight.permute(2, 3, 1, 0).reshape(-1), s.bias, s.norm_weight, s.norm_bias]
        return torch.cat(parts).contiguous()

    return derived(packed, "mask_path_params", sources, build)


def params_numel(geom: MaskGeometry) -> int:
    """Elements of the buffer ``_params`` builds."""
    taps = geom.kernel[0] * geom.kernel[1]
    return sum((taps * c_in + 3) * c_out for c_in, c_out in zip(geom.channels[:-1], geom.channels[1:]))


def plan_mask_path(
    masks: torch.Tensor,
    params: torch.Tensor,
    geom: MaskGeometry,
    apply_sigmoid: bool,
    scale: float,
    bias: float,
    sms: int,
    max_programs: Optional[int] = None,
    for_interpreter: bool = INTERPRETED,
) -> Tuple[Launch, torch.Tensor]:
    """The launch (and its output, channels-last (B, h, w, C)) for ``masks`` (real or meta)."""
    batch, _, height, width = masks.shape
    sizes = geom.output_size(height, width)
    out_h, out_w = sizes[-1]
    cfg = choose_config(geom, batch, (out_h, out_w), masks.dtype, sms, for_interpreter)
    n = geom.num_stages
    regions = _region_sizes(geom, cfg.th, cfg.tw)
    c_out = geom.channels[1:]

    # Region origin of stage j: tile origin * s^(n-1-j) - p * (s^(n-1-j) - 1) / (s - 1).
    def origin(axis: int, j: int) -> Tuple[int, int]:
        s, p = geom.stride[axis], geom.padding[axis]
        scale_j, offset = 1, 0
        for _ in range(n - 1 - j):
            scale_j, offset = scale_j * s, offset * s + p
        return scale_j, offset

    prm, offset = [], 0
    taps = geom.kernel[0] * geom.kernel[1]
    for c_in, c in zip(geom.channels[:-1], c_out):
        prm.append(offset)
        offset += (taps * c_in + 3) * c
    # Two ping-pong buffers per slot: stage j writes buffer j % 2 (the last writes the output).
    buf_sizes = [0, 0]
    for j in range(n - 1):
        buf_sizes[j % 2] = max(buf_sizes[j % 2], regions[j][0] * regions[j][1] * c_out[j])
    align = 64
    buf1 = triton.cdiv(buf_sizes[0], align) * align
    slot_elems = max(align, triton.cdiv(buf1 + buf_sizes[1], align) * align)
    tiles_h, tiles_w = triton.cdiv(out_h, cfg.th), triton.cdiv(out_w, cfg.tw)
    num_tiles = batch * tiles_h * tiles_w
    programs = min(num_tiles, sms * cfg.programs_per_sm)
    if max_programs is not None:
        programs = min(programs, max_programs)
    programs = max(programs, 1)

    out = new_output((batch, out_h, out_w, c_out[-1]), masks.dtype, masks.device)
    scratch = torch.empty(programs * slot_elems if n > 1 else 1, dtype=masks.dtype, device=masks.device)
    args = dict(
        mask_ptr=masks, out_ptr=out, scratch_ptr=scratch, params_ptr=params,
        mask_sb=masks.stride(0), mask_sc=masks.stride(1), mask_sy=masks.stride(2), mask_sx=masks.stride(3),
        mask_h=height, mask_w=width, scale=float(scale), bias=float(bias),
        tiles_w=tiles_w, tiles_per_image=tiles_h * tiles_w, num_tiles=num_tiles, slot_elems=slot_elems,
    )
    constexprs = dict(
        NUM_STAGES=n, KH=geom.kernel[0], KW=geom.kernel[1], SH=geom.stride[0], SW=geom.stride[1],
        PH=geom.padding[0], PW=geom.padding[1],
        C_IN=tuple(geom.channels[:-1]), C_OUT=tuple(c_out),
        CP_OUT=tuple(triton.next_power_of_2(c) for c in c_out), EPS=tuple(float(e) for e in geom.eps),
        RH=tuple(r[0] for r in regions), RW=tuple(r[1] for r in regions),
        ORG_Y=tuple(origin(0, j) for j in range(n)), ORG_X=tuple(origin(1, j) for j in range(n)),
        BM=cfg.bm, BK=cfg.bk, MODE=cfg.mode, PRM=tuple(prm), BUF=tuple(0 if j % 2 == 0 else buf1 for j in range(n)),
        APPLY_SIGMOID=bool(apply_sigmoid), UPCAST=INTERPRETED, PREC=dot_precision(masks.dtype),
    )
    item = masks.element_size()
    launch = Launch(
        kernel="mask_path", fn=_mask_path_kernel, grid=(programs,), args=args, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, config=cfg.describe(), matrix_work=True,
        flops=batch * geom.flops(height, width),
        min_bytes=(batch * (height * width * geom.channels[0] + out_h * out_w * c_out[-1]) + params.numel()) * item,
    )
    return launch, out


def launch_mask_path(
    masks: torch.Tensor,
    packed: PackedEncoder,
    apply_sigmoid: bool,
    scale: float = 1.0,
    bias: float = 0.0,
    max_programs: Optional[int] = None,
    for_interpreter: bool = INTERPRETED,
) -> torch.Tensor:
    """Runs the kernel on ``masks`` (B, C_in, H, W): last stage's features as (B, h, w, C).

    ``max_programs`` caps the persistent grid; ``for_interpreter=False`` under the interpreter
    runs the GPU blocking (tests use both).
    """
    op = "mask_downsample"
    geom = geometry_of(packed)
    dtype = packed.stages[0].weight.dtype
    check_tensor(op, "masks", masks, dtype=dtype, shape=(None, geom.channels[0], None, None))
    check_same_device(op, masks=masks, weights=packed.stages[0].weight)
    height, width = masks.shape[-2:]
    sizes = geom.output_size(height, width)
    if min(min(s) for s in sizes) < 1:
        raise ValueError(f"{op}: masks of size {height}x{width} are too small for the downsampler: "
                         f"stage outputs would be {sizes}")
    if masks.shape[0] == 0:
        return new_output((0, *sizes[-1], geom.channels[-1]), dtype, masks.device)
    launch, out = plan_mask_path(masks, _params(packed), geom, apply_sigmoid, scale, bias,
                                 sm_count(masks.device), max_programs, for_interpreter)
    launch.run()
    return out


def mask_downsample(
    masks: torch.Tensor, packed: PackedEncoder, apply_sigmoid: bool, scale: float = 1.0, bias: float = 0.0
) -> torch.Tensor:
    """The ``mask_downsample`` op (see ``torch_ops.mask_downsample``): (B, 1, Hm, Wm) mask logits
    -> last stage's features (B, C, h, w), stored channels-last."""
    reason = unsupported_reason(packed)
    if reason is not None:
        log_fallback("mask_downsample", reason)
        return torch_ops.mask_downsample(masks, packed, apply_sigmoid, scale, bias)
    if packed.interpol_size is not None and list(masks.shape[-2:]) != packed.interpol_size:
        # The resize (SAM 3) runs in torch; the sigmoid and scale/bias must come before it.
        masks = torch_ops.resized_mask(masks, packed, apply_sigmoid, scale, bias)
        apply_sigmoid, scale, bias = False, 1.0, 0.0
    return launch_mask_path(masks, packed, apply_sigmoid, scale, bias).permute(0, 3, 1, 2)


def report_specs(batch: int, dtype: torch.dtype) -> list:
    """The kernel report's launch of the SAM 2 mask path (1024x1024 masks) at ``batch``."""
    masks = torch.empty((batch, 1, 1024, 1024), dtype=dtype, device="meta")
    params = torch.empty(params_numel(SAM2_GEOMETRY), dtype=dtype, device="meta")
    launch, _ = plan_mask_path(masks, params, SAM2_GEOMETRY, True, 1.0, 0.0, REPORT_SM_COUNT, for_interpreter=False)
    return [launch.spec()]
