"""The whole mask path in one kernel: [sigmoid] -> *scale+bias -> every conv -> LayerNorm2d -> GELU
stage of the MaskDownSampler (the final 1x1 conv belongs to ``proj_add``'s kernel).

Design
------
Each program owns TH x TW pixels of the last stage's output and walks the stages forward: stage
j computes exactly the region of its output grid that the next stage's region reads (a halo of
``(R - 1) * stride + kernel`` per side), as an implicit GEMM over K = input channels x kernel
taps with the LayerNorm over channels (and its affine) and the GELU in its epilogue (the whole
channel row is in the accumulator). K runs channel-major, tap-minor: the order of the conv
weight (C_out, C_in, KH, KW) as stored, so each output channel's weights are one contiguous row
of K. Each stage's four parameters (conv weight and bias, LayerNorm weight and bias) are kernel
arguments of their own, read live in their own dtype; unused stages repeat stage 0's.

Stage 1 reads the mask straight from memory, applying the sigmoid and the caller's scale/bias in
the operand load; the last stage writes the output. Triton has no addressable shared memory, so
the regions between stages live in a per-program scratch slot: a persistent grid (one program
per SM) reuses its slots tile after tile, so they stay in L2 and the mask is the only input that
comes from DRAM. A barrier separates the stages (each stage reads pixels other threads wrote).
For SAM 2 (4 stages of conv3x3/s2) an 8x16 output tile reads a 143x271 mask patch and recomputes
10-17% of stages 1-3 in halos (8x8 tiles, used at small batches: 13-23%); its slot holds 76k
values (152 KB in bf16, 20 MB for 132 SMs).

Stages with fewer than 16 output channels (SAM 2's first: 4) are too narrow for tensor cores and
run as broadcast FMAs; the others use ``tl.dot`` with fp32 accumulation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    MAX_REGISTERS,
    DeviceLimits,
    Launch,
    ceil_div,
    dot_precision,
    fills_wave,
    fits_shared_memory,
    fp32_dot_operands,
    gelu,
    needs_int64_offsets,
    next_power_of_2,
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

__all__ = ["MaskGeometry", "MaskPathConfig", "choose_config", "plan_mask_path", "report_launches", "MAX_STAGES",
           "MAX_CHANNELS", "SAM2_GEOMETRY"]

MAX_STAGES = 4
"""Stages the kernel unrolls (one set of parameter pointers each): sam2's configs have 4 (stride
2) or 2 (stride 4)."""

MAX_CHANNELS = 256
"""Widest stage output: its LayerNorm needs the whole channel row in one accumulator."""

GATHERED_ELEMENTS = 4096
"""Most input elements a dot stage gathers per K chunk (BM x BK): each (pixel, channel, tap) has
an address of its own, and 16 per thread on 8 warps is what the registers hold beside a 64 x 256
accumulator on sm_80 (256 x 32, 32 per thread, spilled 16-24 bytes there)."""


@triton.jit
def _stage_pointer(J: tl.constexpr, p0, p1, p2, p3):
    """The pointer of stage J (a compile-time index) among the four stages' pointers."""
    if J == 0:
        return p0
    elif J == 1:
        return p1
    elif J == 2:
        return p2
    else:
        return p3


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
def _conv_ln_gelu_region(
    src, src_sy, src_sx, src_sc, src_ry, src_rx, src_h, src_w,
    dst, dst_sy, dst_sx, dst_ry, dst_rx, dst_h, dst_w,
    oy0, ox0, w_ptr, cb_ptr, nw_ptr, nb_ptr, scale, bias,
    EPS: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr, CP_OUT: tl.constexpr,
    RH: tl.constexpr, RW: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, FROM_MASK: tl.constexpr, TO_OUTPUT: tl.constexpr, APPLY_SIGMOID: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
):
    """One stage over the RH x RW region at (oy0, ox0) of its output grid.

    A source pixel (y, x, c) is at ``src + (y - src_ry) * src_sy + (x - src_rx) * src_sx +
    c * src_sc`` (int64 offsets with WIDE: a mask view reaching that far within one image);
    pixels outside ``src_h x src_w`` are the conv's zero padding. ``w_ptr`` is the
    conv weight (C_OUT, C_IN, KH, KW), ``cb_ptr`` its bias, ``nw_ptr``/``nb_ptr`` the LayerNorm
    affine. ``dst`` (scratch or the output) holds the compute dtype. Without USE_DOT, K is
    walked one (input channel, tap) at a time as broadcast FMAs; with it, in chunks of BK
    through tl.dot.
    """
    TAPS: tl.constexpr = KH * KW
    K_TOT: tl.constexpr = C_IN * TAPS
    n = tl.arange(0, CP_OUT)
    n_ok = n < C_OUT
    for m0 in range(0, RH * RW, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < RH * RW
        oy = oy0 + m // RW
        ox = ox0 + m % RW
        acc = tl.zeros((BM, CP_OUT), dtype=tl.float32)
        if USE_DOT:
            for k0 in range(0, K_TOT, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < K_TOT
                tap = k % TAPS
                gy = oy[:, None] * SH + (tap // KW - PH)[None, :]
                gx = ox[:, None] * SW + (tap % KW - PW)[None, :]
                ok = m_ok[:, None] & k_ok[None, :] & (gy >= 0) & (gy < src_h) & (gx >= 0) & (gx < src_w)
                a = tl.load(src + widened(gy - src_ry, WIDE) * src_sy + widened(gx - src_rx, WIDE) * src_sx
                            + widened(k // TAPS, WIDE)[None, :] * src_sc, mask=ok, other=0.0)
                a = _mask_operand(a, ok, scale, bias, FROM_MASK, APPLY_SIGMOID)
                w = tl.load(w_ptr + n[None, :] * K_TOT + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(operand(a, dst, UPCAST), operand(w, dst, UPCAST), acc, input_precision=PREC)
        else:
            for tap in range(TAPS):
                gy = oy * SH + (tap // KW - PH)
                gx = ox * SW + (tap % KW - PW)
                ok = m_ok & (gy >= 0) & (gy < src_h) & (gx >= 0) & (gx < src_w)
                rows = widened(gy - src_ry, WIDE) * src_sy + widened(gx - src_rx, WIDE) * src_sx
                for ci in tl.static_range(C_IN):
                    a = tl.load(src + rows + widened(ci, WIDE) * src_sc, mask=ok, other=0.0)
                    a = _mask_operand(a, ok, scale, bias, FROM_MASK, APPLY_SIGMOID)
                    w = tl.load(w_ptr + n * K_TOT + ci * TAPS + tap, mask=n_ok, other=0.0).to(tl.float32)
                    acc += a[:, None] * w[None, :]
        # LayerNorm over the channel row, statistics in fp32; padded channels hold zeros. The
        # per-channel vectors are loaded here, not before the loops: in the accumulator's layout
        # a thread holds a quarter of the row, and they would stay live through the K loop.
        y = acc + tl.load(cb_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        mean = tl.sum(y, axis=1) / C_OUT
        centered = tl.where(n_ok[None, :], y - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / C_OUT
        y = centered * tl.rsqrt(var + EPS)[:, None]
        y = y * tl.load(nw_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = gelu(y + tl.load(nb_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :])
        keep = m_ok[:, None] & n_ok[None, :]
        if TO_OUTPUT:
            keep = keep & ((oy < dst_h) & (ox < dst_w))[:, None]
        offsets = (oy - dst_ry)[:, None] * dst_sy + (ox - dst_rx)[:, None] * dst_sx + n[None, :]
        tl.store(dst + offsets, rounded(y, dst, UPCAST), mask=keep)


@triton.jit
def _mask_path_kernel(
    mask_ptr, out_ptr, scratch_ptr,
    w0_ptr, cb0_ptr, nw0_ptr, nb0_ptr, w1_ptr, cb1_ptr, nw1_ptr, nb1_ptr,
    w2_ptr, cb2_ptr, nw2_ptr, nb2_ptr, w3_ptr, cb3_ptr, nw3_ptr, nb3_ptr,
    mask_sb, mask_sc, mask_sy, mask_sx, mask_h, mask_w, scale, bias,
    tiles_w, tiles_per_image, num_tiles, slot_elems,
    NUM_STAGES: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, CP_OUT: tl.constexpr, EPS: tl.constexpr,
    RH: tl.constexpr, RW: tl.constexpr, ORG_Y: tl.constexpr, ORG_X: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr, BUF: tl.constexpr,
    APPLY_SIGMOID: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
):
    """Persistent: program p runs tiles p, p + P, ... and owns scratch slot p.

    Stage j's parameters are ``w{j}`` (conv weight), ``cb{j}`` (conv bias), ``nw{j}``/``nb{j}``
    (LayerNorm weight and bias). Per-stage constexprs are tuples indexed by stage. Stage j's
    region origin is ``tile origin * ORG_Y[j][0] - ORG_Y[j][1]`` (folding o_{j-1} = o_j * stride
    - padding).
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
                dst, dst_sy, C_OUT[j], dst_ry, dst_rx, dst_h, dst_w, oy, ox,
                _stage_pointer(j, w0_ptr, w1_ptr, w2_ptr, w3_ptr),
                _stage_pointer(j, cb0_ptr, cb1_ptr, cb2_ptr, cb3_ptr),
                _stage_pointer(j, nw0_ptr, nw1_ptr, nw2_ptr, nw3_ptr),
                _stage_pointer(j, nb0_ptr, nb1_ptr, nb2_ptr, nb3_ptr),
                scale, bias,
                EPS[j], C_IN[j], C_OUT[j], CP_OUT[j], RH[j], RW[j], BM[j], BK[j], USE_DOT[j],
                KH, KW, SH, SW, PH, PW, j == 0, j == NUM_STAGES - 1, APPLY_SIGMOID, UPCAST, PREC, WIDE[j],
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

    @classmethod
    def of(cls, weights: Sequence[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
           eps: Sequence[float]) -> "MaskGeometry":
        """The geometry of stages with conv ``weights`` (C_out, C_in, KH, KW) that share one
        kernel size, ``stride`` and ``padding``."""
        channels = (weights[0].shape[1],) + tuple(w.shape[0] for w in weights)
        return cls((weights[0].shape[2], weights[0].shape[3]), (stride[0], stride[1]), (padding[0], padding[1]),
                   channels, tuple(float(e) for e in eps))

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

    def parameter_count(self) -> int:
        """Elements of every stage's conv weight and bias and LayerNorm weight and bias."""
        taps = self.kernel[0] * self.kernel[1]
        return sum((taps * c_in + 3) * c_out for c_in, c_out in zip(self.channels[:-1], self.channels[1:]))


SAM2_GEOMETRY = MaskGeometry((3, 3), (2, 2), (1, 1), (1, 4, 16, 64, 256), (1e-6,) * 4)


@dataclass(frozen=True)
class MaskPathConfig:
    """Tile and blocking of one launch: TH x TW last-stage pixels per tile; per stage, BM pixels
    per block and whether K runs through tl.dot (in chunks of BK) or as FMAs."""

    th: int
    tw: int
    bm: Tuple[int, ...]
    bk: Tuple[int, ...]
    use_dot: Tuple[bool, ...]
    num_warps: int
    num_stages: int
    programs_per_sm: int

    def describe(self) -> str:
        stages = " ".join(f"{'dot' if d else 'fma'}:{m}x{k}" for m, k, d in zip(self.bm, self.bk, self.use_dot))
        return (f"T={self.th}x{self.tw} [{stages}] w{self.num_warps} s{self.num_stages} "
                f"P={self.programs_per_sm}/SM")


def _region_sizes(geom: MaskGeometry, th: int, tw: int) -> List[Tuple[int, int]]:
    """Region (rows, cols) each stage computes for a th x tw tile of the last stage."""
    sizes = [(th, tw)]
    for _ in range(geom.num_stages - 1):
        rh, rw = sizes[0]
        sizes.insert(0, ((rh - 1) * geom.stride[0] + geom.kernel[0], (rw - 1) * geom.stride[1] + geom.kernel[1]))
    return sizes


WEIGHT_READ_MACS = 32
"""What reading one parameter from L2 costs a program, in multiply-adds: an SM's tensor-core rate
over its share of L2 bandwidth (A100, H100: 30-60 flops per byte). Every tile reads every stage's
parameters, so small tiles pay for them more often."""


def _tile_cost(geom: MaskGeometry, th: int, tw: int) -> int:
    """One th x tw tile of the last stage, in multiply-adds: every stage's conv over its region
    (halos included) and the reads of every stage's parameters."""
    taps = geom.kernel[0] * geom.kernel[1]
    macs = sum(rh * rw * c_in * c_out * taps for (rh, rw), c_in, c_out in
               zip(_region_sizes(geom, th, tw), geom.channels[:-1], geom.channels[1:]))
    return macs + WEIGHT_READ_MACS * geom.parameter_count()


def _uses_dot(c_out: int) -> bool:
    """Outputs narrower than 16 channels cannot feed tensor cores: they run as FMAs."""
    return next_power_of_2(c_out) >= 16


def choose_config(geom: MaskGeometry, batch: int, out_size: Tuple[int, int], compute: torch.dtype,
                  weights: torch.dtype, device: DeviceLimits, tf32: bool = False,
                  for_interpreter: bool = False) -> MaskPathConfig:
    """The one place the launch configuration is chosen (the wrappers and the report use it).

    Larger tiles cut the halo recompute and the weight traffic per output pixel; small batches
    take 8x8, 4x8 or 4x4 tiles so that there is a tile for every SM (at B=1, SAM 2's 64x64
    features make 128 tiles of 4x8: under a wave of an H100's 132 SMs) and the last round of
    the persistent grid's tiles does not leave most SMs idle. Each dot stage takes
    the largest K chunk (64 at most, 16 at least) that gathers at most ``GATHERED_ELEMENTS``
    inputs (a quarter as many in TF32, with pixel blocks to match) and whose double-buffered
    operand tiles, the weights as loaded in their own dtype, fit
    the device's shared memory. fp32 takes the tensor-core blocking where TF32 is allowed
    (``tf32``, torch's flag for the convs the kernel replaces). ``for_interpreter`` picks the largest
    blocks instead: the interpreter spends ~0.1 ms of Python per tl op whatever its size, and has
    no registers to run out of.
    """
    k_totals = [geom.kernel[0] * geom.kernel[1] * c_in for c_in in geom.channels[:-1]]
    use_dot = tuple(_uses_dot(c_out) for c_out in geom.channels[1:])
    if for_interpreter:
        th, tw = min(out_size[0], 16), min(out_size[1], 16)
        bm = tuple(min(4096, next_power_of_2(rh * rw)) for rh, rw in _region_sizes(geom, th, tw))
        bk = tuple(min(128, padded(k)) if dot else 1 for k, dot in zip(k_totals, use_dot))
        return MaskPathConfig(th, tw, bm, bk, use_dot, 8, 1, 1)

    def tiles(tile: Tuple[int, int]) -> int:
        return batch * ceil_div(out_size[0], tile[0]) * ceil_div(out_size[1], tile[1])

    # The persistent grid runs ceil(tiles / SMs) rounds of tiles: among the tilings that give
    # every SM a tile, the one with the least rounds x cost of a tile; the larger tile on a tie.
    candidates = [(8, 16), (8, 8), (4, 8), (4, 4)]
    filling = [tile for tile in candidates if fills_wave(tiles(tile), device)] or candidates[-1:]
    th, tw = min(filling, key=lambda tile: ceil_div(tiles(tile), device.sm_count) * _tile_cost(geom, *tile))
    # Accumulator budget per block, BM x channels fp32 values, read off the cubins: with 8 warps,
    # 64 x 256 leaves the LayerNorm/GELU epilogue room (128 x 256 spills on sm_80 and sm_90a).
    # CUDA-core dots (IEEE fp32; every dot on sm_75) hold their operands in registers too: 16 x 256
    # and at most 128 pixels (32 x 256, or 256 pixels in the narrow stages, spilled on sm_80), K
    # in 16s.
    cuda_cores = not tensor_core_dots(compute, device, tf32)
    budget, max_bm = (16 * 256, 128) if cuda_cores else (64 * 256, 256)
    # About 240 registers x 8 warps: one program per SM, which the persistent grid matches.
    # CUDA-core dots gain nothing from cp.async double buffering, and with 8 warps ptxas squeezed
    # them into 128 registers and spilled: 4 warps, single-buffered.
    num_warps, num_stages = (4, 1) if cuda_cores else (8, 2)
    # TF32 operands take twice the registers of 16-bit ones, beside their addresses: gathers of
    # 64 x 64 (triton 3.9), 128 x 16 and 64 x 32 (triton 3.6) spilled on sm_80, sm_90a and
    # sm_100a; a quarter as many (64 x 16) did not.
    gathered = GATHERED_ELEMENTS // 4 if compute == torch.float32 and not cuda_cores else GATHERED_ELEMENTS
    bm, bk = [], []
    for (rh, rw), c_out, k_total, dot in zip(_region_sizes(geom, th, tw), geom.channels[1:], k_totals, use_dot):
        cp_out = next_power_of_2(c_out)
        m = max(16, min(budget // cp_out, max_bm, next_power_of_2(rh * rw)))
        chunk = 1
        if dot:
            m = max(16, min(m, gathered // 16))  # K chunks of 16 at least
            fitting = [c for c in (64, 32) if m * c <= gathered and fits_shared_memory(
                pipelined_shared_bytes(num_stages, compute, [(m * c, compute), (c * cp_out, weights)]), device)]
            chunk = min(16 if cuda_cores or not fitting else fitting[0], padded(k_total))
        bm.append(m)
        bk.append(chunk)
    return MaskPathConfig(th, tw, tuple(bm), tuple(bk), use_dot, num_warps, num_stages, 1)


@dataclass(frozen=True)
class _Tiling:
    """What a launch's shapes decide: the configuration, the persistent grid, each program's
    scratch slot, the constexprs of the tiles and stages, and what the kernel report shows."""

    cfg: MaskPathConfig
    programs: int
    slot_elems: int
    tiles_w: int
    tiles_per_image: int
    num_tiles: int
    constexprs: Tuple[Tuple[str, Any], ...]
    config: str
    flops: int
    min_bytes: int


# Planning costs tens of microseconds of Python, as much as the kernel itself at B=1 on a GPU. It
# depends on these arguments only (shapes, dtypes, the device's limits; never the weights'
# values), so it is kept per argument tuple.
@functools.lru_cache(maxsize=64)
def _tiling(geom: MaskGeometry, batch: int, height: int, width: int, compute: torch.dtype, weights: torch.dtype,
            device: DeviceLimits, tf32: bool, max_programs: Optional[int], for_interpreter: bool) -> _Tiling:
    out_h, out_w = geom.output_size(height, width)[-1]
    cfg = choose_config(geom, batch, (out_h, out_w), compute, weights, device, tf32, for_interpreter)
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

    # Two ping-pong buffers per slot: stage j writes buffer j % 2 (the last writes the output).
    buf_sizes = [0, 0]
    for j in range(n - 1):
        buf_sizes[j % 2] = max(buf_sizes[j % 2], regions[j][0] * regions[j][1] * c_out[j])
    align = 64
    buf1 = ceil_div(buf_sizes[0], align) * align
    slot_elems = max(align, ceil_div(buf1 + buf_sizes[1], align) * align)
    tiles_h, tiles_w = ceil_div(out_h, cfg.th), ceil_div(out_w, cfg.tw)
    num_tiles = batch * tiles_h * tiles_w
    programs = min(num_tiles, device.sm_count * cfg.programs_per_sm)
    if max_programs is not None:
        programs = min(programs, max_programs)
    constexprs = dict(
        NUM_STAGES=n, KH=geom.kernel[0], KW=geom.kernel[1], SH=geom.stride[0], SW=geom.stride[1],
        PH=geom.padding[0], PW=geom.padding[1],
        C_IN=tuple(geom.channels[:-1]), C_OUT=tuple(c_out),
        CP_OUT=tuple(next_power_of_2(c) for c in c_out), EPS=geom.eps,
        RH=tuple(r[0] for r in regions), RW=tuple(r[1] for r in regions),
        ORG_Y=tuple(origin(0, j) for j in range(n)), ORG_X=tuple(origin(1, j) for j in range(n)),
        BM=cfg.bm, BK=cfg.bk, USE_DOT=cfg.use_dot, BUF=tuple(0 if j % 2 == 0 else buf1 for j in range(n)),
    )
    min_bytes = (batch * (height * width * geom.channels[0] + out_h * out_w * c_out[-1]) * compute.itemsize
                 + geom.parameter_count() * weights.itemsize)
    return _Tiling(cfg, max(programs, 1), slot_elems, tiles_w, tiles_h * tiles_w, num_tiles,
                   tuple(constexprs.items()), f"{cfg.describe()} W={type_name(weights)}",
                   batch * geom.flops(height, width), min_bytes)


def plan_mask_path(
    masks: torch.Tensor,
    geom: MaskGeometry,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    norm_weights: Sequence[torch.Tensor],
    norm_biases: Sequence[torch.Tensor],
    apply_sigmoid: bool,
    scale: float,
    bias: float,
    out: torch.Tensor,
    device: DeviceLimits,
    max_programs: Optional[int] = None,
    for_interpreter: bool = INTERPRETED,
    tf32: bool = False,
) -> Launch:
    """The launch for ``masks`` (B, C_in, H, W), any strides, into ``out``: the last stage's
    features, (B, h, w, C) contiguous, in the masks' dtype (the compute dtype). Per stage:
    the conv weight (C_out, C_in, KH, KW), its bias, the LayerNorm weight and bias, contiguous,
    any float dtype. ``max_programs`` caps the persistent grid (tests use it). ``tf32``: whether
    torch allows the convs TF32 (``torch.backends.cudnn.allow_tf32``, read by the caller)."""
    batch, _, height, width = masks.shape
    tiling = _tiling(geom, batch, height, width, masks.dtype, widest_dtype(weights), device, tf32, max_programs,
                     for_interpreter)
    n = geom.num_stages
    scratch = torch.empty(tiling.programs * tiling.slot_elems if n > 1 else 1, dtype=masks.dtype, device=masks.device)
    args = dict(mask_ptr=masks, out_ptr=out, scratch_ptr=scratch)
    for j in range(MAX_STAGES):
        stage = j if j < n else 0
        args.update({f"w{j}_ptr": weights[stage], f"cb{j}_ptr": biases[stage], f"nw{j}_ptr": norm_weights[stage],
                     f"nb{j}_ptr": norm_biases[stage]})
    args.update(
        mask_sb=masks.stride(0), mask_sc=masks.stride(1), mask_sy=masks.stride(2), mask_sx=masks.stride(3),
        mask_h=height, mask_w=width, scale=float(scale), bias=float(bias), tiles_w=tiling.tiles_w,
        tiles_per_image=tiling.tiles_per_image, num_tiles=tiling.num_tiles, slot_elems=tiling.slot_elems,
    )
    precision = dot_precision(masks.dtype, device, tf32)
    # Only the mask is a caller's view; the scratch slots are this kernel's own.
    wide = (needs_int64_offsets(masks),) + (False,) * (n - 1)
    constexprs = dict(tiling.constexprs, APPLY_SIGMOID=bool(apply_sigmoid), WIDE=wide,
                      UPCAST=fp32_dot_operands(masks.dtype, device),
                      PREC=precision)
    return Launch(
        kernel="mask_path", fn=_mask_path_kernel, grid=(tiling.programs,), args=args, constexprs=constexprs,
        num_warps=tiling.cfg.num_warps, num_stages=tiling.cfg.num_stages, config=tiling.config, matrix_work=True,
        flops=tiling.flops, min_bytes=tiling.min_bytes,
        # The persistent grid runs one program per SM: ptxas capping registers for more programs
        # per SM gains nothing (it capped fp32 4x4 tiles to 128 on sm_80, and spilled).
        max_registers=MAX_REGISTERS, tf32=precision == "tf32",
    )


def report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> List[Launch]:
    """The kernel report's launches of the SAM 2 mask path (1024x1024 masks) at ``batch``, with
    weights in ``dtype`` and, for bf16/fp16, also in fp32 (autocast); fp32 with IEEE and with TF32
    dots."""
    geom = SAM2_GEOMETRY
    masks = torch.empty((batch, 1, 1024, 1024), dtype=dtype, device="meta")
    out_h, out_w = geom.output_size(1024, 1024)[-1]
    out = torch.empty((batch, out_h, out_w, geom.channels[-1]), dtype=dtype, device="meta")
    launches = []
    for weights in dict.fromkeys((dtype, torch.float32)):
        convs = [torch.empty((c_out, c_in, *geom.kernel), dtype=weights, device="meta")
                 for c_in, c_out in zip(geom.channels[:-1], geom.channels[1:])]
        vectors = [torch.empty((c_out,), dtype=weights, device="meta") for c_out in geom.channels[1:]]
        launches += [plan_mask_path(masks, geom, convs, vectors, vectors, vectors, True, 1.0, 0.0, out, device,
                                    for_interpreter=False, tf32=tf32) for tf32 in report_tf32_settings(dtype)]
    return launches
