"""Tests of the CUDA build step (build_tools/cuda_build.py), which setup.py runs.

The pure parts are tested everywhere; the real nvcc compile is skipped where nvcc is absent.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

# build_tools/ is not installed (it is a helper of setup.py): import it from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_tools import cuda_build  # noqa: E402
from build_tools.cuda_build import (  # noqa: E402
    ARCHS_ENV,
    DEFAULT_ARCHS,
    JOBS_ENV,
    LIBRARY_NAME,
    SKIP_ENV,
    CudaBuildError,
    archs_define,
    build_cuda_library,
    build_jobs,
    compile_command,
    find_nvcc,
    gencode_flags,
    link_command,
    parse_archs,
    parse_ptxas_report,
    skip_reason,
    sources_digest,
)

ROOT = Path(__file__).resolve().parents[1]
NVCC = find_nvcc(os.environ)
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)"
)

TINY_KERNEL = """
__global__ void add_one(float* x, int n) {
    __shared__ float tile[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.f;
    __syncthreads();
    if (i < n) x[i] = tile[threadIdx.x] + 1.f;
}
// The build exports only what asks to be (-fvisibility=hidden), as csrc/ does with MF_EXPORT.
extern "C" __attribute__((visibility("default"))) int memenc_fast_test_probe() { return 42; }
"""

SAMPLE_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5smemkPf' for 'sm_90a'
ptxas info    : Function properties for _Z5smemkPf
    256 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 26.273 ms
ptxas info    : Function properties for _Z1fPfi
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z7add_onePfi' for 'sm_80'
ptxas info    : Function properties for _Z7add_onePfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 364 bytes cmem[0]
"""


def _env_for_build(**overrides: str) -> dict[str, str]:
    """The current environment without this project's build knobs, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in (ARCHS_ENV, SKIP_ENV, JOBS_ENV)}
    env.update(overrides)
    return env


@pytest.mark.parametrize("value", [None, "", "  "])
def test_archs_default_covers_every_generation_sam2_users_run(value: str | None) -> None:
    from memenc_fast import gpus

    assert parse_archs(value) == DEFAULT_ARCHS == ("75", "80", "86", "89", "90a", "100a", "120")
    assert {f"sm_{arch}" for arch in DEFAULT_ARCHS} == set(gpus.TARGETS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("80;90", ("80", "90")),
        ("90,80", ("80", "90")),
        ("90a", ("90a",)),
        (" 8.0 ; 9.0a ,", ("80", "90a")),
        ("sm_86;compute_89;SM_90A", ("86", "89", "90a")),
        ("90a;90;90", ("90", "90a")),
        ("120f;100", ("100", "120f")),
    ],
)
def test_archs_parse(value: str, expected: tuple[str, ...]) -> None:
    assert parse_archs(value) == expected


@pytest.mark.parametrize("value", ["7", "abc", "90b", "8.0.1", "sm80x", "1000"])
def test_archs_bad_value_names_the_entry(value: str) -> None:
    with pytest.raises(ValueError, match=rf"{ARCHS_ENV}: bad CUDA architecture '{value}'"):
        parse_archs(f"80;{value}")


def test_archs_only_separators() -> None:
    with pytest.raises(ValueError, match="no CUDA architecture"):
        parse_archs(";,")


def test_gencode_default_sass_for_each_plus_ptx_for_highest() -> None:
    assert gencode_flags(DEFAULT_ARCHS) == [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_89,code=sm_89",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100a,code=sm_100a",
        "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120",
    ]


def test_gencode_arch_specific_highest_gets_portable_ptx() -> None:
    assert gencode_flags(("80", "90a")) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_gencode_needs_an_arch() -> None:
    with pytest.raises(ValueError):
        gencode_flags(())


def test_archs_define_names_the_embedded_code_without_commas() -> None:
    # nvcc splits an option's value at commas: -DX=a,b would define b as well.
    assert archs_define(("80", "90a")) == "-DMEMENC_CUDA_ARCHS=sm_80/sm_90a/compute_90"


def test_compile_command() -> None:
    command = compile_command(
        "nvcc", Path("csrc/a.cu"), Path("out/a.o"), ("90a",), [Path("csrc")], ["-DANSWER=42"], threads=3
    )
    assert command[0] == "nvcc"
    for flag in ("-O3", "-std=c++17", "-lineinfo", "-c", "--threads=3"):
        assert flag in command
    assert "-shared" not in command
    assert command[command.index("-Xcompiler") + 1] == "-fPIC"
    assert command[command.index("-Xptxas") + 1] == "-v"
    assert "-gencode=arch=compute_90a,code=sm_90a" in command
    assert "-Icsrc" in command
    assert command.index("-DANSWER=42") < command.index(str(Path("csrc/a.cu")))
    assert command[command.index("-o") + 1] == str(Path("out/a.o"))


def test_link_command() -> None:
    command = link_command("nvcc", [Path("a.o"), Path("b.o")], Path("out/lib.so"))
    assert command[:2] == ["nvcc", "-shared"]
    assert command[command.index("-o") + 1] == str(Path("out/lib.so"))
    # Libraries come after the inputs, or the linker drops the symbols they need.
    assert command.index("-lcudart_static") > command.index("b.o") > command.index("a.o")
    with pytest.raises(ValueError):
        link_command("nvcc", [], Path("lib.so"))


@pytest.mark.parametrize(("value", "expected"), [(None, os.cpu_count() or 1), ("", os.cpu_count() or 1), ("3", 3)])
def test_build_jobs(value: str | None, expected: int) -> None:
    assert build_jobs({} if value is None else {JOBS_ENV: value}) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_build_jobs_bad_value(value: str) -> None:
    with pytest.raises(ValueError, match=rf"{JOBS_ENV}: expected a positive integer, got '{value}'"):
        build_jobs({JOBS_ENV: value})


def test_sources_digest_follows_what_the_build_compiles(tmp_path: Path) -> None:
    (tmp_path / "a.cu").write_text("// a\n")
    (tmp_path / "common.cuh").write_text("// common\n")
    digest = sources_digest(tmp_path)
    (tmp_path / "kernels.json").write_text("{}")
    (tmp_path / "README.md").write_text("notes")
    assert sources_digest(tmp_path) == digest  # not compiled
    for name in ("a.cu", "common.cuh"):
        (tmp_path / name).write_text((tmp_path / name).read_text() + "// edit\n")
        assert sources_digest(tmp_path) != digest
        digest = sources_digest(tmp_path)
    (tmp_path / "launch_args.h").write_text("#pragma once\n")
    assert sources_digest(tmp_path) != digest


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_skip_env(value: str) -> None:
    reason = skip_reason({SKIP_ENV: value}, [Path("a.cu")], "nvcc")
    assert reason is not None and SKIP_ENV in reason and "\n" not in reason


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_skip_env_off(value: str) -> None:
    assert skip_reason({SKIP_ENV: value}, [Path("a.cu")], "nvcc") is None


def test_no_sources_message() -> None:
    reason = skip_reason({}, [], "nvcc")
    assert reason is not None and "no .cu files" in reason and "\n" not in reason


def test_no_nvcc_message() -> None:
    reason = skip_reason({}, [Path("a.cu")], None)
    assert reason is not None and "nvcc not found" in reason and "\n" not in reason


def test_find_nvcc_prefers_cuda_home(tmp_path: Path) -> None:
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_nvcc({"CUDA_HOME": str(tmp_path / "cuda"), "PATH": ""}, ()) == str(fake)
    assert find_nvcc({"PATH": str(tmp_path)}, ()) is None


def test_build_without_nvcc_logs_one_line_and_installs_python_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "k.cu").write_text(TINY_KERNEL)
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda env: None)
    lines: list[str] = []
    result = build_cuda_library(tmp_path, tmp_path / "out", env=_env_for_build(), log=lines.append)
    assert result is None and len(lines) == 1 and "nvcc not found" in lines[0]
    assert not (tmp_path / "out").exists()


def test_build_skipped_by_env(tmp_path: Path) -> None:
    (tmp_path / "k.cu").write_text(TINY_KERNEL)
    lines: list[str] = []
    result = build_cuda_library(
        tmp_path, tmp_path / "out", env=_env_for_build(**{SKIP_ENV: "1"}), log=lines.append
    )
    assert result is None and len(lines) == 1 and SKIP_ENV in lines[0]


def test_build_without_sources(tmp_path: Path) -> None:
    lines: list[str] = []
    assert (
        build_cuda_library(tmp_path, tmp_path / "out", env=_env_for_build(), log=lines.append)
        is None
    )
    assert len(lines) == 1 and "no .cu files" in lines[0]


def test_parse_ptxas_report() -> None:
    kernels = parse_ptxas_report(SAMPLE_REPORT)
    assert [(k.name, k.arch, k.registers) for k in kernels] == [
        ("_Z5smemkPf", "sm_90a", 40),
        ("_Z7add_onePfi", "sm_80", 8),
    ]
    smemk = kernels[0]
    assert (smemk.stack_bytes, smemk.spill_store_bytes, smemk.spill_load_bytes) == (256, 8, 4)
    assert smemk.smem_bytes == 4096
    # The device function's properties after the kernel's "Used" line do not leak into it.
    assert kernels[1].stack_bytes == 0 and kernels[1].smem_bytes == 0


ARCHS_PROBE = """
#define TEXT(...) #__VA_ARGS__
#define EXPANDED_TEXT(...) TEXT(__VA_ARGS__)
#define EXPORT extern "C" __attribute__((visibility("default")))
EXPORT const char* memenc_fast_test_archs() { return EXPANDED_TEXT(MEMENC_CUDA_ARCHS); }
EXPORT unsigned long long memenc_fast_test_digest() { return MEMENC_SOURCES_DIGEST; }
"""


@needs_nvcc
def test_nvcc_builds_library_from_files_in_parallel_and_reports_resources(tmp_path: Path) -> None:
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cu").write_text(TINY_KERNEL)
    (csrc / "archs.cu").write_text(ARCHS_PROBE)
    lines: list[str] = []
    result = build_cuda_library(
        csrc, tmp_path / "out", env=_env_for_build(**{ARCHS_ENV: "80;90a", JOBS_ENV: "2"}), log=lines.append
    )
    assert result is not None
    assert result.library == tmp_path / "out" / LIBRARY_NAME and result.library.is_file()
    assert {(k.name, k.arch) for k in result.kernels} == {
        ("_Z7add_onePfi", "sm_80"),
        ("_Z7add_onePfi", "sm_90a"),
    }
    assert all(k.registers > 0 and k.smem_bytes == 256 * 4 for k in result.kernels)
    log = "\n".join(lines)
    assert "Used" in log and "registers" in log  # the raw ptxas report is in the build log
    assert "2 files, 2 jobs" in log
    report = result.report.read_text()
    assert "_Z7add_onePfi" in report
    assert "-gencode=arch=compute_90a,code=sm_90a" in report.split("\n", 1)[0]  # the targets, on the first line
    assert result.header is None  # no launch_args.h in this csrc/

    built = ctypes.CDLL(str(result.library))
    assert built.memenc_fast_test_probe() == 42
    built.memenc_fast_test_archs.restype = ctypes.c_char_p
    assert built.memenc_fast_test_archs() == b"sm_80/sm_90a/compute_90"
    built.memenc_fast_test_digest.restype = ctypes.c_uint64
    assert built.memenc_fast_test_digest() == sources_digest(csrc) != 0


def test_the_build_hashes_the_header_as_the_binding_does(tmp_path: Path) -> None:
    """The build cannot import the package (no torch in pip's isolated build), so it computes the
    header's hash itself: the same as the binding, which compares it with the library's."""
    from memenc_fast.backends.cuda import library

    sample = tmp_path / "launch_args.h"
    sample.write_text(PROBE_HEADER)
    for header in (ROOT / "csrc" / "launch_args.h", sample):
        digest = cuda_build.launch_args_hash(header)
        assert digest == library.header_hash(header.read_bytes()) != 0
        assert cuda_build.launch_args_define(header) == f"-D{library.HASH_MACRO}=0x{digest:016x}ULL"


PROBE_HEADER = """#pragma once
#include <stdint.h>
struct ProbeArgs {
  int32_t value;
};
"""

PROBE_KERNEL = """#include "launch_args.h"
extern "C" __attribute__((visibility("default"))) unsigned long long memenc_fast_test_hash() {
  return MEMENC_LAUNCH_ARGS_HASH;
}
"""


@needs_nvcc
def test_nvcc_builds_the_header_hash_in_and_installs_the_header(tmp_path: Path) -> None:
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "launch_args.h").write_text(PROBE_HEADER)
    (csrc / "probe.cu").write_text(PROBE_KERNEL)
    lines: list[str] = []
    result = build_cuda_library(csrc, tmp_path / "out", env=_env_for_build(**{ARCHS_ENV: "80"}), log=lines.append)
    assert result is not None and result.header == tmp_path / "out" / "launch_args.h"
    assert result.header.read_text() == PROBE_HEADER
    assert cuda_build.launch_args_define(csrc / "launch_args.h") in "\n".join(lines)  # the logged command
    probe = ctypes.CDLL(str(result.library)).memenc_fast_test_hash
    probe.restype = ctypes.c_uint64
    assert probe() == cuda_build.launch_args_hash(csrc / "launch_args.h") != 0


@needs_nvcc
def test_nvcc_failure_is_loud(tmp_path: Path) -> None:
    (tmp_path / "broken.cu").write_text("__global__ void k() { this is not cuda; }\n")
    with pytest.raises(CudaBuildError, match="nvcc failed") as excinfo:
        build_cuda_library(
            tmp_path, tmp_path / "out", env=_env_for_build(**{ARCHS_ENV: "80"}), log=lambda _: None
        )
    assert "broken.cu" in str(excinfo.value)
