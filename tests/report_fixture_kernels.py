"""Tiny Triton kernels made for testing the kernel report (never launched).

``report_specs`` gives three configurations whose compiled code is known: a softmax row that fits
in registers, the same kernel over 4096 elements with one warp (two arrays of 128 fp32 values per
thread live across a reduction: it spills on sm_80 and sm_90a with triton 3.6 and 3.9), and a
64x64x32 ``tl.dot`` that runs on tensor cores (HGMMA on sm_90a, HMMA on sm_80).
"""

from __future__ import annotations

import triton
import triton.language as tl

from memenc_fast.tools.kernel_report import TritonKernelSpec

# str(torch.dtype) names, so this module needs no torch import of its own.
_TRITON_TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
_ITEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


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


def report_specs(batch: int, dtype: object) -> list[TritonKernelSpec]:
    """Configurations of the fixture kernels for ``batch`` rows of ``dtype``."""
    t = _TRITON_TYPES[str(dtype)]
    item = _ITEM_BYTES[t]
    specs = []
    for name, block, warps in (("softmax_fits", 1024, 4), ("softmax_spills", 4096, 1)):
        specs.append(TritonKernelSpec(
            kernel=name, fn=softmax_kernel, signature={"x_ptr": f"*{t}", "y_ptr": f"*{t}"},
            constexprs={"BLOCK": block}, num_warps=warps, num_stages=1,
            config=f"BLOCK={block} w{warps} s1", matrix_work=False, hot=True,
            flops=5 * block * batch, min_bytes=2 * block * item * batch))
    specs.append(TritonKernelSpec(
        kernel="dot", fn=dot_kernel,
        signature={"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": "*fp32"},
        constexprs={"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=1,
        config="BM=64 BN=64 BK=32 w4 s1", matrix_work=True, hot=True,
        flops=2 * 64 * 64 * 32 * batch,
        min_bytes=(64 * 32 + 32 * 64) * item * batch + 64 * 64 * 4 * batch))
    return specs
