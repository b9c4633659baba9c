"""What the triton backend's op wrappers share: device checks (CPU tensors too under Triton's
interpreter), a parameter check cheap enough for every call, and the device limits the kernels'
configuration choosers take."""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch

from ...kernels._common import H100, INTERPRETED, DeviceLimits
from ...validation import describe_tensor
from ..kernel_args import KERNEL_DTYPES, check_same_device, check_tensor

__all__ = ["check_device", "check_parameters", "device_limits"]

_CPU_HINT = " (or set TRITON_INTERPRET=1 before importing triton)"


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``: CUDA, or any under the interpreter; ValueError otherwise."""
    return check_same_device(op, INTERPRETED, _CPU_HINT, **tensors)


def check_parameters(op: str, device: torch.device,
                     parameters: Sequence[Tuple[str, torch.Tensor, Tuple[int, ...]]]) -> None:
    """Raises TypeError/ValueError naming the parameter that is not a float32/bfloat16/float16
    tensor of its expected shape on ``device`` (the activations'), for (name, tensor, shape).

    One comparison per tensor when all is well (it runs on every call, for up to 16 tensors);
    ``check_tensor`` words the error when not.
    """
    for name, t, shape in parameters:
        if not isinstance(t, torch.Tensor) or t.dtype not in KERNEL_DTYPES or t.shape != shape:
            check_tensor(op, name, t, shape=shape)
        if t.device != device:
            raise ValueError(f"{op}: {name} must be on {device}, the activations' device; got {describe_tensor(t)}")


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    properties = torch.cuda.get_device_properties(index)
    return DeviceLimits(properties.multi_processor_count, properties.shared_memory_per_block_optin)


def device_limits(device: torch.device) -> DeviceLimits:
    """SM count and shared memory per block of ``device``; an H100's for CPU tensors (the
    interpreter), so that tests there can run the configurations an H100 gets."""
    if device.type != "cuda":
        return H100
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
