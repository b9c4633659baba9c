"""Build step for the CUDA kernels in ``csrc/``: every ``*.cu`` there is compiled by nvcc into one
shared library, ``libmemenc_fast_cuda.so``, that ships inside the ``memenc_fast`` package (in
``memenc_fast/_lib/``).

setup.py drives this module; it is kept free of setuptools and torch so that tests can exercise
the pure parts (arch parsing, gencode flags, the nvcc command line, the ptxas report) and so that
it works inside pip's isolated build environment, where torch is not installed. nvcc is called
directly rather than through ``torch.utils.cpp_extension``, which refuses to build CUDA code
against a CPU-only torch.

Environment variables:

- ``MEMENC_FAST_CUDA_ARCHS``: target GPU architectures, separated by ``;`` or ``,``: ``80``,
  ``90a``, ``8.0``, ``sm_90`` are all accepted. Default ``80;86;89;90``. Machine code is built for
  each, plus PTX for the highest one so that newer GPUs can JIT it.
- ``MEMENC_FAST_SKIP_CUDA=1``: skip the CUDA build and install only the Python parts.
- ``CUDA_HOME``: where to look for nvcc first (then ``PATH``, then ``/usr/local/cuda``).

When ``csrc/`` holds ``launch_args.h`` (the launchers' argument structs, which the Python binding
parses at load time), its hash is compiled into the library (``-DMEMENC_LAUNCH_ARGS_HASH``) and the
header is installed next to it, so that the binding can refuse a library built from another version
of the header.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LIBRARY_NAME = "libmemenc_fast_cuda.so"
PTXAS_REPORT_NAME = "ptxas_report.txt"
DEFAULT_ARCHS: tuple[str, ...] = ("80", "86", "89", "90")
ARCHS_ENV = "MEMENC_FAST_CUDA_ARCHS"
SKIP_ENV = "MEMENC_FAST_SKIP_CUDA"

NVCC_FLAGS: tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "-Xcompiler",
    "-fPIC",
    "-shared",  # compile and link in one call, into a shared library
    "-lineinfo",
    "-Xptxas",
    "-v",  # ptxas prints registers, spills and shared memory per kernel
)
# The CUDA runtime is linked statically so the library needs no libcudart.so at run time (torch's
# CPU wheel has none, and a CUDA wheel's may be a different version); the static runtime itself
# needs libdl, librt and libpthread.
LINK_FLAGS: tuple[str, ...] = ("-lcudart_static", "-ldl", "-lrt", "-lpthread")

LAUNCH_ARGS_HEADER = "launch_args.h"
LAUNCH_ARGS_HASH_MACRO = "MEMENC_LAUNCH_ARGS_HASH"

_LOG_PREFIX = "memenc_fast:"
_TRUTHY = frozenset({"1", "true", "yes", "on"})
# "90", "90a", "100f", optionally "sm_"/"compute_" prefixed, or the dotted "9.0", "9.0a".
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(?:(\d{2,3})|(\d{1,2})\.(\d))([af]?)$")


class CudaBuildError(RuntimeError):
    """nvcc failed; the message carries the command and what nvcc printed."""


@dataclass(frozen=True)
class KernelResources:
    """One kernel's resource usage for one architecture, as reported by ``ptxas -v``."""

    name: str
    arch: str
    registers: int
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    smem_bytes: int = 0


@dataclass(frozen=True)
class CudaBuildResult:
    """What a successful build produced."""

    library: Path
    report: Path
    kernels: tuple[KernelResources, ...]
    header: Path | None = None  # launch_args.h, installed next to the library


def _arch_key(arch: str) -> tuple[int, str]:
    """Sort key: ``"90a"`` -> ``(90, "a")``, so 90 < 90a < 100."""
    digits = arch.rstrip("af")
    return int(digits), arch[len(digits) :]


def parse_archs(value: str | None) -> tuple[str, ...]:
    """Parse a ``MEMENC_FAST_CUDA_ARCHS`` value into normalized arch names such as ``"90a"``.

    Entries are separated by ``;`` or ``,``; blanks around them and empty entries are ignored.
    ``None`` or a blank string gives :data:`DEFAULT_ARCHS`. The result is sorted and
    deduplicated. Raises :class:`ValueError` naming the bad entry for anything else.
    """
    if value is None or not value.strip():
        return DEFAULT_ARCHS
    archs: set[str] = set()
    for entry in re.split(r"[;,]", value):
        entry = entry.strip()
        if not entry:
            continue
        match = _ARCH_RE.match(entry.lower())
        if match is None:
            raise ValueError(
                f"{ARCHS_ENV}: bad CUDA architecture {entry!r} in {value!r}; expected entries "
                "like 80, 86, 90a or 8.0, separated by ';' or ','"
            )
        plain, major, minor, suffix = match.groups()
        archs.add((plain or f"{major}{minor}") + suffix)
    if not archs:
        raise ValueError(f"{ARCHS_ENV}: no CUDA architecture in {value!r}")
    return tuple(sorted(archs, key=_arch_key))


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """nvcc ``-gencode`` flags: machine code (SASS) for every arch, plus PTX for the highest.

    The PTX is emitted for the highest arch without its ``a``/``f`` suffix, because
    arch-specific PTX cannot be JIT-compiled for later GPUs, which is what shipping PTX is for.
    """
    if not archs:
        raise ValueError("no CUDA architecture to build for")
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    ptx_arch = str(max(_arch_key(arch)[0] for arch in archs))
    flags.append(f"-gencode=arch=compute_{ptx_arch},code=compute_{ptx_arch}")
    return flags


def nvcc_command(
    nvcc: str,
    sources: Sequence[Path],
    output: Path,
    archs: Sequence[str],
    include_dirs: Sequence[Path] = (),
    defines: Sequence[str] = (),
) -> list[str]:
    """The single nvcc command line that compiles ``sources`` and links them into ``output``;
    ``defines`` are ``-D`` flags."""
    if not sources:
        raise ValueError("no CUDA source to compile")
    return [
        nvcc,
        *NVCC_FLAGS,
        *gencode_flags(archs),
        *defines,
        *(f"-I{directory}" for directory in include_dirs),
        *(str(source) for source in sources),
        "-o",
        str(output),
        *LINK_FLAGS,
    ]


def find_nvcc(
    env: Mapping[str, str], fallback_dirs: Sequence[str] = ("/usr/local/cuda/bin",)
) -> str | None:
    """Locate nvcc: ``$CUDA_HOME/bin``, then ``PATH``, then ``fallback_dirs``.

    ``CUDA_HOME`` comes first because setting it is an explicit choice of toolkit.
    """
    cuda_home = env.get("CUDA_HOME")
    search_paths = [
        *([str(Path(cuda_home) / "bin")] if cuda_home else []),
        env.get("PATH", ""),
        *fallback_dirs,
    ]
    return next(
        (found for path in search_paths if path and (found := shutil.which("nvcc", path=path))),
        None,
    )


def cuda_sources(csrc_dir: Path) -> list[Path]:
    """The ``*.cu`` files directly in ``csrc_dir``, sorted so the command line is stable."""
    return sorted(csrc_dir.glob("*.cu"))


def launch_args_hash(header: Path) -> int:
    """The hash of ``launch_args.h`` the library records: the first 64 bits of the SHA-256 of its
    bytes, big-endian, as ``memenc_fast/backends/cuda/library.py``'s ``header_hash`` computes it
    (this module cannot import the package: pip's isolated build has no torch)."""
    return int.from_bytes(hashlib.sha256(header.read_bytes()).digest()[:8], "big")


def launch_args_define(header: Path) -> str:
    """The nvcc flag that compiles ``header``'s hash into the library."""
    return f"-D{LAUNCH_ARGS_HASH_MACRO}=0x{launch_args_hash(header):016x}ULL"


def skip_reason(env: Mapping[str, str], sources: Sequence[Path], nvcc: str | None) -> str | None:
    """The one line to print when the CUDA build is skipped, or ``None`` when it should run."""
    if env.get(SKIP_ENV, "").strip().lower() in _TRUTHY:
        return f"{_LOG_PREFIX} {SKIP_ENV} is set; skipping the CUDA build"
    if not sources:
        return f"{_LOG_PREFIX} no .cu files in csrc/; nothing to build with nvcc"
    if nvcc is None:
        return (
            f"{_LOG_PREFIX} nvcc not found (CUDA_HOME, PATH, /usr/local/cuda); "
            "installing without CUDA kernels"
        )
    return None


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(text: str) -> list[KernelResources]:
    """Per-kernel resource usage from the ``ptxas -v`` lines of an nvcc log.

    ptxas also prints "Function properties" for non-inlined device functions; those lines are
    ignored unless they belong to the entry function being compiled.
    """
    kernels: list[KernelResources] = []
    entry: tuple[str, str] | None = None  # (kernel name, arch) being compiled
    frame = (0, 0, 0)  # stack, spill-store and spill-load bytes of that kernel
    properties_of: str | None = None
    for line in text.splitlines():
        if match := _ENTRY_RE.search(line):
            entry, frame, properties_of = (match.group(1), match.group(2)), (0, 0, 0), None
        elif match := _PROPERTIES_RE.search(line):
            properties_of = match.group(1)
        elif (match := _FRAME_RE.search(line)) and entry and properties_of == entry[0]:
            frame = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
        elif (match := _USED_RE.search(line)) and entry:
            smem = _SMEM_RE.search(line)
            kernels.append(
                KernelResources(
                    name=entry[0],
                    arch=entry[1],
                    registers=int(match.group(1)),
                    stack_bytes=frame[0],
                    spill_store_bytes=frame[1],
                    spill_load_bytes=frame[2],
                    smem_bytes=int(smem.group(1)) if smem else 0,
                )
            )
            entry = None
    return kernels


def format_resource_table(kernels: Sequence[KernelResources]) -> str:
    """A compact table of the ptxas report, one row per kernel and arch."""
    header = (
        f"{'arch':<8} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6} {'smem':>7}  kernel"
    )
    rows = [
        f"{k.arch:<8} {k.registers:>5} {k.spill_store_bytes:>9} {k.spill_load_bytes:>9} "
        f"{k.stack_bytes:>6} {k.smem_bytes:>7}  {k.name}"
        for k in kernels
    ]
    return "\n".join([header, *rows])


def build_cuda_library(
    csrc_dir: Path,
    output_dir: Path,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> CudaBuildResult | None:
    """Compile every ``csrc_dir/*.cu`` into ``output_dir/libmemenc_fast_cuda.so``.

    Returns ``None`` after logging one line when the build is skipped (``MEMENC_FAST_SKIP_CUDA``,
    no sources, no nvcc). Logs nvcc's output, which includes the ptxas report, and writes that
    report next to the library. Raises :class:`CudaBuildError` when nvcc fails and
    :class:`ValueError` for a bad ``MEMENC_FAST_CUDA_ARCHS``.
    """
    env = os.environ if env is None else env
    sources = cuda_sources(csrc_dir)
    nvcc = find_nvcc(env)
    reason = skip_reason(env, sources, nvcc)
    if reason is not None:
        log(reason)
        return None
    assert nvcc is not None  # skip_reason returned None, so nvcc was found

    archs = parse_archs(env.get(ARCHS_ENV))
    output_dir.mkdir(parents=True, exist_ok=True)
    library = output_dir / LIBRARY_NAME
    header = csrc_dir / LAUNCH_ARGS_HEADER
    defines = [launch_args_define(header)] if header.is_file() else []
    command = nvcc_command(nvcc, sources, library, archs, include_dirs=[csrc_dir], defines=defines)
    log(f"{_LOG_PREFIX} building {library.name} for sm_{', sm_'.join(archs)}")
    log(shlex.join(command))
    completed = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if completed.stdout:
        log(completed.stdout.rstrip())
    if completed.returncode != 0:
        raise CudaBuildError(
            f"nvcc failed with exit status {completed.returncode}.\n"
            f"command: {shlex.join(command)}\n{completed.stdout}\n"
            f"(set {SKIP_ENV}=1 to install without the CUDA kernels)"
        )

    kernels = parse_ptxas_report(completed.stdout)
    table = format_resource_table(kernels)
    log(table)
    report = output_dir / PTXAS_REPORT_NAME
    report.write_text(f"{shlex.join(command)}\n\n{table}\n\n{completed.stdout}")
    installed_header = None
    if header.is_file():
        installed_header = output_dir / header.name
        shutil.copyfile(header, installed_header)
    return CudaBuildResult(library=library, report=report, kernels=tuple(kernels), header=installed_header)
