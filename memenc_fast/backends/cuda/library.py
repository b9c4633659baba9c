"""The ``cuda`` backend's one shared module: the ctypes binding of ``libmemenc_fast_cuda.so`` (the
CUDA kernels of ``csrc/``) and how the op modules hand it their arguments.

The library is plain nvcc output with ``extern "C"`` launchers (no torch headers, no torch C++
ABI), so one build serves every torch version. Each launcher takes one struct of arguments,
declared once in ``csrc/launch_args.h`` (its comment states the format): this module parses that
header into ``ctypes.Structure`` classes and refuses a library built from another version of it
(the build compiles the header's hash, :func:`header_hash`, into the library). It reads the kernel
configurations the library contains once, when it loads it (:func:`has_kernel` answers from them),
and turns a launcher's non-zero return into :class:`CudaLaunchError` with the CUDA runtime's text
for it.

The kernels read the module's parameters as it holds them, in PyTorch's layouts, in the
activations' dtype or in float32 (autocast's usual case). :func:`parameter` copies, per call and
never kept, only what they cannot read: a mix of the two within one launcher, other dtypes (fp16
parameters with bf16 activations, float64), a non-contiguous or misaligned view; all rare.

Importing this module touches neither the library nor the GPU; :func:`load` opens the library on
first use and :func:`unavailable_reason` says in one line why the ``cuda`` backend cannot run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from ...dispatch import constant_while_tracing
from ..kernel_args import check_same_device, check_tensor

__all__ = [
    "LIBRARY_NAME",
    "HEADER_NAME",
    "HASH_MACRO",
    "LaunchStruct",
    "LaunchArgsHeader",
    "LaunchArgsFormatError",
    "header_hash",
    "parse_header",
    "read_header",
    "CudaLibraryError",
    "CudaLaunchError",
    "SizeCondition",
    "parse_kernel_configs",
    "CudaLibrary",
    "library_path",
    "header_path",
    "load",
    "unavailable_reason",
    "has_kernel",
    "dtype_code",
    "kernel_device",
    "launch",
    "parameter_dtype",
    "parameter",
    "optional_parameter",
    "precise_fp32",
]

LIBRARY_NAME = "libmemenc_fast_cuda.so"

# ---- the launch-args header ----------------------------------------------------------------------

HEADER_NAME = "launch_args.h"
HASH_MACRO = "MEMENC_LAUNCH_ARGS_HASH"
"""The macro through which the build passes :func:`header_hash` to ``csrc/library.cu``."""

_CTYPES = {"int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
           "const void*": ctypes.c_void_p, "void*": ctypes.c_void_p}
_STRUCT_OPEN = re.compile(r"struct ([A-Z][A-Za-z0-9]*)Args \{")
_MEMBER = re.compile(r"(int32_t|int64_t|float|const void\*|void\*) ([a-z_][a-z0-9_]*);")
_CONSTANT = re.compile(r"#define (MEMENC_[A-Z0-9_]+) (-?[0-9]+)")
_IGNORED = re.compile(r"#pragma once|#include <stdint\.h>")
_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


class LaunchArgsFormatError(ValueError):
    """The header does not follow the format its comment states; the message names the line."""


@dataclass(frozen=True)
class LaunchStruct:
    """One launcher's arguments: ``struct <Name>Args`` for ``memenc_fast_<name>``."""

    name: str  # the C struct's name, e.g. "MaskStemArgs"
    op: str  # the launcher's name without its prefix, e.g. "mask_stem"
    fields: Tuple[Tuple[str, str], ...]  # (member name, C type), in declaration order

    @property
    def launcher(self) -> str:
        """The exported C function: ``memenc_fast_<op>``."""
        return f"memenc_fast_{self.op}"


@dataclass(frozen=True)
class LaunchArgsHeader:
    """A parsed ``launch_args.h``: its structs by op name, its constants, and its hash."""

    structs: Dict[str, LaunchStruct]
    constants: Dict[str, int]
    digest: int


def header_hash(data: bytes) -> int:
    """The header's identity as the library records it: the first 64 bits of its SHA-256, big-endian
    (build_tools/cuda_build.py computes the same; tests/test_build.py checks that they agree)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _snake_case(camel: str) -> str:
    return _WORD_START.sub("_", camel).lower()


def parse_header(data: bytes, source: str = HEADER_NAME) -> LaunchArgsHeader:
    """The structs and constants of a launch-args header's text (``source`` names it in errors).

    Raises LaunchArgsFormatError naming the first line that breaks the format.
    """
    structs: Dict[str, LaunchStruct] = {}
    constants: Dict[str, int] = {}
    open_struct: Tuple[str, int] = ("", 0)  # (name, line number) of the struct being read
    fields: List[Tuple[str, str]] = []
    for number, raw in enumerate(data.decode("utf-8").splitlines(), start=1):
        line = " ".join(raw.split("//", 1)[0].split())
        if not line:
            continue
        name = open_struct[0]
        if name:
            member = _MEMBER.fullmatch(line)
            if member is not None:
                if any(field == member.group(2) for field, _ in fields):
                    raise LaunchArgsFormatError(f"{source}:{number}: {name}Args declares {member.group(2)} twice")
                fields.append((member.group(2), member.group(1)))
            elif line == "};":
                if not fields:
                    raise LaunchArgsFormatError(f"{source}:{open_struct[1]}: {name}Args has no members")
                struct = LaunchStruct(f"{name}Args", _snake_case(name), tuple(fields))
                if struct.op in structs:
                    raise LaunchArgsFormatError(f"{source}:{open_struct[1]}: a second struct for {struct.launcher}")
                structs[struct.op] = struct
                open_struct, fields = ("", 0), []
            else:
                raise LaunchArgsFormatError(
                    f"{source}:{number}: expected a member `<type> <name>;` with <type> one of "
                    f"{', '.join(_CTYPES)}, or `}};`; got {raw.strip()!r}")
            continue
        opening = _STRUCT_OPEN.fullmatch(line)
        constant = _CONSTANT.fullmatch(line)
        if opening is not None:
            open_struct = (opening.group(1), number)
        elif constant is not None:
            constants[constant.group(1)] = int(constant.group(2))
        elif _IGNORED.fullmatch(line) is None:
            raise LaunchArgsFormatError(
                f"{source}:{number}: expected `struct <Name>Args {{`, `#define MEMENC_<NAME> <integer>`, "
                f"`#pragma once`, `#include <stdint.h>` or a comment; got {raw.strip()!r}")
    if open_struct[0]:
        raise LaunchArgsFormatError(f"{source}:{open_struct[1]}: {open_struct[0]}Args is not closed with `}};`")
    return LaunchArgsHeader(structs, constants, header_hash(data))


def read_header(path: Path) -> LaunchArgsHeader:
    """:func:`parse_header` of the file at ``path``."""
    return parse_header(path.read_bytes(), str(path))


# ---- the library ---------------------------------------------------------------------------------

_DTYPE_CONSTANTS = {torch.float32: "MEMENC_DTYPE_FLOAT32", torch.bfloat16: "MEMENC_DTYPE_BFLOAT16",
                    torch.float16: "MEMENC_DTYPE_FLOAT16"}
_CONDITION = re.compile(r"([a-z_]+)(=|%|<=)([0-9]+(?:,[0-9]+)*)")
# The library's own entry points (csrc/library.cu): name -> (restype, argtypes).
_ENTRY_POINTS = {
    "memenc_fast_launch_args_hash": (ctypes.c_uint64, []),
    "memenc_fast_kernel_configs": (ctypes.c_char_p, []),
    "memenc_fast_runs_on_host": (ctypes.c_int, []),
    "memenc_fast_cuda_error_string": (ctypes.c_char_p, [ctypes.c_int]),
    "memenc_fast_cuda_device_count": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
}


class CudaLibraryError(RuntimeError):
    """The library is missing, does not load, or does not match ``launch_args.h``."""


class CudaLaunchError(RuntimeError):
    """A launcher returned a CUDA error; the message names the launcher and the CUDA error."""


@dataclass(frozen=True)
class SizeCondition:
    """One condition of a kernel configuration line (format: ``csrc/kernel_configs.h``)."""

    size: str
    relation: str  # "=" (one of values), "%" (a positive multiple of), "<=" (at most)
    values: Tuple[int, ...]

    def holds(self, value: int) -> bool:
        """Whether ``value`` meets this condition."""
        if self.relation == "=":
            return value in self.values
        if self.relation == "%":
            return value > 0 and value % self.values[0] == 0
        return value <= self.values[0]


KernelConfigs = Mapping[str, Tuple[Tuple[SizeCondition, ...], ...]]
"""Kernel name -> its configuration lines, each a tuple of conditions that must all hold."""


def parse_kernel_configs(text: str) -> Dict[str, Tuple[Tuple[SizeCondition, ...], ...]]:
    """The configurations ``memenc_fast_kernel_configs()`` reports (format: ``csrc/kernel_configs.h``).

    Raises ValueError naming a line that breaks the format.
    """
    configs: Dict[str, Tuple[Tuple[SizeCondition, ...], ...]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kernel, *terms = line.split()
        conditions = []
        for term in terms:
            match = _CONDITION.fullmatch(term)
            if match is None:
                raise ValueError(f"kernel configuration {line!r}: expected conditions like size=1,2, size%32 or "
                                 f"size<=512; got {term!r}")
            size, relation, values = match.groups()
            conditions.append(SizeCondition(size, relation, tuple(int(v) for v in values.split(","))))
        configs[kernel] = configs.get(kernel, ()) + (tuple(conditions),)
    return configs


def _structure_class(struct: LaunchStruct) -> Type[ctypes.Structure]:
    """``struct`` as a ctypes.Structure; ``__slots__`` makes a misspelled member an error."""
    fields = [(name, _CTYPES[c_type]) for name, c_type in struct.fields]
    return type(struct.name, (ctypes.Structure,), {"__slots__": (), "_fields_": fields})


def header_path(library: Path) -> Path:
    """The ``launch_args.h`` the binding reads for ``library``: the source tree's ``csrc/`` when
    this package runs from one (an editable install: the header being edited, so a library built
    before an edit is refused), else the copy the build installs next to the library."""
    source = Path(__file__).resolve().parents[3] / "csrc" / HEADER_NAME
    return source if source.is_file() else library.parent / HEADER_NAME


class CudaLibrary:
    """A loaded library, checked against ``launch_args.h``.

    ``args`` maps each launcher's op name (``"mask_stem"``) to its ctypes.Structure class,
    ``kernel_configs`` holds the kernel configurations the library contains, ``runs_on_host``
    is True for a build against ``csrc/emulation.h`` (kernels run on the host, on CPU tensors).
    """

    def __init__(self, path: Path, header: Optional[Path] = None) -> None:
        header = header_path(path) if header is None else header
        try:
            self._dll = ctypes.CDLL(str(path))
        except OSError as err:
            raise CudaLibraryError(f"the CUDA library {path.name} failed to load: {err}") from None
        missing = [name for name in _ENTRY_POINTS if not hasattr(self._dll, name)]
        if missing:
            raise CudaLibraryError(f"the CUDA library {path.name} lacks {', '.join(missing)}; rebuild it "
                                   "(pip install -e .)")
        for name, (restype, argtypes) in _ENTRY_POINTS.items():
            getattr(self._dll, name).restype = restype
            getattr(self._dll, name).argtypes = argtypes
        if not header.is_file():
            raise CudaLibraryError(f"{HEADER_NAME} is neither in the source tree's csrc/ nor next to {path}; "
                                   "reinstall the package (pip install -e .)")
        try:
            parsed = read_header(header)
        except LaunchArgsFormatError as err:
            raise CudaLibraryError(f"cannot read the launchers' arguments: {err}") from None
        built_from = self._dll.memenc_fast_launch_args_hash()
        if built_from == 0:
            raise CudaLibraryError(f"the CUDA library {path.name} was built without -D{HASH_MACRO} (not by the "
                                   "package's build); rebuild it (pip install -e .)")
        if built_from != parsed.digest:
            raise CudaLibraryError(
                f"the CUDA library {path.name} was built from another {HEADER_NAME}: it records hash "
                f"{built_from:016x}, {header} hashes to {parsed.digest:016x}; rebuild it (pip install -e .)")
        missing_constants = [c for c in _DTYPE_CONSTANTS.values() if c not in parsed.constants]
        if missing_constants:
            raise CudaLibraryError(f"{header} does not define {', '.join(missing_constants)}")
        self.dtype_codes: Dict[torch.dtype, int] = {
            dtype: parsed.constants[name] for dtype, name in _DTYPE_CONSTANTS.items()}
        self.args: Dict[str, Type[ctypes.Structure]] = {}
        self._launchers = {}
        for op, struct in parsed.structs.items():
            if not hasattr(self._dll, struct.launcher):
                raise CudaLibraryError(f"the CUDA library {path.name} lacks {struct.launcher}, which {HEADER_NAME} "
                                       f"declares ({struct.name}); rebuild it (pip install -e .)")
            cls = _structure_class(struct)
            launcher = getattr(self._dll, struct.launcher)
            launcher.restype = ctypes.c_int
            launcher.argtypes = [ctypes.POINTER(cls), ctypes.c_int, ctypes.c_void_p]
            self.args[op], self._launchers[op] = cls, launcher
        self.kernel_configs: KernelConfigs = parse_kernel_configs(self._dll.memenc_fast_kernel_configs().decode())
        self.runs_on_host = bool(self._dll.memenc_fast_runs_on_host())
        self.path = path
        self.header = header

    def error_string(self, code: int) -> str:
        """The CUDA runtime's text for an error code."""
        return self._dll.memenc_fast_cuda_error_string(code).decode(errors="replace")

    def device_count(self) -> Tuple[int, int]:
        """(CUDA devices the library's runtime sees, the CUDA error code of asking)."""
        count = ctypes.c_int(0)
        code = self._dll.memenc_fast_cuda_device_count(ctypes.byref(count))
        return count.value, code

    def has_kernel(self, kernel: str, /, **sizes: int) -> bool:
        """Whether the library has ``kernel`` for these sizes, named as its configuration lines
        name them (``has_kernel("conv3x3s2_ln_gelu", in_channels=16, out_channels=64)``).

        Raises ValueError when the sizes are not the ones the kernel's lines name.
        """
        for conditions in self.kernel_configs.get(kernel, ()):
            named = {condition.size for condition in conditions}
            if named != set(sizes):
                raise ValueError(f"{kernel} configurations name sizes {sorted(named)}; got {sorted(sizes)}")
            if all(condition.holds(sizes[condition.size]) for condition in conditions):
                return True
        return False

    def launch(self, op: str, args: ctypes.Structure, device_index: int, stream: Optional[int]) -> None:
        """Runs launcher ``memenc_fast_<op>``; raises CudaLaunchError on a CUDA error."""
        code = self._launchers[op](ctypes.byref(args), device_index, stream)
        if code != 0:
            raise CudaLaunchError(f"memenc_fast {op}: CUDA error {code}: {self.error_string(code)}")


def library_path() -> Path:
    """Where the build puts the library: ``memenc_fast/_lib/libmemenc_fast_cuda.so``."""
    return Path(__file__).resolve().parents[2] / "_lib" / LIBRARY_NAME


@functools.lru_cache(maxsize=None)
def load(path: Optional[Path] = None) -> CudaLibrary:
    """The library at ``path`` (default :func:`library_path`), loaded and checked once.

    Raises CudaLibraryError with a one-line reason when it is missing or unusable.
    """
    path = library_path() if path is None else path
    if not path.is_file():
        raise CudaLibraryError("the CUDA library was not built (pip install -e . with nvcc)")
    return CudaLibrary(path)


def unavailable_reason() -> Optional[str]:
    """None when the ``cuda`` backend can run here, else why not, in one line."""
    try:
        load()
    except CudaLibraryError as err:
        return str(err)
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@constant_while_tracing
def _has_kernel(kernel: str, sizes: Tuple[Tuple[str, int], ...]) -> bool:
    return load().has_kernel(kernel, **dict(sizes))


def has_kernel(kernel: str, /, **sizes: int) -> bool:
    """:meth:`CudaLibrary.has_kernel` of the loaded library; under torch.compile, answered once
    while tracing."""
    return _has_kernel(kernel, tuple(sorted(sizes.items())))


def dtype_code(dtype: torch.dtype) -> int:
    """The launchers' code for ``dtype`` (``MEMENC_DTYPE_*`` in ``launch_args.h``)."""
    return load().dtype_codes[dtype]


def kernel_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device ``op``'s tensors are on, where its kernel runs: a CUDA device, or the host
    for a library built against ``csrc/emulation.h``. ValueError naming the tensors otherwise."""
    return check_same_device(op, allow_cpu=load().runs_on_host, **tensors)


def launch(op: str, device: torch.device, **fields: object) -> None:
    """Runs launcher ``memenc_fast_<op>`` with its arguments struct's members ``fields`` (those
    left out are zero), on ``device`` and torch's current stream there."""
    library = load()
    stream = None if library.runs_on_host else torch.cuda.current_stream(device).cuda_stream
    library.launch(op, library.args[op](**fields), device.index or 0, stream)


# ---- parameters as the kernels read them ---------------------------------------------------------


def parameter_dtype(dtype: torch.dtype, *params: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype a launcher reads all of ``params`` in (None: an absent parameter): the activations'
    ``dtype`` when every parameter has it, else float32."""
    if all(t is None or getattr(t, "dtype", None) == dtype for t in params):
        return dtype
    return torch.float32


def parameter(op: str, name: str, t: torch.Tensor, dtype: torch.dtype,
              shape: Sequence[Optional[int]]) -> torch.Tensor:
    """Parameter ``t`` as a kernel reads it: in ``dtype`` (see :func:`parameter_dtype`), contiguous
    and 16-byte aligned, so the kernels may read it in 16-byte vectors. TypeError naming ``name``
    when it is not a floating-point tensor, ValueError when its shape is not ``shape`` (None: any
    size)."""
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{op}: {name} must be a floating-point torch.Tensor; got {got}")
    if t.dtype != dtype:
        t = t.to(dtype)
    check_tensor(op, name, t, dtype, shape)
    if not t.is_contiguous() or t.data_ptr() % 16:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def optional_parameter(op: str, name: str, t: Optional[torch.Tensor], dtype: torch.dtype,
                       shape: Sequence[Optional[int]]) -> Optional[torch.Tensor]:
    """:func:`parameter`, or None for an absent parameter."""
    return None if t is None else parameter(op, name, t, dtype, shape)


def precise_fp32() -> bool:
    """fp32 GEMMs at IEEE-level accuracy (3xTF32) unless torch allows TF32 matmuls, as torch's own."""
    return not torch.backends.cuda.matmul.allow_tf32
