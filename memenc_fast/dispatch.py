"""Backend registry and selection.

Every backend implements some of the ops in ``OPS`` over the module's live weights (see
``structure.py``); an op a backend lacks, or cannot run for a given structure, falls back per op
to the ``torch`` backend. ``reference`` is special: it runs the unfused reference forward and
serves everything.

The backend in force is, by precedence: the innermost ``use_backend(...)`` block, the environment
variable ``MEMENC_FAST_BACKEND``, then ``"auto"``. ``auto`` picks the highest-priority backend
that serves the inputs' device and dtype and the module's structure; it runs the reference for
training with grad, and logs each such fallback reason once. Whether and how a backend runs a
structure is decided once per (structure, backend in force, device, dtype, grad) and kept with
the structure.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, TypeVar, Union

import torch

from .structure import Structure

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
    "select_cached",
    "BackendUnavailableError",
    "log_once",
    "constant_while_tracing",
]

logger = logging.getLogger("memenc_fast")
_R = TypeVar("_R")

OPS = ("mask_downsample", "proj_add", "cxblock", "out_proj", "cxblock_out_proj")
"""The op vocabulary: the signatures are those of ``memenc_fast.backends.torch_ops``, except the
optional ``cxblock_out_proj(x, block, layer)`` = ``out_proj(cxblock(x, block), layer)`` in one
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
    this machine. The ops module may define ``unsupported_ops(structure, device, dtype)``, the
    one place where it says which of its ops cannot run a structure on a device in a dtype (op
    name -> reason); those run the torch op instead. It may also define
    ``auto_skip_reason(device, dtype)``: why ``auto`` should not prefer it there (it is slower than
    the next backend on that GPU generation), or None.
    """

    name: str
    priority: int
    device_types: Optional[FrozenSet[str]]  # None: any device
    dtypes: FrozenSet[torch.dtype]
    ops_module: str
    unavailable_reason: Callable[[], Optional[str]]
    differentiable: bool = False
    auto_device_types: Optional[FrozenSet[str]] = None  # where ``auto`` may pick it; None: device_types
    _module: List[ModuleType] = field(default_factory=list, compare=False, repr=False)
    _import_errors: List[str] = field(default_factory=list, compare=False, repr=False)

    def module(self) -> ModuleType:
        """The ops module, imported on first use."""
        if not self._module:
            self._module.append(importlib.import_module(self.ops_module, package=__package__))
        return self._module[0]

    def ops(self) -> Dict[str, Callable]:
        """The ops this backend implements."""
        module = self.module()
        return {name: getattr(module, name) for name in OPS if hasattr(module, name)}

    def availability(self) -> Optional[str]:
        """None when this backend can run on this machine, else why not."""
        if self._import_errors:
            return self._import_errors[0]
        return self.unavailable_reason()

    def serve_reason(self, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> Optional[str]:
        """None when this backend can run inputs on ``device`` in ``dtype``, else why not."""
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
        return None

    def auto_skip_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """Why ``auto`` passes this backend over on ``device`` in ``dtype``, or None."""
        skip = getattr(self.module(), "auto_skip_reason", None)
        return skip(device, dtype) if skip is not None else None

    def op_table(self, structure: Structure, device: torch.device,
                 dtype: torch.dtype) -> Tuple[Optional[Dict[str, Callable]], str]:
        """The ops that run ``structure`` here: this backend's where it can, torch's elsewhere
        (each such fallback logged once, and said in the second item); None and why when it can
        run none of its ops."""
        ops = self.ops()
        unsupported = getattr(self.module(), "unsupported_ops", None)
        refused = unsupported(structure, device, dtype) if unsupported is not None else {}
        if self.name != "torch" and refused and all(op in refused for op in ops):
            reasons = list(dict.fromkeys(refused.values()))  # a device-wide reason once, not per op
            if len(reasons) == 1:
                return None, reasons[0]
            return None, "; ".join(f"{op}: {why}" for op, why in refused.items())
        torch_ops = _registry["torch"].ops()
        table = dict(torch_ops)
        fallbacks = []
        for op, fn in ops.items():
            if op not in refused:
                table[op] = fn
                continue
            # An optional op (not in torch's table) runs as the ops it combines.
            instead = "runs the torch op" if op in torch_ops else "runs as the separate ops it fuses"
            fallbacks.append(f"{op} {instead}: {refused[op]}")
            log_once(f"memenc_fast: {self.name} {fallbacks[-1]}")
        return table, "; ".join(fallbacks)


@dataclass(frozen=True)
class Selection:
    """The outcome of backend selection for one forward: a name, the op table to run, and
    ``reason``: why the reference runs instead of a fused backend, or which ops a fused backend
    leaves to the torch backend (None when there is nothing to say)."""

    name: str
    ops: Optional[Mapping[str, Callable]]  # None means: run the reference forward
    reason: Optional[str] = None

    @property
    def is_reference(self) -> bool:
        return self.ops is None


def _reference(reason: str) -> Selection:
    return Selection(REFERENCE, None, reason)


_registry: Dict[str, Backend] = {}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("memenc_fast_backend", default=None)
_logged_reasons: set = set()
_registry_generation = 0


def register_backend(backend: Backend) -> None:
    """Adds (or replaces) a backend in the registry (choices made before are made again)."""
    global _registry_generation
    _registry[backend.name] = backend
    _registry_generation += 1


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
    if name not in _registry and name not in (AUTO, REFERENCE):
        raise ValueError(f"unknown memenc_fast backend {name!r}; expected one of {[AUTO] + registered_backends()}")
    return name


class use_backend:  # noqa: N801 (used as a function: ``with use_backend("torch"): ...``)
    """Runs the enclosed forwards with backend ``name`` ("auto" restores automatic choice).

    A plain class rather than a generator-based context manager: entering and leaving one costs
    a third as much, and SAM 2's predictor may enter one per object per frame.
    """

    __slots__ = ("_name", "_token")

    def __init__(self, name: str) -> None:
        self._name = _check_name(name)

    def __enter__(self) -> None:
        self._token = _forced.set(self._name)

    def __exit__(self, *exc_info: object) -> None:
        _forced.reset(self._token)


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


def select_backend(
    device: torch.device,
    dtype: torch.dtype,
    structure: Optional[Structure],
    structure_error: Optional[str],
    needs_grad: bool,
    name: Optional[str] = None,
) -> Selection:
    """Chooses the backend for one forward.

    ``structure`` is None (with ``structure_error`` saying why) for modules whose submodules the
    fused path cannot tell apart; a Structure with a ``reason`` is one it cannot run. A backend
    named explicitly that cannot serve raises BackendUnavailableError.
    """
    refusal = structure_error if structure is None else structure.reason
    if torch.onnx.is_in_onnx_export():
        # ONNX has none of our kernels: export the torch backend's standard ops.
        name = "torch" if refusal is None and not needs_grad else REFERENCE
    elif name is None:
        name = _backend_in_force()
    else:
        name = _check_name(name)
    if name == REFERENCE:
        return _reference("the reference backend was asked for")
    if name != AUTO:
        backend = _registry[name]
        reason = refusal
        if reason is None:
            served = backend.serve_reason(device, dtype, needs_grad)
            reason = served and f"{served} (`python -m memenc_fast info` says what this install can run)"
        table = None
        if reason is None:
            table, reason = backend.op_table(structure, device, dtype)
        if table is None:
            raise BackendUnavailableError(f"memenc_fast backend {name!r} cannot run this forward: {reason}")
        return Selection(name, table, reason or None)
    if refusal is not None:
        log_once(f"memenc_fast: running the reference forward: {refusal}")
        return _reference(refusal)
    if needs_grad:
        log_once("memenc_fast: running the reference forward for training (grad enabled)")
        return _reference("training (grad enabled)")
    skipped = []
    for candidate in registered_backends()[1:]:
        backend = _registry[candidate]
        auto_devices = backend.device_types if backend.auto_device_types is None else backend.auto_device_types
        if auto_devices is not None and device.type not in auto_devices:
            continue
        unavailable = _availability(candidate)
        if unavailable is not None:
            # A backend meant for this device that this machine cannot run (a CUDA runtime newer
            # than the driver, a ROCm build): said with whatever runs instead.
            skipped.append(f"auto skips backend {candidate!r}: {unavailable}")
            continue
        if backend.serve_reason(device, dtype, needs_grad) is None:
            table, reason = backend.op_table(structure, device, dtype)
            skip = backend.auto_skip_reason(device, dtype) if table is not None else reason
            if skip is None:
                said = "; ".join(skipped + ([reason] if reason else []))
                if skipped:
                    log_once(f"memenc_fast: {said}")
                return Selection(candidate, table, said or None)
            skipped.append(f"auto skips backend {candidate!r}: {skip}")
    reason = "; ".join(skipped) or f"no fused backend serves {device.type}/{str(dtype).replace('torch.', '')}"
    log_once(f"memenc_fast: running the reference forward: {reason}")
    return _reference(reason)


def select_cached(
    structure: Optional[Structure],
    structure_error: Optional[str],
    device: torch.device,
    dtype: torch.dtype,
    needs_grad: bool,
) -> Selection:
    """``select_backend`` for the backend in force, remembered with ``structure`` per (backend in
    force, device, dtype, grad) outside compiled, exported and ONNX-exported code."""
    # (ONNX export runs under torch.export or the JIT tracer.)
    if structure is None or torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return select_backend(device, dtype, structure, structure_error, needs_grad)
    key = (current_backend(), device, dtype, needs_grad, _registry_generation)
    selection = structure.selections.get(key)
    if selection is None:
        selection = select_backend(device, dtype, structure, None, needs_grad, key[0])
        structure.selections[key] = selection
    return selection
