"""Backend registry and selection.

Every backend implements some of the ops in ``OPS`` over the same packed weights (see
``packing.py``); an op a backend lacks falls back, per op, to the ``torch`` backend. ``reference``
is special: it runs the unfused reference forward and serves everything.

The backend in force is, by precedence: the innermost ``use_backend(...)`` block, the environment
variable ``MEMENC_FAST_BACKEND``, then ``"auto"``. ``auto`` picks the highest-priority backend
that serves the inputs' device and dtype and the module's structure; it runs the reference for
training with grad, and logs each such fallback reason once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, TypeVar, Union

import torch

from .packing import EncoderStructure

__all__ = [
    "OPS",
    "Backend",
    "Selection",
    "register_backend",
    "registered_backends",
    "available_backends",
    "use_backend",
    "current_backend",
    "select_backend",
    "BackendUnavailableError",
    "log_once",
    "op_table",
    "constant_while_tracing",
]

logger = logging.getLogger("memenc_fast")
_R = TypeVar("_R")

OPS = ("mask_downsample", "proj_add", "cxblock", "out_proj", "cxblock_out_proj")
"""The op vocabulary: the signatures are those of ``memenc_fast.backends.torch_ops``, except the
optional ``cxblock_out_proj(x, block, packed)`` = ``out_proj(cxblock(x, block), packed)`` in one
step, which a backend may offer for the last block; without it the pipeline composes the two."""

ENV_VAR = "MEMENC_FAST_BACKEND"
REFERENCE = "reference"
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve these inputs; the message says why."""


@dataclass(frozen=True)
class Backend:
    """What a backend is, what it serves and where its ops live.

    ``ops_module`` is imported only when the backend is first used, so registering a backend
    never imports its toolchain. ``unavailable_reason`` returns None when the backend can run on
    this machine. ``structure_reason`` returns None when it can run a module's structure.
    """

    name: str
    priority: int
    device_types: Optional[FrozenSet[str]]  # None: any device
    dtypes: FrozenSet[torch.dtype]
    ops_module: str
    unavailable_reason: Callable[[], Optional[str]]
    structure_reason: Callable[[EncoderStructure], Optional[str]] = lambda structure: None
    differentiable: bool = False
    exportable: bool = False  # its ops trace under torch.export (ATen or custom ops with fakes)
    # torch.compile traces its ops (ATen, or custom ops with fakes); otherwise compiled code runs
    # the whole fused forward as one custom op (pipeline.opaque_forward).
    traceable: bool = True
    auto_device_types: Optional[FrozenSet[str]] = None  # where ``auto`` may pick it; None: device_types
    _ops: Dict[str, Callable] = field(default_factory=dict, compare=False, repr=False)
    _import_errors: List[str] = field(default_factory=list, compare=False, repr=False)

    def ops(self) -> Mapping[str, Callable]:
        """The ops this backend implements, imported on first use."""
        if not self._ops:
            module = importlib.import_module(self.ops_module, package=__package__)
            self._ops.update({name: getattr(module, name) for name in OPS if hasattr(module, name)})
        return self._ops

    def availability(self) -> Optional[str]:
        """None when this backend can run on this machine, else why not."""
        if self._import_errors:
            return self._import_errors[0]
        return self.unavailable_reason()

    def serve_reason(self, device: torch.device, dtype: torch.dtype, structure: EncoderStructure,
                     needs_grad: bool) -> Optional[str]:
        """None when this backend can run these inputs, else why not."""
        reason = _availability(self.name)
        if reason is not None:
            return reason
        if self.device_types is not None and device.type not in self.device_types:
            return f"serves devices {sorted(self.device_types)}, got {device.type}"
        if dtype not in self.dtypes:
            served = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            return f"serves dtypes {served}, got {str(dtype).replace('torch.', '')}"
        if needs_grad and not self.differentiable:
            return "has no backward; run with torch.no_grad() or use the reference backend for training"
        return self.structure_reason(structure)


@dataclass(frozen=True)
class Selection:
    """The outcome of backend selection for one forward: a name and the op table to run."""

    name: str
    ops: Optional[Mapping[str, Callable]]  # None means: run the reference forward

    @property
    def traceable(self) -> bool:
        """Whether torch.compile traces this selection's ops (see ``Backend.traceable``)."""
        return self.is_reference or _registry[self.name].traceable

    @property
    def is_reference(self) -> bool:
        return self.ops is None


_registry: Dict[str, Backend] = {}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("memenc_fast_backend", default=None)
_logged_reasons: set = set()


def register_backend(backend: Backend) -> None:
    """Adds (or replaces) a backend in the registry."""
    _registry[backend.name] = backend


def registered_backends() -> List[str]:
    """Every backend name this build knows, available here or not, reference first."""
    return [REFERENCE] + sorted(_registry, key=lambda n: -_registry[n].priority)


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """The backends that can run on this machine (a subset of reference, torch, triton, cuda);
    with ``device``, those of them that serve tensors on that device's type.

    Imports the ops of each one that can (a backend whose ops fail to import is disabled, with
    the reason logged once), so that compiled code never meets a first-use import: dynamo does
    not trace ``importlib``.
    """
    device_type = None if device is None else torch.device(device).type
    names = [REFERENCE]
    for name in registered_backends()[1:]:
        backend = _registry[name]
        if backend.availability() is not None:
            continue
        if device_type is not None and backend.device_types is not None and device_type not in backend.device_types:
            continue
        try:
            backend.ops()
        except ImportError as err:
            backend._import_errors.append(f"its ops module failed to import: {err}")
            log_once(f"memenc_fast: backend {name!r} disabled: its ops module failed to import: {err}")
            continue
        names.append(name)
    return names


def _check_name(name: str) -> str:
    if name != AUTO and name not in registered_backends():
        raise ValueError(f"unknown memenc_fast backend {name!r}; expected one of {[AUTO] + registered_backends()}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the enclosed forwards with backend ``name`` ("auto" restores automatic choice)."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str:
    """The backend name in force here: use_backend block, else $MEMENC_FAST_BACKEND, else auto."""
    forced = _forced.get()
    if forced is not None:
        return forced
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        try:
            return _check_name(from_env)
        except ValueError as err:
            raise ValueError(f"${ENV_VAR}: {err}") from None
    return AUTO


def constant_while_tracing(fn: Callable[..., _R]) -> Callable[..., _R]:
    """``fn``, except inside torch.compile, where it runs once while tracing and the compiled code
    keeps its result: for answers dynamo cannot trace (ContextVars, importlib, ctypes, logging).
    Its arguments must be constants (names, sizes)."""
    at_trace = torch._dynamo.assume_constant_result(fn)

    @functools.wraps(fn)
    def call(*args: object) -> _R:
        return (at_trace if torch.compiler.is_compiling() else fn)(*args)

    return call


# The backend in force at trace time is baked into compiled code; a later use_backend change does
# not recompile.
_backend_in_force = constant_while_tracing(current_backend)


@constant_while_tracing
def _log_once(message: str) -> bool:
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.info(message)
    return True


def log_once(message: str) -> None:
    """Logs ``message`` at INFO on the ``memenc_fast`` logger, the first time only (compiled code:
    while it is traced)."""
    _log_once(message)


_availability = constant_while_tracing(lambda name: _registry[name].availability())


def op_table(name: str) -> Mapping[str, Callable]:
    """Backend ``name``'s ops, with the ``torch`` backend's for the ops it lacks."""
    backend = _registry[name]
    if name == "torch":
        return backend.ops()
    table = dict(_registry["torch"].ops())
    table.update(backend.ops())
    return table


def select_backend(
    device: torch.device,
    dtype: torch.dtype,
    structure: Optional[EncoderStructure],
    structure_error: Optional[str],
    needs_grad: bool,
    name: Optional[str] = None,
) -> Selection:
    """Chooses the backend for one forward.

    ``structure`` is None (with ``structure_error`` saying why) for modules the fused pipeline
    cannot run. A backend named explicitly that cannot serve raises BackendUnavailableError.
    """
    if torch.onnx.is_in_onnx_export():
        # ONNX has none of our kernels: export the torch backend's standard ops.
        name = "torch" if structure is not None and not needs_grad else REFERENCE
    elif name is None:
        name = _backend_in_force()
    else:
        name = _check_name(name)
    if name == REFERENCE:
        return Selection(REFERENCE, None)
    if torch.compiler.is_exporting() and name != AUTO and not _registry[name].exportable:
        log_once(f"memenc_fast: backend {name!r} cannot be exported; exporting the torch backend's ops")
        name = "torch"
    if name != AUTO:
        backend = _registry[name]
        reason = structure_error if structure is None else backend.serve_reason(device, dtype, structure, needs_grad)
        if reason is not None:
            raise BackendUnavailableError(f"memenc_fast backend {name!r} cannot run this forward: {reason}")
        return Selection(name, op_table(name))
    if structure is None:
        log_once(f"memenc_fast: running the reference forward: {structure_error}")
        return Selection(REFERENCE, None)
    if needs_grad:
        log_once("memenc_fast: running the reference forward for training (grad enabled)")
        return Selection(REFERENCE, None)
    for candidate in registered_backends()[1:]:
        backend = _registry[candidate]
        auto_devices = backend.device_types if backend.auto_device_types is None else backend.auto_device_types
        if torch.compiler.is_exporting() and not backend.exportable:
            continue
        if (auto_devices is None or device.type in auto_devices) and backend.serve_reason(
            device, dtype, structure, needs_grad
        ) is None:
            return Selection(candidate, op_table(candidate))
    log_once(f"memenc_fast: no fused backend serves {device.type}/{dtype}; running the reference forward")
    return Selection(REFERENCE, None)
