"""What every kernel module shares: dtype names, exact GELU and dot operands in Triton, input
checks, the device guard, cached weight layouts, output poisoning, fallback logging, and
``Launch``: one kernel launch (grid, arguments, configuration) that the launcher runs and the
kernel report compiles, so both always see the same configuration.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Dict, Tuple, TypeVar

import torch
import triton
import triton.language as tl

from memenc_fast.backends import triton_interpreted
from memenc_fast.backends.kernel_args import check_same_device as _check_same_device
from memenc_fast.dispatch import log_once

__all__ = [
    "INTERPRETED",
    "REPORT_SM_COUNT",
    "TYPE_NAMES",
    "gelu",
    "rounded",
    "operand",
    "dot_precision",
    "sm_count",
    "check_same_device",
    "log_fallback",
    "Launch",
]


INTERPRETED = triton_interpreted()
"""Kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""

REPORT_SM_COUNT = 132
"""SMs of an H100 SXM: the device the kernel report describes (configs that depend on the
number of SMs are picked for it)."""

TYPE_NAMES: Dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

_T = TypeVar("_T")


@triton.jit
def gelu(x):
    """Exact (erf) GELU, as ``nn.GELU()``; ``x`` in fp32."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rounded(x, like_ptr, UPCAST: tl.constexpr):
    """``x`` rounded to the nearest value of ``like_ptr``'s element type, in that type.

    UPCAST marks the interpreter, whose fp32 -> bf16 casts truncate: it rounds first.
    """
    if UPCAST:
        if like_ptr.dtype.element_ty == tl.bfloat16:
            x = _round_bf16(x.to(tl.float32))
    return x.to(like_ptr.dtype.element_ty)


@triton.jit
def operand(x, like_ptr, UPCAST: tl.constexpr):
    """``x`` rounded to the element type of ``like_ptr`` (the compute dtype), ready for tl.dot.

    On a GPU the dot then runs on bf16/fp16 tensor cores. The interpreter computes bf16/fp16 dots
    wrongly, so with UPCAST the rounded values go back to fp32: same operands, fp32 math.
    """
    y = rounded(x, like_ptr, UPCAST)
    if UPCAST:
        y = y.to(tl.float32)
    return y


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of fp32 dots: IEEE unless torch allows TF32 matmuls (as torch does)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; the report's H100 figure off CUDA (interpreter)."""
    if device.type != "cuda":
        return REPORT_SM_COUNT
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


_CPU_HINT = " (or set TRITON_INTERPRET=1 before importing triton)"
# The interpreter is not thread-safe: launches under it run one at a time.
_interpreter_lock = threading.Lock()


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``: CUDA, or any under the interpreter; ValueError otherwise."""
    return _check_same_device(op, INTERPRETED, _CPU_HINT, **tensors)


def log_fallback(op: str, reason: str) -> None:
    """Logs once per (op, reason) that the triton backend ran the torch op instead."""
    log_once(f"memenc_fast: triton {op} runs the torch op: {reason}")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what runs on the device, and what the kernel report compiles.

    ``args`` are the runtime arguments (tensors, ints, floats) by name, ``constexprs`` the
    compile-time ones. Built from meta tensors, a Launch only describes (``spec``).
    """

    kernel: str
    fn: Any
    grid: Tuple[int, ...]
    args: Dict[str, Any]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    config: str
    matrix_work: bool
    flops: int
    min_bytes: int

    def run(self) -> None:
        """Launches on the device of the tensors and torch's current stream there."""
        device = next(v for v in self.args.values() if isinstance(v, torch.Tensor)).device
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        # The interpreter swaps triton.language's functions for its own while a kernel runs and
        # swaps them back after: two threads' launches must not interleave.
        serial = _interpreter_lock if INTERPRETED else contextlib.nullcontext()
        with guard, serial:
            self.fn[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def spec(self) -> Any:
        """The kernel report's TritonKernelSpec of this launch, typed as Triton types it."""
        from memenc_fast.tools.kernel_report import TritonKernelSpec

        signature: Dict[str, str] = {}
        constexprs = dict(self.constexprs)
        aligned = []
        for name, value in self.args.items():
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPE_NAMES[value.dtype]
            elif isinstance(value, float):
                signature[name] = "fp32"
            elif value == 1:
                constexprs[name] = 1  # Triton specialises an int argument equal to 1 at launch
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    aligned.append(name)
        return TritonKernelSpec(
            kernel=self.kernel, fn=self.fn, signature=signature, constexprs=constexprs,
            num_warps=self.num_warps, num_stages=self.num_stages, config=self.config,
            matrix_work=self.matrix_work, hot=True, flops=self.flops, min_bytes=self.min_bytes,
            aligned_ints=tuple(aligned))
