"""Argument checks, output buffers and the custom-op switch shared by the kernel backends
(Triton and CUDA).

Every kernel wrapper validates its tensors before a launch with the same messages (what the op
expected of which argument, and what it got) and allocates its outputs through ``new_output``,
so tests can fill every output with NaN (``poison_outputs``) to catch elements a kernel never
writes. Each wrapper also has a ``torch.library`` custom op with a fake implementation, which
compiled and exported code traces; eager calls skip it (``eager_or_custom_op``).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Hashable, Iterator, Optional, Sequence, Set, TypeVar

import torch

from ..validation import describe_tensor

__all__ = ["KERNEL_DTYPES", "check_tensor", "check_same_device", "poison_outputs", "new_output",
           "eager_or_custom_op", "LaunchRefused", "launch_or_fall_back"]

_T = TypeVar("_T")

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    op: str,
    name: str,
    t: object,
    dtype: Optional[torch.dtype] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Raises TypeError/ValueError naming what ``op`` expected of ``name`` and what it got.

    ``shape`` entries that are None match any size; devices are checked by check_same_device.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {str(dtype).replace('torch.', '')}; got {describe_tensor(t)}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16; got {describe_tensor(t)}")
    if shape is not None:
        expected = tuple(shape)
        if t.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, t.shape)):
            wanted = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"{op}: {name} must have shape {wanted}; got {describe_tensor(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; got strides {t.stride()} ({describe_tensor(t)})")
    return t


def check_same_device(op: str, allow_cpu: bool = False, cpu_hint: str = "", **tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``: ValueError naming them when they differ, or when one is not
    on CUDA (unless ``allow_cpu``; ``cpu_hint`` says how to allow it)."""
    if not allow_cpu:
        for name, t in tensors.items():
            if t.device.type != "cuda":
                raise ValueError(f"{op}: {name} must be on a CUDA device{cpu_hint}; got {describe_tensor(t)}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listing}")
    return devices.pop()


_poison = threading.local()


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within the block, every kernel output starts as NaN, so an element a kernel fails to write
    shows up in the comparison (tests use it; torch.empty may hand back old, plausible values)."""
    previous = getattr(_poison, "on", False)
    _poison.on = True
    try:
        yield
    finally:
        _poison.on = previous


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel: uninitialized, or NaN inside ``poison_outputs()``."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if getattr(_poison, "on", False):
        out.fill_(float("nan"))
    return out


def eager_or_custom_op(eager: Callable[..., _T], custom_op: Callable[..., _T]) -> Callable[..., _T]:
    """``custom_op`` while torch.compile or torch.export traces, else the plain wrapper ``eager``:
    a custom op's dispatch costs about 10 us per call, as much as a whole B=1 kernel."""
    return custom_op if torch.compiler.is_compiling() else eager


class LaunchRefused(RuntimeError):
    """The GPU refused a kernel launch: more shared memory than a block may have, no kernel image
    for this GPU, an invalid launch configuration. The message names the kernel and the reason."""


_refused: Set[Hashable] = set()
_refused_lock = threading.Lock()


def launch_or_fall_back(kernel: str, device: torch.device, signature: Hashable, launch: Callable[[], _T],
                        fall_back: Callable[[], _T]) -> _T:
    """``launch()``, or ``fall_back()`` (the torch op) where the GPU refuses it: a refusal is
    remembered per (kernel, device, ``signature``), the dtypes and sizes the launch configuration
    depends on, and said once in a warning naming the kernel, the GPU and the reason."""
    key = (kernel, device, signature)
    if _refused and key in _refused:
        return fall_back()
    try:
        return launch()
    except LaunchRefused as err:
        with _refused_lock:
            _refused.add(key)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        warnings.warn(f"memenc_fast: {kernel} was refused on {gpu} ({device}): {err}; this op runs the torch op "
                      f"for these inputs from now on", RuntimeWarning, stacklevel=2)
        return fall_back()
