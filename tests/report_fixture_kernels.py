"""Tiny Triton kernels made for testing the kernel report (never launched).

``report_launches`` gives three launches whose compiled code is known: a softmax row that fits in
registers, the same kernel over 4096 elements with one warp (two arrays of 128 fp32 values per
thread live across a reduction: it spills on sm_80 and sm_90a with triton 3.6 and 3.9), both a
program per SM, and a 64x64x32 ``tl.dot`` that runs on tensor cores (HGMMA on sm_90a, HMMA on
sm_80), one program per object with the reason it may leave SMs idle. They are built from meta
tensors, as the kernel modules' are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memenc_fast.kernels._common import DeviceLimits, Launch


@triton.jit
def softmax_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Softmax over BLOCK elements plus a term that keeps the input live beside it."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0) + x * tl.max(e, axis=0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One BMxBN tile of A @ B with K = BK."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


def _meta(size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((size,), dtype=dtype, device="meta")


def report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> list[Launch]:
    """Launches of the fixture kernels for ``batch`` rows of ``dtype`` (any device)."""
    item = dtype.itemsize
    launches = []
    for name, block, warps in (("softmax_fits", 1024, 4), ("softmax_spills", 4096, 1)):
        launches.append(Launch(
            kernel=name, fn=softmax_kernel, grid=(batch * device.sm_count,),
            args={"x_ptr": _meta(block, dtype), "y_ptr": _meta(block, dtype)}, constexprs={"BLOCK": block},
            num_warps=warps, num_stages=1, config=f"BLOCK={block} w{warps} s1", matrix_work=False,
            flops=5 * block * batch, min_bytes=2 * block * item * batch))
    launches.append(Launch(
        kernel="dot", fn=dot_kernel, grid=(batch,),
        args={"a_ptr": _meta(64 * 32, dtype), "b_ptr": _meta(32 * 64, dtype), "c_ptr": _meta(64 * 64, torch.float32)},
        constexprs={"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=1, config="BM=64 BN=64 BK=32 w4 s1",
        matrix_work=True, flops=2 * 64 * 64 * 32 * batch,
        min_bytes=(64 * 32 + 32 * 64) * item * batch + 64 * 64 * 4 * batch,
        small_grid_reason="one tile per object"))
    return launches
