"""Build step for the CUDA kernels in ``csrc/``: every ``*.cu`` there is compiled by nvcc into one
shared library, ``libmemenc_fast_cuda.so``, that ships inside the ``memenc_fast`` package (in
``memenc_fast/_lib/``). The files compile in parallel (one nvcc per file, each building its
architectures on several threads), then link.

setup.py drives this module; it is kept free of setuptools and torch so that tests can exercise
the pure parts (arch parsing, gencode flags, the nvcc command line, the ptxas report) and so that
it works inside pip's isolated build environment, where torch is not installed. nvcc is called
directly rather than through ``torch.utils.cpp_extension``, which refuses to build CUDA code
against a CPU-only torch.

Environment variables:

- ``MEMENC_FAST_CUDA_ARCHS``: target GPU architectures, separated by ``;`` or ``,``: ``80``,
  ``90a``, ``8.0``, ``sm_90`` are all accepted. Default ``75;80;86;89;90a;100a;120``: every GPU
  generation SAM 2 users run (T4, A100, A10/RTX 30xx, L4/RTX 40xx, H100, B200, RTX 50xx). Machine
  code is built for each, plus PTX for the highest one so that newer GPUs can JIT it. The list of
  embedded code is compiled into the library (``-DMEMENC_CUDA_ARCHS``), so the binding can tell a
  GPU it has no code for.
- ``MEMENC_FAST_BUILD_JOBS``: how many nvcc compile steps run at once (default: the CPU count).
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
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LIBRARY_NAME = "libmemenc_fast_cuda.so"
PTXAS_REPORT_NAME = "ptxas_report.txt"
DEFAULT_ARCHS: tuple[str, ...] = ("75", "80", "86", "89", "90a", "100a", "120")
ARCHS_ENV = "MEMENC_FAST_CUDA_ARCHS"
SKIP_ENV = "MEMENC_FAST_SKIP_CUDA"
JOBS_ENV = "MEMENC_FAST_BUILD_JOBS"

NVCC_FLAGS: tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "-Xcompiler",
    "-fPIC",
    # Only the extern "C" entry points (MF_EXPORT) are exported: the internals' inline and template
    # statics would otherwise be process-wide unique symbols, shared with any other copy or build
    # of the library loaded in the process.
    "-Xcompiler",
    "-fvisibility=hidden",
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
CUDA_ARCHS_MACRO = "MEMENC_CUDA_ARCHS"
SOURCES_DIGEST_MACRO = "MEMENC_SOURCES_DIGEST"
SOURCE_SUFFIXES = (".cu", ".cuh", ".h")

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


def embedded_code(archs: Sequence[str]) -> list[tuple[str, str]]:
    """(virtual arch, code) pairs for nvcc's ``-gencode``: machine code (SASS) for every arch, plus
    PTX for the highest.

    The PTX is emitted for the highest arch without its ``a``/``f`` suffix, because
    arch-specific PTX cannot be JIT-compiled for later GPUs, which is what shipping PTX is for.
    """
    if not archs:
        raise ValueError("no CUDA architecture to build for")
    pairs = [(f"compute_{arch}", f"sm_{arch}") for arch in archs]
    ptx_arch = str(max(_arch_key(arch)[0] for arch in archs))
    pairs.append((f"compute_{ptx_arch}", f"compute_{ptx_arch}"))
    return pairs


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """nvcc ``-gencode`` flags for :func:`embedded_code`."""
    return [f"-gencode=arch={virtual},code={code}" for virtual, code in embedded_code(archs)]


def archs_define(archs: Sequence[str]) -> str:
    """The nvcc flag that records the embedded code in the library (``csrc/library.cu`` reports it
    as ``sm_80/sm_90a/compute_90``: tokens it stringifies, so no quoting is needed; nvcc would split
    a value at commas)."""
    return f"-D{CUDA_ARCHS_MACRO}=" + "/".join(code for _, code in embedded_code(archs))


def compile_command(
    nvcc: str,
    source: Path,
    output: Path,
    archs: Sequence[str],
    include_dirs: Sequence[Path] = (),
    defines: Sequence[str] = (),
    threads: int = 1,
) -> list[str]:
    """The nvcc command line that compiles ``source`` into the object ``output``, for every arch on
    up to ``threads`` threads; ``defines`` are ``-D`` flags."""
    return [
        nvcc,
        *NVCC_FLAGS,
        f"--threads={threads}",
        *gencode_flags(archs),
        *defines,
        *(f"-I{directory}" for directory in include_dirs),
        "-c",
        str(source),
        "-o",
        str(output),
    ]


def link_command(nvcc: str, objects: Sequence[Path], output: Path) -> list[str]:
    """The nvcc command line that links ``objects`` into the shared library ``output``."""
    if not objects:
        raise ValueError("no CUDA object to link")
    return [nvcc, "-shared", *(str(o) for o in objects), "-o", str(output), *LINK_FLAGS]


def build_jobs(env: Mapping[str, str]) -> int:
    """How many compile steps run at once: ``MEMENC_FAST_BUILD_JOBS``, else the CPU count."""
    value = env.get(JOBS_ENV, "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{JOBS_ENV}: expected a positive integer, got {value!r}")
    return int(value)


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


def sources_digest(csrc_dir: Path) -> int:
    """The identity of what the build compiles: the first 64 bits of the SHA-256 of every source
    and header in ``csrc_dir`` (names and bytes, sorted by name). The library records it, so a
    ptxas report next to it can be told current or stale."""
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc_dir.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return int.from_bytes(digest.digest()[:8], "big")


def sources_define(csrc_dir: Path) -> str:
    """The nvcc flag that compiles :func:`sources_digest` into the library."""
    return f"-D{SOURCES_DIGEST_MACRO}=0x{sources_digest(csrc_dir):016x}ULL"


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


def _run(command: Sequence[str]) -> tuple[int, str]:
    """(exit status, stdout and stderr together) of ``command``."""
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    return completed.returncode, completed.stdout


def _failure(command: Sequence[str], returncode: int, output: str) -> CudaBuildError:
    return CudaBuildError(
        f"nvcc failed with exit status {returncode}.\n"
        f"command: {shlex.join(command)}\n{output}\n"
        f"(set {SKIP_ENV}=1 to install without the CUDA kernels)"
    )


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
    :class:`ValueError` for a bad ``MEMENC_FAST_CUDA_ARCHS`` or ``MEMENC_FAST_BUILD_JOBS``.
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
    jobs = build_jobs(env)
    output_dir.mkdir(parents=True, exist_ok=True)
    library = output_dir / LIBRARY_NAME
    header = csrc_dir / LAUNCH_ARGS_HEADER
    defines = [archs_define(archs), sources_define(csrc_dir),
               *([launch_args_define(header)] if header.is_file() else [])]
    log(f"{_LOG_PREFIX} building {library.name} for sm_{', sm_'.join(archs)} ({len(sources)} files, {jobs} jobs)")
    with tempfile.TemporaryDirectory(prefix="memenc_fast_cuda_") as object_dir:
        # The largest files start first. Each file's nvcc builds its archs on `jobs` threads, and
        # `jobs` files compile at once: the archs keep the cores busy while one file is left.
        by_size = sorted(sources, key=lambda source: source.stat().st_size, reverse=True)
        objects = [Path(object_dir) / f"{source.stem}.o" for source in by_size]
        commands = [compile_command(nvcc, source, obj, archs, [csrc_dir], defines, threads=jobs)
                    for source, obj in zip(by_size, objects)]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            compiled = list(pool.map(_run, commands))
        outputs = []
        for command, (returncode, output) in zip(commands, compiled):
            log(shlex.join(command))
            if output:
                log(output.rstrip())
            if returncode != 0:
                raise _failure(command, returncode, output)
            outputs.append(output)
        command = link_command(nvcc, objects, library)
        log(shlex.join(command))
        returncode, output = _run(command)
        if returncode != 0:
            raise _failure(command, returncode, output)
    stdout = "\n".join(outputs)
    kernels = parse_ptxas_report(stdout)
    table = format_resource_table(kernels)
    log(table)
    report = output_dir / PTXAS_REPORT_NAME
    # The first line names the targets (memenc_fast.tools.info reads it): a compile command.
    report.write_text(f"{shlex.join(commands[0])}\n\n{table}\n\n{stdout}")
    installed_header = None
    if header.is_file():
        installed_header = output_dir / header.name
        shutil.copyfile(header, installed_header)
    return CudaBuildResult(library=library, report=report, kernels=tuple(kernels), header=installed_header)
