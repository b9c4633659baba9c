"""What the triton backend's op wrappers share: device checks (CPU tensors too under Triton's
interpreter), a parameter check cheap enough for every call, the GPU the kernels' configuration
choosers plan for, and the launch of an op's kernels that runs the torch op instead where the GPU
refuses them."""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, Tuple, TypeVar

import torch
from triton.runtime.errors import OutOfResources, PTXASError

from ...gpus import TARGETS, GpuSpec, gpu_spec
from ...kernels._common import INTERPRETED, Launch
from ...validation import describe_tensor
from ..kernel_args import KERNEL_DTYPES, LaunchRefused, check_same_device, check_tensor, launch_or_fall_back

__all__ = ["check_device", "check_parameters", "device_spec", "INTERPRETER_GPU", "EXACT_GELU", "run_or_fall_back"]

_T = TypeVar("_T")

_CPU_HINT = " (or set TRITON_INTERPRET=1 before importing triton)"

INTERPRETER_GPU = TARGETS["sm_90a"]
"""What the kernels plan for off a GPU (the interpreter): an H100, so that tests there can run the
configurations a GPU gets."""

EXACT_GELU = torch.nn.GELU()
"""The activation of the records the wrappers rebuild for a torch op (the kernels fuse the exact
GELU only; ``unsupported_ops`` refuses structures with another)."""

# What ptxas says when a kernel needs more than the target has (a compile that fails for this
# GPU only; the launch configuration is the kernel report's to fix, the op's to survive).
_RESOURCE_WORDS = ("too much shared", "too many resources", "registers", "out of resource")


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


def device_spec(device: torch.device) -> GpuSpec:
    """The GPU the configuration choosers plan for: ``device``'s own properties (read once per
    device), or ``INTERPRETER_GPU`` for CPU tensors (the interpreter)."""
    return gpu_spec(device) if device.type == "cuda" else INTERPRETER_GPU


def _run(launches: Sequence[Launch]) -> None:
    """Runs ``launches`` in order; a launch the GPU refuses raises LaunchRefused naming it."""
    for launch in launches:
        try:
            launch.run()
        except OutOfResources as err:
            raise LaunchRefused(f"{launch.kernel} [{launch.config}]: {err}") from err
        except (PTXASError, RuntimeError) as err:
            if not any(word in str(err).lower() for word in _RESOURCE_WORDS):
                raise
            raise LaunchRefused(f"{launch.kernel} [{launch.config}]: {err}") from err


def run_or_fall_back(op: str, device: torch.device, signature: Hashable,
                     plan: Callable[[], Tuple[Sequence[Launch], _T]], torch_op: Callable[[], _T]) -> _T:
    """Runs the launches ``plan()`` makes on ``device`` and returns the result it allocated for
    them, or ``torch_op()`` where the GPU refuses one: from then on for every call of ``op`` with
    this ``signature`` (the shapes and dtypes the launch configuration depends on), said once in
    a warning (``kernel_args.launch_or_fall_back``). Nothing is planned or allocated for the
    kernels once they are refused."""
    def launch() -> _T:
        launches, out = plan()
        _run(launches)
        return out

    return launch_or_fall_back(f"triton {op}", device, signature, launch, torch_op)
