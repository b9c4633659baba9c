"""What every kernel module shares: the interpreter switch, exact GELU and dot operands in Triton,
the precision of fp32 dots (IEEE or TF32, as the caller says torch allows for the op), the
device properties the configuration choosers size against (shared memory, SMs to fill, whether
dots run on tensor cores), the shared-memory estimate of a
software-pipelined loop, and ``Launch``: one kernel launch (grid, arguments, configuration) that
the backend runs and the kernel report compiles, so both always see the same configuration.

This package imports nothing from the rest of ``memenc_fast``: the backend wraps these launches,
and the kernel report turns a ``Launch`` into what it compiles.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple, TypeVar

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "MAX_REGISTERS",
    "DeviceLimits",
    "tensor_core_dots",
    "fills_wave",
    "first_filling_wave",
    "gelu",
    "rounded",
    "operand",
    "fp32_dot_operands",
    "dot_precision",
    "report_tf32_settings",
    "INT32_REACH",
    "needs_int64_offsets",
    "widened",
    "type_name",
    "widest_dtype",
    "ceil_div",
    "next_power_of_2",
    "padded",
    "SYSTEM_SHARED_BYTES",
    "pipelined_shared_bytes",
    "fits_shared_memory",
    "Launch",
]


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, read by Triton when
it is imported, so it must be set before then)."""


MAX_REGISTERS = 255
"""Registers a thread may have on every target: ``Launch.max_registers`` of kernels that run one
program per SM (8 warps of 255 registers fill the register file). Not a free lunch: with it,
triton 3.6 spilled the MLP kernel on sm_80, which fits without."""

_C = TypeVar("_C")


class DeviceLimits(Protocol):
    """What the configuration choosers need to know of a GPU (``memenc_fast.gpus.GpuSpec`` is one;
    hashable, as plans are cached per device): its compute capability (tensor cores, bf16), its
    streaming multiprocessors (a grid should fill at least a wave of them), the shared memory
    one block may use (bytes, with opt-in) and its L2 cache (bytes)."""

    @property
    def capability(self) -> Tuple[int, int]: ...

    @property
    def sm_count(self) -> int: ...

    @property
    def shared_memory_per_block(self) -> int: ...

    @property
    def l2_bytes(self) -> int: ...


def tensor_core_dots(compute: torch.dtype, device: DeviceLimits, tf32: bool = False) -> bool:
    """Whether Triton runs ``tl.dot`` on tensor cores for operands in ``compute`` on ``device``:
    bf16/fp16 from sm_80 on, and fp32 there too where torch allows the op TF32 (``tf32``). IEEE
    fp32 dots, and every dot on sm_75 (Triton has no mma there, nor the GPU TF32), run as FMAs on
    CUDA cores with whole K rows of both operands in registers: those take the small tiles of the
    CUDA-core configurations."""
    return (compute != torch.float32 or tf32) and tuple(device.capability) >= (8, 0)


def fills_wave(programs: int, device: DeviceLimits) -> bool:
    """Whether a grid of ``programs`` occupies every SM of ``device`` at least once."""
    return programs >= device.sm_count


def first_filling_wave(candidates: Sequence[_C], programs: Callable[[_C], int], device: DeviceLimits) -> _C:
    """The first of ``candidates`` (most efficient first) whose grid fills a wave of ``device``'s
    SMs, else the last (the finest, with the most programs): at small batches a coarse tiling
    leaves SMs idle through the whole kernel."""
    return next((c for c in candidates if fills_wave(programs(c), device)), candidates[-1])

_TYPE_NAMES: Dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def type_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16``: how configurations name a dtype."""
    return _TYPE_NAMES[dtype]


def widest_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The widest dtype among ``tensors`` (weights): what a configuration must make room for."""
    return max((t.dtype for t in tensors), key=lambda dtype: dtype.itemsize)


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, on the host (``triton.cdiv`` costs microseconds per call there)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (at least 1), on the host (``triton.next_power_of_2``
    costs microseconds per call there)."""
    return 1 << max(0, n - 1).bit_length()


def padded(size: int) -> int:
    """``size`` rounded up to a power of two of at least 16, the smallest ``tl.dot`` dimension."""
    return max(16, next_power_of_2(size))


INT32_REACH = 2**31
"""Offsets from 0 up to this (excluded) fit int32 index arithmetic."""


def needs_int64_offsets(view: torch.Tensor) -> bool:
    """Whether addressing one image of a (B, C, H, W) ``view`` (the batch offset is int64 already)
    through its strides reaches ``INT32_REACH``: a caller's view may (strides, not element counts,
    set how far), and int32 offsets would wrap. Kernels take int64 offsets into such a view only
    (``widened``), for the registers they cost elsewhere."""
    _, channels, height, width = view.shape
    _, s_c, s_h, s_w = view.stride()
    return (channels - 1) * s_c + (height - 1) * s_h + (width - 1) * s_w >= INT32_REACH


@triton.jit
def widened(x, WIDE: tl.constexpr):
    """Index ``x`` (a tensor or a constant) in int64 with WIDE, as it is without; multiplied by a
    stride, it makes int64 offsets (``needs_int64_offsets``)."""
    if WIDE:
        x = tl.cast(x, tl.int64)
    return x


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
def rounded(x, compute_ptr, UPCAST: tl.constexpr):
    """``x`` rounded to the nearest value of the compute dtype, in that dtype.

    ``compute_ptr`` points to activations: their element type is the compute dtype, whatever the
    weights' dtype (fp32 parameters under bf16 autocast round to bf16 here, as torch's casts do).
    With UPCAST (see ``fp32_dot_operands``) it rounds to bf16 itself first: the interpreter's
    fp32 -> bf16 casts truncate (on a GPU the cast then changes nothing).
    """
    x = x.to(tl.float32)
    if UPCAST:
        if compute_ptr.dtype.element_ty == tl.bfloat16:
            x = _round_bf16(x)
    return x.to(compute_ptr.dtype.element_ty)


@triton.jit
def operand(x, compute_ptr, UPCAST: tl.constexpr):
    """``x`` (activations or a weight tile as stored, in any float dtype) rounded to the compute
    dtype (see ``rounded``), ready for tl.dot.

    On tensor cores the dot then runs on bf16/fp16 operands. With UPCAST (see
    ``fp32_dot_operands``) the rounded values go back to fp32: same operands, fp32 math.
    """
    y = rounded(x, compute_ptr, UPCAST)
    if UPCAST:
        y = y.to(tl.float32)
    return y


def fp32_dot_operands(compute: torch.dtype, device: DeviceLimits) -> bool:
    """The ``UPCAST`` of ``operand``: whether 16-bit dot operands go to tl.dot in fp32 (rounded
    to ``compute`` first). Under the interpreter, which computes bf16/fp16 dots wrongly; and
    where 16-bit dots run on CUDA cores (sm_75), whose FMAs take fp32 anyway and whose 16-bit
    operand copies spilled there."""
    return INTERPRETED or (compute != torch.float32 and not tensor_core_dots(compute, device))


def report_tf32_settings(dtype: torch.dtype) -> Tuple[bool, ...]:
    """The TF32 permissions the kernel report plans each launch with for activations in ``dtype``:
    fp32 both IEEE and TF32 (torch's defaults give the convolutions TF32 and the MLP IEEE), 16-bit
    dtypes one (precision does not change their dots)."""
    return (False, True) if dtype == torch.float32 else (False,)


def dot_precision(compute: torch.dtype, device: DeviceLimits, tf32: bool) -> str:
    """``input_precision`` of the dots of a kernel computing in ``compute`` on ``device``, where
    ``tf32`` says whether torch allows TF32 for the layer the kernel replaces (its flag, read by
    the caller at launch: ``memenc_fast.precision``): TF32 for fp32 on TF32 tensor cores, else
    IEEE (16-bit operands, and fp32 operands rounded from them, are exact in either)."""
    return "tf32" if compute == torch.float32 and tensor_core_dots(compute, device, tf32) else "ieee"


SYSTEM_SHARED_BYTES = 1024
"""Shared memory sm_90 and later reserve in every block that uses any (counted against the limit)."""


def pipelined_shared_bytes(num_stages: int, compute: torch.dtype,
                           tiles: Sequence[Tuple[int, torch.dtype]]) -> int:
    """Shared memory of a K loop whose dot operands are ``tiles`` (elements, dtype as loaded).

    Triton's software pipeliner keeps ``num_stages`` buffers of each operand in the compute
    dtype; a tile loaded in a wider dtype (fp32 weights with bf16 activations) is converted on
    its way, and each of its ``num_stages - 1`` loads in flight takes the difference more. Read
    off the cubins of triton 3.9: exact for the pointwise kernel on sm_90a, an upper bound on
    sm_80 and for the other kernels.
    """
    total = 0
    for elements, dtype in tiles:
        widening = max(0, dtype.itemsize - compute.itemsize)
        total += elements * (num_stages * compute.itemsize + (num_stages - 1) * widening)
    return total


def fits_shared_memory(size: int, device: DeviceLimits) -> bool:
    """Whether a block using ``size`` bytes of shared memory (plus the system's share) fits ``device``."""
    return size + SYSTEM_SHARED_BYTES <= device.shared_memory_per_block


# The interpreter is not thread-safe: launches under it run one at a time.
_interpreter_lock = threading.Lock()


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what runs on the device, and what the kernel report compiles.

    ``args`` are the runtime arguments (tensors, ints, floats) by name, ``constexprs`` the
    compile-time ones; together they bind every parameter of ``fn`` once. ``config`` names the
    configuration (and the weights' dtype), ``matrix_work`` marks kernels that must run on tensor
    cores in bf16/fp16, ``flops`` and ``min_bytes`` are this launch's work and least memory
    traffic. ``small_grid_reason`` says why the chooser accepts a grid under one wave of the
    device's SMs (the kernel report flags such a grid at B=1 without one). ``max_registers``
    (ptxas' ``.maxnreg``) lets a kernel whose programs never share an SM use every register:
    without it ptxas may cap them to fit more programs per SM, and spill. ``tf32``: its fp32
    dots run as TF32 on tensor cores (the kernel report's rows say ``tf32`` and expect
    tensor-core instructions). Built from meta tensors, a Launch only describes.
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
    small_grid_reason: Optional[str] = None
    max_registers: Optional[int] = None
    tf32: bool = False

    @property
    def programs(self) -> int:
        """Programs (thread blocks) the grid launches."""
        total = 1
        for size in self.grid:
            total *= size
        return total

    def run(self) -> None:
        """Launches on the device of the tensors and torch's current stream there."""
        device = next(v for v in self.args.values() if isinstance(v, torch.Tensor)).device
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        # The interpreter swaps triton.language's functions for its own while a kernel runs and
        # swaps them back after: two threads' launches must not interleave.
        serial = _interpreter_lock if INTERPRETED else contextlib.nullcontext()
        options = {} if self.max_registers is None else {"maxnreg": self.max_registers}
        with guard, serial:
            self.fn[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages, **options)
