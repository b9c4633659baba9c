"""One CXBlock on channels-last tokens in two kernels, and its variant with ``out_proj`` fused.

1. ``_dwconv_ln_kernel``: the depthwise conv (weight (C, 1, KH, KW) as stored) and the LayerNorm
   over channels with its affine, for a TH x TW pixel tile with every channel in registers;
   writes the normalized tokens.
2. ``_mlp_kernel``: per BM tokens, ``x + gamma * (GELU(n @ w1^T + b1) @ w2^T + b2)`` with the
   4C-wide hidden produced and consumed BH columns at a time: it never leaves the chip. The
   BM x C fp32 accumulator holds the whole output row, so the bias, gamma and the residual land
   in the epilogue, and so can ``out_proj`` (``FUSE_OUT``: the block's output, rounded to the
   compute dtype as it would be stored, times ``W_out^T`` on tensor cores, stored NCHW).

At small batches (SAM 2's per-object call: 64 token tiles of 4096 tokens) the token tiles alone
leave SMs idle, so the hidden dimension may be split across SPLIT programs per tile: each stores
its share of the second GEMM in fp32, and the last of them to arrive (an atomic count per tile)
adds all shares in split order, the same sum whatever the arrival order, and runs the epilogue.
The shares cost traffic (at B=1, split 4: 16 MiB written and read back against 6 MiB of real
input and output), so the split is chosen by a cost model of waves and shares' traffic
(``choose_mlp_config``), and ``forced_mlp_split`` overrides it for benchmarks. The counts start
at zero because the dwconv kernel, which always runs just before on the same stream, zeroes them
(no memset launch, which at B=1 costs as much as a kernel), and the last program of a tile resets
its count after the epilogue: a launch leaves them at zero, so rerunning the MLP launch alone
(a benchmark of one op, a reused plan) is correct too.

Every weight is read as stored, in its own dtype; the compute dtype is the tokens'.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

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
    gelu,
    next_power_of_2,
    operand,
    padded,
    pipelined_shared_bytes,
    report_tf32_settings,
    rounded,
    tensor_core_dots,
    type_name,
    widest_dtype,
)

__all__ = ["DwconvConfig", "MlpConfig", "choose_dwconv_config", "choose_mlp_config", "fuses_out_proj",
           "mlp_shared_bytes", "share_traffic_bytes", "forced_mlp_split", "plan_block", "report_launches",
           "MAX_CHANNELS", "EPILOGUE_CHANNELS", "SHARE_BYTE_MACS"]

MAX_CHANNELS = 256
"""Widest block (and fused out_proj): the MLP's accumulator holds a whole BM x C row block in
registers."""

EPILOGUE_CHANNELS = 64
"""Channels per step of the split MLP's epilogue (see ``_split_epilogue``)."""


@triton.jit
def _dwconv_ln_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, o_ptr, count_ptr, counts, height, width, tiles_w, tiles_per_image,
    C: tl.constexpr, CP: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, EPS: tl.constexpr, COUNTS_PER_PROGRAM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """LayerNorm(depthwise conv) with affine ``g``, ``beta`` of a TH x TW tile of tokens (B, H, W, C).

    With COUNTS_PER_PROGRAM > 0, also zeroes that many of the ``counts`` int32 arrival counts at
    ``count_ptr`` per program, for the split MLP that follows (else ``count_ptr`` is never used).
    """
    pid = tl.program_id(0)
    if COUNTS_PER_PROGRAM > 0:
        z = pid * COUNTS_PER_PROGRAM + tl.arange(0, COUNTS_PER_PROGRAM)
        tl.store(count_ptr + z, tl.zeros((COUNTS_PER_PROGRAM,), dtype=tl.int32), mask=z < counts)
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
def _block_output(acc, m_ok, rows, c, x_ptr, b2_ptr, gamma_ptr, C: tl.constexpr, HAS_GAMMA: tl.constexpr):
    """``x + gamma * (acc + b2)`` for the rows at ``rows`` and the channels ``c`` of ``acc``."""
    c_ok = c < C
    acc += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        acc *= tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return acc + tl.load(x_ptr + rows[:, None] + c[None, :], mask=m_ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)


@triton.jit
def _store_out(out, m, m_ok, o_ptr, bo_ptr, hw, NO: tl.constexpr, NOP: tl.constexpr, UPCAST: tl.constexpr):
    """Stores out_proj's BM x NOP result ``out`` plus ``bo`` NCHW (B, NO, H, W), ``hw`` = H * W."""
    no = tl.arange(0, NOP)
    no_ok = no < NO
    out += tl.load(bo_ptr + no, mask=no_ok, other=0.0).to(tl.float32)[None, :]
    image = m // hw
    offsets = (image.to(tl.int64) * NO * hw + m % hw)[:, None] + (no * hw)[None, :]
    tl.store(o_ptr + offsets, rounded(out, o_ptr, UPCAST), mask=m_ok[:, None] & no_ok[None, :])


@triton.jit
def _out_proj_operand(wo_ptr, k, C: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr):
    """Rows ``k`` of ``wo^T`` (wo: (NO, C, 1, 1) as stored), NOP columns."""
    no = tl.arange(0, NOP)
    return tl.load(wo_ptr + no[None, :] * C + k[:, None], mask=(k < C)[:, None] & (no < NO)[None, :], other=0.0)


@triton.jit
def _mlp_epilogue(acc, m, m_ok, x_ptr, b2_ptr, gamma_ptr, o_ptr, wo_ptr, bo_ptr, hw,
                  C: tl.constexpr, CP: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr, HAS_GAMMA: tl.constexpr,
                  FUSE_OUT: tl.constexpr, UPCAST: tl.constexpr, OUT_PREC: tl.constexpr):
    """The block's output from ``acc``, the second GEMM's BM x CP sum: stored as tokens, or with
    FUSE_OUT (rounded to the compute dtype, as stored) times ``wo^T`` plus ``bo`` (dots in
    OUT_PREC, out_proj's precision), stored NCHW."""
    rows = m.to(tl.int64) * C
    c = tl.arange(0, CP)
    y = _block_output(acc, m_ok, rows, c, x_ptr, b2_ptr, gamma_ptr, C, HAS_GAMMA)
    if FUSE_OUT:
        out = tl.dot(operand(y, x_ptr, UPCAST), operand(_out_proj_operand(wo_ptr, c, C, NO, NOP), x_ptr, UPCAST),
                     input_precision=OUT_PREC)
        _store_out(out, m, m_ok, o_ptr, bo_ptr, hw, NO, NOP, UPCAST)
    else:
        tl.store(o_ptr + rows[:, None] + c[None, :], rounded(y, o_ptr, UPCAST), mask=m_ok[:, None] & (c < C)[None, :])


@triton.jit
def _split_epilogue(shares, m, m_ok, x_ptr, b2_ptr, gamma_ptr, o_ptr, wo_ptr, bo_ptr, hw,
                    C: tl.constexpr, CP: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr, BM: tl.constexpr,
                    EC: tl.constexpr, SPLIT: tl.constexpr, HAS_GAMMA: tl.constexpr, FUSE_OUT: tl.constexpr,
                    UPCAST: tl.constexpr, OUT_PREC: tl.constexpr):
    """``_mlp_epilogue`` of the sum of the SPLIT (BM, CP) fp32 shares at ``shares``, added in
    split order, EC channels at a time: a whole BM x CP sum beside a loaded share and out_proj's
    operands spilled."""
    rows = m.to(tl.int64) * C
    if FUSE_OUT:
        out = tl.zeros((BM, NOP), dtype=tl.float32)
    for c0 in tl.static_range(0, CP, EC):
        c = c0 + tl.arange(0, EC)
        cell = tl.arange(0, BM)[:, None] * CP + c[None, :]
        total = tl.zeros((BM, EC), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            # .cg reads L2, where the other SMs' stores are, past this SM's L1.
            total += tl.load(shares + s * (BM * CP) + cell, cache_modifier=".cg")
        y = _block_output(total, m_ok, rows, c, x_ptr, b2_ptr, gamma_ptr, C, HAS_GAMMA)
        if FUSE_OUT:
            out = tl.dot(operand(y, x_ptr, UPCAST), operand(_out_proj_operand(wo_ptr, c, C, NO, NOP), x_ptr, UPCAST),
                         out, input_precision=OUT_PREC)
        else:
            tl.store(o_ptr + rows[:, None] + c[None, :], rounded(y, o_ptr, UPCAST),
                     mask=m_ok[:, None] & (c < C)[None, :])
    if FUSE_OUT:
        _store_out(out, m, m_ok, o_ptr, bo_ptr, hw, NO, NOP, UPCAST)


@triton.jit
def _mlp_kernel(
    n_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gamma_ptr, o_ptr, wo_ptr, bo_ptr, partial_ptr, count_ptr,
    tokens, hw,
    C: tl.constexpr, CP: tl.constexpr, HID: tl.constexpr, NO: tl.constexpr, NOP: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, SPAN: tl.constexpr,
    EC: tl.constexpr, HAS_GAMMA: tl.constexpr, FUSE_OUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    OUT_PREC: tl.constexpr,
):
    """BM tokens of ``x + gamma * (GELU(n @ w1^T + b1) @ w2^T + b2)`` (then ``@ wo^T + bo`` with
    FUSE_OUT; without HAS_GAMMA, gamma is 1 and ``gamma_ptr`` is never read).

    ``n``, ``x``: (tokens, C); ``w1``: (HID, C); ``w2``: (C, HID); ``wo``: (NO, C, 1, 1). Output:
    tokens (tokens, C), or with FUSE_OUT NCHW (B, NO, H, W) with ``hw`` = H * W. With BK == CP
    the BM x C input tile is loaded once; a smaller BK re-reads it (from cache) in K chunks per
    hidden chunk, for CUDA-core (fp32) dots, which hold a whole K row of operands per thread.

    Program (t, s) runs hidden columns [s * SPAN, (s + 1) * SPAN) of token tile t. With SPLIT > 1,
    ``partial_ptr`` holds (tiles, SPLIT, BM, CP) fp32 shares and ``count_ptr`` one zeroed int32
    arrival count per tile, and the last program of a tile sums the shares EC channels at a time,
    then sets the count back to zero; with SPLIT == 1 neither is used.
    """
    tile = tl.program_id(0)
    m = tile * BM + tl.arange(0, BM)
    m_ok = m < tokens
    rows = m.to(tl.int64) * C
    c = tl.arange(0, CP)
    c_ok = c < C
    if BK == CP:
        a = operand(tl.load(n_ptr + rows[:, None] + c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0),
                    x_ptr, UPCAST)
    h_first = tl.program_id(1) * SPAN
    acc = tl.zeros((BM, CP), dtype=tl.float32)
    for h0 in range(0, SPAN, BH):
        h = h_first + h0 + tl.arange(0, BH)
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
    if SPLIT == 1:
        _mlp_epilogue(acc, m, m_ok, x_ptr, b2_ptr, gamma_ptr, o_ptr, wo_ptr, bo_ptr, hw, C, CP, NO, NOP, HAS_GAMMA,
                      FUSE_OUT, UPCAST, OUT_PREC)
    else:
        shares = partial_ptr + tile.to(tl.int64) * (SPLIT * BM * CP)
        tl.store(shares + tl.program_id(1) * (BM * CP) + tl.arange(0, BM)[:, None] * CP + c[None, :], acc)
        # Every thread's share is stored before one thread releases the count (an acq_rel atomic
        # at GPU scope): the program that reads SPLIT - 1 sees every other program's share.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1)
        if arrived == SPLIT - 1:
            _split_epilogue(shares, m, m_ok, x_ptr, b2_ptr, gamma_ptr, o_ptr, wo_ptr, bo_ptr, hw, C, CP, NO, NOP, BM,
                            EC, SPLIT, HAS_GAMMA, FUSE_OUT, UPCAST, OUT_PREC)
            # Every other program of the tile has counted: the count is free to start over, and
            # the next launch with these counts needs no zeroing before it.
            tl.store(count_ptr + tile, 0)


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
    (None: the whole channel row at once), and the hidden split across ``split`` programs per
    token tile."""

    bm: int
    bh: int
    bk: Optional[int]
    num_warps: int
    num_stages: int
    split: int = 1

    def describe(self) -> str:
        k = "" if self.bk is None else f" BK={self.bk}"
        split = "" if self.split == 1 else f" split={self.split}"
        return f"BM={self.bm} BH={self.bh}{k}{split} w{self.num_warps} s{self.num_stages}"


def fuses_out_proj(compute: torch.dtype, weights: torch.dtype, device: DeviceLimits) -> bool:
    """Whether out_proj runs in the MLP's epilogue for activations in ``compute`` and the block's
    and out_proj's weights at most as wide as ``weights`` on ``device``: only where 16-bit dots
    run on tensor cores (``tensor_core_dots``; a CUDA-core dot there spilled), and not with
    weights wider than the activations (autocast) on sm_100, where the epilogue's converted
    out_proj tile spilled whatever the tiling. Never in fp32: its dots run on tensor cores only
    where torch's TF32 flags, read at every call, allow it, and this choice is made per dtype."""
    if compute == torch.float32 or not tensor_core_dots(compute, device):
        return False
    return not (device.capability[0] == 10 and weights.itemsize > compute.itemsize)


@functools.lru_cache(maxsize=64)  # planning costs microseconds per call, as much as a B=1 launch
def choose_dwconv_config(batch: int, height: int, width: int, device: DeviceLimits,
                         for_interpreter: bool = False) -> DwconvConfig:
    """The one place the dwconv launch is configured: 4 x 8 pixels x all channels on 4 warps
    (a 7x7 window's reads hit L1 from the neighbouring pixels), 4 x 4 or 2 x 4 where that leaves
    SMs idle (SAM 2's 64x64 tokens make 128 tiles of 4 x 8 per object); whole images (up to
    4096 px) under the interpreter, whose cost is per tl op."""
    if for_interpreter:
        th = min(next_power_of_2(height), 64)
        return DwconvConfig(th, min(next_power_of_2(width), 4096 // th), 4)
    th, tw = first_filling_wave([(4, 8), (4, 4), (2, 4)],
                                lambda tile: batch * ceil_div(height, tile[0]) * ceil_div(width, tile[1]), device)
    return DwconvConfig(th, tw, 4)


def mlp_shared_bytes(cfg: MlpConfig, channels: int, compute: torch.dtype, weights: torch.dtype) -> int:
    """Shared memory of the MLP loop (an upper bound, see ``pipelined_shared_bytes``): the BM x C
    input tile, staged once, and per hidden chunk the w1 and w2 tiles."""
    cp = padded(channels)
    inputs = cfg.bm * cp * compute.itemsize
    return inputs + pipelined_shared_bytes(cfg.num_stages, compute, [(cp * cfg.bh, weights)] * 2)


SHARE_BYTE_MACS = 0.5
"""What one byte of the split MLP's fp32 shares costs, in one SM's 16-bit tensor-core
multiply-adds. Every program's share crosses the L2 twice (stored, then read back by the tile's
last program), so a byte costs an SM's rate over the bandwidth of the whole L2: H100 3.7e12
multiply-adds/s per SM over ~5.5 TB/s, A100 1.4e12 over ~4.5 TB/s, L4 1.0e12 over ~2 TB/s
(0.3-0.7)."""


def _mac_cost(compute: torch.dtype, device: DeviceLimits, tf32: bool) -> int:
    """One of the MLP's multiply-adds in 16-bit tensor-core multiply-adds: TF32 runs at half their
    rate, FMAs on CUDA cores at about a sixteenth (H100: 989 dense bf16, 495 TF32, 67 fp32 TFLOP/s)."""
    if not tensor_core_dots(compute, device, tf32):
        return 16
    return 2 if compute == torch.float32 else 1


def share_traffic_bytes(cfg: MlpConfig, tokens: int, channels: int) -> int:
    """Bytes of fp32 shares a launch of ``cfg`` over ``tokens`` stores and reads back (0 unsplit)."""
    if cfg.split == 1:
        return 0
    return 2 * ceil_div(tokens, cfg.bm) * cfg.split * cfg.bm * padded(channels) * 4


def _shares_fit(cfg: MlpConfig, tokens: int, channels: int, device: DeviceLimits) -> bool:
    """Whether a launch's shares (one copy) fit the device's L2, where the cost model prices them:
    beyond it their write-backs and read-backs go to DRAM, which it does not (a T4's 4 MiB L2
    against the 8 MiB of a 2-way split at B=1)."""
    return share_traffic_bytes(cfg, tokens, channels) // 2 <= device.l2_bytes


def _split_cost(cfg: MlpConfig, tokens: int, channels: int, hidden: int, mac_cost: int,
                device: DeviceLimits) -> float:
    """The MLP launch's time in one SM's 16-bit tensor-core multiply-adds: its rounds of programs
    (one per SM at a time: each takes most of an SM's registers and shared memory, so a round
    lasts as long as its slowest program) times one program's work, plus the shares' traffic."""
    rounds = ceil_div(ceil_div(tokens, cfg.bm) * cfg.split, device.sm_count)
    program_macs = 2 * cfg.bm * channels * ceil_div(ceil_div(hidden, cfg.bh), cfg.split) * cfg.bh
    return rounds * program_macs * mac_cost + SHARE_BYTE_MACS * share_traffic_bytes(cfg, tokens, channels)


_forced_split: Optional[int] = None


@contextlib.contextmanager
def forced_mlp_split(split: int) -> Iterator[None]:
    """Inside, every MLP launch a GPU runs is planned with ``split`` programs per token tile (at
    most one per hidden chunk) instead of the cost model's choice: what ``python -m memenc_fast
    bench --ops`` times to compare splits on a GPU. One setting per process, for benchmarks."""
    global _forced_split
    if split < 1:
        raise ValueError(f"forced_mlp_split: split must be at least 1; got {split}")
    previous, _forced_split = _forced_split, split
    try:
        yield
    finally:
        _forced_split = previous


@functools.lru_cache(maxsize=64)  # planning costs microseconds per call, as much as a B=1 launch
def choose_mlp_config(tokens: int, channels: int, hidden: int, compute: torch.dtype, weights: torch.dtype,
                      device: DeviceLimits, tf32: bool = False, for_interpreter: bool = False,
                      split: Optional[int] = None) -> MlpConfig:
    """The one place the MLP launch is configured (the wrappers and the report use it).

    Read off the cubins (BM x 256 fp32 accumulator, hidden chunks of BH), with triton 3.6 and
    3.9: BM=64 on 8 warps (BM=128 with BH=16..64 spilled 24-80 bytes on 8 or 16 warps). The
    widest hidden chunk, double-buffered where it can be, whose weight tiles as loaded fit the
    device's shared memory: fp32 weights under bf16 autocast take 192 KiB at BH=64, beyond
    sm_80's 163 KiB, which then runs BH=32 (single-buffered BH=64 spilled with fp32 weights on
    sm_90a; smaller devices go down to BH=16, single-buffered). fp32 takes these tensor-core
    tilings where TF32 is allowed (``tf32``: torch's flag for the Linear layers). CUDA-core dots
    (IEEE fp32; sm_75, see ``tensor_core_dots``) hold a whole K row of both operands per thread:
    K chunks of 16 for the first GEMM too.

    The hidden is split across programs by a cost model (``_split_cost``): among the splits of
    whole chunks whose shares fit the L2, the one with the least time in rounds of programs plus
    fp32 shares' traffic (``SHARE_BYTE_MACS``), the fewest splits on a tie. At B=1 (64 tiles)
    that is 2 on an H100 (128 programs for 132 SMs: 4 idle SMs cost less than a 4-way split's
    16 MiB of shares, stored and read back), none on an A100 (64 programs: a 2-way split's 128 run
    in two rounds) and 2 on an L4 (three rounds of half tiles against two of whole ones).
    ``split`` replaces the model's choice (at most one program per chunk; ``forced_mlp_split``).
    """
    if for_interpreter:
        return MlpConfig(min(4096, padded(tokens)), 256, None, 4, 1)
    if not tensor_core_dots(compute, device, tf32):
        cfg = MlpConfig(64, 16, 16, 8, 1)
    else:
        candidates = [MlpConfig(64, bh, None, 8, stages) for bh, stages in ((64, 2), (32, 2), (32, 1), (16, 1))]
        cfg = next((c for c in candidates if fits_shared_memory(mlp_shared_bytes(c, channels, compute, weights),
                                                                device)), candidates[-1])
    mac_cost = _mac_cost(compute, device, tf32)

    def with_split(cfg: MlpConfig) -> MlpConfig:
        chunks = ceil_div(hidden, cfg.bh)
        if split is not None:
            return replace(cfg, split=min(split, chunks))
        options = [c for c in (replace(cfg, split=s) for s in range(1, chunks + 1) if chunks % s == 0)
                   if _shares_fit(c, tokens, channels, device)]
        return min(options, key=lambda c: _split_cost(c, tokens, channels, hidden, mac_cost, device))

    cfg = with_split(cfg)
    # Split programs share SMs, and ptxas holds them to 128 registers on sm_100a: BH=64 spilled
    # there with 16-bit dots (triton 3.6), BH=32 with TF32 ones (triton 3.9).
    narrowest = 64 // compute.itemsize
    if cfg.split > 1 and device.capability[0] == 10 and cfg.bh > narrowest:
        cfg = with_split(replace(cfg, bh=narrowest))
    return cfg


def _small_grid_reason(cfg: MlpConfig, tokens: int, channels: int, hidden: int, device: DeviceLimits) -> Optional[str]:
    """Why the MLP's grid may leave SMs idle (None where it fills a wave): the split that would fill
    them costs more in shares' traffic, or there is none."""
    tiles, chunks = ceil_div(tokens, cfg.bm), ceil_div(hidden, cfg.bh)
    if tiles * cfg.split >= device.sm_count:
        return None
    filling = next((s for s in range(cfg.split + 1, chunks + 1)
                    if chunks % s == 0 and tiles * s >= device.sm_count), None)
    if filling is None:
        return f"{tiles} token tiles x {chunks} hidden chunks of {cfg.bh}: no split fills {device.sm_count} SMs"
    split = replace(cfg, split=filling)
    traffic = share_traffic_bytes(split, tokens, channels) / 2**20
    if not _shares_fit(split, tokens, channels, device):
        return (f"filling {device.sm_count} SMs takes a {filling}-way split of the hidden, whose "
                f"{traffic / 2:.1f} MiB of fp32 shares outgrow the {device.l2_bytes / 2**20:.0f} MiB L2")
    return (f"filling {device.sm_count} SMs takes a {filling}-way split of the hidden, whose {traffic:.1f} MiB "
            f"of fp32 shares cost more than the idle SMs")


def plan_block(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: Tuple[int, int],
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor,
               w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor], out_weight: Optional[torch.Tensor],
               out_bias: Optional[torch.Tensor], normed: torch.Tensor, out: torch.Tensor, device: DeviceLimits,
               for_interpreter: bool = INTERPRETED, tf32: bool = False,
               out_tf32: bool = False) -> Tuple[Launch, Launch]:
    """The two launches of a CXBlock on tokens ``x`` (B, H, W, C) contiguous: dwconv + LayerNorm
    into ``normed`` (same shape, contiguous), then the MLP into ``out``: tokens (B, H, W, C), or
    with ``out_weight`` (N, C, 1, 1) the NCHW (B, N, H, W) result of out_proj. Run them in order
    on one stream: the first zeroes the second's arrival counts.

    ``dw_weight`` (C, 1, KH, KW) with ``padding`` keeping the size, ``w1`` (HID, C), ``w2``
    (C, HID), the rest (C,), (HID,) or (N,), all contiguous, any float dtype; ``gamma`` or None.
    ``tf32``, ``out_tf32``: whether torch allows TF32 to the MLP's Linear layers
    (``torch.backends.cuda.matmul.allow_tf32``) and to out_proj, a Conv2d
    (``torch.backends.cudnn.allow_tf32``), read by the caller.
    """
    batch, height, width, channels = x.shape
    tokens = batch * height * width
    hidden = w1.shape[0]
    fused = out_weight is not None
    weights = widest_dtype([w1, w2, out_weight] if fused else [w1, w2])
    cfg = choose_mlp_config(tokens, channels, hidden, x.dtype, weights, device, tf32, for_interpreter, _forced_split)
    tiles = ceil_div(tokens, cfg.bm)
    if cfg.split > 1:
        shares = torch.empty((tiles, cfg.split, cfg.bm, padded(channels)), dtype=torch.float32, device=x.device)
        counts = torch.empty((tiles,), dtype=torch.int32, device=x.device)
    else:
        shares = counts = None
    dwconv = _plan_dwconv_ln(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, normed, counts, device,
                             for_interpreter)
    mlp = _plan_mlp(normed, x, w1, b1, w2, b2, gamma, out_weight, out_bias, out, cfg, weights, shares, counts,
                    fp32_dot_operands(x.dtype, device), dot_precision(x.dtype, device, tf32),
                    dot_precision(x.dtype, device, out_tf32), _small_grid_reason(cfg, tokens, channels, hidden, device))
    return dwconv, mlp


def _plan_dwconv_ln(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: Tuple[int, int],
                    norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, out: torch.Tensor,
                    counts: Optional[torch.Tensor], device: DeviceLimits, for_interpreter: bool) -> Launch:
    batch, height, width, channels = x.shape
    kernel = tuple(dw_weight.shape[-2:])
    cfg = choose_dwconv_config(batch, height, width, device, for_interpreter)
    tiles_w = ceil_div(width, cfg.tw)
    tiles = ceil_div(height, cfg.th) * tiles_w
    programs = batch * tiles
    n_counts = 0 if counts is None else counts.numel()
    args = dict(x_ptr=x, w_ptr=dw_weight, b_ptr=dw_bias, g_ptr=norm_weight, beta_ptr=norm_bias, o_ptr=out,
                count_ptr=x if counts is None else counts, counts=n_counts, height=height, width=width,
                tiles_w=tiles_w, tiles_per_image=tiles)
    constexprs = dict(C=channels, CP=next_power_of_2(channels), KH=kernel[0], KW=kernel[1],
                      PH=padding[0], PW=padding[1], TH=cfg.th, TW=cfg.tw, EPS=float(eps),
                      COUNTS_PER_PROGRAM=next_power_of_2(ceil_div(n_counts, programs)) if n_counts else 0,
                      UPCAST=INTERPRETED)
    numel = batch * height * width * channels
    return Launch(
        kernel="dwconv_ln", fn=_dwconv_ln_kernel, grid=(programs,), args=args, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=1, config=f"{cfg.describe()} W={type_name(dw_weight.dtype)}",
        matrix_work=False, flops=numel * (2 * kernel[0] * kernel[1] + 10),
        min_bytes=2 * numel * x.element_size() + channels * (kernel[0] * kernel[1] + 3) * dw_weight.element_size(),
    )


def _plan_mlp(normed: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, gamma: Optional[torch.Tensor], out_weight: Optional[torch.Tensor],
              out_bias: Optional[torch.Tensor], out: torch.Tensor, cfg: MlpConfig, weights: torch.dtype,
              shares: Optional[torch.Tensor], counts: Optional[torch.Tensor], upcast: bool, precision: str,
              out_precision: str, small_grid_reason: Optional[str]) -> Launch:
    batch, height, width, channels = x.shape
    hidden = w1.shape[0]
    tokens = batch * height * width
    fused = out_weight is not None
    n_out = out_weight.shape[0] if fused else channels
    args = dict(n_ptr=normed, x_ptr=x, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2,
                gamma_ptr=gamma if gamma is not None else b2, o_ptr=out,
                wo_ptr=out_weight if fused else w1, bo_ptr=out_bias if fused else b1,
                partial_ptr=x if shares is None else shares, count_ptr=x if counts is None else counts,
                tokens=tokens, hw=height * width)
    cp = padded(channels)
    constexprs = dict(C=channels, CP=cp, HID=hidden, NO=n_out, NOP=padded(n_out), BM=cfg.bm, BH=cfg.bh,
                      BK=cfg.bk or cp, SPLIT=cfg.split, SPAN=ceil_div(hidden, cfg.bh * cfg.split) * cfg.bh,
                      EC=min(cp, EPILOGUE_CHANNELS),
                      HAS_GAMMA=gamma is not None, FUSE_OUT=fused, UPCAST=upcast, PREC=precision,
                      OUT_PREC=out_precision)
    flops = 4 * tokens * channels * hidden + (2 * tokens * channels * n_out if fused else 0)
    parameters = 2 * channels * hidden + hidden + 2 * channels + ((channels + 1) * n_out if fused else 0)
    traffic = share_traffic_bytes(cfg, tokens, channels)
    shares = f" shares={traffic / 2**20:.1f}MiB" if traffic else ""
    return Launch(
        kernel="cxblock_mlp_out" if fused else "cxblock_mlp", fn=_mlp_kernel,
        grid=(ceil_div(tokens, cfg.bm), cfg.split), args=args, constexprs=constexprs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, config=f"{cfg.describe()}{shares} W={type_name(weights)}", matrix_work=True,
        flops=flops, min_bytes=tokens * (2 * channels + n_out) * x.element_size() + parameters * weights.itemsize,
        small_grid_reason=small_grid_reason, tf32=precision == "tf32",
    )


def report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> List[Launch]:
    """The kernel report's launches of one SAM 2 CXBlock (64x64 tokens, dim 256, hidden 1024):
    dwconv + LayerNorm, the MLP, and where it fuses (``fuses_out_proj``) the MLP with out_proj
    (256 -> 64), with weights in ``dtype`` and, for bf16/fp16, also in fp32 (autocast); the fp32
    MLP with IEEE and with TF32 dots. The MLP's config names its split and its shares' traffic
    (write and read back), its grid the waves."""
    def meta(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    x = meta(batch, 64, 64, 256)
    launches = []
    for weights in dict.fromkeys((dtype, torch.float32)):
        def vector(size: int) -> torch.Tensor:
            return meta(size, dtype=weights)

        block = (
            meta(256, 1, 7, 7, dtype=weights), vector(256), (3, 3), vector(256), vector(256), 1e-6,
            meta(1024, 256, dtype=weights), vector(1024), meta(256, 1024, dtype=weights), vector(256), vector(256))
        launches.append(plan_block(x, *block, None, None, x, x, device, for_interpreter=False)[0])
        # The dwconv has no dot: one launch whatever the precision.
        launches += [plan_block(x, *block, None, None, x, x, device, for_interpreter=False, tf32=tf32)[1]
                     for tf32 in report_tf32_settings(dtype)]
        if fuses_out_proj(dtype, weights, device):
            launches.append(plan_block(x, *block, meta(64, 256, 1, 1, dtype=weights), vector(64), x,
                                       meta(batch, 64, 64, 64), device, for_interpreter=False)[1])
    return launches
