"""Compile every GPU kernel for every GPU generation on any machine and report what the compiler made.

``python -m memenc_fast kernels`` (or ``python -m memenc_fast.tools.kernel_report``) builds each kernel
that the ``triton`` and ``cuda`` backends launch for the SAM 2 shapes into a cubin for each target
(``--targets``: sm_75 T4, sm_80 A100, sm_86 A10/A40/RTX 30xx, sm_89 L4/L40/RTX 40xx, sm_90a H100,
sm_100a B200, sm_120 RTX 50xx) without a GPU, then reads the cubins back with ``cuobjdump``:
registers, local memory (spills), shared memory, and tensor-core instructions (``HMMA`` =
mma.sync, ``HGMMA`` = Hopper wgmma, ``UTC*MMA`` such as ``UTCHMMA`` = Blackwell tcgen05). Each row
is one launch on one GPU of ``memenc_fast.gpus.REPORT_GPUS`` (the configuration that GPU runs,
chosen from its properties by the same chooser the backend calls) with its grid in waves of that
GPU's SMs. Next to those it prints the kernel's FLOPs and minimum bytes for the SAM 2 shape and
the floor time they imply on an H100.

Where the kernels come from
---------------------------
* **Triton**: every module of the package ``memenc_fast.kernels`` that defines
  ``report_launches(batch: int, dtype: torch.dtype, device: DeviceLimits) -> list[Launch]``
  (``memenc_fast.kernels._common``): the launches the backend makes for the SAM 2 shape on
  ``device`` (each report GPU's ``GpuSpec``), built from meta tensors. The report turns each into
  a ``TritonKernelSpec`` (``spec_from_launch``: the argument types as Triton types them at
  launch) and compiles it with ``triton.compile`` for an explicit ``GPUTarget``, with every
  pointer argument specialised as 16-byte aligned, as a launch on torch tensors is. A
  configuration several GPUs of one target run compiles once. The compiles run in worker
  processes (``--jobs``), which also keeps them clear of ``TRITON_INTERPRET``.
* **CUDA**: every ``csrc/*.cu`` is compiled with ``nvcc -cubin -O3 -std=c++17`` per target (``-I
  csrc`` and, when torch is installed, torch's include directories). Where
  ``memenc_fast.backends.cuda`` imports and defines ``report_launches(batch, dtype, weight_dtype,
  spec)`` (torch dtypes, a ``GpuSpec``) and its built library was compiled from these very
  sources (the sources digest it records, ``sources_digest``, whether ``--csrc`` is the
  repository's ``csrc/`` or a copy of it beside an installed package), each launch it returns is
  a row: a dict with ``kernel`` (the demangled name with its template arguments, as in the
  cubin), ``grid`` (blocks), ``block`` (threads), ``dynamic_smem`` (bytes) and ``config``
  (text), and optionally ``small_grid_reason``. Otherwise (no torch, no library, or one built
  from other sources; a note says which) each ``__global__`` function in the cubin is a row per
  target, without a grid, except the instantiations no plan launches on that target, so that
  the verdict is the plans': every plan skips a tile whose dynamic shared memory
  (``kernels.json``) does not fit the GPU, so an instantiation over the target's limit is left
  out, with a note, where another tile of it (the same template arguments but the last, which
  is the tile) fits. Names are demangled (``c++filt``) into a kernel name and template
  arguments; a ``__nv_bfloat16``/``__half``/``float`` template argument gives the row's dtype.

  What the names mean comes from an optional sidecar ``csrc/kernels.json``::

      {
        "mask_path_kernel": {"hot": true, "matrix_work": false,
                             "flops_per_object": 1170000000, "min_bytes_per_object": 2100000},
        "proj_add_kernel<__nv_bfloat16>": {"hot": true, "matrix_work": true,
                                           "flops_per_object": 1074000000,
                                           "min_bytes_per_object": 4200000,
                                           "dynamic_shared_bytes": 98304}
      }

  A key is a kernel name, or a kernel name with its template arguments exactly as the table
  prints them (that entry wins); the name may leave out its namespaces. All keys of an entry
  are optional: ``hot`` (bool, default true), ``matrix_work`` (bool, default false),
  ``flops_per_object`` and ``min_bytes_per_object`` (int, per SAM 2 object: a row's figures are
  these times the batch), ``dynamic_shared_bytes`` (int, what the launcher requests, where
  ``report_launches`` does not say; added to the static shared memory). A kernel without an
  entry shows "-" for FLOPs and bytes and is treated as hot and not matrix work.

Inspected cubins are kept in a cache (``--cache-dir``, default ``~/.cache/memenc_fast/
kernel_report`` or ``$MEMENC_FAST_CACHE_DIR``) keyed by a hash of everything a compile depends
on (the kernel's source and its callees', the configuration, the target, the compiler's version),
not on where the files are (a copy of ``csrc/``, another checkout or environment finds the same
entries), so a rerun compiles only what changed; ``--no-cache`` compiles everything.

The checks (``--strict`` turns them into a non-zero exit)
---------------------------------------------------------
* a kernel does not compile for a target;
* a kernel that does matrix work in bf16/fp16, or in fp32 with TF32 dots (a Triton launch's
  ``tf32``: its rows say ``tf32``), has no tensor-core instruction where the target has them for
  its backend (``expects_tensor_cores``: every target from sm_80; on sm_75, fp16 in CUDA C++, as
  Triton emits no tensor-core code there and the GPU has no TF32);
* a hot kernel uses local memory (``STACK``/``LOCAL`` bytes or ``STL``/``LDL`` instructions);
* static + dynamic shared memory exceeds the target's per-block limit (``TARGET_LIMITS``), or
  static shared memory exceeds the 48 KiB that needs no opt-in. Static is what the cubin
  declares: on sm_90 that includes the 1 KiB the compiler reserves for the system in any kernel
  that uses shared memory, so the check errs by at most that much on the strict side;
* registers per thread, or per block at the launch's threads, exceed the target's;
* a hot kernel's grid at B=1 fills less than one wave of its GPU's SMs, unless the launch says
  why that is faster (``small_grid_reason``, shown in the row's note).

bf16 rows are left out for targets without bf16 (sm_75), with one line saying so. A missing tool
(triton, nvcc, cuobjdump, torch for the Triton specs) skips those rows with one line saying why;
it is not a violation.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # the report runs without torch and triton, which the kernels and gpus import
    from memenc_fast.gpus import GpuSpec
    from memenc_fast.kernels._common import Launch


@dataclasses.dataclass(frozen=True)
class TritonKernelSpec:
    """One launch configuration of a Triton kernel, as the backend launches it for one shape.

    ``signature`` maps each runtime argument to a Triton type string (``"*bf16"``, ``"*fp32"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` maps each ``tl.constexpr`` argument to its value. Every
    argument of ``fn`` must be in exactly one of them. ``flops`` and ``min_bytes`` are the work and
    the minimum memory traffic of this launch for the shape it was made for; ``matrix_work``
    marks kernels that must run on tensor cores; ``hot`` marks kernels that must not spill.
    ``aligned_ints`` names integer arguments whose launch values are multiples of 16 (shapes and
    strides of the SAM 2 tensors), which Triton specialises on at launch. ``max_registers`` is
    ptxas' ``.maxnreg`` (Triton's ``maxnreg``), where the launch sets one.
    """

    kernel: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    config: str
    matrix_work: bool
    hot: bool
    flops: int
    min_bytes: int
    aligned_ints: tuple[str, ...] = ()
    max_registers: int | None = None

    def __post_init__(self) -> None:
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"{self.kernel}: num_warps must be a power of two in 1..32, "
                             f"got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"{self.kernel}: num_stages must be an int >= 1, "
                             f"got {self.num_stages!r}")
        for field in ("flops", "min_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.kernel}: {field} must be an int >= 0, got {value!r}")
        both = set(self.signature) & set(self.constexprs)
        if both:
            raise ValueError(f"{self.kernel}: arguments {sorted(both)} are in both signature and "
                             "constexprs; expected each in exactly one")
        unknown = set(self.aligned_ints) - set(self.signature)
        if unknown:
            raise ValueError(f"{self.kernel}: aligned_ints {sorted(unknown)} are not runtime "
                             f"arguments; expected names from {sorted(self.signature)}")


@dataclasses.dataclass(frozen=True)
class TargetLimits:
    """What one compile target allows a block (CUDA programming guide, compute capabilities
    table), and whether its GPUs compute in bf16."""

    per_block_max: int  # shared memory per block with opt-in, bytes
    static_max: int = 48 * 1024  # static shared memory: beyond it a kernel opts in to dynamic
    registers_per_thread: int = 255
    registers_per_block: int = 64 * 1024
    bf16: bool = True


TARGET_LIMITS: dict[str, TargetLimits] = {
    "sm_75": TargetLimits(per_block_max=65536, bf16=False),  # 64 KiB
    "sm_80": TargetLimits(per_block_max=166912),  # 163 KiB
    "sm_86": TargetLimits(per_block_max=101376),  # 99 KiB
    "sm_89": TargetLimits(per_block_max=101376),
    "sm_90a": TargetLimits(per_block_max=232448),  # 227 KiB
    "sm_100a": TargetLimits(per_block_max=232448),
    "sm_120": TargetLimits(per_block_max=101376),
}
"""Every target the report compiles for (``--targets``), and its limits."""

# H100 SXM rates the floors are computed with: bf16/fp16 measured on dense GEMMs (~80% of the
# 989 TFLOP/s peak); TF32 at the same ratio of its 495; fp32 with IEEE math runs on the CUDA
# cores (67 TFLOP/s peak, same ratio).
H100_FLOPS: dict[str, float] = {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 54e12}
H100_BYTES_PER_S: float = 3.0e12

DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
TENSOR_CORE_OPS: tuple[str, ...] = ("HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "DMMA")
# Blackwell's tcgen05.mma: UTCHMMA (f16, bf16, tf32), UTCQMMA (fp8/6/4), UTCIMMA (int8), UTCOMMA
# (mxf4), and whatever else of the family comes; UTCBAR, UTCCP and UTCATOMSWS are not matrix ops.
_TCGEN05_MMA_RE = re.compile(r"UTC[A-Z]*MMA")
JSON_KEYS: tuple[str, ...] = (
    "backend", "kernel", "target", "config", "registers", "spill_bytes", "shared_bytes",
    "tensor_core_instructions", "flops", "min_bytes", "cubin",
    # Beyond the required keys: what tells rows apart and what the checks read.
    "gpu", "sm_count", "grid", "threads", "waves", "small_grid_reason",
    "batch", "dtype", "hot", "matrix_work", "local_instructions", "floor_us", "compile_seconds",
    "error",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]  # memenc_fast/tools/ -> the repository


def is_tensor_core_op(op: str) -> bool:
    """Whether a SASS opcode is a tensor-core matrix instruction of some generation."""
    return op in TENSOR_CORE_OPS or _TCGEN05_MMA_RE.fullmatch(op) is not None


def _arch_number(target: str) -> int:
    return int(re.fullmatch(r"sm_(\d+)a?", target).group(1))  # type: ignore[union-attr]


def expects_tensor_cores(backend: str, target: str, dtype: str) -> bool:
    """Whether a bf16/fp16 (or TF32) matrix kernel of ``backend`` compiled for ``target`` must
    contain tensor-core instructions: from sm_80 on; on sm_75 (fp16 mma.sync, no bf16, no TF32)
    in CUDA C++ only, as Triton has no mma for sm_75."""
    if dtype not in ("bf16", "fp16", "tf32"):
        return False
    if _arch_number(target) >= 80:
        return True
    return backend == "cuda" and dtype == "fp16" and _arch_number(target) >= 75


def report_gpus(targets: Sequence[str]) -> list[GpuSpec]:
    """The GPUs of ``memenc_fast.gpus.REPORT_GPUS`` whose target is in ``targets`` (needs torch)."""
    from memenc_fast.gpus import REPORT_GPUS

    return [gpu for gpu in REPORT_GPUS if gpu.arch in targets]


def _bf16_skips(targets: Sequence[str], dtypes: Sequence[str]) -> list[str]:
    """One line per target whose rows leave out bf16."""
    if "bf16" not in dtypes:
        return []
    return [f"bf16 rows skipped for {target}: no bf16 before sm_80" for target in targets
            if not TARGET_LIMITS[target].bf16]


# ----------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump --dump-resource-usage``."""

    registers: int
    stack: int
    shared: int
    local: int


@dataclasses.dataclass(frozen=True)
class SassCounts:
    """Instruction counts of one function's SASS that the report cares about."""

    tensor_core: dict[str, int]
    stl: int
    ldl: int


_FUNCTION_RE = re.compile(r"^\s*Function\s+(?::\s*)?(\S+?):?\s*$")
_USAGE_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
# An instruction line: "/*0a20*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, ... ;"
_SASS_INSN_RE = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_SASS_FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")


def parse_resource_usage(text: str) -> dict[str, ResourceUsage]:
    """Parse ``cuobjdump --dump-resource-usage`` output into ``{mangled name: usage}``.

    Raises ``ValueError`` when a ``Function`` header is not followed by its usage line.
    """
    result: dict[str, ResourceUsage] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = _FUNCTION_RE.match(line)
        if not header:
            continue
        fields = dict(_USAGE_RE.findall(lines[i + 1])) if i + 1 < len(lines) else {}
        if "REG" not in fields:
            raise ValueError(f"resource usage of {header.group(1)}: expected a line with "
                             f"REG:/STACK:/SHARED:/LOCAL:, got {lines[i + 1:i + 2]!r}")
        result[header.group(1)] = ResourceUsage(
            registers=int(fields["REG"]), stack=int(fields.get("STACK", 0)),
            shared=int(fields.get("SHARED", 0)), local=int(fields.get("LOCAL", 0)))
    return result


def parse_sass(text: str) -> dict[str, SassCounts]:
    """Count tensor-core and local-memory instructions per function in ``cuobjdump -sass`` text."""
    counts: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        header = _SASS_FUNCTION_RE.match(line)
        if header:
            current = counts.setdefault(header.group(1), {})
            continue
        insn = _SASS_INSN_RE.match(line)
        if insn and current is not None:
            op = insn.group(1)
            current[op] = current.get(op, 0) + 1
    return {
        name: SassCounts(
            tensor_core={op: n for op, n in sorted(ops.items()) if is_tensor_core_op(op)},
            stl=ops.get("STL", 0), ldl=ops.get("LDL", 0))
        for name, ops in counts.items()
    }


def _matching_open(text: str, close_index: int, open_char: str, close_char: str) -> int:
    """Index of the bracket that opens the one at ``close_index`` (-1 when unbalanced)."""
    depth = 0
    for i in range(close_index, -1, -1):
        if text[i] == close_char:
            depth += 1
        elif text[i] == open_char:
            depth -= 1
            if depth == 0:
                return i
    return -1


def split_kernel_name(symbol: str) -> tuple[str, str]:
    """Split a (demangled) kernel symbol into ``(name, template arguments)``.

    ``"void ns::k<__nv_bfloat16, 4>(float const*, int)"`` gives ``("ns::k", "__nv_bfloat16, 4")``;
    an ``extern "C"`` name comes back as it is with ``""``. A still-mangled ``_Z`` name (no
    ``c++filt``) gives its plain identifier and the full symbol as the template text, so two
    instantiations stay apart.
    """
    if symbol.startswith("_Z"):
        parts = []
        rest = symbol[3:] if symbol.startswith("_ZN") else symbol[2:]
        while (m := re.match(r"(\d+)", rest)) is not None:
            n = int(m.group(1))
            start = len(m.group(1))
            parts.append(rest[start:start + n])
            rest = rest[start + n:]
        return ("::".join(parts) or symbol), symbol
    name = symbol.strip()
    if name.endswith(")"):
        name = name[:_matching_open(name, len(name) - 1, "(", ")")].rstrip()
    template = ""
    if name.endswith(">"):
        open_at = _matching_open(name, len(name) - 1, "<", ">")
        template = name[open_at + 1:-1].strip()
        name = name[:open_at]
    return name.split(" ")[-1], template


def dtype_of_template(template: str) -> str:
    """The storage dtype a CUDA template instantiation names, or ``"-"``.

    Low-precision types win over ``float``, which often names only the accumulator.
    """
    if re.search(r"\b(__)?nv_bfloat16\b", template):
        return "bf16"
    if re.search(r"\b(__)?half\b", template):
        return "fp16"
    if re.search(r"\bfloat\b", template):
        return "fp32"
    return "-"


def demangle(symbols: Sequence[str]) -> dict[str, str]:
    """Demangle symbols with ``c++filt`` when it exists; otherwise map each to itself."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not symbols:
        return {s: s for s in symbols}
    out = subprocess.run([cxxfilt], input="\n".join(symbols) + "\n", capture_output=True,
                         text=True, check=False).stdout.splitlines()
    if len(out) != len(symbols):
        return {s: s for s in symbols}
    return dict(zip(symbols, out))


# ----------------------------------------------------------------------------- tools


def _module_origin(name: str) -> Path | None:
    """Where an installed top-level module lives, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # sys.modules[name] is None: the module is deliberately blocked
        return None
    return Path(spec.origin) if spec is not None and spec.origin is not None else None


def _triton_bin_dir() -> Path | None:
    """The triton wheel's bundled CUDA tools (found without importing triton)."""
    origin = _module_origin("triton")
    if origin is None:
        return None
    path = origin.parent / "backends" / "nvidia" / "bin"
    return path if path.is_dir() else None


def cuda_roots(nvcc: str | None) -> list[Path]:
    """CUDA toolkit roots to look in: $CUDA_HOME, $CUDA_PATH, nvcc's, /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    return [Path(r) for r in dict.fromkeys(r for r in roots if r)]


def find_nvcc() -> str | None:
    """``nvcc`` on PATH or in ``$CUDA_HOME/bin``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in cuda_roots(None):
        if (root / "bin" / "nvcc").is_file():
            return str(root / "bin" / "nvcc")
    return None


def find_cuobjdump(prefer_triton: bool, nvcc: str | None = None) -> str | None:
    """A ``cuobjdump`` that can read the cubins at hand.

    Triton's cubins come from the ptxas inside its wheel, so its own cuobjdump (same toolkit)
    goes first for them; nvcc's cubins prefer the toolkit of that nvcc. Either falls back to the
    other and to PATH.
    """
    toolkit = [root / "bin" / "cuobjdump" for root in cuda_roots(nvcc)]
    triton_bin = _triton_bin_dir()
    wheel = [triton_bin / "cuobjdump"] if triton_bin else []
    on_path = shutil.which("cuobjdump")
    candidates = (wheel + toolkit if prefer_triton else toolkit + wheel)
    candidates += [Path(on_path)] if on_path else []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _run_tool(cmd: Sequence[str], timeout: float = 300) -> str:
    """Run a tool and return stdout; a failure raises with the tool's first error line."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(_first_error_line(proc.stderr or proc.stdout)
                           or f"{Path(cmd[0]).name} exited with {proc.returncode}")
    return proc.stdout


def _first_error_line(text: str) -> str:
    """The most telling single line of a compiler's error output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else ""


def inspect_cubin(cuobjdump: str, cubin: Path) -> tuple[dict[str, ResourceUsage],
                                                        dict[str, SassCounts]]:
    """Resource usage and SASS counts of every function in a cubin."""
    usage = parse_resource_usage(_run_tool([cuobjdump, "--dump-resource-usage", str(cubin)]))
    sass = parse_sass(_run_tool([cuobjdump, "-sass", str(cubin)]))
    return usage, sass


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
    """One kernel configuration on one target (and GPU, where known) for one (batch, dtype)."""

    backend: str
    kernel: str
    target: str
    config: str
    batch: int | None
    dtype: str
    hot: bool
    matrix_work: bool
    gpu: str = "-"
    sm_count: int | None = None
    grid: int | None = None
    threads: int | None = None
    small_grid_reason: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    static_shared_bytes: int | None = None
    tensor_core_instructions: dict[str, int] = dataclasses.field(default_factory=dict)
    local_instructions: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: int | None = None
    min_bytes: int | None = None
    cubin: str | None = None
    compile_seconds: float | None = None
    error: str | None = None

    @property
    def waves(self) -> float | None:
        """The grid in waves of the GPU's SMs (one thread block per SM per wave)."""
        if self.grid is None or not self.sm_count:
            return None
        return self.grid / self.sm_count

    @property
    def floor_us(self) -> float | None:
        """Floor time on an H100 in µs: the slower of compute and memory traffic."""
        if self.flops is None or self.min_bytes is None:
            return None
        flops_rate = H100_FLOPS.get(self.dtype, H100_FLOPS["bf16"])
        return max(self.flops / flops_rate, self.min_bytes / H100_BYTES_PER_S) * 1e6

    def record(self) -> dict[str, Any]:
        """The row as a JSON record with the keys in ``JSON_KEYS``."""
        values = dataclasses.asdict(self)
        values["floor_us"] = self.floor_us
        values["waves"] = self.waves
        return {key: values[key] for key in JSON_KEYS}


@dataclasses.dataclass
class Report:
    """Rows plus one-line reasons for whatever could not be reported."""

    rows: list[Row] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Options:
    """What to compile (targets, SAM 2 batch sizes, dtypes), from where, into where, how wide,
    and where inspected cubins of earlier runs are kept (None: nowhere)."""

    targets: tuple[str, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    cubin_dir: Path
    csrc_dir: Path
    jobs: int = 1
    cache_dir: Path | None = None


def _apply_usage(row: Row, usage: ResourceUsage | None, sass: SassCounts | None,
                 dynamic_shared: int) -> None:
    if usage is None or sass is None:
        row.error = "function missing from cuobjdump output"
        return
    row.registers = usage.registers
    # STACK holds spilled registers and local arrays alike: both are local-memory traffic.
    row.spill_bytes = usage.stack + usage.local
    row.static_shared_bytes = usage.shared
    row.shared_bytes = usage.shared + dynamic_shared
    row.tensor_core_instructions = dict(sass.tensor_core)
    row.local_instructions = {"STL": sass.stl, "LDL": sass.ldl}


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$MEMENC_FAST_CACHE_DIR``, else ``memenc_fast/kernel_report`` in the user's cache
    directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    explicit = os.environ.get("MEMENC_FAST_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memenc_fast" / "kernel_report"


def _inspection_record(usage: dict[str, ResourceUsage], sass: dict[str, SassCounts],
                       **extra: Any) -> dict[str, Any]:
    return {"usage": {name: dataclasses.asdict(u) for name, u in usage.items()},
            "sass": {name: dataclasses.asdict(s) for name, s in sass.items()}, **extra}


def _inspection_of(record: dict[str, Any]) -> tuple[dict[str, ResourceUsage], dict[str, SassCounts]]:
    return ({name: ResourceUsage(**u) for name, u in record["usage"].items()},
            {name: SassCounts(**s) for name, s in record["sass"].items()})


@dataclasses.dataclass(frozen=True)
class CubinCache:
    """Cubins and what ``cuobjdump`` said of them, by a hash of everything their compile depends
    on; ``directory`` None keeps nothing. Entries are written whole or not at all (worker
    processes share the directory), and a cache that cannot be read or written costs only time."""

    directory: Path | None

    @staticmethod
    def key(*parts: object) -> str:
        """The cache key of a compile described by ``parts`` (their reprs)."""
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def load(self, key: str, cubin: Path) -> dict[str, Any] | None:
        """The record stored under ``key``, with its cubin copied to ``cubin``; None if absent."""
        if self.directory is None:
            return None
        try:
            record = json.loads((self.directory / f"{key}.json").read_text())
            shutil.copyfile(self.directory / f"{key}.cubin", cubin)
        except (OSError, ValueError):
            return None
        return record

    def store(self, key: str, cubin: Path, record: dict[str, Any]) -> None:
        """Keeps ``cubin`` and ``record`` under ``key``."""
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for suffix, write in ((".cubin", lambda p: shutil.copyfile(cubin, p)),
                                  (".json", lambda p: p.write_text(json.dumps(record)))):
                partial = self.directory / f"{key}{suffix}.{os.getpid()}.tmp"
                write(partial)
                os.replace(partial, self.directory / f"{key}{suffix}")
        except OSError:
            pass


# ----------------------------------------------------------------------------- triton
#
# Triton kernels compile in child processes, in parallel (see report_triton), with
# TRITON_INTERPRET removed from their environment: a process that imported triton in
# interpreter mode (the tests do, on a CPU) holds interpreter objects even for triton.language's
# own @jit functions (tl.max, tl.sum, ...), and those cannot be compiled.

_WORKER_TIMEOUT_S = 1800


def _triton_fn(fn: object) -> Any:
    """The JITFunction under ``@triton.autotune``/``@triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")
    return fn


def _ast_source(spec: TritonKernelSpec) -> Any:
    """``ASTSource`` for a spec; its signature form is the same in triton 3.6 and 3.9."""
    from triton.compiler import ASTSource

    fn = _triton_fn(spec.fn)
    names = list(fn.arg_names)
    extra = (set(spec.signature) | set(spec.constexprs)) - set(names)
    if extra:
        raise ValueError(f"arguments {sorted(extra)} are not parameters of {fn.__name__}; "
                         f"expected names from {names}")
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for index, name in enumerate(names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.signature:
            signature[name] = spec.signature[name]
            if spec.signature[name].startswith("*") or name in spec.aligned_ints:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"argument {name!r} of {fn.__name__} has neither a type in "
                             "signature nor a value in constexprs")
    return ASTSource(fn, signature, dict(spec.constexprs), attrs)


def _spec_key(spec: TritonKernelSpec, target: str) -> str:
    """Identity of a compile: B=1 and B=64 often launch the very same configuration."""
    fn = spec.fn
    # JITFunction, Autotuner and Heuristics all keep what they wrap in .fn; the plain Python
    # function at the bottom names the kernel the same way in every run.
    while hasattr(fn, "fn"):
        fn = fn.fn
    text = repr((getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), target,
                 sorted(spec.signature.items()),
                 sorted((k, repr(v)) for k, v in spec.constexprs.items()), spec.num_warps,
                 spec.num_stages, sorted(spec.aligned_ints), spec.max_registers))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _compile_triton(spec: TritonKernelSpec, target: str, cubin_dir: Path, cuobjdump: str,
                    cache: CubinCache) -> Row:
    """Compile one spec for one target (or find it in ``cache``) into a row without batch,
    dtype and GPU."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(backend="triton", kernel=spec.kernel, target=target, config=spec.config,
              batch=None, dtype="-", hot=spec.hot, matrix_work=spec.matrix_work,
              threads=spec.num_warps * 32)
    try:
        source = _ast_source(spec)
    except (TypeError, ValueError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    name = f"triton_{spec.kernel}_{target}_{_spec_key(spec, target)}.cubin"
    key = CubinCache.key("triton", triton.__version__, _triton_fn(spec.fn).cache_key, _spec_key(spec, target))
    record = cache.load(key, cubin_dir / name)
    if record is None:
        started = time.perf_counter()
        try:
            options: dict[str, int] = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
            if spec.max_registers is not None:
                options["maxnreg"] = spec.max_registers
            compiled = triton.compile(source, target=GPUTarget("cuda", _arch_number(target), 32),
                                      options=options)
        except Exception as exc:  # noqa: BLE001 - any compiler failure is this row's result
            message = _first_error_line(str(exc)) or repr(exc)
            row.error = f"{type(exc).__name__}: {message}"
            return row
        row.compile_seconds = time.perf_counter() - started
        (cubin_dir / name).write_bytes(compiled.asm["cubin"])
        try:
            usage, sass = inspect_cubin(cuobjdump, cubin_dir / name)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            row.error = f"cuobjdump: {exc}"
            return row
        record = _inspection_record(usage, sass, symbol=compiled.metadata.name,
                                    shared=int(compiled.metadata.shared))
        cache.store(key, cubin_dir / name, record)
    usage, sass = _inspection_of(record)
    row.cubin = name
    _apply_usage(row, usage.get(record["symbol"]), sass.get(record["symbol"]), record["shared"])
    return row


def _error_row(kernel: str, error: str, batch: int | None = None, dtype: str = "-",
               target: str = "-", gpu: str = "-", backend: str = "triton") -> Row:
    return Row(backend=backend, kernel=kernel, target=target, config="-", batch=batch,
               dtype=dtype, hot=True, matrix_work=False, gpu=gpu, error=error)


# Triton's name of each torch dtype a pointer argument may point to, keyed by str(torch.dtype).
_POINTER_TYPES: dict[str, str] = {"torch.float32": "fp32", "torch.bfloat16": "bf16",
                                  "torch.float16": "fp16", "torch.int32": "i32"}


def spec_from_launch(launch: Launch) -> TritonKernelSpec:
    """The ``TritonKernelSpec`` of a kernel module's launch, each runtime argument typed as
    Triton types it at launch: a tensor as a pointer to its dtype, a float as fp32, an int as
    i32 or i64 (one equal to 1 becomes a constant, and one divisible by 16 is marked aligned, as
    Triton specialises them)."""
    signature: dict[str, str] = {}
    constexprs = dict(launch.constexprs)
    aligned = []
    for name, value in launch.args.items():
        if isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int) and not isinstance(value, bool):
            if value == 1:
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
        else:
            dtype = str(getattr(value, "dtype", type(value).__name__))
            if dtype not in _POINTER_TYPES:
                raise ValueError(f"{launch.kernel}: argument {name!r}: expected a float32, "
                                 f"bfloat16, float16 or int32 tensor, an int or a float, got {dtype}")
            signature[name] = "*" + _POINTER_TYPES[dtype]
    return TritonKernelSpec(
        kernel=launch.kernel, fn=launch.fn, signature=signature, constexprs=constexprs,
        num_warps=launch.num_warps, num_stages=launch.num_stages, config=launch.config,
        matrix_work=launch.matrix_work, hot=True, flops=launch.flops, min_bytes=launch.min_bytes,
        aligned_ints=tuple(aligned), max_registers=launch.max_registers)


def _kernel_modules(report: Report, discover: bool,
                    extra_modules: Sequence[Path]) -> list[ModuleType]:
    """The modules to report: ``memenc_fast.kernels``'s with ``report_launches``, then the extras.

    A module that fails to import becomes an error row: on the GPU machine it would fail too.
    """
    modules: list[ModuleType] = []
    if discover:
        try:
            package = importlib.import_module("memenc_fast.kernels")
        except ImportError as exc:
            report.skipped.append(f"no Triton kernels registered: memenc_fast.kernels is not "
                                  f"importable ({exc})")
        else:
            for info in pkgutil.iter_modules(package.__path__, prefix=package.__name__ + "."):
                try:
                    modules.append(importlib.import_module(info.name))
                except Exception as exc:  # noqa: BLE001 - a broken kernel module is a finding
                    report.rows.append(_error_row(info.name, f"import failed: "
                                                  f"{type(exc).__name__}: {exc}"))
    for path in extra_modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"expected a Python file for an extra kernel module, got {path}")
        module = importlib.util.module_from_spec(spec)
        # Registered so that triton (inspect, the cache key) finds the module like any other.
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return [m for m in modules if callable(getattr(m, "report_launches", None))]


def _compile_modules(target: str, dtype: str, batches: Sequence[int], modules: Sequence[ModuleType],
                     report: Report, compile_spec: Callable[[TritonKernelSpec], Row]) -> None:
    """Rows for every launch of ``modules`` on every report GPU of ``target`` (a worker's job);
    ``compile_spec`` compiles a spec for ``target`` once, however many GPUs and batches run it."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for gpu in report_gpus((target,)):
        for module in modules:
            for batch in batches:
                try:
                    launches = list(module.report_launches(batch, torch_dtype, gpu))
                    specs = [spec_from_launch(launch) for launch in launches]
                except Exception as exc:  # noqa: BLE001 - a broken launch list is a finding
                    report.rows.append(_error_row(module.__name__, f"report_launches failed: "
                                                  f"{type(exc).__name__}: {exc}", batch, dtype,
                                                  target, gpu.name))
                    continue
                for launch, spec in zip(launches, specs):
                    report.rows.append(dataclasses.replace(
                        compile_spec(spec), kernel=spec.kernel, config=spec.config, batch=batch,
                        dtype="tf32" if launch.tf32 else dtype, hot=spec.hot, matrix_work=spec.matrix_work, flops=spec.flops,
                        min_bytes=spec.min_bytes, gpu=gpu.name, sm_count=gpu.sm_count,
                        grid=launch.programs, small_grid_reason=launch.small_grid_reason))


def triton_worker(task_file: str) -> None:
    """Child-process entry: compile what the JSON task in ``task_file`` names, write the result.

    The task holds ``units`` (``[target, dtype]`` pairs), ``batches``, ``cubin_dir``,
    ``cache_dir`` (or null), ``discover``, ``extra_modules`` (file paths), ``cuobjdump``,
    ``sys_path`` and ``result`` (where the rows go, as JSON).
    """
    task = json.loads(Path(task_file).read_text())
    report = Report()
    modules = _kernel_modules(report, task["discover"], [Path(p) for p in task["extra_modules"]])
    cache = CubinCache(Path(task["cache_dir"]) if task["cache_dir"] else None)
    compiled: dict[str, Row] = {}
    for target, dtype in task["units"] if modules else []:
        def compile_spec(spec: TritonKernelSpec, target: str = target) -> Row:
            key = _spec_key(spec, target)
            if key not in compiled:
                compiled[key] = _compile_triton(spec, target, Path(task["cubin_dir"]), task["cuobjdump"],
                                                cache)
            return compiled[key]

        _compile_modules(target, dtype, task["batches"], modules, report, compile_spec)
    if not modules and not report.skipped:
        report.skipped.append("no Triton kernels registered")
    Path(task["result"]).write_text(json.dumps({
        "rows": [dataclasses.asdict(row) for row in report.rows], "skipped": report.skipped,
        "compiles": len(compiled),
        "cached": sum(1 for r in compiled.values() if r.error is None and r.compile_seconds is None),
        "compile_seconds": [r.compile_seconds for r in compiled.values()
                            if r.compile_seconds is not None]}))


# The child takes this process's sys.path first, so it imports the very same memenc_fast (a
# checkout run from its root, an editable install, or an installed copy) and kernel modules.
_WORKER_CODE = ("import json, sys; sys.path[:] = json.load(open(sys.argv[1]))['sys_path']; "
                "from memenc_fast.tools.kernel_report import triton_worker; triton_worker(sys.argv[1])")


def _kernels_package_missing(report: Report) -> bool:
    """Whether ``memenc_fast.kernels`` cannot be found; says so in ``report`` if so.

    Checked here so that no worker process starts only to find nothing.
    """
    try:
        if importlib.util.find_spec("memenc_fast.kernels") is not None:
            return False
        reason = "No module named 'memenc_fast.kernels'"
    except ImportError as exc:
        reason = str(exc)
    report.skipped.append(f"no Triton kernels registered: memenc_fast.kernels is not importable "
                          f"({reason})")
    return True


def _share_out(units: list[list[str]], workers: int) -> list[list[list[str]]]:
    """``units`` ([target, dtype]) among ``workers``, heaviest first to the least loaded: 16-bit
    units compile about 1.5 times the kernels of fp32 ones (autocast weights and fused out_proj
    against IEEE and TF32 dots),
    and sm_89 stands for two GPUs."""
    def weight(unit: list[str]) -> int:
        return (2 if unit[1] == "fp32" else 3) * (2 if unit[0] == "sm_89" else 1)

    shares: list[list[list[str]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for unit in sorted(units, key=weight, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(unit)
        loads[least] += weight(unit)
    return shares


def report_triton(options: Options, report: Report, extra_modules: Sequence[Path] = (),
                  discover: bool = True) -> None:
    """Add a row per Triton launch, report GPU, batch and dtype to ``report``.

    ``discover`` reports the modules of ``memenc_fast.kernels``; ``extra_modules`` are Python
    files with a ``report_launches`` reported beside them. The (target, dtype) pairs are shared
    out among ``options.jobs`` worker processes; the GPUs and batches of one pair share a worker,
    so a configuration several of them launch compiles once.
    """
    if not discover and not extra_modules:
        return
    if _module_origin("triton") is None:
        report.skipped.append("Triton rows skipped: triton is not installed")
        return
    if _module_origin("torch") is None:
        report.skipped.append("Triton rows skipped: torch is not installed "
                              "(report_launches takes a torch.dtype)")
        return
    cuobjdump = find_cuobjdump(prefer_triton=True)
    if cuobjdump is None:
        report.skipped.append("Triton rows skipped: cuobjdump not found (triton wheel, CUDA "
                              "toolkit, PATH)")
        return
    if discover and _kernels_package_missing(report):
        discover = False
        if not extra_modules:
            return
    units = [[target, dtype] for target in options.targets for dtype in options.dtypes
             if dtype != "bf16" or TARGET_LIMITS[target].bf16]
    jobs = max(1, min(options.jobs, len(units)))
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="memenc-triton-") as scratch:
        workers = []
        for index, share in enumerate(_share_out(units, jobs)):
            task = {"units": share, "batches": list(options.batches),
                    "cubin_dir": str(options.cubin_dir),
                    "cache_dir": str(options.cache_dir) if options.cache_dir else None,
                    "discover": discover, "extra_modules": [str(p) for p in extra_modules],
                    "cuobjdump": cuobjdump, "sys_path": sys.path,
                    "result": str(Path(scratch) / f"{index}.json")}
            task_file = Path(scratch) / f"{index}.task.json"
            task_file.write_text(json.dumps(task))
            log = open(Path(scratch) / f"{index}.log", "w+")  # noqa: SIM115 - closed below
            workers.append((task, log, subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, str(task_file)], stdout=log,
                stderr=subprocess.STDOUT, env=env)))
        seconds: list[float] = []
        distinct = cached = 0
        for task, log, proc in workers:
            try:
                code = proc.wait(timeout=_WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.seek(0)
            output = log.read()
            log.close()
            if code != 0 or not Path(task["result"]).is_file():
                what = ", ".join(f"{t} {d}" for t, d in task["units"])
                report.rows.append(_error_row(
                    "(worker)", f"Triton compile worker for {what} exited with {code}: "
                    f"{_first_error_line(output) or 'no output'}"))
                continue
            result = json.loads(Path(task["result"]).read_text())
            distinct += result["compiles"]
            cached += result["cached"]
            seconds += _merge_worker_result(report, result)
    if distinct:
        compiled = (f"{len(seconds)} compiled, {sum(seconds):.1f} s ({sum(seconds) / len(seconds):.2f} s each)"
                    if seconds else "none compiled")
        report.notes.append(
            f"triton {_version('triton')}: {distinct} distinct kernels, {compiled}, {cached} from the "
            f"cache, in {jobs} processes, {time.perf_counter() - started:.1f} s wall")


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _merge_worker_result(report: Report, result: dict[str, Any]) -> list[float]:
    """Add a worker's rows; what every worker says alike (skips, import errors) comes once.

    Returns the worker's compile times.
    """
    for row in (Row(**fields) for fields in result["rows"]):
        if row.target == "-" and row.batch is None and row in report.rows:
            continue
        report.rows.append(row)
    for line in result["skipped"]:
        if line not in report.skipped:
            report.skipped.append(line)
    return list(result["compile_seconds"])


# ----------------------------------------------------------------------------- cuda


_SIDECAR_TYPES: dict[str, type] = {
    "hot": bool, "matrix_work": bool, "flops_per_object": int, "min_bytes_per_object": int,
    "dynamic_shared_bytes": int,
}


def load_sidecar(path: Path) -> dict[str, dict[str, Any]]:
    """Read and check ``csrc/kernels.json`` (format in the module docstring); ``{}`` if absent."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected an object mapping kernel names to entries, "
                         f"got {type(data).__name__}")
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path.name}: entry {name!r}: expected an object, "
                             f"got {type(entry).__name__}")
        for key, value in entry.items():
            expected = _SIDECAR_TYPES.get(key)
            if expected is None:
                raise ValueError(f"{path.name}: entry {name!r}: unknown key {key!r}; expected "
                                 f"one of {sorted(_SIDECAR_TYPES)}")
            # bool is an int in Python: a flag given where a count belongs is a mistake.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"{path.name}: entry {name!r}: {key} must be "
                                 f"{expected.__name__}, got {value!r}")
    return data


def _sidecar_entry(sidecar: dict[str, dict[str, Any]], kernel: str, template: str) -> dict[str, Any]:
    unqualified = kernel.rsplit("::", 1)[-1]
    return next((sidecar[key] for key in (f"{kernel}<{template}>", kernel, f"{unqualified}<{template}>",
                                          unqualified) if key in sidecar), {})


def _nvcc_command(nvcc: str, source: Path, cubin: Path, target: str) -> list[str]:
    arch = target.removeprefix("sm_")
    includes = ["-I", str(source.parent)]
    torch_origin = _module_origin("torch")
    if torch_origin is not None:
        # A binding file may include torch's (stable ABI) headers; kernel files ignore them.
        torch_include = torch_origin.parent / "include"
        includes += ["-I", str(torch_include),
                     "-I", str(torch_include / "torch" / "csrc" / "api" / "include")]
    return [nvcc, "-cubin", "-O3", "-std=c++17",
            "-gencode", f"arch=compute_{arch},code=sm_{arch}", *includes,
            str(source), "-o", str(cubin)]


def _files_digest(paths: Iterable[Path]) -> bytes:
    """SHA-256 of files' names and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def sources_digest(csrc_dir: Path) -> int:
    """The digest the built library records of the sources it was compiled from
    (``memenc_fast_sources_digest``): the first 64 bits, big-endian, of the SHA-256 of every
    ``.cu``, ``.cuh`` and ``.h`` file in ``csrc_dir`` (names and bytes, sorted by name). The build
    (``build_tools/cuda_build.py``, which an installed package does not have) computes the same;
    tests/test_kernel_report.py checks that they agree."""
    sources = sorted(p for p in csrc_dir.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    return int.from_bytes(_files_digest(sources)[:8], "big")


def _cuda_compile_key(nvcc: str, nvcc_version: str, source: Path, target: str) -> str:
    """What a csrc compile depends on: the compiler, torch (whose headers a binding includes),
    the source, every header beside it, and the command, but not where any of them is."""
    headers = sorted(p for p in source.parent.iterdir() if p.suffix in (".h", ".cuh", ".hpp", ".inc"))
    # The command for a stand-in csrc/, torch's include paths reduced to their last part: csrc/
    # copied beside an installed package, another checkout or another environment compiles the
    # same bytes the same way (nvcc_version names the compiler).
    command = [Path(part).name if os.path.isabs(part) else part
               for part in _nvcc_command("nvcc", Path("csrc", source.name), Path("out.cubin"), target)]
    return CubinCache.key("nvcc", nvcc_version, _version("torch"), command,
                          _files_digest([source, *headers]).hex())


def _tool_version(tool: str) -> str:
    try:
        return _run_tool([tool, "--version"], timeout=60).strip().splitlines()[-1]
    except (RuntimeError, OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


@dataclasses.dataclass(frozen=True)
class _CudaFunction:
    """One ``__global__`` function of a compiled csrc file."""

    kernel: str
    template: str
    usage: ResourceUsage
    sass: SassCounts | None
    cubin: str
    compile_seconds: float | None


def _normalized(name: str) -> str:
    return re.sub(r"\s+", "", name)


def _cuda_report_launches(options: Options, report: Report) -> Callable[..., Any] | None:
    """``memenc_fast.backends.cuda.report_launches`` where it answers and the library it reads was
    built from the sources in ``options.csrc_dir`` (wherever they are), or None, with a note saying
    why, where rows come per compiled function (without grids)."""
    why = None
    if _module_origin("torch") is None:
        why = "torch is not installed"
    else:
        try:
            import torch

            module = importlib.import_module("memenc_fast.backends.cuda")
            launches = getattr(module, "report_launches", None)
            built_from, these = module.library.load().sources_digest, sources_digest(options.csrc_dir)
            if not callable(launches):
                why = "memenc_fast.backends.cuda has no report_launches"
            elif built_from != these:
                # Its plans pick among the tiles of other sources: they do not say what these launch.
                why = (f"the built CUDA library was compiled from other sources (sources digest "
                       f"{built_from:016x}; {options.csrc_dir} has {these:016x})")
            else:
                for gpu in report_gpus(options.targets)[:1]:
                    launches(1, torch.float32, torch.float32, gpu)
                return launches
        except Exception as exc:  # noqa: BLE001 - any failure here leaves the sidecar's rows
            why = f"memenc_fast.backends.cuda.report_launches is unusable here ({type(exc).__name__}: {exc})"
    report.notes.append(f"CUDA rows per compiled function, without grids, dynamic shared memory from "
                        f"kernels.json: {why}")
    return None


def report_cuda(options: Options, report: Report) -> None:
    """Add the rows of ``csrc/*.cu`` compiled for each target to ``report``: one per launch
    ``report_launches`` describes, report GPU, batch and dtype, or one per ``__global__``
    function, target and batch."""
    sources = sorted(options.csrc_dir.glob("*.cu")) if options.csrc_dir.is_dir() else []
    if not sources:
        report.skipped.append(f"no CUDA kernels: no .cu files in {options.csrc_dir}")
        return
    nvcc = find_nvcc()
    if nvcc is None:
        report.skipped.append("CUDA rows skipped: nvcc not found on PATH or in $CUDA_HOME/bin")
        return
    cuobjdump = find_cuobjdump(prefer_triton=False, nvcc=nvcc)
    if cuobjdump is None:
        report.skipped.append("CUDA rows skipped: cuobjdump not found (CUDA toolkit, PATH, "
                              "triton wheel)")
        return
    sidecar = load_sidecar(options.csrc_dir / "kernels.json")
    cache = CubinCache(options.cache_dir)
    nvcc_version = _tool_version(nvcc)

    def build(job: tuple[Path, str]) -> tuple[Path, dict[str, Any] | None, float | None, str | None]:
        source, target = job
        cubin = options.cubin_dir / f"cuda_{source.stem}_{target}.cubin"
        key = _cuda_compile_key(nvcc, nvcc_version, source, target)
        record = cache.load(key, cubin)
        if record is not None:
            return cubin, record, None, None
        started = time.perf_counter()
        try:
            _run_tool(_nvcc_command(nvcc, source, cubin, target))
            seconds = time.perf_counter() - started
            record = _inspection_record(*inspect_cubin(cuobjdump, cubin))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            return cubin, None, None, str(exc)
        cache.store(key, cubin, record)
        return cubin, record, seconds, None

    jobs = [(source, target) for source in sources for target in options.targets]
    started = time.perf_counter()
    # nvcc runs as its own process: threads are enough to keep every core busy.
    with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        built = list(pool.map(build, jobs))
    wall = time.perf_counter() - started
    functions: dict[str, dict[str, _CudaFunction]] = {target: {} for target in options.targets}
    for (source, target), (cubin, record, seconds, error) in zip(jobs, built):
        if record is None:
            report.rows.append(_error_row(source.name, str(error), target=target, backend="cuda"))
            continue
        usage, sass = _inspection_of(record)
        names = demangle(sorted(usage))
        for symbol in sorted(usage, key=lambda s: names[s]):
            kernel, template = split_kernel_name(names[symbol])
            functions[target][_normalized(f"{kernel}<{template}>" if template else kernel)] = _CudaFunction(
                kernel, template, usage[symbol], sass.get(symbol), cubin.name, seconds)
    launches_of = _cuda_report_launches(options, report)
    if launches_of is None:
        for target, by_name in functions.items():
            launched, left_out = _launchable_functions(list(by_name.values()), target, sidecar)
            for function in launched:
                report.rows.extend(_cuda_rows(function, target, sidecar, options))
            if left_out:
                report.notes.append(
                    f"{target}: left out {len(left_out)} instantiations no plan launches there, their dynamic "
                    f"shared memory over the {TARGET_LIMITS[target].per_block_max} bytes a block gets where a "
                    "smaller tile fits: " + ", ".join(f"{f.kernel}<{f.template}>" for f in left_out))
    else:
        report.rows.extend(_cuda_launch_rows(launches_of, functions, sidecar, options))
    compiled = [seconds for _, _, seconds, _ in built if seconds is not None]
    report.notes.append(f"nvcc: {len(jobs)} files x targets, {len(compiled)} compiled "
                        f"({sum(compiled):.1f} s), {sum(1 for b in built if b[1] is not None) - len(compiled)} "
                        f"from the cache, {wall:.1f} s wall")


def _launchable_functions(functions: Sequence[_CudaFunction], target: str,
                         sidecar: dict[str, dict[str, Any]]) -> tuple[list[_CudaFunction], list[_CudaFunction]]:
    """``(kept, left out)``: the compiled functions of ``target`` some plan may launch there, and
    the instantiations none does, judged without the plans (the report's fallback).

    Every plan chooses among a kernel's tiles (csrc/common.cuh: ``fill_a_wave``, ``most_blocks``;
    mask_downsample.cu: ``stage4_tile``) only those whose dynamic shared memory fits the GPU's
    per-block limit, and the tile is an instantiation's last template argument: an instantiation
    over the limit (``dynamic_shared_bytes`` in kernels.json) is left out where another tile of
    the same kernel and other template arguments fits. Where none fits, the plan refuses every
    launch, so its rows stay, to be flagged.
    """
    limit = TARGET_LIMITS[target].per_block_max

    def fits(function: _CudaFunction) -> bool:
        entry = _sidecar_entry(sidecar, function.kernel, function.template)
        return entry.get("dynamic_shared_bytes", 0) <= limit

    def family(function: _CudaFunction) -> tuple[str, str]:
        return function.kernel, function.template.rpartition(",")[0]

    fitting = {family(f) for f in functions if fits(f)}
    left_out = [f for f in functions if not fits(f) and family(f) in fitting]
    return [f for f in functions if f not in left_out], left_out


def _cuda_rows(function: _CudaFunction, target: str, sidecar: dict[str, dict[str, Any]],
               options: Options) -> list[Row]:
    """A compiled function's rows per batch, where no launch says how it runs."""
    dtype = dtype_of_template(function.template)
    if dtype != "-" and (dtype not in options.dtypes or (dtype == "bf16" and not TARGET_LIMITS[target].bf16)):
        return []
    meta = _sidecar_entry(sidecar, function.kernel, function.template)
    rows = []
    for batch in options.batches:
        row = Row(backend="cuda", kernel=function.kernel, target=target, config=function.template or "-",
                  batch=batch, dtype=dtype, hot=meta.get("hot", True),
                  matrix_work=meta.get("matrix_work", False), cubin=function.cubin,
                  compile_seconds=function.compile_seconds)  # the whole file's nvcc time
        if "flops_per_object" in meta:
            row.flops = meta["flops_per_object"] * batch
        if "min_bytes_per_object" in meta:
            row.min_bytes = meta["min_bytes_per_object"] * batch
        _apply_usage(row, function.usage, function.sass, meta.get("dynamic_shared_bytes", 0))
        rows.append(row)
    return rows


_LAUNCH_KEYS: dict[str, tuple[type, ...]] = {"kernel": (str,), "grid": (int, list, tuple),
                                             "block": (int, list, tuple), "dynamic_smem": (int,),
                                             "config": (str,)}


def _count(value: int | Sequence[int]) -> int:
    """A grid or block size given as a total or as its dimensions."""
    if isinstance(value, int):
        return value
    total = 1
    for size in value:
        total *= int(size)
    return total


def _cuda_launch_rows(launches_of: Callable[..., Any], functions: dict[str, dict[str, _CudaFunction]],
                      sidecar: dict[str, dict[str, Any]], options: Options) -> list[Row]:
    """A row per launch of ``report_launches`` on each report GPU, batch, dtype and weight dtype
    (the activations' and fp32), read off the compiled function it names."""
    import torch

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows: list[Row] = []
    for gpu in report_gpus(options.targets):
        for batch in options.batches:
            for dtype in options.dtypes:
                if dtype == "bf16" and not gpu.bf16:
                    continue
                for weights in dict.fromkeys((dtype, "fp32")):
                    where = dict(batch=batch, dtype=dtype, target=gpu.arch, gpu=gpu.name, backend="cuda")
                    try:
                        launches = list(launches_of(batch, torch_dtypes[dtype], torch_dtypes[weights], gpu))
                    except Exception as exc:  # noqa: BLE001 - a broken launch list is a finding
                        rows.append(_error_row("report_launches", f"report_launches(weights {weights}) failed: "
                                                                  f"{type(exc).__name__}: {exc}", **where))
                        continue
                    for launch in launches:
                        rows.append(_cuda_launch_row(launch, functions[gpu.arch], sidecar, gpu, where))
    return rows


def _cuda_launch_row(launch: Any, functions: dict[str, _CudaFunction], sidecar: dict[str, dict[str, Any]],
                     gpu: GpuSpec, where: dict[str, Any]) -> Row:
    bad = [key for key, types in _LAUNCH_KEYS.items()
           if not isinstance(launch, dict) or not isinstance(launch.get(key), types)]
    if bad:
        named = launch.get("kernel") if isinstance(launch, dict) else None
        return _error_row(named if isinstance(named, str) else "report_launches",
                          f"a launch must be a dict with {', '.join(_LAUNCH_KEYS)}; "
                          f"{', '.join(bad)} missing or mistyped in {launch!r}", **where)
    name = _normalized(launch["kernel"])
    function = functions.get(name) or next(
        (f for key, f in functions.items() if key.rsplit("::", 1)[-1] == name), None)
    if function is None:
        return _error_row(launch["kernel"], f"no function {launch['kernel']} in the csrc cubins for "
                                            f"{gpu.arch}", **where)
    meta = _sidecar_entry(sidecar, function.kernel, function.template)
    template = f"<{function.template}> " if function.template else ""
    row = Row(backend="cuda", kernel=function.kernel, target=gpu.arch, config=template + launch["config"],
              batch=where["batch"], dtype=where["dtype"], hot=meta.get("hot", True),
              matrix_work=meta.get("matrix_work", False), gpu=gpu.name, sm_count=gpu.sm_count,
              grid=_count(launch["grid"]), threads=_count(launch["block"]),
              small_grid_reason=launch.get("small_grid_reason"), cubin=function.cubin,
              compile_seconds=function.compile_seconds)
    if "flops_per_object" in meta:
        row.flops = meta["flops_per_object"] * row.batch
    if "min_bytes_per_object" in meta:
        row.min_bytes = meta["min_bytes_per_object"] * row.batch
    _apply_usage(row, function.usage, function.sass, launch["dynamic_smem"])
    return row


# ----------------------------------------------------------------------------- checks, output


def violations(rows: Iterable[Row]) -> list[str]:
    """One line per broken CI rule (see the module docstring)."""
    found = []
    for row in rows:
        gpu = f" ({row.gpu})" if row.gpu != "-" else ""
        where = (f"{row.backend} {row.kernel} [{row.config}] {row.target}{gpu} "
                 f"B={row.batch if row.batch is not None else '-'} {row.dtype}")
        if row.error is not None:
            found.append(f"does not compile: {where}: {row.error}")
            continue
        if (row.matrix_work and expects_tensor_cores(row.backend, row.target, row.dtype)
                and not row.tensor_core_instructions):
            found.append(f"no tensor-core instruction: {where}: expected HMMA, HGMMA or UTC*MMA in a "
                         "matrix-work kernel, found none")
        local_insns = sum(row.local_instructions.values())
        if row.hot and ((row.spill_bytes or 0) > 0 or local_insns > 0):
            found.append(f"hot kernel spills: {where}: {row.spill_bytes} bytes of local memory "
                         f"per thread, STL {row.local_instructions.get('STL', 0)} / "
                         f"LDL {row.local_instructions.get('LDL', 0)}; expected none")
        limit = TARGET_LIMITS[row.target]
        if row.shared_bytes is not None and row.shared_bytes > limit.per_block_max:
            found.append(f"shared memory over the limit: {where}: {row.shared_bytes} bytes per "
                         f"block, limit {limit.per_block_max}")
        if row.static_shared_bytes is not None and row.static_shared_bytes > limit.static_max:
            found.append(f"static shared memory over the limit: {where}: "
                         f"{row.static_shared_bytes} bytes, limit {limit.static_max} without "
                         "opt-in")
        if row.registers is not None and row.registers > limit.registers_per_thread:
            found.append(f"registers over the limit: {where}: {row.registers} per thread, limit "
                         f"{limit.registers_per_thread}")
        # Registers are allocated per warp in units of 256: 8 per thread.
        if (row.registers is not None and row.threads is not None
                and -(-row.registers // 8) * 8 * row.threads > limit.registers_per_block):
            found.append(f"registers over the limit: {where}: {row.registers} per thread x {row.threads} "
                         f"threads, limit {limit.registers_per_block} per block")
        if (row.hot and row.batch == 1 and row.waves is not None and row.waves < 1
                and not row.small_grid_reason):
            found.append(f"hot kernel under one wave at B=1: {where}: {row.grid} blocks on "
                         f"{row.sm_count} SMs ({row.waves:.2f} waves); expected at least one "
                         "wave, or the launch's small_grid_reason")
    return found


def _human(value: float | None, unit: str) -> str:
    """``11.6G``-style text with three significant digits; ``-`` for unknown."""
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _microseconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}us" if value >= 100 else f"{value:.3g}us"


def sort_rows(rows: Sequence[Row]) -> list[Row]:
    """Rows by backend, batch and dtype, kernels in the order they came, configurations and
    targets together, each target's GPUs in the order of ``REPORT_GPUS``."""
    first_seen: dict[tuple[str, str], int] = {}
    gpu_order: dict[str, int] = {}
    for row in rows:
        first_seen.setdefault((row.backend, row.kernel), len(first_seen))
        gpu_order.setdefault(row.gpu, len(gpu_order))
    return sorted(rows, key=lambda r: (r.backend, r.batch or 0, r.dtype,
                                       first_seen[(r.backend, r.kernel)], r.config,
                                       _arch_number(r.target) if r.target != "-" else 0, gpu_order[r.gpu]))


def _grid_text(row: Row) -> str:
    if row.grid is None:
        return "-"
    return f"{row.grid} ({row.waves:.2f}w)" if row.waves is not None else str(row.grid)


def format_table(rows: Sequence[Row]) -> str:
    """The report as an aligned text table."""
    header = ("backend", "kernel", "target", "gpu", "B", "dtype", "config", "grid (waves)", "regs",
              "spill", "smem", "tensor cores", "FLOPs", "min bytes", "floor", "note")
    lines = [header]
    for row in rows:
        if row.error is not None:
            lines.append((row.backend, row.kernel, row.target, row.gpu, str(row.batch or "-"), row.dtype,
                          row.config, "", "ERROR", row.error[:60], "", "", "", "", "", ""))
            continue
        tensor = " ".join(f"{op}:{n}" for op, n in row.tensor_core_instructions.items()) or "-"
        spill = str(row.spill_bytes)
        if row.spill_bytes or sum(row.local_instructions.values()):
            spill += (f" (STL {row.local_instructions.get('STL', 0)}/"
                      f"LDL {row.local_instructions.get('LDL', 0)})")
        lines.append((row.backend, row.kernel, row.target, row.gpu, str(row.batch or "-"), row.dtype,
                      row.config, _grid_text(row), str(row.registers), spill, str(row.shared_bytes), tensor,
                      _human(row.flops, ""), _human(row.min_bytes, "B"), _microseconds(row.floor_us),
                      row.small_grid_reason or ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)


def _csv(value: str, what: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}; got {value!r}")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"expected values from {', '.join(allowed)}; got {', '.join(bad)}")
    return items


def _targets(value: str) -> tuple[str, ...]:
    return _csv(value, "targets", tuple(TARGET_LIMITS))


def _dtypes(value: str) -> tuple[str, ...]:
    return _csv(value, "dtypes", DTYPES)


def _batches(value: str) -> tuple[int, ...]:
    items = _csv(value, "batches")
    if not all(v.isdigit() and int(v) > 0 for v in items):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {value!r}")
    return tuple(int(v) for v in items)


def writable_folder(text: str) -> Path:
    """argparse type: a folder this process can write into, made now where it is missing (so a
    bad path fails before any work, also for root, whom permission bits do not stop)."""
    path = Path(text).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"expected a folder this user can write; got {text!r} "
                                         f"({exc.strerror})") from None
    return path


def writable_file(text: str) -> Path:
    """argparse type: a file path this process can write, tried by opening it for appending (a
    file that did not exist is removed again). Used by every subcommand; it lives here because the
    report's arguments are checked without torch."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file to write; got {text!r}, a folder")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"expected a file this user can write; got {text!r} "
                                         f"({exc.strerror})") from None
    if not existed:
        path.unlink()
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``kernels`` subcommand's options on ``parser``."""
    parser.add_argument("--json", metavar="FILE", type=writable_file,
                        help="write one JSON record per row to FILE")
    parser.add_argument("--cubin-dir", metavar="DIR", type=writable_folder,
                        help="keep the compiled cubins in DIR")
    parser.add_argument("--targets", type=_targets, default=tuple(TARGET_LIMITS),
                        help=f"comma-separated GPU targets (default: all: {','.join(TARGET_LIMITS)})")
    parser.add_argument("--batches", type=_batches, default=(1, 64),
                        help="comma-separated SAM 2 batch sizes (default: 1,64)")
    parser.add_argument("--dtypes", type=_dtypes, default=DTYPES,
                        help="comma-separated dtypes (default: bf16,fp16,fp32)")
    parser.add_argument("--csrc", metavar="DIR", type=Path, default=_REPO_ROOT / "csrc",
                        help="directory of the CUDA sources (default: the repository's csrc/)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes at once (default: the CPU count)")
    parser.add_argument("--cache-dir", metavar="DIR", type=writable_folder, default=None,
                        help="where inspected cubins of earlier runs are kept (default: "
                             "$MEMENC_FAST_CACHE_DIR or ~/.cache/memenc_fast/kernel_report)")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile everything, keeping nothing for later runs")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a kernel breaks a CI rule (each printed on one line)")


def collect(options: Options, extra_modules: Sequence[Path] = (),
            discover: bool = True) -> Report:
    """Compile and inspect everything (see ``report_triton`` for the two module arguments)."""
    report = Report()
    report.skipped += _bf16_skips(options.targets, options.dtypes)
    report_triton(options, report, extra_modules, discover)
    report_cuda(options, report)
    return report


def run(args: argparse.Namespace, extra_modules: Sequence[Path] = (),
        discover: bool = True) -> int:
    """Run the report for parsed arguments; returns the process exit code.

    ``extra_modules`` and ``discover`` let tests report their own kernels alone.
    """
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="memenc-cubins-") as scratch:
        cubin_dir = Path(args.cubin_dir) if args.cubin_dir else Path(scratch)
        cubin_dir.mkdir(parents=True, exist_ok=True)
        options = Options(targets=tuple(args.targets), batches=tuple(args.batches),
                          dtypes=tuple(args.dtypes), cubin_dir=cubin_dir,
                          csrc_dir=Path(args.csrc), jobs=args.jobs, cache_dir=cache_dir)
        try:
            report = collect(options, extra_modules, discover)
        except (ValueError, json.JSONDecodeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    rows = sort_rows(report.rows)
    for line in report.skipped:
        print(line)
    if not rows:
        print("error: compiled nothing (the lines above say what was missing and where it was "
              "looked for)", file=sys.stderr)
        return 1
    print(format_table(rows))
    for line in report.notes:
        print(line)
    found = violations(rows)
    for line in found:
        print(f"VIOLATION {line}")
    if args.json:
        Path(args.json).write_text(json.dumps([row.record() for row in rows], indent=1) + "\n")
    return 1 if (found and args.strict) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m memenc_fast.tools.kernel_report``."""
    parser = argparse.ArgumentParser(prog="python -m memenc_fast.tools.kernel_report",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
