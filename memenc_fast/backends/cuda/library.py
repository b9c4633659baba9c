"""The ``cuda`` backend's one shared module: the ctypes binding of ``libmemenc_fast_cuda.so`` (the
CUDA kernels of ``csrc/``) and how the op modules hand it their arguments.

The library is plain nvcc output with ``extern "C"`` launchers (no torch headers, no torch C++
ABI), so one build serves every torch version. Each launcher takes one struct of arguments,
declared once in ``csrc/launch_args.h`` (its comment states the format): this module parses that
header into ``ctypes.Structure`` classes and refuses a library built from another version of it
(the build compiles the header's hash, :func:`header_hash`, into the library). It reads the kernel
configurations the library contains once, when it loads it (:func:`has_kernel` answers from them),
and turns a launcher's non-zero return into :class:`CudaLaunchError` with the CUDA runtime's text
for it, or into :class:`CudaLaunchRefused` (a ``kernel_args.LaunchRefused``) where the GPU cannot
run the launch (:data:`REFUSED_CODES`) or the runtime cannot serve the machine (:data:`UNSERVED_CODES`),
which the op modules answer with the torch op.

Whether the library's own CUDA runtime can serve this machine is asked of it, once per process and
without creating a context (:meth:`CudaLibrary.runtime`: a driver older than the runtime it was built
with fails its every call), and whether it can serve a device when the backend is first chosen for
that device (:meth:`CudaLibrary.prepare_device`, which also loads and configures every kernel there,
so that no first launch does it inside a user's CUDA-graph capture). A ROCm build of torch (device
type ``cuda`` on AMD GPUs) gets neither: the kernels are written for NVIDIA GPUs.

Each launcher has a plan (``memenc_fast_<op>_plan``): the kernel launch it makes for given sizes on
a GPU like a given ``gpus.GpuSpec``, chosen by the same code the launcher runs on the device.
:meth:`CudaLibrary.plan` calls it, without a GPU; the kernel report reads it through
``report_launches``. The library also says which GPUs it has code for (:meth:`CudaLibrary.code_for`)
and which dtypes each architecture serves (:meth:`CudaLibrary.device_refusal`).

The kernels read the module's parameters as it holds them, in PyTorch's layouts, in the
activations' dtype or in float32 (autocast's usual case). :func:`parameter` copies, per call and
never kept, only what they cannot read: a mix of the two within one launcher, other dtypes (fp16
parameters with bf16 activations, float64), a non-contiguous or misaligned view; all rare. An
activation read in vectors is copied where it is misaligned (:func:`contiguous_aligned`): a view with
a storage offset passes ``.contiguous()`` unchanged.

The fp32 GEMMs of the kernels (the mask stages and ``proj_add``) replace ``nn.Conv2d`` layers, so
they take TF32 where torch gives such a conv TF32 (:func:`precise_conv_fp32`); the MLP runs on
cuBLAS through torch, which applies ``nn.Linear``'s rule itself.

Importing this module touches neither the library nor the GPU; :func:`load` opens the library on
first use and :func:`unavailable_reason` says in one line why the ``cuda`` backend cannot run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from ... import gpus
from ...dispatch import constant_while_tracing, log_once
from ...precision import conv_tf32
from .. import rocm_reason
from ..kernel_args import LaunchRefused, check_same_device, check_tensor

__all__ = [
    "LIBRARY_NAME",
    "LIBRARY_ENV",
    "HEADER_NAME",
    "HASH_MACRO",
    "HeaderStruct",
    "LaunchStruct",
    "LaunchArgsHeader",
    "LaunchArgsFormatError",
    "header_hash",
    "parse_header",
    "read_header",
    "CudaLibraryError",
    "CudaLaunchError",
    "CudaLaunchRefused",
    "REFUSED_CODES",
    "UNSERVED_CODES",
    "CudaRuntime",
    "PlannedLaunch",
    "EmbeddedCode",
    "SizeCondition",
    "parse_kernel_configs",
    "CudaLibrary",
    "library_path",
    "header_path",
    "load",
    "unavailable_reason",
    "device_refusal",
    "has_kernel",
    "dtype_code",
    "kernel_device",
    "launch",
    "parameter_dtype",
    "parameter",
    "optional_parameter",
    "contiguous_aligned",
    "precise_conv_fp32",
]

LIBRARY_NAME = "libmemenc_fast_cuda.so"

# ---- the launch-args header ----------------------------------------------------------------------

HEADER_NAME = "launch_args.h"
HASH_MACRO = "MEMENC_LAUNCH_ARGS_HASH"
"""The macro through which the build passes :func:`header_hash` to ``csrc/library.cu``."""

_CTYPES = {"int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
           "const void*": ctypes.c_void_p, "void*": ctypes.c_void_p, "const char*": ctypes.c_char_p}
_STRUCT_OPEN = re.compile(r"struct ([A-Z][A-Za-z0-9]*) \{")
_MEMBER = re.compile(r"(int32_t|int64_t|float|const void\*|void\*|const char\*) ([a-z_][a-z0-9_]*);")
_CONSTANT = re.compile(r"#define (MEMENC_[A-Z0-9_]+) (-?[0-9]+)")
_IGNORED = re.compile(r"#pragma once|#include <stdint\.h>")
_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


class LaunchArgsFormatError(ValueError):
    """The header does not follow the format its comment states; the message names the line."""


@dataclass(frozen=True)
class HeaderStruct:
    """One struct of the header: its C name and its members."""

    name: str  # the C struct's name, e.g. "MaskStemArgs" or "GpuTarget"
    fields: Tuple[Tuple[str, str], ...]  # (member name, C type), in declaration order


@dataclass(frozen=True)
class LaunchStruct(HeaderStruct):
    """One launcher's arguments: ``struct <Name>Args`` for ``memenc_fast_<name>``."""

    op: str = ""  # the launcher's name without its prefix, e.g. "mask_stem"

    @property
    def launcher(self) -> str:
        """The exported C function: ``memenc_fast_<op>``."""
        return f"memenc_fast_{self.op}"

    @property
    def planner(self) -> str:
        """The exported C function that says what the launcher would launch on a given GPU."""
        return f"memenc_fast_{self.op}_plan"


@dataclass(frozen=True)
class LaunchArgsHeader:
    """A parsed ``launch_args.h``: its launchers' structs by op name, its other structs (records)
    by C name, its constants, and its hash."""

    structs: Dict[str, LaunchStruct]
    records: Dict[str, HeaderStruct]
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
    records: Dict[str, HeaderStruct] = {}
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
                    raise LaunchArgsFormatError(f"{source}:{number}: {name} declares {member.group(2)} twice")
                fields.append((member.group(2), member.group(1)))
            elif line == "};":
                if not fields:
                    raise LaunchArgsFormatError(f"{source}:{open_struct[1]}: {name} has no members")
                if name in records or any(struct.name == name for struct in structs.values()):
                    raise LaunchArgsFormatError(f"{source}:{open_struct[1]}: a second struct {name}")
                if name.endswith("Args") and name != "Args":
                    struct = LaunchStruct(name, tuple(fields), _snake_case(name[:-len("Args")]))
                    structs[struct.op] = struct
                else:
                    records[name] = HeaderStruct(name, tuple(fields))
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
                f"{source}:{number}: expected `struct <Name> {{`, `#define MEMENC_<NAME> <integer>`, "
                f"`#pragma once`, `#include <stdint.h>` or a comment; got {raw.strip()!r}")
    if open_struct[0]:
        raise LaunchArgsFormatError(f"{source}:{open_struct[1]}: {open_struct[0]} is not closed with `}};`")
    return LaunchArgsHeader(structs, records, constants, header_hash(data))


def read_header(path: Path) -> LaunchArgsHeader:
    """:func:`parse_header` of the file at ``path``."""
    return parse_header(path.read_bytes(), str(path))


# ---- the library ---------------------------------------------------------------------------------

_DTYPE_CONSTANTS = {torch.float32: "MEMENC_DTYPE_FLOAT32", torch.bfloat16: "MEMENC_DTYPE_BFLOAT16",
                    torch.float16: "MEMENC_DTYPE_FLOAT16"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CONDITION = re.compile(r"([a-z_]+)(=|%|<=)([0-9]+(?:,[0-9]+)*)")
_CODE = re.compile(r"(sm|compute)_([0-9]+)([af]?)")
# The records the plans use (csrc/launch_args.h), which the binding needs by name.
_RECORDS = ("GpuTarget", "KernelLaunch")
# The library's own entry points (csrc/library.cu): name -> (restype, argtypes).
_ENTRY_POINTS = {
    "memenc_fast_launch_args_hash": (ctypes.c_uint64, []),
    "memenc_fast_sources_digest": (ctypes.c_uint64, []),
    "memenc_fast_kernel_configs": (ctypes.c_char_p, []),
    "memenc_fast_cuda_archs": (ctypes.c_char_p, []),
    "memenc_fast_min_arch": (ctypes.c_int, [ctypes.c_int]),
    "memenc_fast_matrix_math": (ctypes.c_char_p, [ctypes.c_int, ctypes.c_int]),
    "memenc_fast_runs_on_host": (ctypes.c_int, []),
    "memenc_fast_cuda_error_string": (ctypes.c_char_p, [ctypes.c_int]),
    "memenc_fast_cuda_runtime": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)] * 3),
    "memenc_fast_prepare_device": (ctypes.c_int, [ctypes.c_int]),
}

REFUSED_CODES: Mapping[int, str] = {
    9: "cudaErrorInvalidConfiguration",  # also: more shared memory than the GPU gives a block
    98: "cudaErrorInvalidDeviceFunction",
    200: "cudaErrorInvalidKernelImage",
    209: "cudaErrorNoKernelImageForDevice",  # also: a dtype the code for this GPU does not serve
    218: "cudaErrorInvalidPtx",
    221: "cudaErrorJitCompilerNotFound",
    222: "cudaErrorUnsupportedPtxVersion",
    223: "cudaErrorJitCompilationDisabled",
    701: "cudaErrorLaunchOutOfResources",
}
"""The CUDA errors by which a GPU refuses a launch (its configuration, its code), as opposed to
errors of the arguments or of the device: those launches fall back to the torch op."""

UNSERVED_CODES: Mapping[int, str] = {
    3: "cudaErrorInitializationError",
    34: "cudaErrorStubLibrary",  # a stub libcuda, no driver
    35: "cudaErrorInsufficientDriver",  # the driver is older than the library's runtime
    36: "cudaErrorCallRequiresNewerDriver",
    46: "cudaErrorDevicesUnavailable",  # exclusive-process devices in use elsewhere
    100: "cudaErrorNoDevice",
    802: "cudaErrorSystemNotReady",
    803: "cudaErrorSystemDriverMismatch",
    804: "cudaErrorCompatNotSupportedOnDevice",
    805: "cudaErrorMpsConnectionFailed",
    806: "cudaErrorMpsRpcFailure",
    807: "cudaErrorMpsServerNotReady",
    808: "cudaErrorMpsMaxClientsReached",
    809: "cudaErrorMpsMaxConnectionsReached",
    999: "cudaErrorUnknown",
}
"""The CUDA errors by which the library's runtime says it cannot serve this machine or a device (the
driver, the system, the device's state), not that one launch failed: met by its probes, they make the
``cuda`` backend unavailable or refuse the device; met by a launch, it falls back to the torch op."""


def _cuda_version(version: int) -> str:
    """A CUDA version as the runtime encodes it (1000 * major + 10 * minor) in words: 12040 -> 12.4."""
    return f"{version // 1000}.{version % 1000 // 10}"


@dataclass(frozen=True)
class CudaRuntime:
    """What the library's CUDA runtime finds on this machine (``memenc_fast_cuda_runtime``)."""

    version: int  # the runtime's CUDA version, 1000 * major + 10 * minor (13000: CUDA 13.0)
    driver_version: int  # the newest CUDA version the driver supports, same encoding; 0: no driver
    device_count: int  # the devices it sees
    error: int  # the CUDA error of its initialization (cudaGetDeviceCount); 0 where none

    def describe(self) -> str:
        """Its versions and devices in a few words."""
        driver = (f"the driver supports CUDA {_cuda_version(self.driver_version)}" if self.driver_version
                  else "no driver")
        return f"CUDA {_cuda_version(self.version)}, {driver}, {self.device_count} device(s)"


class CudaLibraryError(RuntimeError):
    """The library is missing, does not load, or does not match ``launch_args.h``."""


class CudaLaunchError(RuntimeError):
    """A launcher returned a CUDA error; the message names the launcher and the CUDA error."""


class CudaLaunchRefused(CudaLaunchError, LaunchRefused):
    """A launcher returned one of :data:`REFUSED_CODES`: this GPU cannot run the launch."""


@dataclass(frozen=True)
class PlannedLaunch:
    """One kernel launch as a launcher's plan chooses it (launch_args.h's ``KernelLaunch``)."""

    kernel: str  # the instantiation's name as c++filt prints it
    config: str  # its tile configuration, in a few words
    grid: Tuple[int, int]
    block: int  # threads per block
    dynamic_smem: int  # bytes per block
    small_grid_reason: Optional[str]  # why fewer blocks than the GPU has SMs; None where not

    @property
    def blocks(self) -> int:
        """The grid's size."""
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class EmbeddedCode:
    """One piece of GPU code the library holds: SASS (``sm_86``, ``sm_90a``) or PTX (``compute_120``)."""

    name: str

    @property
    def ptx(self) -> bool:
        """PTX, which the driver compiles for the GPU at load time, rather than SASS."""
        return self.name.startswith("compute_")

    @property
    def arch(self) -> int:
        """major * 10 + minor: 86 for ``sm_86``, 100 for ``sm_100a``."""
        return int(_CODE.fullmatch(self.name).group(2))

    def runs_on(self, capability: Tuple[int, int]) -> bool:
        """Whether a GPU of ``capability`` runs this code (the CUDA compatibility rules): an ``a``
        variant on its own GPU only; plain PTX on every GPU from its arch up; SASS and ``f`` (family)
        variants on their major version from their minor up."""
        suffix = _CODE.fullmatch(self.name).group(3)
        major, minor = divmod(self.arch, 10)
        if suffix == "a":
            return tuple(capability) == (major, minor)
        if self.ptx and not suffix:
            return tuple(capability) >= (major, minor)
        return capability[0] == major and capability[1] >= minor


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


def _structure_class(struct: HeaderStruct) -> Type[ctypes.Structure]:
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
    ``kernel_configs`` holds the kernel configurations the library contains, ``archs`` the GPU code
    it embeds (``sm_75`` ... ``compute_120``), ``sources_digest`` the digest of the csrc/ it was
    built from (``build_tools.cuda_build.sources_digest``), ``runs_on_host`` is True for a build
    against ``csrc/emulation.h`` (kernels run on the host, on CPU tensors).
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
        missing_records = [name for name in _RECORDS if name not in parsed.records]
        if missing_records:
            raise CudaLibraryError(f"{header} does not declare {', '.join(missing_records)}")
        self.records: Dict[str, Type[ctypes.Structure]] = {
            name: _structure_class(record) for name, record in parsed.records.items()}
        target, launch = self.records["GpuTarget"], self.records["KernelLaunch"]
        self.args: Dict[str, Type[ctypes.Structure]] = {}
        self._launchers = {}
        self._planners = {}
        for op, struct in parsed.structs.items():
            for function in (struct.launcher, struct.planner):
                if not hasattr(self._dll, function):
                    raise CudaLibraryError(f"the CUDA library {path.name} lacks {function}, which {HEADER_NAME} "
                                           f"implies ({struct.name}); rebuild it (pip install -e .)")
            cls = _structure_class(struct)
            launcher = getattr(self._dll, struct.launcher)
            launcher.restype = ctypes.c_int
            launcher.argtypes = [ctypes.POINTER(cls), ctypes.c_int, ctypes.c_void_p]
            planner = getattr(self._dll, struct.planner)
            planner.restype = ctypes.c_int
            planner.argtypes = [ctypes.POINTER(cls), ctypes.POINTER(target), ctypes.POINTER(launch)]
            self.args[op], self._launchers[op], self._planners[op] = cls, launcher, planner
        self.kernel_configs: KernelConfigs = parse_kernel_configs(self._dll.memenc_fast_kernel_configs().decode())
        self.archs: Tuple[str, ...] = tuple(code for code in self._dll.memenc_fast_cuda_archs().decode().split("/")
                                            if code)
        self.sources_digest: int = self._dll.memenc_fast_sources_digest()
        self.runs_on_host = bool(self._dll.memenc_fast_runs_on_host())
        self.path = path
        self.header = header

    def error_string(self, code: int) -> str:
        """The CUDA runtime's text for an error code."""
        return self._dll.memenc_fast_cuda_error_string(code).decode(errors="replace")

    def describe_error(self, code: int) -> str:
        """``CUDA error <code> (<its name>): <the runtime's text>``, the name where this module knows it."""
        name = UNSERVED_CODES.get(code) or REFUSED_CODES.get(code)
        return f"CUDA error {code}{f' ({name})' if name else ''}: {self.error_string(code)}"

    # ---- whether its runtime serves this machine ------------------------------------------------

    def runtime(self) -> CudaRuntime:
        """What the library's CUDA runtime finds here; the library asks once per process (a host
        build: every time, of its emulated runtime) and creates no context."""
        version, driver, count = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        error = self._dll.memenc_fast_cuda_runtime(ctypes.byref(version), ctypes.byref(driver), ctypes.byref(count))
        return CudaRuntime(version.value, driver.value, count.value, error)

    def runtime_refusal(self) -> Optional[str]:
        """Why the library's CUDA runtime cannot serve this machine, in one line; None where it can."""
        runtime = self.runtime()
        if runtime.error == 0:
            return None
        built = f"the CUDA library was built with CUDA {_cuda_version(runtime.version)}"
        error = self.describe_error(runtime.error)
        if runtime.driver_version == 0:
            return f"no NVIDIA driver found ({built}; {error})"
        if runtime.driver_version < runtime.version:
            supported = _cuda_version(runtime.driver_version)
            return (f"{built}, and this machine's NVIDIA driver supports CUDA {supported} at most ({error}): update "
                    f"the driver, or rebuild the library with a CUDA {supported} toolkit (pip install -e .)")
        return f"{built}, and its runtime cannot use this machine ({runtime.describe()}): {error}"

    def prepare_device(self, index: int) -> Optional[str]:
        """Makes the library ready to launch on CUDA device ``index`` (a host build: its emulated GPU):
        loads every kernel a plan can launch there and gives each its shared-memory opt-in, once per
        device, allowed during a stream capture. Returns why the library cannot serve that device, in
        one line, or None. Uses the device's primary context: ask only for a device that tensors are on."""
        error = self._dll.memenc_fast_prepare_device(index)
        if error == 0:
            return None
        return f"the CUDA library cannot run its kernels on cuda:{index}: {self.describe_error(error)}"

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

    def _check(self, op: str, code: int) -> None:
        if code in REFUSED_CODES or code in UNSERVED_CODES:
            raise CudaLaunchRefused(f"memenc_fast {op}: {self.describe_error(code)}")
        if code != 0:
            raise CudaLaunchError(f"memenc_fast {op}: {self.describe_error(code)}")

    def launch(self, op: str, args: ctypes.Structure, device_index: int, stream: Optional[int]) -> None:
        """Runs launcher ``memenc_fast_<op>``; raises CudaLaunchRefused where the GPU refuses the
        launch (:data:`REFUSED_CODES`), CudaLaunchError on any other CUDA error."""
        self._check(op, self._launchers[op](ctypes.byref(args), device_index, stream))

    def plan(self, op: str, spec: gpus.GpuSpec, **fields: object) -> PlannedLaunch:
        """The kernel launch ``memenc_fast_<op>`` makes with its arguments struct's members
        ``fields`` (sizes, dtypes, strides; pointers are not read) on a GPU like ``spec`` running
        its own native code. Raises as :meth:`launch` would where it would not launch."""
        major, minor = spec.capability
        target = self.records["GpuTarget"](arch=10 * major + minor, sm_count=spec.sm_count,
                                           shared_memory_per_block=spec.shared_memory_per_block)
        launch = self.records["KernelLaunch"]()
        self._check(op, self._planners[op](ctypes.byref(self.args[op](**fields)), ctypes.byref(target),
                                           ctypes.byref(launch)))
        reason = launch.small_grid_reason
        return PlannedLaunch(launch.kernel.decode(), launch.config.decode(), (launch.grid_x, launch.grid_y),
                             launch.block, launch.dynamic_smem, None if reason is None else reason.decode())

    def emulate_gpu(self, arch: int, sm_count: int, shared_memory_per_block: int) -> None:
        """Makes a host (emulation) build plan for and launch on a GPU whose code is of ``arch``
        (major * 10 + minor; 0: the library has no code for it), as the tests need."""
        if not self.runs_on_host:
            raise CudaLibraryError(f"{self.path.name} runs on a GPU; only a host build emulates one")
        emulate = self._dll.memenc_fast_emulate_gpu
        emulate.restype, emulate.argtypes = None, [ctypes.POINTER(self.records["GpuTarget"])]
        emulate(ctypes.byref(self.records["GpuTarget"](arch=arch, sm_count=sm_count,
                                                       shared_memory_per_block=shared_memory_per_block)))

    # ---- which GPUs it serves --------------------------------------------------------------------

    def code_for(self, capability: Tuple[int, int]) -> Optional[EmbeddedCode]:
        """The code of this library a GPU of ``capability`` runs, as the CUDA driver picks it: the
        newest SASS it can run, else the newest PTX, JIT-compiled; None where there is none."""
        codes = [EmbeddedCode(name) for name in self.archs]
        runnable = [code for code in codes if code.runs_on(capability)]
        if not runnable:
            return None
        return max(runnable, key=lambda code: (not code.ptx, code.arch))

    def min_arch(self, dtype: torch.dtype) -> int:
        """The oldest arch (major * 10 + minor) whose code serves activations of ``dtype``."""
        return self._dll.memenc_fast_min_arch(self.dtype_codes[dtype])

    def matrix_math(self, arch: int, dtype: torch.dtype) -> Optional[str]:
        """How code for ``arch`` runs the GEMMs and convs of ``dtype`` (tensor cores and which
        instruction, or CUDA cores); None where it does not serve ``dtype``."""
        text = self._dll.memenc_fast_matrix_math(arch, self.dtype_codes[dtype])
        return None if text is None else text.decode()

    def device_refusal(self, spec: gpus.GpuSpec, dtype: torch.dtype) -> Optional[str]:
        """Why this library cannot run activations of ``dtype`` on the GPU ``spec`` describes (no
        code for it, or its code does not serve ``dtype``), in one line; None where it can."""
        major, minor = spec.capability
        this = f"sm_{major}{minor} ({spec.name})"
        oldest = min(self.min_arch(d) for d in self.dtype_codes)
        if 10 * major + minor < oldest:
            return f"the CUDA kernels need sm_{oldest} or newer; this GPU is {this}"
        native = [name.removeprefix("sm_") for name in self.archs if not EmbeddedCode(name).ptx]
        ptx = [name for name in self.archs if EmbeddedCode(name).ptx]
        wanted = sorted({*native, spec.arch.removeprefix("sm_")}, key=lambda a: (int(a.rstrip("af")), a))
        rebuild = f"rebuild with MEMENC_FAST_CUDA_ARCHS={';'.join(wanted)}"
        code = self.code_for(spec.capability)
        if code is None:
            built = ";".join(native) + (f" (PTX {', '.join(ptx)})" if ptx else "")
            return f"the CUDA library is built for {built}; this GPU is {this}: {rebuild}"
        needed = self.min_arch(dtype)
        if code.arch >= needed:
            return None
        if 10 * major + minor < needed:
            return f"{_DTYPE_NAMES[dtype]} needs sm_{needed}; this is {this}"
        return f"{_DTYPE_NAMES[dtype]} needs sm_{needed} code; the library runs {code.name} on this {this}: {rebuild}"


LIBRARY_ENV = "MEMENC_FAST_CUDA_LIBRARY"
"""Names a library built elsewhere (the GPU campaign's, prepared on another machine) to load instead."""


def library_path() -> Path:
    """Where the library is loaded from: ``$MEMENC_FAST_CUDA_LIBRARY`` when set, else where the
    build puts it, ``memenc_fast/_lib/libmemenc_fast_cuda.so``."""
    named = os.environ.get(LIBRARY_ENV, "").strip()
    return Path(named) if named else Path(__file__).resolve().parents[2] / "_lib" / LIBRARY_NAME


@functools.lru_cache(maxsize=None)
def load(path: Optional[Path] = None) -> CudaLibrary:
    """The library at ``path`` (default :func:`library_path`), loaded and checked once.

    Raises CudaLibraryError with a one-line reason when it is missing or unusable.
    """
    path = library_path() if path is None else path
    if not path.is_file():
        if os.environ.get(LIBRARY_ENV, "").strip():
            raise CudaLibraryError(f"${LIBRARY_ENV} names {path}, which is not a file")
        raise CudaLibraryError("the CUDA library was not built (pip install -e . with nvcc)")
    return CudaLibrary(path)


def unavailable_reason() -> Optional[str]:
    """None when the ``cuda`` backend can run here, else why not, in one line: a ROCm build of torch,
    no library, no CUDA device, or a library whose CUDA runtime cannot serve this machine (logged
    once)."""
    amd = rocm_reason("its CUDA kernels")
    if amd is not None:
        return amd
    try:
        loaded = load()
    except CudaLibraryError as err:
        return str(err)
    if not torch.cuda.is_available():
        return "no CUDA device"
    refusal = loaded.runtime_refusal()
    if refusal is not None:
        log_once(f"memenc_fast: the cuda backend cannot run here: {refusal}")
    return refusal


@constant_while_tracing
def device_refusal(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the library cannot serve activations of ``dtype`` on ``device``, in one line, or None:
    :meth:`CudaLibrary.device_refusal` for a CUDA device (its ``gpus.gpu_spec``), then
    :meth:`CudaLibrary.prepare_device`, which readies the kernels there when the backend is first
    chosen for it (a refusal is logged once). A host build prepares its emulated GPU; a GPU build has
    nothing to say of another device type. Under torch.compile, answered once while tracing."""
    loaded = load()
    if device.type == "cuda" and not loaded.runs_on_host:
        refusal = loaded.device_refusal(gpus.gpu_spec(device), dtype)
        if refusal is not None:
            return refusal
    elif not loaded.runs_on_host:
        return None
    refusal = loaded.prepare_device(device.index or 0)
    if refusal is not None:
        log_once(f"memenc_fast: the cuda backend refuses {device}: {refusal}")
    return refusal


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
    return contiguous_aligned(t)


def optional_parameter(op: str, name: str, t: Optional[torch.Tensor], dtype: torch.dtype,
                       shape: Sequence[Optional[int]]) -> Optional[torch.Tensor]:
    """:func:`parameter`, or None for an absent parameter."""
    return None if t is None else parameter(op, name, t, dtype, shape)


def contiguous_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 16-byte boundary (the widest vector a kernel reads): as it
    is where it already is, else a contiguous copy. A view with a storage offset passes
    ``.contiguous()`` unchanged, and a misaligned vector access is a sticky error that ends the CUDA
    context; the launchers refuse one with cudaErrorInvalidValue."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def precise_conv_fp32() -> bool:
    """Whether the kernels' fp32 GEMMs run at IEEE-level accuracy (3xTF32) rather than one TF32
    product: they replace ``nn.Conv2d`` layers (the mask stages, the 1x1 convs of ``proj_add``), so
    the answer is torch's for such a conv (``torch.backends.cudnn.allow_tf32``, default True), read at
    every launch."""
    return not conv_tf32()
