"""``python -m memenc_fast info``: what memenc_fast runs with on this machine, for bug reports.

Versions, devices, which backend serves which device and dtype (or why not), and the CUDA library:
where it is, whether it loads, which GPU architectures it holds, whether its CUDA runtime serves this
machine's driver and each device. A machine without triton, the CUDA library or a GPU, or with a ROCm
build of torch, gets a line saying so, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from .. import __version__, dispatch
from ..backends import torch_ops
from ..backends.cuda import library
from ..dispatch import ENV_VAR, Backend, available_backends, current_backend, registered_backends
from ..gpus import gpu_spec
from .reporting import DTYPES, writable_file, write_json

__all__ = ["add_arguments", "run", "collect", "render", "fatbin_targets", "ptxas_report_targets", "KERNEL_DTYPES"]

Entries = Dict[str, object]
"""One section: key -> text, number, list of texts, or a nested section."""

KERNEL_DTYPES = ("fp32", "bf16", "fp16")
"""The dtypes asked of each backend per CUDA device: those the kernel backends are written for."""

PTXAS_REPORT = "ptxas_report.txt"
"""The build's ptxas report, next to the library: its first line is the nvcc command."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the ``info`` subcommand's options on ``parser``."""
    parser.add_argument("--json", dest="json_path", metavar="FILE", type=writable_file, default=None,
                        help="also write everything shown as JSON here")


def run(args: argparse.Namespace) -> int:
    """Prints what :func:`collect` finds (and writes it as JSON with ``--json``); returns 0."""
    info = collect()
    print(render(info))
    write_json(args.json_path, info)
    return 0


def collect() -> Dict[str, Entries]:
    """Every section ``info`` shows, as plain data (JSON-ready)."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "versions": _versions(),
        "devices": _devices(cuda_count),
        "backends": _backends(cuda_count),
        "cpu fast paths": _cpu_fast_paths(),
        "cuda library": _cuda_library(),
    }


def render(info: Mapping[str, Mapping[str, object]]) -> str:
    """``info`` as aligned ``key: value`` lines under each section's name."""
    lines: List[str] = []
    for section, entries in info.items():
        lines.append(section)
        lines += _render_entries(entries, indent=2)
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _render_entries(entries: Mapping[str, object], indent: int) -> List[str]:
    width = max((len(key) for key in entries), default=0) + 1
    lines = []
    for key, value in entries.items():
        if isinstance(value, Mapping):
            lines.append(f"{' ' * indent}{key}:")
            lines += _render_entries(value, indent + 2)
        else:
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append(f"{' ' * indent}{(key + ':').ljust(width)} {text}")
    return lines


def _probe(read: Callable[[], object]) -> object:
    """``read()``, or a line saying why it failed: on a machine missing a driver, a GPU or a
    toolchain, one failing probe must not hide what the others find."""
    try:
        return read()
    except Exception as err:  # noqa: BLE001 (any failure is a finding to show)
        return f"cannot be told: {type(err).__name__}: {err}"


# ---- versions and devices ------------------------------------------------------------------------


def _package_version(name: str) -> str:
    """The installed version of distribution ``name`` (read from its metadata, not imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> Entries:
    matplotlib = _package_version("matplotlib")
    return {
        "memenc_fast": f"{__version__} ({Path(__file__).resolve().parents[1]})",
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or _no_torch_cuda(),
        "triton": _package_version("triton"),
        "matplotlib": matplotlib + (" (bench --plot needs it)" if matplotlib == "not installed" else ""),
        "platform": platform.platform(),
    }


def _no_torch_cuda() -> str:
    return f"none (a ROCm build: HIP {torch.version.hip})" if torch.version.hip else "none (a CPU-only torch build)"


def _no_cuda_device() -> str:
    if torch.version.hip:
        return f"no CUDA device (torch is a ROCm build: HIP {torch.version.hip})"
    return "no CUDA device" + (" (torch is a CPU-only build)" if torch.version.cuda is None else "")


def _cuda_device(index: int) -> Entries:
    spec = gpu_spec(torch.device("cuda", index))
    memory = torch.cuda.get_device_properties(index).total_memory
    return {
        "name": spec.name,
        "compute capability": f"{spec.capability[0]}.{spec.capability[1]} ({spec.arch})",
        "SMs": spec.sm_count,
        "shared memory per block": f"{spec.shared_memory_per_block // 1024} KiB",
        "memory": f"{memory / 2**30:.1f} GiB",
    }


def _devices(cuda_count: int) -> Entries:
    devices: Entries = {
        "cpu": f"{platform.machine()}, {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads",
    }
    if cuda_count == 0:
        devices["cuda"] = _no_cuda_device()
    for index in range(cuda_count):
        devices[f"cuda:{index}"] = _probe(lambda: _cuda_device(index))
    return devices


# ---- backends ------------------------------------------------------------------------------------


def _serves(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    reason = backend.serve_reason(device, dtype, needs_grad=False)
    if reason is not None:
        return f"no: {reason}"
    skip = backend.auto_skip_reason(device, dtype)
    return "yes" if skip is None else f"yes, but auto passes it over: {skip}"


def _service_on(backend: Backend, device: torch.device) -> Union[str, Entries]:
    """Whether ``backend`` serves each kernel dtype on ``device``; one line when the answer is the
    same for all (as it is when the backend is not available at all)."""
    answers = {name: _probe(lambda: _serves(backend, device, DTYPES[name])) for name in KERNEL_DTYPES}
    distinct = set(answers.values())
    return f"{', '.join(answers)}: {distinct.pop()}" if len(distinct) == 1 else answers


def _in_force() -> str:
    name = current_backend()
    return f"{name} (from ${ENV_VAR})" if os.environ.get(ENV_VAR, "").strip() else name


def _backends(cuda_count: int) -> Entries:
    # Asking for the available backends imports each one's ops; one that fails to import is
    # disabled then, and only from then on does its availability say so.
    _probe(available_backends)
    entries: Entries = {"in force": _probe(_in_force)}
    for name in registered_backends():
        if name not in dispatch._registry:  # the reference: the unfused model itself, not a registered backend
            entries[name] = "available (the unfused PyTorch model: every device and dtype)"
            continue
        reason = _probe(dispatch._registry[name].availability)
        entries[name] = "available" if reason is None else f"not available: {reason}"
    entries["on cpu"] = _probe(lambda: available_backends("cpu"))
    entries["on cuda"] = _probe(lambda: available_backends("cuda")) if cuda_count else _no_cuda_device()
    for index in range(cuda_count):
        device = torch.device("cuda", index)
        entries[f"on cuda:{index}"] = {name: _service_on(dispatch._registry[name], device)
                                       for name in registered_backends() if name in dispatch._registry}
    return entries


def _cpu_fast_paths() -> Entries:
    """The torch backend's host-dependent CPU paths, each with this host's probe verdict."""
    verdicts = _probe(torch_ops.cpu_fast_paths)
    entries: Entries = {"ATen CPU capability": _probe(torch.backends.cpu.get_cpu_capability)}
    entries.update(verdicts if isinstance(verdicts, dict) else {"probes": verdicts})
    return entries


# ---- the CUDA library ----------------------------------------------------------------------------

_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_PTX, _FATBIN_CUBIN = 1, 2
# Entry flags that mark code for one arch only (sm_90a) or for a family (sm_120f), found by
# comparing what nvcc 13 writes for sm_90 / sm_90a / compute_90a / sm_100 / sm_100a / sm_100f / sm_120f.
_FATBIN_VARIANTS = ((0x100000, "a"), (0x200000, "f"))
_GENCODE = re.compile(r"\bcode=\[?([\w,]+)\]?")  # \b: not the "code=" inside "-gencode="


def _elf_section(data: bytes, wanted: str) -> Optional[bytes]:
    """The contents of section ``wanted`` of a 64-bit little-endian ELF file, None if it has none."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    table_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple:  # (name offset, type, flags, address, offset, size)
        return struct.unpack_from("<IIQQQQ", data, table_offset + index * entry_size)

    names_offset = header(names_index)[4]
    for index in range(count):
        name_offset, _, _, _, offset, size = header(index)
        start = names_offset + name_offset
        if data[start:data.index(b"\0", start)] == wanted.encode():
            return data[offset:offset + size]
    return None


def fatbin_targets(path: Path) -> List[str]:
    """The GPU code in the library at ``path``, as nvcc names it: ``sm_90``/``sm_90a`` for machine
    code (cubins), ``compute_90`` for PTX; empty for a library with no GPU code (a host build).

    Read from the file, not asked of the library (its ``memenc_fast_cuda_archs`` entry point), so
    that it answers for a library that does not load too: from the fat binaries nvcc puts in its
    ``.nv_fatbin`` section: a 16-byte header (magic 0xBA55ED50, version, header size,
    payload size), then entries whose own header holds their kind (1 PTX, 2 cubin) at byte 0, their
    header and padded payload sizes at bytes 4 and 8, the SM version at byte 28 and flags at byte 40.
    """
    section = _elf_section(path.read_bytes(), ".nv_fatbin")
    targets = set()
    start = 0
    while section is not None and start + 16 <= len(section):
        magic, _, header_size, payload_size = struct.unpack_from("<IHHQ", section, start)
        if magic != _FATBIN_MAGIC:
            start += 8  # fat binaries are 8-byte aligned; what lies between them is padding
            continue
        entry, end = start + header_size, start + header_size + payload_size
        while entry < end:
            kind, _, entry_header_size, entry_payload_size = struct.unpack_from("<HHII", section, entry)
            if entry_header_size == 0:
                raise ValueError(f"a fat binary entry at byte {entry} of .nv_fatbin has no header")
            sm_version, = struct.unpack_from("<I", section, entry + 28)
            flags, = struct.unpack_from("<I", section, entry + 40)
            variant = "".join(suffix for bit, suffix in _FATBIN_VARIANTS if flags & bit)
            if kind in (_FATBIN_PTX, _FATBIN_CUBIN):
                targets.add((kind == _FATBIN_PTX, sm_version, variant))
            entry += entry_header_size + entry_payload_size
        start = end
    return [f"{'compute' if is_ptx else 'sm'}_{sm}{variant}" for is_ptx, sm, variant in sorted(targets)]


def ptxas_report_targets(report: str) -> List[str]:
    """The targets (``sm_80``, ``compute_90``) of the nvcc command on the report's first line, in
    the order given; empty when that line names none."""
    command = report.split("\n", 1)[0]
    codes = [code for group in _GENCODE.findall(command) for code in group.split(",")]
    return list(dict.fromkeys(codes))


def _library_runtime(loaded: library.CudaLibrary) -> str:
    refusal = loaded.runtime_refusal()
    return loaded.runtime().describe() + ("" if refusal is None else f"; cannot serve this machine: {refusal}")


def _library_device(loaded: library.CudaLibrary, index: int) -> str:
    # Readies the kernels there, in that device's primary context (as a forward's first use would).
    refusal = loaded.prepare_device(index)
    return "kernels load and are ready" if refusal is None else refusal


def _cuda_library() -> Entries:
    path = library.library_path()
    entries: Entries = {"path": str(path)}
    if not path.is_file():
        entries["status"] = "not built (pip install -e . on a machine with nvcc)"
    else:
        try:
            loaded = library.load()
        except library.CudaLibraryError as err:
            entries["status"] = f"does not load: {err}"
        else:
            entries["status"] = "loads" + (" (a host build: its kernels run on the CPU)" if loaded.runs_on_host else "")
            entries["built from"] = str(loaded.header)
            entries["kernels"] = sorted(loaded.kernel_configs)
            entries["CUDA runtime"] = _probe(lambda: _library_runtime(loaded))
            if not loaded.runs_on_host and torch.cuda.is_available() and loaded.runtime().error == 0:
                for index in range(torch.cuda.device_count()):
                    entries[f"on cuda:{index}"] = _probe(lambda: _library_device(loaded, index))
        entries["architectures"] = _probe(lambda: fatbin_targets(path) or "none (no GPU code in the library)")
    report = path.parent / PTXAS_REPORT
    if report.is_file():
        entries["ptxas report"] = str(report)
        entries["ptxas report targets"] = _probe(
            lambda: ptxas_report_targets(report.read_text(errors="replace")) or "not named on its first line")
    else:
        entries["ptxas report"] = "not built"
    return entries
