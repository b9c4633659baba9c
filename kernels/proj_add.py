"""``proj_add``: the downsampler's final 1x1 conv plus ``pix_feat_proj`` as one GEMM.

``out = [W_m | W_p] . [m ; p] + (b_m + b_p)`` over the concatenated K: each output tile walks
the mask features' channels, then pix_feat's, reading both straight from their own layouts (the
mask path's channels-last output, pix_feat's NCHW) through strides, and writes channels-last
tokens. The same kernel, with one source and an NCHW output, is ``out_proj`` (``out_proj.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from memenc_fast.backends.kernel_args import check_tensor, new_output
from memenc_fast.packing import PackedEncoder

from ._common import (
    INTERPRETED,
    REPORT_SM_COUNT,
    Launch,
    check_same_device,
    dot_precision,
    operand,
    rounded,
    sm_count,
)

__all__ = ["proj_add", "launch_pointwise", "plan_pointwise", "PointwiseConfig", "choose_config", "report_specs"]


@triton.jit
def _accumulate(acc, src, s_c, s_p, p, p_ok, w_ptr, n, n_ok,
                K: tl.constexpr, W_STRIDE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr):
    """acc += src[p, 0:K] @ w[n, 0:K]^T, with src pixel p, channel k at ``src + k*s_c + p*s_p``."""
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        a = tl.load(src + k[None, :] * s_c + p[:, None] * s_p, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n[None, :] * W_STRIDE + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(operand(a, w_ptr, UPCAST), operand(w, w_ptr, UPCAST), acc, input_precision=PREC)
    return acc


@triton.jit
def _pointwise_kernel(
    a_ptr, a_sb, a_sc, a_sp, c_ptr, c_sb, c_sc, c_sp,
    w_ptr, bias_ptr, o_ptr, o_sb, o_sc, o_sp,
    hw, tiles_per_image,
    KA: tl.constexpr, KC: tl.constexpr, N: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One BM-pixel x BN-channel tile of one image: ``[a ; c] @ w^T + bias``.

    ``w`` is (N, KA + KC) row-major; KC == 0 means no second source. A tile never spans two
    images, so every address is (batch, channel, pixel) strided.
    """
    pid = tl.program_id(0)
    b = pid // tiles_per_image
    p = (pid - b * tiles_per_image) * BM + tl.arange(0, BM)
    p_ok = p < hw
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    b64 = b.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, a_ptr + b64 * a_sb, a_sc, a_sp, p, p_ok, w_ptr, n, n_ok,
                      KA, KA + KC, BK, UPCAST, PREC)
    if KC > 0:
        acc = _accumulate(acc, c_ptr + b64 * c_sb, c_sc, c_sp, p, p_ok, w_ptr + KA, n, n_ok,
                          KC, KA + KC, BK, UPCAST, PREC)
    acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
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


def choose_config(batch: int, hw: int, n: int, dtype: torch.dtype, sms: int,
                  for_interpreter: bool = False) -> PointwiseConfig:
    """The one place the launch configuration is chosen (the launcher and the report use it).

    128 x 128 tiles on 8 warps for tensor cores (128 x 256 spilled on sm_80); 64-pixel tiles
    when the grid would not cover the SMs (small batches). fp32 dots run on CUDA cores with both
    operands in registers: 32 x 64 (64 x 64 spilled on sm_90a; a K step under 16 would not
    compile with triton 3.6).
    ``for_interpreter``: whole images per program (Python overhead per tl op, no registers).
    """
    n_pad = triton.next_power_of_2(n)
    if for_interpreter:
        return PointwiseConfig(min(4096, triton.next_power_of_2(hw)), n_pad, 64, 4, 1)
    if dtype == torch.float32:
        return PointwiseConfig(32, min(n_pad, 64), 16, 4, 2)
    bn = min(n_pad, 128)
    bm = 128 if batch * triton.cdiv(hw, 128) * triton.cdiv(n, bn) >= sms else 64
    return PointwiseConfig(bm, bn, 64, 8 if bm * bn >= 128 * 128 else 4, 3)


def plan_pointwise(
    kernel: str,
    a: torch.Tensor,
    c: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    channels_last_out: bool,
    sms: int,
    for_interpreter: bool = INTERPRETED,
) -> Tuple[Launch, torch.Tensor]:
    """The launch of ``[a ; c] @ weight^T + bias`` on (B, K, H, W) inputs (any strides whose
    H, W collapse into one pixel index), and its output: tokens (B, H, W, N) contiguous when
    ``channels_last_out``, else NCHW (B, N, H, W) contiguous."""
    batch, ka, height, width = a.shape
    kc = 0 if c is None else c.shape[1]
    n = weight.shape[0]
    hw = height * width
    cfg = choose_config(batch, hw, n, a.dtype, sms, for_interpreter)
    if channels_last_out:
        out = new_output((batch, height, width, n), a.dtype, a.device)
        o_strides = (hw * n, 1, n)
    else:
        out = new_output((batch, n, height, width), a.dtype, a.device)
        o_strides = (n * hw, hw, 1)
    second = a if c is None else c
    tiles = triton.cdiv(hw, cfg.bm)
    args = dict(
        a_ptr=a, a_sb=a.stride(0), a_sc=a.stride(1), a_sp=a.stride(3),
        c_ptr=second, c_sb=second.stride(0), c_sc=second.stride(1), c_sp=second.stride(3),
        w_ptr=weight, bias_ptr=bias, o_ptr=out, o_sb=o_strides[0], o_sc=o_strides[1], o_sp=o_strides[2],
        hw=hw, tiles_per_image=tiles,
    )
    constexprs = dict(KA=ka, KC=kc, N=n, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, UPCAST=INTERPRETED,
                      PREC=dot_precision(a.dtype))
    item = a.element_size()
    launch = Launch(
        kernel=kernel, fn=_pointwise_kernel, grid=(batch * tiles, triton.cdiv(n, cfg.bn)), args=args,
        constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, config=cfg.describe(),
        matrix_work=True, flops=2 * batch * hw * n * (ka + kc),
        min_bytes=(batch * hw * (ka + kc + n) + n * (ka + kc + 1)) * item,
    )
    return launch, out


def _pixel_strides_ok(t: torch.Tensor) -> bool:
    """H and W of an NCHW-indexed tensor collapse into one pixel index (NCHW or channels-last)."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def launch_pointwise(
    op: str, a: torch.Tensor, c: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
    channels_last_out: bool,
) -> torch.Tensor:
    """Checks the inputs and runs ``plan_pointwise``'s launch; inputs are (B, K, H, W) views."""
    check_tensor(op, "weight", weight, shape=(None, a.shape[1] + (0 if c is None else c.shape[1])),
                 contiguous=True)
    check_tensor(op, "bias", bias, dtype=weight.dtype, shape=(weight.shape[0],), contiguous=True)
    inputs = {"input": a} if c is None else {"mask_features": a, "pix_feat": c}
    for name, t in inputs.items():
        check_tensor(op, name, t, dtype=weight.dtype, shape=(a.shape[0], None, a.shape[2], a.shape[3]))
    check_same_device(op, weight=weight, bias=bias, **inputs)
    a, *rest = (t if _pixel_strides_ok(t) else t.contiguous() for t in inputs.values())
    launch, out = plan_pointwise(op, a, rest[0] if rest else None, weight, bias, channels_last_out,
                                 sm_count(a.device))
    if out.numel():
        launch.run()
    return out


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, packed: PackedEncoder) -> torch.Tensor:
    """The ``proj_add`` op (see ``torch_ops.proj_add``): mask features (B, C_m, H, W) and pix_feat
    (B, C_p, H, W), any layout -> tokens (B, H, W, C) contiguous."""
    return launch_pointwise("proj_add", mask_features, pix_feat, packed.proj_weight, packed.proj_bias, True)


def report_specs(batch: int, dtype: torch.dtype) -> list:
    """The kernel report's launch of proj_add at the SAM 2 shape (64x64 features, 256 + 256 -> 256)."""
    mask_features = torch.empty((batch, 64, 64, 256), dtype=dtype, device="meta").permute(0, 3, 1, 2)
    pix_feat = torch.empty((batch, 256, 64, 64), dtype=dtype, device="meta")
    weight = torch.empty((256, 512), dtype=dtype, device="meta")
    bias = torch.empty((256,), dtype=dtype, device="meta")
    launch, _ = plan_pointwise("proj_add", mask_features, pix_feat, weight, bias, True, REPORT_SM_COUNT,
                               for_interpreter=False)
    return [launch.spec()]
