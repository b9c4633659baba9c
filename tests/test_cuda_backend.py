"""The ``cuda`` backend (csrc/ kernels through memenc_fast/backends/cuda/).

CPU part (runs everywhere): the library builds, loads and matches csrc/launch_args.h (the header's
format, its C layout, the hash check refusing a library built from another header); the launchers
and their plans refuse null arguments and sizes without a kernel; every kernel compiles for every GPU
generation SAM 2 users run (gpus.TARGETS) without spills, on tensor cores where the arch has them for
the dtype, a trap where it does not serve the dtype; the plans give SAM 2's and SAM 3's B=1 calls at
least a wave of blocks on every GPU of gpus.REPORT_GPUS (or say why not) within each GPU's shared
memory, and csrc/kernels.json describes every kernel; the backend refuses, per GPU, what the
library has no code for or its arch does not serve, with the reason; the wrappers reject bad input
before any launch; the custom ops' fakes give the right shapes; and the kernels themselves run on
the CPU through the host emulation in csrc/emulation.h (the real kernel source built with the host
compiler: warps as fibers, mma.sync rebuilt from the PTX fragment layouts, an emulated GPU the
launchers plan for) and match the torch ops and the float64 reference, with parameters in the
activations' dtype or in float32, with and without gamma, after in-place parameter updates, with
every tile configuration, on sm_75's code paths (fp16 on mma.m16n8k8, fp32 on CUDA cores), under
torch.compile and torch.export; a launch the GPU refuses runs the torch op, warned once. Through the
emulated runtime: a runtime that cannot serve the driver (35, 999) makes the backend unavailable with
its reason and ``auto`` picks torch, as on a ROCm build of torch; a device it cannot run on refuses
every op; misaligned views are copied (the launchers refuse them, the emulation fails a misaligned
access); a launch reports its own error, not an earlier one; the device guard creates no context on
another GPU; readying a device loads every kernel before any capture; fp32 precision follows the
flag of the layer each op replaces.

GPU part (``requires_cuda``, skipped without a CUDA device): each op against the torch op and the
whole module against the float64 reference, full SAM 2 size, B in {1, 8}, fp32/bf16/fp16 and
autocast over fp32 parameters, outputs poisoned, odd sizes, B=3, a SAM 3 size, live parameter
updates, torch.compile and opcheck; views with a storage offset, a good launch after an earlier
runtime error, fp32 precision under both TF32 flags, a fresh process's first launch inside a graph
capture, no context on GPU 0 from a process on cuda:1 (two GPUs), ``info`` per device.
"""

import copy
import ctypes
import importlib
import itertools
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch

import memenc_fast as mf
from memenc_fast import dispatch, gpus, pipeline
from memenc_fast.backends import kernel_args, torch_ops
from memenc_fast.backends.cuda import library
from memenc_fast.backends.kernel_args import poison_outputs
from memenc_fast.dispatch import OPS, BackendUnavailableError
from memenc_fast.structure import Structure, read_structure
from memenc_fast.tools import info, kernel_report
from memenc_fast.numerics import judge, relative_error

from helpers import PRESETS, Preset, build_encoder, make_inputs, reference_outputs, requires_cuda, tf32_matmuls

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HEADER = CSRC / library.HEADER_NAME
sys.path.insert(0, str(ROOT))
from build_tools.cuda_build import (  # noqa: E402
    ARCHS_ENV, DEFAULT_ARCHS, JOBS_ENV, PTXAS_REPORT_NAME, SKIP_ENV, KernelResources, build_cuda_library, find_nvcc,
    launch_args_define, parse_ptxas_report, sources_digest)

NVCC = find_nvcc(os.environ)
HOST_COMPILER = shutil.which("g++") or shutil.which("c++")
CXXFILT = shutil.which("c++filt")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
needs_host_compiler = pytest.mark.skipif(HOST_COMPILER is None, reason="no host C++ compiler (g++, c++)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (activations, parameters): alike, or fp32 parameters under 16-bit activations (autocast).
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.float16, torch.float32), (torch.float32, torch.float32)]
KERNEL_FAMILIES = ("mf::mask_stem_kernel", "mf::conv3x3s2_ln_gelu_kernel", "mf::proj_add_kernel",
                   "mf::dwconv_ln_kernel")
# SAM 2's channels (1 -> 4 -> 16 -> 64 -> 256, dim 256, out 64) at a small spatial size.
SMALL = Preset("small256", mask_size=64, feature_size=4)
# (activation dtype, parameter dtype, gamma): the dtypes alike, and fp32 parameters with 16-bit
# activations (SAM 2 under autocast); gamma None is sam2's layer_scale_init_value=0.
PRECISIONS = [
    pytest.param(torch.float32, torch.float32, True, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, True, id="bf16"),
    pytest.param(torch.float16, torch.float16, False, id="fp16-nogamma"),
    pytest.param(torch.bfloat16, torch.float32, False, id="bf16-fp32params-nogamma"),
    pytest.param(torch.float16, torch.float32, True, id="fp16-fp32params"),
]


def _op_module(op: str) -> ModuleType:
    """``memenc_fast.backends.cuda.<op>`` (the package attribute of that name is the op itself)."""
    return importlib.import_module(f"memenc_fast.backends.cuda.{op}")


def _cuda_backend() -> ModuleType:
    return importlib.import_module("memenc_fast.backends.cuda")


def _encoder(seed: int, dtype: torch.dtype = torch.float32, gamma: bool = True,
             device: object = "cpu") -> torch.nn.Module:
    """SMALL's encoder (sam2's channels), in ``dtype``; without gamma: layer_scale_init_value=0."""
    encoder = build_encoder(SMALL, seed=seed, device=device)
    if not gamma:
        for block in encoder.fuser.layers:
            block.gamma = None
    return encoder.to(dtype)


def _op_table(backend: ModuleType = None) -> Dict[str, Callable]:
    """The torch ops, with ``backend``'s where it has them (default: the cuda backend; what
    dispatch runs when unsupported_ops refuses nothing)."""
    backend = _cuda_backend() if backend is None else backend
    table = {op: getattr(torch_ops, op) for op in OPS if hasattr(torch_ops, op)}
    return {**table, **{op: getattr(backend, op) for op in OPS if hasattr(backend, op)}}


# ------------------------------------------------------------------------------ the binding


def _demangle(symbols: List[str]) -> Dict[str, str]:
    """Mangled kernel name -> its name as c++filt prints it, without ``void`` and parameters."""
    if CXXFILT is None:
        pytest.skip("c++filt not found")
    printed = subprocess.run([CXXFILT], input="\n".join(symbols), capture_output=True, text=True, check=True)
    return {symbol: re.sub(r"^void |\(.*$", "", name)
            for symbol, name in zip(symbols, printed.stdout.splitlines())}


@dataclass(frozen=True)
class TargetBuild:
    """The library with code for every target, and what ptxas reported of its kernels."""

    library: library.CudaLibrary
    kernels: Tuple[KernelResources, ...]

    def names(self, target: str) -> Dict[str, KernelResources]:
        """The kernels compiled for ``target``, by their name as c++filt prints it."""
        rows = [k for k in self.kernels if k.arch == target]
        names = _demangle([k.name for k in rows])
        return {names[k.name]: k for k in rows}


@pytest.fixture(scope="session")
def target_build(tmp_path_factory: pytest.TempPathFactory) -> TargetBuild:
    """The installed library where it was built from these very sources (its sources digest) for
    every target, with its ptxas report; else one built here, once per session, by the project's
    build step (the files compile in parallel)."""
    try:
        installed = library.CudaLibrary(library.library_path())
    except (OSError, library.CudaLibraryError):
        installed = None
    report = library.library_path().parent / PTXAS_REPORT_NAME
    if (installed is not None and installed.sources_digest == sources_digest(CSRC) and report.is_file()
            and {f"sm_{arch}" for arch in DEFAULT_ARCHS} <= set(installed.archs)):
        return TargetBuild(installed, tuple(parse_ptxas_report(report.read_text())))
    if NVCC is None:
        pytest.skip("no CUDA library built from these sources is installed and nvcc is not found")
    env = {k: v for k, v in os.environ.items() if k not in (SKIP_ENV, ARCHS_ENV, JOBS_ENV)}
    result = build_cuda_library(CSRC, tmp_path_factory.mktemp("cudalib"), env=env, log=lambda line: None)
    assert result is not None and result.header is not None and result.header.read_bytes() == HEADER.read_bytes()
    return TargetBuild(library.CudaLibrary(result.library), result.kernels)


@pytest.fixture(scope="module")
def built_library(target_build: TargetBuild) -> library.CudaLibrary:
    return target_build.library


def test_library_declares_every_launcher_of_the_header(built_library: library.CudaLibrary) -> None:
    header = library.read_header(HEADER)
    assert set(built_library.args) == set(header.structs) == {"mask_stem", "conv3x3s2_ln_gelu", "proj_add",
                                                              "dwconv_ln"}
    assert set(built_library.records) == set(header.records) == {"GpuTarget", "KernelLaunch"}
    for op, struct in header.structs.items():
        assert [name for name, _ in built_library.args[op]._fields_] == [name for name, _ in struct.fields]
        assert hasattr(ctypes.CDLL(str(built_library.path)), struct.launcher)
        assert hasattr(ctypes.CDLL(str(built_library.path)), struct.planner)
    with pytest.raises(AttributeError):  # a misspelled member is an error, not an ignored attribute
        built_library.args["proj_add"](mask_weigth=1)
    assert built_library.dtype_codes == {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    assert not built_library.runs_on_host
    assert built_library.archs == ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "compute_120")
    assert built_library.error_string(0) == "no error"
    assert "invalid argument" in built_library.error_string(1)


def test_library_reports_its_kernel_configurations(built_library: library.CudaLibrary) -> None:
    has = built_library.has_kernel
    # SAM 2's configuration has kernels; other sizes do not.
    assert has("mask_stem", in_channels=1, mid_channels=4, out_channels=16)
    assert not has("mask_stem", in_channels=1, mid_channels=8, out_channels=16)
    assert has("conv3x3s2_ln_gelu", in_channels=16, out_channels=64)
    assert has("conv3x3s2_ln_gelu", in_channels=64, out_channels=256)
    assert not has("conv3x3s2_ln_gelu", in_channels=64, out_channels=128)
    assert has("proj_add", mask_channels=256, pix_channels=256, out_channels=256)
    assert not has("proj_add", mask_channels=256, pix_channels=250, out_channels=256)
    assert not has("proj_add", mask_channels=0, pix_channels=256, out_channels=256)
    assert has("dwconv_ln", kernel_size=7, channels=256) and has("dwconv_ln", kernel_size=3, channels=512)
    assert not has("dwconv_ln", kernel_size=9, channels=256)
    assert not has("dwconv_ln", kernel_size=7, channels=100) and not has("dwconv_ln", kernel_size=7, channels=576)
    assert not has("no_such_kernel", channels=1)
    with pytest.raises(ValueError, match=r"dwconv_ln configurations name sizes \['channels', 'kernel_size'\]; "
                                         r"got \['kernel'\]"):
        has("dwconv_ln", kernel=7)


def test_kernel_configuration_format() -> None:
    configs = library.parse_kernel_configs("k a=1,3 b%32\nk a<=8 b=2\n\nother c=5\n")
    assert [[(c.size, c.relation, c.values) for c in line] for line in configs["k"]] == [
        [("a", "=", (1, 3)), ("b", "%", (32,))], [("a", "<=", (8,)), ("b", "=", (2,))]]
    with pytest.raises(ValueError, match=r"expected conditions like .*; got 'a>1'"):
        library.parse_kernel_configs("k a>1\n")


def test_launchers_refuse_null_arguments_and_sizes_without_a_kernel(built_library: library.CudaLibrary) -> None:
    for op, args in built_library.args.items():  # every member zero: null pointers
        with pytest.raises(library.CudaLaunchError, match=rf"memenc_fast {op}: CUDA error 1: invalid argument"):
            built_library.launch(op, args(), 0, None)
    unsupported = {  # non-null (never dereferenced) pointers, sizes without a kernel
        "mask_stem": dict(batch=1, height=8, width=8, channels1=8, channels2=16),
        "conv3x3s2_ln_gelu": dict(batch=1, height=8, width=8, in_channels=16, out_channels=128),
        "proj_add": dict(batch=1, pixels=16, mask_channels=256, pix_channels=250, out_channels=256),
        "dwconv_ln": dict(batch=1, height=4, width=4, channels=256, kernel_size=9),
    }
    h100 = gpus.TARGETS["sm_90a"]
    for op, sizes in unsupported.items():
        cls = built_library.args[op]
        pointers = {name: 16 for name, c_type in cls._fields_ if c_type is ctypes.c_void_p}
        for call in (lambda: built_library.launch(op, cls(**pointers, **sizes), 0, None),
                     lambda: built_library.plan(op, h100, **sizes)):
            with pytest.raises(library.CudaLaunchError, match=rf"memenc_fast {op}: CUDA error 801") as err:
                call()
            assert not isinstance(err.value, kernel_args.LaunchRefused)  # an error of the caller, not the GPU's
    with pytest.raises(library.CudaLaunchError, match=r"memenc_fast dwconv_ln: CUDA error 1: invalid argument"):
        built_library.plan("dwconv_ln", h100, batch=0, height=4, width=4, channels=256, kernel_size=7)


REFUSING_CODES = {**library.REFUSED_CODES, **library.UNSERVED_CODES}


@pytest.mark.parametrize("code", sorted(REFUSING_CODES))
def test_refusal_codes_raise_launch_refused_and_others_errors(built_library: library.CudaLibrary,
                                                              monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """A launch the GPU refuses, or one whose runtime cannot serve the machine or device (a driver
    older than the runtime, a device in another process's exclusive use), falls back; others stay errors."""
    monkeypatch.setitem(built_library._launchers, "proj_add", lambda *args: code)
    with pytest.raises(library.CudaLaunchRefused, match=rf"memenc_fast proj_add: CUDA error {code} "
                                                        rf"\({REFUSING_CODES[code]}\)"):
        built_library.launch("proj_add", built_library.args["proj_add"](), 0, None)
    for error in (1, 700, 719):  # invalid argument, illegal address, launch failure: errors, not refusals
        monkeypatch.setitem(built_library._launchers, "proj_add", lambda *args, error=error: error)
        with pytest.raises(library.CudaLaunchError) as err:
            built_library.launch("proj_add", built_library.args["proj_add"](), 0, None)
        assert not isinstance(err.value, kernel_args.LaunchRefused)


SAMPLE_HEADER = b"""// comment
#pragma once
#include <stdint.h>
#define MEMENC_DTYPE_FLOAT32 0
#define MEMENC_ANSWER -42

struct Conv3x3s2LnGeluArgs {
  int32_t dtype;  // trailing comment
  const void* x;
  int64_t   stride;
  float eps;
  void* out;
};

struct KernelLaunch {
  const char* kernel;
  int32_t block;
};
"""


def test_header_format_parses_structs_records_and_constants() -> None:
    header = library.parse_header(SAMPLE_HEADER)
    assert header.constants == {"MEMENC_DTYPE_FLOAT32": 0, "MEMENC_ANSWER": -42}
    struct = header.structs["conv3x3s2_ln_gelu"]
    assert (struct.name, struct.launcher, struct.planner) == (
        "Conv3x3s2LnGeluArgs", "memenc_fast_conv3x3s2_ln_gelu", "memenc_fast_conv3x3s2_ln_gelu_plan")
    assert struct.fields == (("dtype", "int32_t"), ("x", "const void*"), ("stride", "int64_t"), ("eps", "float"),
                             ("out", "void*"))
    assert set(header.structs) == {"conv3x3s2_ln_gelu"}
    assert header.records["KernelLaunch"].fields == (("kernel", "const char*"), ("block", "int32_t"))
    assert header.digest == library.header_hash(SAMPLE_HEADER) != library.header_hash(SAMPLE_HEADER + b"\n")


@pytest.mark.parametrize(("text", "message"), [
    (b"struct FooArgs {\n  double x;\n};\n", r"sample\.h:2: expected a member `<type> <name>;` .*got 'double x;'"),
    (b"struct FooArgs {\n  int32_t a;\n  float a;\n};\n", r"sample\.h:3: FooArgs declares a twice"),
    (b"struct FooArgs {\n  int32_t a;\n", r"sample\.h:1: FooArgs is not closed"),
    (b"struct FooArgs {\n};\n", r"sample\.h:1: FooArgs has no members"),
    (b"int memenc_fast_foo(int x);\n", r"sample\.h:1: expected `struct <Name> \{`.*got 'int memenc_fast_foo"),
    (b"struct FooArgs {\n  int32_t a;\n};\nstruct FooArgs {\n  int32_t b;\n};\n",
     r"sample\.h:4: a second struct FooArgs"),
    (b"struct Target {\n  int32_t a;\n};\nstruct Target {\n  int32_t b;\n};\n", r"sample\.h:4: a second struct Target"),
])
def test_header_format_errors_name_the_line(text: bytes, message: str) -> None:
    with pytest.raises(library.LaunchArgsFormatError, match=message):
        library.parse_header(text, "sample.h")


@needs_host_compiler
def test_header_structs_have_the_c_compilers_layout(built_library: library.CudaLibrary, tmp_path: Path) -> None:
    """ctypes lays the parsed structs out as the C compiler lays out the header's: same size, same
    offset of every member."""
    header = library.read_header(HEADER)
    lines = [f'#include "{HEADER}"', "#include <cstddef>", "#include <cstdio>", "int main() {"]
    for struct in [*header.structs.values(), *header.records.values()]:
        lines.append(f'  std::printf("{struct.name} size %zu\\n", sizeof({struct.name}));')
        lines += [f'  std::printf("{struct.name} {name} %zu\\n", offsetof({struct.name}, {name}));'
                  for name, _ in struct.fields]
    source, program = tmp_path / "layout.cpp", tmp_path / "layout"
    source.write_text("\n".join(lines + ["}"]) + "\n")
    subprocess.run([HOST_COMPILER, "-std=c++17", str(source), "-o", str(program)], check=True)
    printed = subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout.splitlines()
    expected = []
    for cls in [*built_library.args.values(), *built_library.records.values()]:
        expected.append(f"{cls.__name__} size {ctypes.sizeof(cls)}")
        expected += [f"{cls.__name__} {name} {getattr(cls, name).offset}" for name, _ in cls._fields_]
    assert sorted(printed) == sorted(expected)


def test_library_built_from_another_header_is_refused(built_library: library.CudaLibrary, tmp_path: Path) -> None:
    edited = tmp_path / library.HEADER_NAME
    edited.write_bytes(HEADER.read_bytes() + b"// one more comment\n")
    with pytest.raises(library.CudaLibraryError, match=r"was built from another launch_args\.h: it records hash "
                                                       r"[0-9a-f]{16}, .* hashes to [0-9a-f]{16}; rebuild it"):
        library.CudaLibrary(built_library.path, header=edited)
    with pytest.raises(library.CudaLibraryError, match=r"launch_args\.h is neither in the source tree's csrc/"):
        library.CudaLibrary(built_library.path, header=tmp_path / "missing.h")
    library.CudaLibrary(built_library.path, header=HEADER)  # the header it was built from is accepted


def test_missing_library_gives_one_line_reason(tmp_path: Path) -> None:
    with pytest.raises(library.CudaLibraryError) as err:
        library.load.__wrapped__(tmp_path / library.LIBRARY_NAME)
    assert str(err.value) == "the CUDA library was not built (pip install -e . with nvcc)"
    (tmp_path / library.LIBRARY_NAME).write_text("not a library")
    with pytest.raises(library.CudaLibraryError, match="failed to load"):
        library.load.__wrapped__(tmp_path / library.LIBRARY_NAME)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_backend_reports_no_device_here() -> None:
    reason = library.unavailable_reason()
    assert reason == "no CUDA device" or reason.startswith("the CUDA library")
    assert "cuda" not in mf.available_backends()
    encoder = build_encoder(SMALL, seed=1)
    pix_feat, masks = make_inputs(SMALL, 1, seed=2)
    with mf.use_backend("cuda"), pytest.raises(BackendUnavailableError, match=reason):
        encoder(pix_feat, masks)
    if reason == "no CUDA device":
        runtime = library.load().runtime()
        assert runtime.device_count == 0 and runtime.error != 0
        assert library.load().runtime_refusal() is not None


def test_has_kernel_is_answered_while_tracing(built_library: library.CudaLibrary,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "load", lambda path=None: built_library)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + library.has_kernel("dwconv_ln", kernel_size=7, channels=256),
                             fullgraph=True, backend="eager")
    assert compiled(torch.zeros(2)).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------ every GPU generation


def _family(kernel: str) -> str:
    return kernel.split("<", 1)[0]


def _dtype_pair(kernel: str) -> Tuple[str, str]:
    """(activation type, parameter type) of a kernel instantiation's name."""
    activation, parameter = kernel.split("<", 1)[1].rstrip(">").split(", ")[:2]
    return activation, parameter


_TYPE_NAMES = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
_DTYPE_OF_TYPE = {name: dtype for dtype, name in _TYPE_NAMES.items()}


def _sidecar() -> Dict[str, Dict[str, object]]:
    return kernel_report.load_sidecar(CSRC / "kernels.json")


@pytest.fixture(scope="module")
def sass(target_build: TargetBuild) -> Dict[str, Dict[str, List[str]]]:
    """target -> kernel name (as c++filt prints it) -> its SASS opcodes, from the built library."""
    tool = kernel_report.find_cuobjdump(prefer_triton=False, nvcc=NVCC)
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit, triton wheel)")

    def dump(target: str) -> Dict[str, List[str]]:
        text = subprocess.run([tool, "-sass", "-arch", target, str(target_build.library.path)], capture_output=True,
                              text=True, check=True).stdout
        functions: Dict[str, List[str]] = {}
        current: List[str] = []
        for line in text.splitlines():
            header = re.match(r"\s*Function : (\S+)", line)
            if header:
                current = functions.setdefault(header.group(1), [])
            else:
                opcode = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
                if opcode:
                    current.append(opcode.group(1))
        names = _demangle(sorted(functions))
        return {names[symbol]: opcodes for symbol, opcodes in functions.items()}

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(gpus.TARGETS, pool.map(dump, gpus.TARGETS)))


def test_every_kernel_compiles_for_every_target_without_spills(target_build: TargetBuild) -> None:
    """The CI gate: every csrc kernel has code for every GPU generation (gpus.TARGETS), no hot kernel
    spills, and static shared memory needs no opt-in."""
    sidecar = _sidecar()
    assert {k.arch for k in target_build.kernels} == set(gpus.TARGETS)
    for target in gpus.TARGETS:
        kernels = target_build.names(target)
        assert {_family(name) for name in kernels} == {*KERNEL_FAMILIES, "mf::arch_probe_kernel"}, target
        for name, k in kernels.items():
            if sidecar[name].get("hot", True):
                assert (k.spill_store_bytes, k.spill_load_bytes, k.stack_bytes) == (0, 0, 0), (target, name, k)
            assert k.smem_bytes <= 48 * 1024, (target, name, k)


def test_matrix_math_runs_as_each_arch_serves_it(built_library: library.CudaLibrary,
                                                 sass: Dict[str, Dict[str, List[str]]]) -> None:
    """bf16/fp16 GEMMs on HMMA.16816 from sm_80 on, fp16 on sm_75 on HMMA.1688 (mma.m16n8k8), fp32 on
    tf32 HMMA from sm_80 on and on the CUDA cores (FFMA) on sm_75; an instantiation of a dtype its arch
    does not serve is a trap; no kernel touches local memory."""
    sidecar = _sidecar()
    for target, kernels in sass.items():
        arch = 10 * gpus.TARGETS[target].capability[0] + gpus.TARGETS[target].capability[1]
        assert set(kernels) == set(sidecar), target
        for name, opcodes in kernels.items():
            assert not any(op.startswith(("STL", "LDL")) for op in opcodes), (target, name)
            if name == "mf::arch_probe_kernel":
                continue
            dtype = _DTYPE_OF_TYPE[_dtype_pair(name)[0]]
            served = built_library.matrix_math(arch, dtype) is not None
            assert ("BPT.TRAP" in opcodes) == (not served), (target, name)
            mma = {op for op in opcodes if op.startswith("HMMA")}
            if not served or not sidecar[name]["matrix_work"]:
                assert not mma, (target, name)
            elif dtype == torch.float32:
                assert mma == ({"HMMA.1688.F32.TF32"} if arch >= 80 else set()), (target, name)
                assert arch >= 80 or "FFMA" in opcodes, (target, name)
            else:
                wanted = "HMMA.16816.F32" + (".BF16" if dtype == torch.bfloat16 else "")
                assert mma == ({wanted} if arch >= 80 else {"HMMA.1688.F32"}), (target, name)


SAM_SHAPES = [pytest.param(1024, 64, id="sam2"), pytest.param(1152, 72, id="sam3")]


@pytest.mark.parametrize(("mask_size", "feature_size"), SAM_SHAPES)
@pytest.mark.parametrize("spec", gpus.REPORT_GPUS, ids=lambda spec: spec.name)
def test_b1_launches_fill_a_wave_and_fit_the_gpu(target_build: TargetBuild, spec: gpus.GpuSpec, mask_size: int,
                                                 feature_size: int) -> None:
    """At B=1 every hot kernel launches at least one block per SM, within the GPU's shared memory and
    with code for its arch. The exception is the conv of mask stage 4, which chooses by its floor
    (every block reads the whole weight): below a wave only where a tile of half the rows would put two
    blocks, two weight reads, on some SM, and then the launch says so."""
    from memenc_fast.backends import cuda

    kernels = target_build.names(spec.arch)
    for dtype, weight_dtype in DTYPE_PAIRS:
        launches = cuda.report_launches(1, dtype, weight_dtype, spec, mask_size=mask_size, feature_size=feature_size)
        if dtype == torch.bfloat16 and spec.capability < (8, 0):
            assert launches == []
            continue
        assert [_family(launch["kernel"]) for launch in launches] == [
            "mf::mask_stem_kernel", "mf::conv3x3s2_ln_gelu_kernel", "mf::conv3x3s2_ln_gelu_kernel",
            "mf::proj_add_kernel", "mf::dwconv_ln_kernel", "mf::dwconv_ln_kernel"]
        for launch in launches:
            where = (spec.name, str(dtype), str(weight_dtype), launch)
            assert _dtype_pair(launch["kernel"]) == (_TYPE_NAMES[dtype], _TYPE_NAMES[weight_dtype]), where
            static = kernels[launch["kernel"]].smem_bytes  # KeyError: a name the library does not have
            assert static + launch["dynamic_smem"] <= spec.shared_memory_per_block, where
            assert 0 < launch["block"] <= 1024 and launch["block"] % 32 == 0, where
            assert launch["config"], where
            weight_bound = launch["kernel"].startswith("mf::conv3x3s2_ln_gelu_kernel") and ", 64, 256, " in launch[
                "kernel"]
            if weight_bound and launch["grid"] < spec.sm_count:
                assert 2 * launch["grid"] > spec.sm_count and not launch["kernel"].endswith(", 16>"), where
                assert "reads the whole conv weight" in launch["small_grid_reason"], where
            else:
                assert launch["grid"] >= spec.sm_count and "small_grid_reason" not in launch, where


def test_launch_report_follows_batch_and_says_bad_shapes(built_library: library.CudaLibrary,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from memenc_fast.backends import cuda

    monkeypatch.setattr(library, "load", lambda path=None: built_library)
    h100 = gpus.TARGETS["sm_90a"]
    one, eight = (cuda.report_launches(batch, torch.bfloat16, torch.float32, h100) for batch in (1, 8))
    stem = [launch["grid"] for launch in (one[0], eight[0])]
    assert stem == [256, 8 * 256]  # 16x16 tiles of the 256x256 stage-2 image per object
    assert all(b["grid"] >= a["grid"] for a, b in zip(one, eight))
    small = cuda.report_launches(1, torch.bfloat16, torch.float32, h100, mask_size=256, feature_size=16)
    assert [launch.get("small_grid_reason") for launch in small] == [
        "these sizes give fewer blocks than SMs even in the smallest tile"] * 6
    with pytest.raises(ValueError, match=r"masks of 1024² make 64² features, not 72²"):
        cuda.report_launches(1, torch.bfloat16, torch.bfloat16, h100, feature_size=72)


def _every_plan(lib: library.CudaLibrary) -> Iterator[library.PlannedLaunch]:
    """The plans of every kernel configuration: each op's sizes in SAM 2's channels, on GPUs of one
    SM and of very many (the largest and the smallest tiles), small and large shared memory, both
    fp32 GEMM modes, one object and many."""
    for sm_count, shared, (dtype, weight_dtype), batch, precise in itertools.product(
            (1, 40, 132, 10**6), (65536, 232448), DTYPE_PAIRS, (1, 64), (0, 1)):
        spec = gpus.GpuSpec("any", (9, 0), sm_count, shared)
        common = dict(dtype=lib.dtype_codes[dtype], weight_dtype=lib.dtype_codes[weight_dtype], batch=batch)
        yield lib.plan("mask_stem", spec, **common, height=64, width=64, channels1=4, channels2=16)
        for in_channels, out_channels in ((16, 64), (64, 256)):
            yield lib.plan("conv3x3s2_ln_gelu", spec, **common, height=32, width=32, in_channels=in_channels,
                           out_channels=out_channels, precise=precise)
        yield lib.plan("proj_add", spec, **common, pixels=64, mask_channels=256, pix_channels=256, out_channels=256,
                       mask_stride_c=1, mask_stride_p=256, pix_stride_c=64, pix_stride_p=1)
        for kernel_size in (3, 5, 7):
            yield lib.plan("dwconv_ln", spec, **common, height=8, width=8, channels=256, kernel_size=kernel_size)


def _expected_figures(kernel: str) -> Tuple[int, int]:
    """(FLOPs, minimum bytes) of a kernel per SAM 2 object: its inputs, outputs and parameters once."""
    activation, parameter = (4 if t == "float" else 2 for t in _dtype_pair(kernel))
    ints = [int(v) for v in re.findall(r", (\d+)", kernel)]
    family = _family(kernel)
    if family == "mf::mask_stem_kernel":
        return 512 * 512 * 4 * 9 * 2 + 256 * 256 * 16 * 36 * 2, (1024 * 1024 + 256 * 256 * 16) * activation
    if family == "mf::conv3x3s2_ln_gelu_kernel":
        in_channels, out_channels = ints[:2]
        out_side = 128 if out_channels == 64 else 64
        return (out_side ** 2 * out_channels * 9 * in_channels * 2,
                (4 * out_side ** 2 * in_channels + out_side ** 2 * out_channels) * activation
                + out_channels * 9 * in_channels * parameter)
    if family == "mf::proj_add_kernel":
        return 4096 * 256 * 512 * 2, 3 * 4096 * 256 * activation + 2 * 256 * 256 * parameter
    kernel_size = ints[0]
    return 4096 * 256 * (2 * kernel_size ** 2 + 8), 3 * 4096 * 256 * activation


def test_kernels_json_describes_every_kernel(target_build: TargetBuild) -> None:
    """csrc/kernels.json (the kernel report's sidecar) has an entry for every kernel the library holds
    and no other, with its SAM 2 FLOPs and bytes and the dynamic shared memory its launches ask for."""
    sidecar = _sidecar()
    assert set(sidecar) == set(target_build.names("sm_90a"))
    planned = {plan.kernel: plan.dynamic_smem for plan in _every_plan(target_build.library)}
    assert set(planned) == set(sidecar) - {"mf::arch_probe_kernel"}  # every configuration is reachable
    for kernel, entry in sidecar.items():
        if kernel == "mf::arch_probe_kernel":
            assert entry == {"hot": False, "matrix_work": False}
            continue
        matrix_work = _family(kernel) in ("mf::conv3x3s2_ln_gelu_kernel", "mf::proj_add_kernel")
        assert entry["hot"] is True and entry["matrix_work"] is matrix_work, kernel
        assert (entry["flops_per_object"], entry["min_bytes_per_object"]) == _expected_figures(kernel), kernel
        assert entry.get("dynamic_shared_bytes", 0) == planned[kernel], kernel


# ------------------------------------------------------------------------------ which GPUs it serves


DEFAULT_CODE = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "compute_120")


def _with_code(lib: library.CudaLibrary, *code: str) -> library.CudaLibrary:
    """``lib`` as if built with only ``code``."""
    twin = copy.copy(lib)
    twin.archs = code
    return twin


@pytest.mark.parametrize(("code", "capability", "runs"), [
    ("sm_86", (8, 6), True), ("sm_86", (8, 9), True), ("sm_86", (8, 0), False), ("sm_86", (9, 0), False),
    ("sm_90a", (9, 0), True), ("sm_100a", (10, 3), False), ("sm_100f", (10, 3), True), ("sm_120", (12, 1), True),
    ("compute_120", (12, 0), True), ("compute_120", (13, 0), True), ("compute_120", (10, 0), False),
    ("compute_100f", (10, 3), True), ("compute_100f", (12, 0), False),
])
def test_embedded_code_runs_where_cuda_runs_it(code: str, capability: Tuple[int, int], runs: bool) -> None:
    assert library.EmbeddedCode(code).runs_on(capability) is runs


def _refusals(lib: library.CudaLibrary, spec: gpus.GpuSpec) -> Dict[str, Optional[str]]:
    return {str(dtype).replace("torch.", ""): lib.device_refusal(spec, dtype) for dtype in DTYPES}


def test_every_target_is_served_but_bf16_on_sm75(built_library: library.CudaLibrary) -> None:
    lib = _with_code(built_library, *DEFAULT_CODE)
    for spec in gpus.REPORT_GPUS:
        expected = {"float32": None, "bfloat16": None, "float16": None}
        if spec.capability == (7, 5):
            expected["bfloat16"] = "bf16 needs sm_80; this is sm_75 (T4)"
        assert _refusals(lib, spec) == expected, spec
        assert lib.code_for(spec.capability).name == spec.arch


@pytest.mark.parametrize(("code", "spec", "expected"), [
    (DEFAULT_CODE, gpus.GpuSpec("Jetson Orin", (8, 7), 16, 166912), {}),  # sm_86's SASS
    (DEFAULT_CODE, gpus.GpuSpec("DGX Spark", (12, 1), 48, 101376), {}),  # sm_120's SASS
    (DEFAULT_CODE, gpus.GpuSpec("next", (13, 0), 200, 232448), {}),  # compute_120 PTX, JIT-compiled
    (DEFAULT_CODE, gpus.GpuSpec("V100", (7, 0), 80, 98304),
     dict.fromkeys(("float32", "bfloat16", "float16"),
                   "the CUDA kernels need sm_75 or newer; this GPU is sm_70 (V100)")),
    (DEFAULT_CODE, gpus.GpuSpec("B300", (10, 3), 148, 232448),
     dict.fromkeys(("float32", "bfloat16", "float16"),
                   "the CUDA library is built for 75;80;86;89;90a;100a;120 (PTX compute_120); this GPU is sm_103 "
                   "(B300): rebuild with MEMENC_FAST_CUDA_ARCHS=75;80;86;89;90a;100a;103a;120")),
    (("sm_90a",), gpus.TARGETS["sm_80"],
     dict.fromkeys(("float32", "bfloat16", "float16"),
                   "the CUDA library is built for 90a; this GPU is sm_80 (A100): rebuild with "
                   "MEMENC_FAST_CUDA_ARCHS=80;90a")),
    (("sm_75", "compute_75"), gpus.TARGETS["sm_86"],
     {"bfloat16": "bf16 needs sm_80 code; the library runs compute_75 on this sm_86 (A10): rebuild with "
                  "MEMENC_FAST_CUDA_ARCHS=75;86"}),
], ids=lambda value: getattr(value, "name", None))
def test_device_refusal_names_the_gpu_and_what_to_do(built_library: library.CudaLibrary, code: Tuple[str, ...],
                                                     spec: gpus.GpuSpec, expected: Dict[str, str]) -> None:
    refusals = _refusals(_with_code(built_library, *code), spec)
    assert {dtype: why for dtype, why in refusals.items() if why is not None} == expected


def test_unsupported_ops_refuses_every_op_where_the_gpu_cannot_serve_the_dtype(
        built_library: library.CudaLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _cuda_backend()
    monkeypatch.setattr(library, "load", lambda path=None: _with_code(built_library, *DEFAULT_CODE))
    prepared: List[int] = []  # a GPU's runtime serves it: the devices the backend readies
    monkeypatch.setattr(library.CudaLibrary, "prepare_device", lambda self, index: prepared.append(index))
    structure = read_structure(_encoder(seed=1))
    device = torch.device("cuda", 0)
    for spec in (gpus.TARGETS["sm_75"], gpus.TARGETS["sm_90a"]):
        monkeypatch.setattr(gpus, "gpu_spec", lambda device, spec=spec: spec)
        for dtype in DTYPES:
            refused = cuda.unsupported_ops(structure, device, dtype)
            if spec.capability == (7, 5) and dtype == torch.bfloat16:
                assert refused == dict.fromkeys(("mask_downsample", "proj_add", "cxblock", "out_proj"),
                                                "bf16 needs sm_80; this is sm_75 (T4)")
            else:
                assert refused == {}, (spec, dtype)
            assert cuda.auto_skip_reason(device, dtype) is None
    assert prepared == [0] * 5  # every served (GPU, dtype): the kernels readied on cuda:0 first


# ------------------------------------------------------------------------------ bad input


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _stem_args(**changes: object) -> Dict[str, object]:
    args = dict(masks=_t(2, 1, 32, 32), conv1_weight=_t(4, 1, 3, 3), conv1_bias=_t(4), norm1_weight=_t(4),
                norm1_bias=_t(4), eps1=1e-6, conv2_weight=_t(16, 4, 3, 3), conv2_bias=_t(16), norm2_weight=_t(16),
                norm2_bias=_t(16), eps2=1e-6, apply_sigmoid=True, scale=1.0, bias=0.0)
    return {**args, **changes}


def _stage_args(**changes: object) -> Dict[str, object]:
    args = dict(x=_t(2, 8, 8, 16), weight=_t(64, 16, 3, 3), bias=_t(64), norm_weight=_t(64), norm_bias=_t(64),
                eps=1e-6)
    return {**args, **changes}


def _proj_args(**changes: object) -> Dict[str, object]:
    args = dict(mask_features=_t(2, 256, 4, 4), pix_feat=_t(2, 256, 4, 4), mask_weight=_t(256, 256, 1, 1),
                mask_bias=_t(256), pix_weight=_t(256, 256, 1, 1), pix_bias=_t(256))
    return {**args, **changes}


def _dwconv_args(**changes: object) -> Dict[str, object]:
    args = dict(x=_t(2, 4, 4, 256), dw_weight=_t(256, 1, 7, 7), dw_bias=_t(256), norm_weight=_t(256),
                norm_bias=_t(256), eps=1e-6, b2=_t(256), gamma=_t(256))
    return {**args, **changes}


BAD_INPUTS = [
    ("mask_downsample", "mask_stem", lambda: _stem_args(masks=torch.zeros(2, 1, 8, 8, dtype=torch.int32)),
     TypeError, "mask_stem: masks must be float32, bfloat16 or float16"),
    ("mask_downsample", "mask_stem", lambda: _stem_args(masks=_t(2, 1, 8, 8, dtype=torch.float64)), TypeError,
     "masks must be float32, bfloat16 or float16"),
    ("mask_downsample", "mask_stem", lambda: _stem_args(masks=_t(2, 2, 8, 8)), ValueError,
     r"masks must have shape \(\*, 1, \*, \*\)"),
    ("mask_downsample", "mask_stem", lambda: _stem_args(conv1_weight=torch.ones(4, 1, 3, 3, dtype=torch.int64)),
     TypeError, "conv1_weight must be a floating-point torch.Tensor; got a torch.int64 tensor"),
    ("mask_downsample", "mask_stem", lambda: _stem_args(conv2_weight=_t(16, 8, 3, 3)), ValueError,
     r"conv2_weight must have shape \(\*, 4, 3, 3\)"),
    ("mask_downsample", "mask_stem", lambda: _stem_args(norm2_bias=_t(8)), ValueError,
     r"norm2_bias must have shape \(16\)"),
    ("mask_downsample", "mask_stem", lambda: _stem_args(), ValueError, "masks must be on a CUDA device"),
    ("mask_downsample", "conv3x3s2_ln_gelu", lambda: _stage_args(weight=_t(64, 8, 3, 3)), ValueError,
     r"weight must have shape \(\*, 16, 3, 3\)"),
    ("mask_downsample", "conv3x3s2_ln_gelu", lambda: _stage_args(bias=_t(32)), ValueError,
     r"bias must have shape \(64\)"),
    ("mask_downsample", "conv3x3s2_ln_gelu", lambda: _stage_args(x="not a tensor"), TypeError,
     "x must be a torch.Tensor; got str"),
    ("proj_add", "proj_add_tokens", lambda: _proj_args(pix_feat=_t(2, 256, 4, 5)), ValueError,
     r"pix_feat must have shape \(2, \*, 4, 4\)"),
    ("proj_add", "proj_add_tokens", lambda: _proj_args(pix_weight=_t(256, 250, 1, 1)), ValueError,
     r"pix_weight must have shape \(256, 256, 1, 1\)"),
    ("proj_add", "proj_add_tokens", lambda: _proj_args(pix_feat=_t(2, 256, 4, 4, dtype=torch.bfloat16)),
     TypeError, "pix_feat must have dtype float32"),
    ("proj_add", "proj_add_tokens", lambda: _proj_args(mask_bias=None), TypeError,
     "mask_bias must be a floating-point torch.Tensor; got NoneType"),
    ("proj_add", "proj_add_tokens", lambda: _proj_args(), ValueError, "mask_features must be on a CUDA device"),
    ("cxblock", "dwconv_ln", lambda: _dwconv_args(dw_weight=_t(256, 1, 7, 5)), ValueError,
     r"dw_weight must have shape \(256, 1, 7, 7\)"),
    ("cxblock", "dwconv_ln", lambda: _dwconv_args(b2=_t(128)), ValueError, r"b2 must have shape \(256\)"),
    ("cxblock", "dwconv_ln", lambda: _dwconv_args(gamma=_t(256, 1)), ValueError, r"gamma must have shape \(256\)"),
    ("cxblock", "dwconv_ln", lambda: _dwconv_args(x=_t(4, 4, 256)), ValueError,
     r"x must have shape \(\*, \*, \*, \*\)"),
]


@pytest.mark.parametrize(("module", "wrapper", "make_args", "error", "message"), BAD_INPUTS)
def test_wrappers_reject_bad_input_before_any_launch(built_library: library.CudaLibrary,
                                                     monkeypatch: pytest.MonkeyPatch, module, wrapper, make_args,
                                                     error, message) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a launch happened despite bad input")

    monkeypatch.setattr(library, "load", lambda path=None: built_library)
    monkeypatch.setattr(library, "launch", no_launch)
    with pytest.raises(error, match=message):
        getattr(_op_module(module), wrapper)(**make_args())


def test_fake_implementations_give_shapes_and_dtypes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _cuda_backend()  # registers the custom ops
    ops = torch.ops.memenc_fast
    with FakeTensorMode() as mode:
        for dtype in DTYPES:
            fake = lambda *shape: mode.from_tensor(torch.empty(*shape, dtype=dtype))  # noqa: E731
            param = lambda *shape: mode.from_tensor(torch.empty(*shape))  # noqa: E731  (fp32 parameters)
            stem = ops.cuda_mask_stem(fake(3, 1, 61, 45), param(4, 1, 3, 3), param(4), param(4), param(4), 1e-6,
                                      param(16, 4, 3, 3), param(16), param(16), param(16), 1e-6, True, 1.0, 0.0)
            assert stem.shape == (3, 16, 12, 16) and stem.dtype == dtype
            conv = ops.cuda_conv3x3s2_ln_gelu(fake(3, 16, 12, 16), fake(64, 16, 3, 3), fake(64), fake(64), fake(64),
                                              1e-6)
            assert conv.shape == (3, 8, 6, 64) and conv.dtype == dtype
            tokens = ops.cuda_proj_add(fake(3, 256, 4, 3), fake(3, 256, 4, 3), fake(256, 256, 1, 1), fake(256),
                                       param(256, 256, 1, 1), param(256))
            assert tokens.shape == (3, 4, 3, 256) and tokens.dtype == dtype
            normed, residual = ops.cuda_dwconv_ln(fake(3, 4, 3, 256), param(256, 1, 7, 7), param(256), param(256),
                                                  param(256), 1e-6, param(256), None)
            assert normed.shape == residual.shape == (3, 4, 3, 256) and normed.dtype == residual.dtype == dtype


def test_unsupported_ops_says_per_op_why(built_library: library.CudaLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "load", lambda path=None: built_library)
    cuda = _cuda_backend()
    cpu, dtype = torch.device("cpu"), torch.float32
    assert cuda.unsupported_ops(read_structure(_encoder(seed=1)), cpu, dtype) == {}
    assert cuda.unsupported_ops(read_structure(_encoder(seed=1, gamma=False)), cpu, dtype) == {}
    block = mf.CXBlock(250, kernel_size=9, padding=4)
    encoder = mf.MemoryEncoder(64, mf.MaskDownSampler(embed_dim=250, kernel_size=4, stride=4, padding=0),
                               mf.Fuser(block, 1), mf.PositionEmbeddingSine(64), in_dim=250)
    reasons = cuda.unsupported_ops(read_structure(encoder.eval()), cpu, dtype)
    assert reasons == {
        "mask_downsample": "mask stage 1 is a (4, 4) conv with stride (4, 4) and padding (0, 0); the kernels run "
                           "3x3 stride 2 padding 1 (sam2's configs)",
        "proj_add": "no CUDA kernel for channels 256 + 250 -> 250",
        "cxblock": "fuser.layers.0: no CUDA kernel for 250 channels and a 9x9 dwconv",
    }


# ---------------------------------------------------------------------- kernels, host-emulated


def _cuda_include_dir() -> Path:
    """The CUDA headers nvcc compiles against (nvcc may be a wrapper script outside the toolkit)."""
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True, check=False)
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if "INCLUDES=" in line:
            return Path(line.split('"')[1].split()[0].removeprefix("-I"))
    pytest.skip("could not find the CUDA headers from nvcc --dryrun")


EMULATED_H100 = (90, 132, 232448)  # the emulated GPU (emulation.h's default): arch of its code, SMs, shared memory
EMULATED_T4 = (75, 40, 65536)


def _build_emulated(directory: Path, arch: int) -> library.CudaLibrary:
    """csrc/*.cu built by the host C++ compiler against csrc/emulation.h with the code paths of
    ``arch``, with the header's hash."""
    if HOST_COMPILER is None or platform.machine() != "x86_64":
        pytest.skip("the kernel emulation needs an x86-64 host C++ compiler")
    if NVCC is None:
        pytest.skip("the kernel emulation needs the CUDA headers (nvcc not found)")
    out = directory / f"libmemenc_fast_emulated_sm{arch}.so"
    command = [HOST_COMPILER, "-x", "c++", "-DMEMENC_EMULATE", f"-DMEMENC_EMULATE_ARCH={arch}",
               launch_args_define(HEADER), "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-shared",
               f"-I{CSRC}", f"-I{_cuda_include_dir()}", *map(str, sorted(CSRC.glob("*.cu"))), "-o", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    emulated = library.CudaLibrary(out)
    assert emulated.runs_on_host and emulated.archs == (f"sm_{arch}",)
    return emulated


@pytest.fixture(scope="module")
def emulated_library(tmp_path_factory: pytest.TempPathFactory) -> library.CudaLibrary:
    """The host build with sm_90's code paths."""
    return _build_emulated(tmp_path_factory.mktemp("emulated"), 90)


@pytest.fixture(scope="module")
def emulated_sm75_library(tmp_path_factory: pytest.TempPathFactory) -> library.CudaLibrary:
    """The host build with sm_75's code paths: fp16 on mma.m16n8k8, fp32 on CUDA cores, bf16 a trap."""
    return _build_emulated(tmp_path_factory.mktemp("emulated_sm75"), 75)


def _ieee_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.backends.cudnn.allow_tf32`` off: the kernels' fp32 GEMMs (they replace nn.Conv2d layers)
    at IEEE-level accuracy, as the CPU torch ops they are compared with always are. TF32 mode, torch's
    default for convs, has its own tests."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def emulated(emulated_library: library.CudaLibrary, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The cuda backend with its launches going to the emulated library (on CPU tensors), every
    kernel output starting as NaN, fp32 GEMMs IEEE-level."""
    monkeypatch.setattr(library, "load", lambda path=None: emulated_library)
    _ieee_convs(monkeypatch)
    with poison_outputs():
        yield _cuda_backend()


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[library.CudaLibrary, Tuple[int, int, int]], None]]:
    """``on_gpu(emulated library, (arch, SMs, shared memory))``: the cuda backend launches on that
    library, emulating that GPU, until the test ends (then emulation.h's default GPU again); no
    launch refused before; fp32 GEMMs IEEE-level."""
    monkeypatch.setattr(kernel_args, "_refused", set())
    _ieee_convs(monkeypatch)
    used: List[library.CudaLibrary] = []

    def use(emulated_library: library.CudaLibrary, gpu: Tuple[int, int, int]) -> None:
        monkeypatch.setattr(library, "load", lambda path=None: emulated_library)
        emulated_library.emulate_gpu(*gpu)
        used.append(emulated_library)

    with poison_outputs():
        yield use
    for emulated_library in used:
        emulated_library.emulate_gpu(int(emulated_library.archs[0].removeprefix("sm_")), *EMULATED_H100[1:])


def _close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same computation, different rounding: fp32 ~1e-6, 16-bit a few output ulps (and fp32
    parameters where the torch op rounds them to the activations' dtype first)."""
    error = relative_error(out, expected)
    assert error < (2e-5 if dtype == torch.float32 else 2e-2), error


def _compare_ops(cuda: ModuleType, structure: Structure, pix_feat: torch.Tensor, masks: torch.Tensor) -> None:
    """Each cuda op against the torch op on the same structure and inputs."""
    dtype = masks.dtype
    batch, _, height, width = pix_feat.shape
    for apply_sigmoid, scale, bias in ((True, 1.0, 0.0), (True, 20.0, -10.0), (False, 1.0, 0.0)):
        out = cuda.mask_downsample(masks, structure.stages, None, apply_sigmoid, scale, bias)
        expected = torch_ops.mask_downsample(masks, structure.stages, None, apply_sigmoid, scale, bias)
        assert out.shape == expected.shape == (batch, 256, height, width) and out.dtype == dtype
        _close(out, expected, dtype)
    tokens = cuda.proj_add(expected, pix_feat, structure.projection)
    expected_tokens = torch_ops.proj_add(expected, pix_feat, structure.projection)
    assert tokens.shape == (batch, height, width, 256) and tokens.is_contiguous() and tokens.dtype == dtype
    _close(tokens, expected_tokens, dtype)
    for block in structure.blocks:
        out = cuda.cxblock(expected_tokens, block)
        assert out.shape == expected_tokens.shape and out.dtype == dtype
        _close(out, torch_ops.cxblock(expected_tokens, block), dtype)


@pytest.mark.parametrize(("dtype", "param_dtype", "gamma"), PRECISIONS)
def test_emulated_ops_match_torch_ops(emulated: ModuleType, dtype: torch.dtype, param_dtype: torch.dtype,
                                      gamma: bool) -> None:
    structure = read_structure(_encoder(seed=3, dtype=param_dtype, gamma=gamma))
    # Odd mask size (61x45 -> 4x3 features: 12 pixels, not a multiple of a 16-byte vector), batch 3.
    pix_feat, masks = make_inputs(SMALL, 3, seed=4, dtype=dtype, mask_size=(61, 45))
    with torch.no_grad():
        _compare_ops(emulated, structure, pix_feat[..., :3].contiguous(), masks)


def test_emulated_ops_read_live_parameters(emulated: ModuleType) -> None:
    """In-place updates and ``.data`` swaps reach the next call: nothing is cached."""
    encoder = _encoder(seed=5)
    structure = read_structure(encoder)
    pix_feat, masks = make_inputs(SMALL, 2, seed=6, dtype=torch.bfloat16)
    ops = _op_table()
    with torch.no_grad():
        before = pipeline.run_ops(ops, structure, pix_feat, masks, True, 1.0, 0.0)
        generator = torch.Generator().manual_seed(7)
        for param in structure.parameters()[::2]:
            param.mul_(1 + 0.5 * torch.rand(param.shape, generator=generator))
        conv = encoder.mask_downsampler.encoder[6]  # stage 3: a new tensor behind the same Parameter
        conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * 0.3
        assert structure.parameters()[0] is encoder.mask_downsampler.encoder[0].weight
        after = pipeline.run_ops(ops, structure, pix_feat, masks, True, 1.0, 0.0)
        assert relative_error(after, before) > 0.1
        _close(after, pipeline.run_ops(_op_table(torch_ops), structure, pix_feat, masks, True, 1.0, 0.0),
               torch.bfloat16)
        _compare_ops(emulated, structure, pix_feat, masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_proj_add_reads_every_layout(emulated: ModuleType, dtype: torch.dtype) -> None:
    projection = read_structure(_encoder(seed=8)).projection  # fp32 parameters
    generator = torch.Generator().manual_seed(9)
    mask_features = torch.randn(2, 256, 4, 4, generator=generator).to(dtype)
    pix_feat = torch.randn(1, 256, 4, 4, generator=generator).to(dtype)
    with torch.no_grad():
        expected = torch_ops.proj_add(mask_features, pix_feat.expand(2, -1, -1, -1), projection)
        variants = [
            (mask_features, pix_feat.expand(2, -1, -1, -1)),  # NCHW, expanded batch (stride 0)
            (mask_features.contiguous(memory_format=torch.channels_last),
             pix_feat.expand(2, -1, -1, -1).contiguous(memory_format=torch.channels_last)),
            (mask_features.transpose(2, 3).contiguous().transpose(2, 3), pix_feat.expand(2, -1, -1, -1)),  # copied
        ]
        for m, p in variants:
            _close(emulated.proj_add(m, p, projection), expected, dtype)


@pytest.mark.parametrize(("dtype", "param_dtype", "gamma"), [PRECISIONS[0], PRECISIONS[2], PRECISIONS[3]])
def test_emulated_pipeline_matches_float64_reference(emulated: ModuleType, dtype: torch.dtype,
                                                     param_dtype: torch.dtype, gamma: bool) -> None:
    encoder = _encoder(seed=10, dtype=param_dtype, gamma=gamma)
    pix_feat, masks = make_inputs(SMALL, 2, seed=11)
    with torch.no_grad():
        out = pipeline.run_ops(_op_table(), read_structure(encoder), pix_feat.to(dtype), masks.to(dtype), True, 1.0,
                               0.0)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = None if dtype == torch.float32 else reference_outputs(encoder, pix_feat, masks, dtype)["vision_features"]
    assert out.shape == (2, 64, 4, 4) and out.dtype == dtype
    verdict = judge(out, oracle, dtype, same_dtype_ref=same, allow_tf32=False)
    assert verdict.passed, verdict.describe()


def _run_ops_with_tf32_allowed(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor,
                               monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The cuda backend's op chain with TF32 allowed for convs (``torch.backends.cudnn.allow_tf32``,
    torch's default) and matmuls, as a user may set it."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with tf32_matmuls(True), torch.no_grad():
        return pipeline.run_ops(_op_table(), read_structure(encoder), pix_feat, masks, True, 1.0, 0.0)


def test_emulated_tf32_mode_when_torch_allows_it(emulated: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder(seed=12)
    pix_feat, masks = make_inputs(SMALL, 1, seed=13)
    out = _run_ops_with_tf32_allowed(encoder, pix_feat, masks, monkeypatch)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    error = relative_error(out, oracle)
    assert 1e-6 < error < 1e-3, error  # visibly TF32, within the TF32 bound


def test_emulated_pipeline_compiles_to_one_graph(emulated: ModuleType) -> None:
    """fullgraph torch.compile of the cuda pipeline over fp32 parameters with bf16 activations, no
    gamma in one block: each kernel a custom op whose fake gives its output (AOT autograd checks)."""
    encoder = _encoder(seed=14)
    encoder.fuser.layers[1].gamma = None
    structure = read_structure(encoder)
    pix_feat, masks = make_inputs(SMALL, 2, seed=15, dtype=torch.bfloat16)
    ops = _op_table()
    with torch.no_grad():
        expected = pipeline.run_ops(ops, structure, pix_feat, masks, True, 20.0, -10.0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda p, m: pipeline.run_ops(ops, structure, p, m, True, 20.0, -10.0),
                                 fullgraph=True, backend="aot_eager")
        out = compiled(pix_feat, masks)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_emulated_pipeline_exports_with_the_kernels_as_custom_ops(emulated: ModuleType) -> None:
    structure = read_structure(_encoder(seed=16))
    ops = _op_table()

    class Pipeline(torch.nn.Module):
        def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return pipeline.run_ops(ops, structure, pix_feat, masks, True, 1.0, 0.0)

    pix_feat, masks = make_inputs(SMALL, 2, seed=17)
    with torch.no_grad():
        program = torch.export.export(Pipeline(), (pix_feat, masks))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"memenc_fast.cuda_mask_stem.default", "memenc_fast.cuda_conv3x3s2_ln_gelu.default",
            "memenc_fast.cuda_proj_add.default", "memenc_fast.cuda_dwconv_ln.default"} <= targets, targets
    pix_feat, masks = make_inputs(SMALL, 2, seed=18)
    with torch.no_grad():
        expected = pipeline.run_ops(ops, structure, pix_feat, masks, True, 1.0, 0.0)
        torch.testing.assert_close(program.module()(pix_feat, masks), expected, rtol=0, atol=0)


def test_emulated_launchers_refuse_what_has_no_kernel(emulated: ModuleType) -> None:
    """The last line of defence: a wrapper called directly with sizes without a kernel gets the
    launcher's error, never a wrong result."""
    with pytest.raises(library.CudaLaunchError, match=r"conv3x3s2_ln_gelu: CUDA error 801"):
        _op_module("mask_downsample").conv3x3s2_ln_gelu(**_stage_args(weight=_t(128, 16, 3, 3), bias=_t(128),
                                                                      norm_weight=_t(128), norm_bias=_t(128)))


@pytest.mark.parametrize(("gpu", "tiles"), [
    # One SM: the largest tiles; a T4's 64 KiB: stage 4 in 32-row tiles; an H100 at this small size: the
    # smallest (most blocks).
    pytest.param((90, 1, 232448), ("16, 64, 128>", "64, 256, 64>", "64, 128>"), id="one-sm"),
    pytest.param((90, 1, 65536), ("16, 64, 128>", "64, 256, 32>", "64, 128>"), id="one-sm-64k"),
    pytest.param(EMULATED_H100, ("16, 64, 64>", "64, 256, 16>", "64, 64>"), id="h100"),
])
def test_emulated_ops_match_torch_ops_with_each_tile(emulated_library: library.CudaLibrary, on_gpu,
                                                     gpu: Tuple[int, int, int], tiles: Tuple[str, ...]) -> None:
    """The launchers plan for the GPU they run on: each tile configuration computes the same."""
    on_gpu(emulated_library, gpu)
    structure = read_structure(_encoder(seed=42, dtype=torch.float32))
    pix_feat, masks = make_inputs(SMALL, 3, seed=43, dtype=torch.bfloat16)
    spec = gpus.GpuSpec("emulated", divmod(gpu[0], 10), gpu[1], gpu[2])
    common = dict(dtype=1, weight_dtype=0, batch=3)
    chosen = (emulated_library.plan("conv3x3s2_ln_gelu", spec, **common, height=16, width=16, in_channels=16,
                                    out_channels=64).kernel,
              emulated_library.plan("conv3x3s2_ln_gelu", spec, **common, height=8, width=8, in_channels=64,
                                    out_channels=256).kernel,
              emulated_library.plan("proj_add", spec, **common, pixels=16, mask_channels=256, pix_channels=256,
                                    out_channels=256, mask_stride_c=1, mask_stride_p=256, pix_stride_c=16,
                                    pix_stride_p=1).kernel)
    assert all(kernel.endswith(tile) for kernel, tile in zip(chosen, tiles)), chosen
    with torch.no_grad():
        _compare_ops(_cuda_backend(), structure, pix_feat, masks)


@pytest.mark.parametrize(("dtype", "param_dtype", "gamma"), [PRECISIONS[0], PRECISIONS[2], PRECISIONS[4]])
def test_emulated_sm75_code_paths_match_torch_ops(emulated_sm75_library: library.CudaLibrary, on_gpu,
                                                  dtype: torch.dtype, param_dtype: torch.dtype, gamma: bool) -> None:
    """sm_75's code: fp16 GEMMs as two mma.m16n8k8 per k16, fp32 GEMMs on the CUDA cores, in T4's
    tiles (64 KiB of shared memory)."""
    on_gpu(emulated_sm75_library, EMULATED_T4)
    structure = read_structure(_encoder(seed=44, dtype=param_dtype, gamma=gamma))
    pix_feat, masks = make_inputs(SMALL, 2, seed=45, dtype=dtype, mask_size=(61, 45))
    with torch.no_grad():
        _compare_ops(_cuda_backend(), structure, pix_feat[..., :3].contiguous(), masks)


def test_emulated_sm75_fp32_is_full_precision(emulated_sm75_library: library.CudaLibrary, on_gpu,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CUDA cores fp32 GEMMs are fp32 whether or not torch allows TF32."""
    on_gpu(emulated_sm75_library, EMULATED_T4)
    encoder = _encoder(seed=46)
    pix_feat, masks = make_inputs(SMALL, 1, seed=47)
    out = _run_ops_with_tf32_allowed(encoder, pix_feat, masks, monkeypatch)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert relative_error(out, oracle) < 1e-5


def _counting_launches(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The ops the cuda backend's wrappers launch from now on, in order."""
    launched: List[str] = []
    launch = library.launch

    def counting(op: str, device: torch.device, **fields: object) -> None:
        launched.append(op)
        launch(op, device, **fields)

    monkeypatch.setattr(library, "launch", counting)
    return launched


@pytest.mark.parametrize(("library_arch", "gpu", "dtype", "refused", "reason"), [
    pytest.param(75, EMULATED_T4, torch.bfloat16, {"mask_stem", "conv3x3s2_ln_gelu", "proj_add", "dwconv_ln"},
                 r"CUDA error 209 \(cudaErrorNoKernelImageForDevice\)", id="bf16-on-sm75"),
    pytest.param(90, (90, 132, 16 * 1024), torch.float32, {"conv3x3s2_ln_gelu", "proj_add"},
                 r"CUDA error 9 \(cudaErrorInvalidConfiguration\)", id="no-tile-fits-16k"),
    pytest.param(90, (0, 132, 232448), torch.float16, {"mask_stem", "conv3x3s2_ln_gelu", "proj_add", "dwconv_ln"},
                 r"CUDA error 209 \(cudaErrorNoKernelImageForDevice\)", id="no-code-for-the-gpu"),
])
def test_emulated_refused_launch_runs_the_torch_op_warned_once(
        emulated_library: library.CudaLibrary, emulated_sm75_library: library.CudaLibrary, on_gpu,
        monkeypatch: pytest.MonkeyPatch, library_arch: int, gpu: Tuple[int, int, int], dtype: torch.dtype,
        refused: set, reason: str) -> None:
    """A launch the GPU refuses (no code for it, a dtype its code does not serve, no tile that fits
    its shared memory) runs the torch op: the pipeline's result is the torch ops', one warning per
    kernel and signature names the kernel, the GPU and the reason, and the next call goes straight
    to torch without trying the launch."""
    on_gpu(emulated_library if library_arch == 90 else emulated_sm75_library, gpu)
    structure = read_structure(_encoder(seed=48, dtype=dtype))
    pix_feat, masks = make_inputs(SMALL, 2, seed=49, dtype=dtype)
    launched = _counting_launches(monkeypatch)
    with torch.no_grad():
        expected = pipeline.run_ops(_op_table(torch_ops), structure, pix_feat, masks, True, 1.0, 0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pipeline.run_ops(_op_table(), structure, pix_feat, masks, True, 1.0, 0.0)
        _close(out, expected, dtype)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        kernels = {re.match(r"memenc_fast: (mf::\w+) was refused on cpu \(cpu\): ", m).group(1) for m in messages}
        assert kernels == {f"mf::{op}_kernel" for op in refused}, messages
        assert all(re.search(reason, m) and m.endswith("this op runs the torch op for these inputs from now on")
                   for m in messages), messages
        # One warning per kernel and signature: the stage conv twice (two stages), the CXBlocks' dwconv once.
        assert len(messages) == len(refused) + ("conv3x3s2_ln_gelu" in refused)
        tried = list(launched)
        launched.clear()
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            second = pipeline.run_ops(_op_table(), structure, pix_feat, masks, True, 1.0, 0.0)
    assert not [w for w in again if issubclass(w.category, RuntimeWarning)]
    assert launched == [op for op in tried if op not in refused]
    _close(second, expected, dtype)


@pytest.mark.parametrize("code", [1, 700])
def test_emulated_other_cuda_errors_stay_errors(emulated_library: library.CudaLibrary, on_gpu,
                                                monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    on_gpu(emulated_library, EMULATED_H100)
    monkeypatch.setitem(emulated_library._launchers, "proj_add", lambda *args: code)
    with pytest.raises(library.CudaLaunchError, match=rf"memenc_fast proj_add: CUDA error {code}"):
        _op_module("proj_add").proj_add_tokens(**_proj_args())
    assert not kernel_args._refused


def test_emulated_refused_launch_falls_back_inside_compiled_code(emulated_sm75_library: library.CudaLibrary,
                                                                 on_gpu) -> None:
    """Compiled code runs each kernel as its custom op, whose implementation falls back: the compiled
    pipeline gives the torch ops' result where the GPU refuses every launch."""
    on_gpu(emulated_sm75_library, EMULATED_T4)
    structure = read_structure(_encoder(seed=50, dtype=torch.bfloat16))
    pix_feat, masks = make_inputs(SMALL, 2, seed=51, dtype=torch.bfloat16)
    ops = _op_table()
    with torch.no_grad():
        expected = pipeline.run_ops(_op_table(torch_ops), structure, pix_feat, masks, True, 20.0, -10.0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda p, m: pipeline.run_ops(ops, structure, p, m, True, 20.0, -10.0),
                                 fullgraph=True, backend="aot_eager")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(pix_feat, masks)
    _close(out, expected, torch.bfloat16)
    assert {str(w.message).split(" was refused")[0] for w in caught if issubclass(w.category, RuntimeWarning)} == {
        "memenc_fast: mf::mask_stem_kernel", "memenc_fast: mf::conv3x3s2_ln_gelu_kernel",
        "memenc_fast: mf::proj_add_kernel", "memenc_fast: mf::dwconv_ln_kernel"}


# ------------------------------------------------------------- the runtime, the device, first use


def _emulation(lib: library.CudaLibrary) -> ctypes.CDLL:
    """The emulation's own controls in host build ``lib`` (csrc/library.cu, MEMENC_EMULATE only)."""
    controls = ctypes.CDLL(str(lib.path))
    controls.memenc_fast_emulate_runtime.argtypes = [ctypes.c_int] * 5
    controls.memenc_fast_emulate_runtime.restype = None
    controls.memenc_fast_emulate_capture.argtypes = [ctypes.c_int]
    controls.memenc_fast_emulate_capture.restype = ctypes.c_int
    controls.memenc_fast_emulated_contexts.argtypes = [ctypes.POINTER(ctypes.c_int)]
    controls.memenc_fast_emulated_contexts.restype = ctypes.c_uint64
    return controls


def _contexts(controls: ctypes.CDLL) -> Tuple[int, int]:
    """(bit d set where device d has a primary context, the device whose context is current or -1)."""
    current = ctypes.c_int(0)
    return controls.memenc_fast_emulated_contexts(ctypes.byref(current)), current.value


CUDA_13 = 13000  # the emulated runtime's version: 1000 * major + 10 * minor


@pytest.fixture
def emulated_runtime(emulated_library: library.CudaLibrary,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[ctypes.CDLL]:
    """The controls of the emulated library's runtime, fresh (CUDA 13.0 on a 13.0 driver, one device,
    no context) before and after the test; the cuda backend uses that library, fp32 GEMMs IEEE-level."""
    controls = _emulation(emulated_library)
    controls.memenc_fast_emulate_runtime(CUDA_13, CUDA_13, 0, 1, -1)
    monkeypatch.setattr(library, "load", lambda path=None: emulated_library)
    _ieee_convs(monkeypatch)
    yield controls
    controls.memenc_fast_emulate_runtime(CUDA_13, CUDA_13, 0, 1, -1)


@pytest.mark.parametrize(("driver", "error", "reason"), [
    pytest.param(12040, 35, r"the CUDA library was built with CUDA 13\.0, and this machine's NVIDIA driver supports "
                            r"CUDA 12\.4 at most \(CUDA error 35 \(cudaErrorInsufficientDriver\): CUDA driver version "
                            r"is insufficient for CUDA runtime version\): update the driver, or rebuild the library "
                            r"with a CUDA 12\.4 toolkit \(pip install -e \.\)", id="older-driver"),
    pytest.param(0, 35, r"no NVIDIA driver found \(the CUDA library was built with CUDA 13\.0; CUDA error 35 "
                        r"\(cudaErrorInsufficientDriver\): .*\)", id="no-driver"),
    pytest.param(CUDA_13, 999, r"the CUDA library was built with CUDA 13\.0, and its runtime cannot use this machine "
                               r"\(CUDA 13\.0, the driver supports CUDA 13\.0, 0 device\(s\)\): CUDA error 999 "
                               r"\(cudaErrorUnknown\): emulated CUDA error", id="unknown-error"),
])
def test_runtime_that_cannot_serve_the_machine_leaves_it_to_torch(emulated_runtime: ctypes.CDLL,
                                                                  monkeypatch: pytest.MonkeyPatch, driver: int,
                                                                  error: int, reason: str) -> None:
    """The library's runtime is asked once per process whether it can serve the machine (a driver
    older than the runtime fails its every call with 35): where not, the cuda backend is unavailable
    with the reason (logged once), ``auto`` passes it over for the torch backend, and asking for it by
    name raises that reason. The same machine with a serving runtime gets the cuda backend."""
    structure = read_structure(_encoder(seed=60))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch's own runtime serves this driver
    monkeypatch.delitem(dispatch._registry, "triton")  # auto's choice between cuda and torch alone
    cuda_device = torch.device("cuda", 0)
    assert dispatch.select_backend(cuda_device, torch.float32, structure, None, False, "auto").name == "cuda"
    emulated_runtime.memenc_fast_emulate_runtime(CUDA_13, driver, error, 1, -1)
    said = library.unavailable_reason()
    assert re.fullmatch(reason, said), said
    assert f"memenc_fast: the cuda backend cannot run here: {said}" in dispatch._logged_reasons
    assert "cuda" not in mf.available_backends()
    chosen = dispatch.select_backend(cuda_device, torch.float32, structure, None, False, "auto")
    assert chosen.name == "torch" and chosen.reason == f"auto skips backend 'cuda': {said}"
    with pytest.raises(BackendUnavailableError, match=re.escape(said)):
        dispatch.select_backend(cuda_device, torch.float32, structure, None, False, "cuda")


def test_info_reports_what_the_librarys_runtime_finds(emulated_runtime: ctypes.CDLL,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert info.collect()["cuda library"]["CUDA runtime"] == "CUDA 13.0, the driver supports CUDA 13.0, 1 device(s)"
    emulated_runtime.memenc_fast_emulate_runtime(CUDA_13, 12080, 35, 1, -1)
    reason = library.unavailable_reason()
    written = info.collect()
    assert written["backends"]["cuda"] == f"not available: {reason}"
    assert written["cuda library"]["CUDA runtime"] == ("CUDA 13.0, the driver supports CUDA 12.8, 0 device(s); cannot "
                                                       f"serve this machine: {reason}")


def test_a_device_the_library_cannot_run_on_refuses_every_op(emulated_runtime: ctypes.CDLL, on_gpu,
                                                             emulated_library: library.CudaLibrary) -> None:
    """Readying a device (the backend's first choice for it) fails where the library cannot run its
    kernels there: every op is refused with the runtime's reason, and the torch ops serve."""
    structure = read_structure(_encoder(seed=61))
    cuda = _cuda_backend()
    assert cuda.unsupported_ops(structure, torch.device("cpu"), torch.float32) == {}
    on_gpu(emulated_library, (0, 132, 232448))  # the library has no code for this GPU
    reason = ("the CUDA library cannot run its kernels on cuda:0: CUDA error 209 (cudaErrorNoKernelImageForDevice): "
              "no kernel image is available for execution on the device")
    assert cuda.unsupported_ops(structure, torch.device("cpu"), torch.float32) == dict.fromkeys(
        ("mask_downsample", "proj_add", "cxblock", "out_proj"), reason)


def test_rocm_build_leaves_amd_gpus_to_the_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ROCm build of torch calls AMD GPUs ``cuda``: both kernel backends say they are not for them,
    ``auto`` picks torch there, and ``info`` says what torch is."""
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    for name, kernels in (("triton", "its Triton kernels"), ("cuda", "its CUDA kernels")):
        assert dispatch._registry[name].availability() == (
            f"torch is a ROCm build (HIP 6.2.41133): {kernels} are written for NVIDIA GPUs (32-thread warps, their "
            "cache hints and memory ordering), not AMD's; the torch backend serves AMD GPUs")
        assert name not in mf.available_backends()
    structure = read_structure(_encoder(seed=62, dtype=torch.bfloat16))
    amd_gpu = torch.device("cuda", 0)
    chosen = dispatch.select_backend(amd_gpu, torch.bfloat16, structure, None, False, "auto")
    assert chosen.name == "torch"
    assert chosen.reason.startswith("auto skips backend 'cuda': torch is a ROCm build")
    assert "; auto skips backend 'triton': torch is a ROCm build" in chosen.reason
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' cannot run this forward: torch is a ROCm"):
        dispatch.select_backend(amd_gpu, torch.bfloat16, structure, None, False, "triton")
    written = info.collect()
    assert written["versions"]["torch CUDA"] == "none (a ROCm build: HIP 6.2.41133)"
    assert written["backends"]["cuda"].startswith("not available: torch is a ROCm build (HIP 6.2.41133)")


def _offset_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` as a contiguous view one element into its storage: misaligned for 16-byte
    vectors and for pairs of elements, which ``.contiguous()`` does not change."""
    storage = torch.empty(t.numel() + 1, dtype=dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % (2 * view.element_size()) != 0
    return view


def _offset_views_match_aligned_ones(stages: ModuleType, blocks: ModuleType, stage: Dict[str, object],
                                     dwconv: Dict[str, object], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stage and dwconv ops give misaligned views of their inputs (in ``dtype``, popped from
    ``stage`` and ``dwconv``) exactly the results of aligned copies; returns the two views."""
    stage_x, dwconv_x = _offset_view(stage.pop("x"), dtype), _offset_view(dwconv.pop("x"), dtype)
    with torch.no_grad():
        torch.testing.assert_close(stages.conv3x3s2_ln_gelu(stage_x, **stage),
                                   stages.conv3x3s2_ln_gelu(stage_x.clone(), **stage), rtol=0, atol=0)
        for out, expected in zip(blocks.dwconv_ln(dwconv_x, **dwconv), blocks.dwconv_ln(dwconv_x.clone(), **dwconv)):
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    return stage_x, dwconv_x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_views_with_a_storage_offset_are_never_read_misaligned(emulated: ModuleType,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        dtype: torch.dtype) -> None:
    """The wrappers copy a misaligned activation (the result is the aligned input's); handed one
    anyway, the launchers refuse it as an invalid argument instead of letting a kernel make a
    misaligned vector access, which ends a GPU's context (and fails an emulated launch)."""
    stages, blocks = _op_module("mask_downsample"), _op_module("cxblock")
    stage, dwconv = _stage_args(), _dwconv_args()  # fp32 parameters: dtype's activations read them as they are
    stage_x, dwconv_x = _offset_views_match_aligned_ones(stages, blocks, stage, dwconv, dtype)
    with torch.no_grad():
        for module in (stages, blocks):
            monkeypatch.setattr(module, "contiguous_aligned", lambda t: t.contiguous())
        with pytest.raises(library.CudaLaunchError, match=r"conv3x3s2_ln_gelu: CUDA error 1: invalid argument"):
            stages.conv3x3s2_ln_gelu(stage_x, **stage)
        with pytest.raises(library.CudaLaunchError, match=r"dwconv_ln: CUDA error 1: invalid argument"):
            blocks.dwconv_ln(dwconv_x, **dwconv)


def test_emulated_launch_reports_its_own_error_not_an_earlier_one(emulated_runtime: ctypes.CDLL) -> None:
    """An earlier runtime failure on the thread (readying a device that does not exist) stays its last
    error; a good launch after it is still reported good: the launch helper returns the launch's own
    error (cudaLaunchKernelEx's), never cudaGetLastError's, which the emulation keeps as CUDA does."""
    assert library.load().prepare_device(3) == ("the CUDA library cannot run its kernels on cuda:3: CUDA error 101: "
                                                "invalid device ordinal")
    args = _dwconv_args()
    with torch.no_grad():
        for out, expected in zip(_op_module("cxblock").dwconv_ln(**args),
                                 _op_module("cxblock")._dwconv_ln_in_torch(**args)):
            _close(out, expected, torch.float32)


def _dwconv_on(lib: library.CudaLibrary, device_index: int) -> None:
    """dwconv_ln's launcher called for CUDA device ``device_index`` (the emulation runs it on the host),
    checked against torch."""
    args = _dwconv_args(gamma=None)
    x = args["x"]
    normed, residual = torch.empty_like(x), torch.empty_like(x)
    pointers = {name: t.data_ptr() for name, t in args.items() if isinstance(t, torch.Tensor)}
    lib.launch("dwconv_ln", lib.args["dwconv_ln"](
        dtype=0, weight_dtype=0, batch=x.shape[0], height=x.shape[1], width=x.shape[2], channels=x.shape[3],
        kernel_size=7, eps=args["eps"], normed=normed.data_ptr(), residual=residual.data_ptr(), **pointers),
        device_index, None)
    for out, expected in zip((normed, residual), _op_module("cxblock")._dwconv_ln_in_torch(**args)):
        _close(out, expected, torch.float32)


@pytest.mark.parametrize(("current", "after"), [
    pytest.param(-1, (0b10, -1), id="no-context-current"),  # cudaGetDevice says 0: GPU 0 must not get a context
    pytest.param(0, (0b11, 0), id="gpu0-current"),
    pytest.param(1, (0b10, 1), id="gpu1-current"),
])
def test_emulated_launch_on_one_gpu_creates_no_context_on_another(emulated_runtime: ctypes.CDLL,
                                                                  emulated_library: library.CudaLibrary,
                                                                  current: int, after: Tuple[int, int]) -> None:
    """On a two-GPU machine, readying and launching on cuda:1 creates GPU 1's primary context only and
    leaves the thread's current context as it was: none stays none (restoring cudaGetDevice's 0 would
    create GPU 0's context), GPU 0's stays current."""
    emulated_runtime.memenc_fast_emulate_runtime(CUDA_13, CUDA_13, 0, 2, current)
    assert emulated_library.prepare_device(1) is None
    assert _contexts(emulated_runtime) == after
    _dwconv_on(emulated_library, 1)
    assert _contexts(emulated_runtime) == after


def test_emulated_kernels_are_ready_before_a_capture_and_safe_inside_one(emulated_library: library.CudaLibrary,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel's first launch on a device loads it and sets its shared-memory opt-in: calls that a
    global-mode stream capture (a user's torch.cuda.graph around the first forward) forbids. The
    backend's first choice of a device readies every kernel there, so a captured forward makes no such
    call; where a first launch, or the readying, comes inside a capture anyway, those calls run in
    relaxed capture mode and succeed."""
    _ieee_convs(monkeypatch)
    structure = read_structure(_encoder(seed=63))
    pix_feat, masks = make_inputs(SMALL, 2, seed=64)
    with torch.no_grad():
        expected = pipeline.run_ops(_op_table(torch_ops), structure, pix_feat, masks, True, 1.0, 0.0)
    for ready_first in (True, False):
        # A copy loads as a library of its own: nothing prepared on any device yet.
        path = tmp_path / f"fresh_{ready_first}_{library.LIBRARY_NAME}"
        shutil.copyfile(emulated_library.path, path)
        fresh = library.CudaLibrary(path)
        controls = _emulation(fresh)
        controls.memenc_fast_emulate_runtime(CUDA_13, CUDA_13, 0, 1, -1)
        monkeypatch.setattr(library, "load", lambda path=None, fresh=fresh: fresh)
        if ready_first:
            assert _cuda_backend().unsupported_ops(structure, torch.device("cpu"), torch.float32) == {}
        controls.memenc_fast_emulate_capture(1)
        with torch.no_grad():
            out = pipeline.run_ops(_op_table(), structure, pix_feat, masks, True, 1.0, 0.0)
        calls_in_capture = controls.memenc_fast_emulate_capture(0)
        assert (calls_in_capture == 0) if ready_first else (calls_in_capture > 0), calls_in_capture
        _close(out, expected, torch.float32)


@pytest.mark.parametrize(("conv_tf32", "matmul_tf32"), [(True, False), (False, True), (False, False)])
def test_emulated_fp32_precision_follows_each_reference_layers_flag(emulated: ModuleType,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    conv_tf32: bool, matmul_tf32: bool) -> None:
    """The kernels' fp32 GEMMs replace nn.Conv2d layers (the mask stages, proj_add's 1x1 convs): one
    TF32 product exactly where torch.backends.cudnn.allow_tf32 gives such a conv TF32, whatever
    nn.Linear's flag (torch.backends.cuda.matmul.allow_tf32, which the MLP's cuBLAS GEMMs obey
    themselves) says; out_proj, an nn.Conv2d too, runs as a conv, reading the same flag."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", conv_tf32)
    precise: Dict[str, List[int]] = {}
    launch = library.launch

    def recording(op: str, device: torch.device, **fields: object) -> None:
        if "precise" in fields:
            precise.setdefault(op, []).append(fields["precise"])
        launch(op, device, **fields)

    monkeypatch.setattr(library, "launch", recording)
    structure = read_structure(_encoder(seed=65))
    pix_feat, masks = make_inputs(SMALL, 1, seed=66)
    convs: List[Tuple[int, ...]] = []
    conv2d = torch.nn.functional.conv2d
    with tf32_matmuls(matmul_tf32), torch.no_grad():
        expected = pipeline.run_ops(_op_table(torch_ops), structure, pix_feat, masks, True, 1.0, 0.0)
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, *rest, **kw: convs.append(tuple(w.shape))
                            or conv2d(x, w, *rest, **kw))
        out = pipeline.run_ops(_op_table(), structure, pix_feat, masks, True, 1.0, 0.0)
    assert precise == {"conv3x3s2_ln_gelu": [int(not conv_tf32)] * 2, "proj_add": [int(not conv_tf32)]}
    assert convs == [(64, 256, 1, 1)]  # out_proj's weight
    error = relative_error(out, expected)  # CPU torch computes fp32 without TF32
    assert (1e-6 < error < 1e-3) if conv_tf32 else (error < 2e-5), error


# ------------------------------------------------------------------------------------- GPU


def _gpu_module_case(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor,
                     autocast: Optional[torch.dtype] = None) -> None:
    """The module on the cuda backend (outputs poisoned, under ``autocast`` when given) against the
    float64 reference."""
    dtype = autocast or masks.dtype
    with torch.no_grad(), mf.use_backend("cuda"), poison_outputs(), torch.autocast(
            "cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = encoder(pix_feat, masks)["vision_features"]
    assert encoder.last_backend == "cuda" and encoder.last_backend_reason is None and out.dtype == dtype
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = reference_outputs(encoder, pix_feat, masks, dtype)["vision_features"] if dtype != torch.float32 else None
    verdict = judge(out, oracle, dtype, "cuda", same_dtype_ref=same)
    assert verdict.passed, verdict.describe()


def _gpu_preset_case(preset: Preset, batch: int, dtype: torch.dtype, seed: int) -> None:
    device = torch.device("cuda")
    encoder = build_encoder(preset, seed=seed, dtype=dtype, device=device)
    pix_feat, masks = make_inputs(preset, batch, seed=seed + 1, dtype=dtype, device=device)
    _gpu_module_case(encoder, pix_feat, masks)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_module_sam2_size_matches_reference(dtype: torch.dtype, batch: int) -> None:
    _gpu_preset_case(PRESETS["sam2"], batch, dtype, seed=20)


@requires_cuda
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [True, False])
def test_gpu_module_autocast_over_fp32_parameters(autocast: torch.dtype, gamma: bool) -> None:
    """SAM 2's common case: an fp32 module run under autocast; the kernels read the fp32
    parameters as they are."""
    device = torch.device("cuda")
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=21, device=device)
    if not gamma:
        for block in encoder.fuser.layers:
            block.gamma = None
    pix_feat, masks = make_inputs(preset, 2, seed=22, device=device)
    _gpu_module_case(encoder, pix_feat, masks, autocast=autocast)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_module_odd_size_batch3(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=23, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(24)
    masks = (2 * torch.randn(3, 1, 333, 205, generator=generator)).to(device, dtype)  # -> 21 x 13 features
    pix_feat = torch.randn(3, 256, 21, 13, generator=generator).to(device, dtype)
    _gpu_module_case(encoder, pix_feat, masks)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_module_sam3_size_matches_reference(dtype: torch.dtype) -> None:
    _gpu_preset_case(PRESETS["sam3"], 2, dtype, seed=25)


@requires_cuda
@pytest.mark.parametrize(("dtype", "param_dtype", "gamma"), PRECISIONS)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_each_op_matches_torch_op(dtype: torch.dtype, param_dtype: torch.dtype, gamma: bool,
                                      batch: int) -> None:
    device = torch.device("cuda")
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=26, dtype=param_dtype, device=device)
    if not gamma:
        for block in encoder.fuser.layers:
            block.gamma = None
    pix_feat, masks = make_inputs(preset, batch, seed=27, dtype=dtype, device=device)
    with torch.no_grad(), poison_outputs():
        _compare_ops(_cuda_backend(), read_structure(encoder), pix_feat, masks)


@requires_cuda
def test_gpu_parameter_updates_reach_the_next_forward() -> None:
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=28, device=device, dtype=torch.bfloat16)
    pix_feat, masks = make_inputs(SMALL, 2, seed=29, device=device, dtype=torch.bfloat16)
    with torch.no_grad(), mf.use_backend("cuda"):
        before = encoder(pix_feat, masks)["vision_features"]
        for param in encoder.parameters():
            param.mul_(1.25)
        encoder.mask_downsampler.encoder[9].weight.data = encoder.mask_downsampler.encoder[9].weight.data.flip(0)
        after = encoder(pix_feat, masks)["vision_features"]
    assert encoder.last_backend == "cuda" and relative_error(after, before) > 0.1
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = reference_outputs(encoder, pix_feat, masks, torch.bfloat16)["vision_features"]
    verdict = judge(after, oracle, torch.bfloat16, "cuda", same_dtype_ref=same)
    assert verdict.passed, verdict.describe()


@requires_cuda
def test_gpu_runs_on_the_inputs_device_and_current_stream() -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    encoder = build_encoder(SMALL, seed=30, device=device, dtype=torch.bfloat16)
    pix_feat, masks = make_inputs(SMALL, 2, seed=31, device=device, dtype=torch.bfloat16)
    with torch.no_grad(), mf.use_backend("cuda"):
        expected = encoder(pix_feat, masks)["vision_features"]
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            out = encoder(pix_feat, masks)["vision_features"]
        stream.synchronize()
    assert out.device == device
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@requires_cuda
def test_gpu_torch_compile_traces_through() -> None:
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=32, device=device)
    pix_feat, masks = make_inputs(SMALL, 2, seed=33, device=device)
    with torch.no_grad(), mf.use_backend("cuda"), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = encoder(pix_feat, masks)["vision_features"]
        out = torch.compile(encoder)(pix_feat, masks)["vision_features"]
    assert relative_error(out, expected) < 1e-2


@requires_cuda
def test_gpu_custom_ops_pass_opcheck() -> None:
    _cuda_backend()
    ops = torch.ops.memenc_fast
    device = torch.device("cuda")
    r = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16)  # noqa: E731
    p = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731  (fp32 parameters)
    torch.library.opcheck(ops.cuda_mask_stem, (r(2, 1, 40, 40), p(4, 1, 3, 3), p(4), p(4), p(4), 1e-6,
                                               p(16, 4, 3, 3), p(16), p(16), p(16), 1e-6, True, 1.0, 0.0))
    torch.library.opcheck(ops.cuda_conv3x3s2_ln_gelu, (r(2, 10, 10, 64), r(256, 64, 3, 3), r(256), r(256), r(256),
                                                       1e-6))
    torch.library.opcheck(ops.cuda_proj_add, (r(2, 256, 4, 4), r(2, 256, 4, 4), p(256, 256, 1, 1), p(256),
                                              p(256, 256, 1, 1), p(256)))
    for gamma in (p(256), None):
        torch.library.opcheck(ops.cuda_dwconv_ln, (r(2, 4, 4, 256), p(256, 1, 7, 7), p(256), p(256), p(256), 1e-6,
                                                   p(256), gamma))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_views_with_a_storage_offset_give_the_aligned_result(dtype: torch.dtype) -> None:
    """Misaligned activations (a view one element into its storage) are copied, never read in
    misaligned vectors (a sticky error that would end the context): the same result as the aligned
    input, and the whole module runs on such views too."""
    device = torch.device("cuda")
    stages, blocks = _op_module("mask_downsample"), _op_module("cxblock")
    stage, dwconv = ({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                     for args in (_stage_args(), _dwconv_args()))
    _offset_views_match_aligned_ones(stages, blocks, stage, dwconv, dtype)
    encoder = build_encoder(SMALL, seed=67, dtype=dtype, device=device)
    pix_feat, masks = make_inputs(SMALL, 2, seed=68, dtype=dtype, device=device)
    _gpu_module_case(encoder, _offset_view(pix_feat, dtype), _offset_view(masks, dtype))
    torch.cuda.synchronize()


@requires_cuda
def test_gpu_an_earlier_runtime_error_does_not_fail_a_good_launch() -> None:
    """A failed call of the library's runtime on this thread (readying a device that does not exist)
    stays its last error; the forward after it launches and is reported good, not refused."""
    missing = torch.cuda.device_count()
    assert library.load().prepare_device(missing) is not None
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=69, dtype=torch.bfloat16, device=device)
    pix_feat, masks = make_inputs(SMALL, 2, seed=70, dtype=torch.bfloat16, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a refused launch would warn
        _gpu_module_case(encoder, pix_feat, masks)


@requires_cuda
def test_gpu_fp32_precision_follows_the_conv_and_linear_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 at SAM 2's size: with torch's defaults (TF32 for convs, not for matmuls) the kernels' conv
    GEMMs and out_proj take TF32 like the module's nn.Conv2d layers, visibly less exact than with
    convs at IEEE precision, and each is as close to the float64 reference as the module itself run
    with the same flags."""
    device = torch.device("cuda")
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=71, device=device)
    pix_feat, masks = make_inputs(preset, 1, seed=72, device=device)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    errors = {}
    for conv_tf32 in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", conv_tf32)
        with tf32_matmuls(False), torch.no_grad(), mf.use_backend("cuda"):
            out = encoder(pix_feat, masks)["vision_features"]
        module_error = relative_error(reference_outputs(encoder, pix_feat, masks, torch.float32)["vision_features"],
                                      oracle)
        errors[conv_tf32] = relative_error(out, oracle)
        assert encoder.last_backend == "cuda"
        assert errors[conv_tf32] < max(4 * module_error, 1e-5), (conv_tf32, errors[conv_tf32], module_error)
    assert errors[False] < 1e-5 and errors[False] < errors[True] < 1e-3, errors


# The scripts below run in a fresh process: what they check happens once per process.
_FRESH_PROCESS_PRELUDE = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import memenc_fast as mf
from helpers import Preset, build_encoder, make_inputs
SMALL = Preset("small256", mask_size=64, feature_size=4)
"""


def _run_fresh_process(script: str) -> str:
    """``script`` (after the prelude) in a new Python process; its stdout. Fails with its output."""
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_PRELUDE + script, str(ROOT / "tests")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@requires_cuda
def test_gpu_first_launch_inside_a_users_graph_capture() -> None:
    """A fresh process whose first forward on the cuda backend (the backend's first choice of the
    device, every kernel's first launch) comes inside torch.cuda.graph: the capture succeeds and its
    replay gives the eager result. torch's own first use is warmed up before, as torch asks."""
    out = _run_fresh_process("""
device = torch.device("cuda")
encoder = build_encoder(SMALL, seed=73, dtype=torch.bfloat16, device=device)
pix_feat, masks = make_inputs(SMALL, 2, seed=74, dtype=torch.bfloat16, device=device)
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.no_grad(), torch.cuda.stream(stream), mf.use_backend("torch"):
    encoder(pix_feat, masks)
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.no_grad(), mf.use_backend("cuda"), torch.cuda.graph(graph, stream=stream):
    captured = encoder(pix_feat, masks)["vision_features"]
assert encoder.last_backend == "cuda", encoder.last_backend
graph.replay()
with torch.no_grad(), mf.use_backend("cuda"):
    expected = encoder(pix_feat, masks)["vision_features"]
torch.cuda.synchronize()
error = float((captured.float() - expected.float()).norm() / expected.float().norm())
assert error < 1e-2, error  # the same kernels; cuBLAS may pick another algorithm on the capture stream
print("captured and replayed")
""")
    assert "captured and replayed" in out


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_a_process_on_cuda1_creates_no_context_on_gpu0() -> None:
    """A process that uses cuda:1 only: readying the device from a thread with no current context and
    running forwards there leave GPU 0 without a primary context (asked of the driver, which creates
    none by asking)."""
    out = _run_fresh_process("""
import ctypes
import threading
from memenc_fast.backends.cuda import library
driver = ctypes.CDLL("libcuda.so.1")
assert driver.cuInit(0) == 0

def gpu0_has_a_context():
    device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert driver.cuDeviceGet(ctypes.byref(device), 0) == 0
    assert driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) == 0
    return bool(active.value)

device = torch.device("cuda", 1)
encoder = build_encoder(SMALL, seed=75, dtype=torch.bfloat16, device=device)
pix_feat, masks = make_inputs(SMALL, 2, seed=76, dtype=torch.bfloat16, device=device)
with torch.no_grad(), mf.use_backend("torch"):
    expected = encoder(pix_feat, masks)["vision_features"]
torch.cuda.synchronize(device)
if gpu0_has_a_context():
    print("SKIP torch itself made GPU 0's context")
    sys.exit(0)
refusals = []
thread = threading.Thread(target=lambda: refusals.append(library.load().prepare_device(1)))
thread.start()
thread.join()
assert refusals == [None], refusals
with torch.no_grad(), mf.use_backend("cuda"):
    out = encoder(pix_feat, masks)["vision_features"]
torch.cuda.synchronize(device)
assert encoder.last_backend == "cuda", encoder.last_backend
assert not gpu0_has_a_context(), "the cuda backend created GPU 0's primary context"
error = float((out.float() - expected.float()).norm() / expected.float().norm())
assert error < 2e-2, error
print("no context on GPU 0")
""")
    if out.startswith("SKIP"):
        pytest.skip(out.strip())
    assert "no context on GPU 0" in out


@requires_cuda
def test_gpu_info_says_the_runtime_serves_each_device() -> None:
    """On a machine it serves, ``info`` shows the library's runtime and, per device, that every kernel
    loaded there (what the first forward would otherwise do)."""
    entries = info.collect()["cuda library"]
    assert entries["CUDA runtime"].startswith("CUDA ") and "cannot serve" not in entries["CUDA runtime"]
    for index in range(torch.cuda.device_count()):
        assert entries[f"on cuda:{index}"] == "kernels load and are ready", entries
