"""The kernel report: parsing of cuobjdump text, the limits and checks of every target, real Triton
and nvcc compiles per report GPU (waves, the cubin cache, CUDA launches), JSON output."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memenc_fast.tools import kernel_report as kr

HERE = Path(__file__).resolve().parent
KERNEL_REPORT_PY = HERE.parent / "memenc_fast" / "tools" / "kernel_report.py"

RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z11smem_kernelPf:
  REG:12 STACK:0 SHARED:5120 LOCAL:0 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z12spill_kernelIfEvPKT_PS0_i:
  REG:32 STACK:1048 SHARED:0 LOCAL:8 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function add_one:
  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:540 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t\tFunction : dot_kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
                                                                         /* 0x000fe20000000800 */
        /*0770*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4].tnspB, RZ, !UPT ;
        /*07c0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*07d0*/                   LDSM.16.M88.4 R4, [R2] ;
        /*07e0*/                   EXIT ;
\t\t..........

\t\tFunction : spill_kernel
        /*0220*/                   STL [R1+0x410], R24 ;
        /*0230*/              @!P0 STL.64 [R1+0x40c], R20 ;
        /*0240*/               @P1 LDL R3, [R1+0x10] ;
        /*0250*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0260*/                   BRA 0x260 ;
\t\t..........

\t\tFunction : tcgen05_kernel
        /*0400*/                   UTCHMMA gdesc[UR16], gdesc[UR18], tmem[UR10], tmem[UR6], idesc[UR7], UPT ;
        /*0410*/               @P0 UTCQMMA gdesc[UR16], gdesc[UR18], tmem[UR10], tmem[UR6], idesc[UR7], UPT ;
        /*0420*/                   UTCBAR [UR4], URZ ;
        /*0430*/                   LDTM.16dp32bit.x16 R4, tmem[UR5] ;
"""


def test_parse_resource_usage() -> None:
    usage = kr.parse_resource_usage(RESOURCE_USAGE)
    assert sorted(usage) == ["_Z11smem_kernelPf", "_Z12spill_kernelIfEvPKT_PS0_i", "add_one"]
    assert usage["_Z11smem_kernelPf"] == kr.ResourceUsage(registers=12, stack=0, shared=5120,
                                                          local=0)
    assert usage["_Z12spill_kernelIfEvPKT_PS0_i"] == kr.ResourceUsage(registers=32, stack=1048,
                                                                     shared=0, local=8)


def test_parse_resource_usage_rejects_truncated_text() -> None:
    with pytest.raises(ValueError, match="expected a line with REG"):
        kr.parse_resource_usage(" Function add_one:\n")


def test_parse_sass_counts_per_function() -> None:
    counts = kr.parse_sass(SASS)
    assert counts["dot_kernel"] == kr.SassCounts(tensor_core={"HGMMA": 2}, stl=0, ldl=0)
    # Predicated and widened forms count; LDSM is not a local load.
    assert counts["spill_kernel"] == kr.SassCounts(tensor_core={"HMMA": 1}, stl=2, ldl=1)
    # Blackwell's tcgen05 matrix instructions count; its barrier and tensor-memory loads do not.
    assert counts["tcgen05_kernel"] == kr.SassCounts(tensor_core={"UTCHMMA": 1, "UTCQMMA": 1}, stl=0, ldl=0)


def test_tensor_core_expectations_per_generation() -> None:
    for target in ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"):
        for backend in ("triton", "cuda"):
            assert kr.expects_tensor_cores(backend, target, "bf16") and kr.expects_tensor_cores(backend, target, "fp16")
            assert kr.expects_tensor_cores(backend, target, "tf32")
            assert not kr.expects_tensor_cores(backend, target, "fp32")
    # Triton has no mma for sm_75; CUDA C++ has fp16 mma.sync there (and T4 has no bf16).
    assert not kr.expects_tensor_cores("triton", "sm_75", "fp16")
    assert not any(kr.expects_tensor_cores(backend, "sm_75", "tf32") for backend in ("triton", "cuda"))
    assert kr.expects_tensor_cores("cuda", "sm_75", "fp16") and not kr.expects_tensor_cores("cuda", "sm_75", "bf16")
    assert [kr.is_tensor_core_op(op) for op in ("UTCHMMA", "UTCIMMA", "UTCOMMA", "UTCBAR", "UTCCP", "HFMA2")] == [
        True, True, True, False, False, False]


def test_target_limits_are_those_of_the_report_gpus() -> None:
    """Each target's limits are its GPUs' (what gpus.gpu_spec reads on a device), and every GPU
    generation is a target: the report checks what each GPU users run allows."""
    from memenc_fast import gpus

    assert set(kr.TARGET_LIMITS) == set(gpus.TARGETS) == {gpu.arch for gpu in gpus.REPORT_GPUS}
    for gpu in gpus.REPORT_GPUS:
        limits = kr.TARGET_LIMITS[gpu.arch]
        assert limits.per_block_max == gpu.shared_memory_per_block, gpu.name
        assert limits.bf16 == gpu.bf16, gpu.name
    assert [gpu.name for gpu in kr.report_gpus(("sm_89", "sm_120"))] == ["L4", "RTX 5090", "RTX 4090"]


@pytest.mark.parametrize(("symbol", "expected"), [
    ("void ns::mlp<__nv_bfloat16, 4>(float const*, int)", ("ns::mlp", "__nv_bfloat16, 4")),
    ("void k<std::pair<int, int> >(float*)", ("k", "std::pair<int, int>")),
    ("add_one", ("add_one", "")),
    ("_Z12spill_kernelIfEvPKT_PS0_i", ("spill_kernel", "_Z12spill_kernelIfEvPKT_PS0_i")),
    ("_ZN2ns3fooEPf", ("ns::foo", "_ZN2ns3fooEPf")),
])
def test_split_kernel_name(symbol: str, expected: tuple[str, str]) -> None:
    assert kr.split_kernel_name(symbol) == expected


@pytest.mark.parametrize(("template", "dtype"), [
    ("__nv_bfloat16, float", "bf16"), ("__half", "fp16"), ("float, 128", "fp32"), ("64, 4", "-"),
])
def test_dtype_of_template(template: str, dtype: str) -> None:
    assert kr.dtype_of_template(template) == dtype


def test_sidecar_errors_name_expected_and_given(tmp_path: Path) -> None:
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"k": {"flops_per_object": True}}))
    with pytest.raises(ValueError, match="flops_per_object must be int, got True"):
        kr.load_sidecar(path)
    path.write_text(json.dumps({"k": {"hot": True, "flop": 1}}))
    with pytest.raises(ValueError, match="unknown key 'flop'; expected one of"):
        kr.load_sidecar(path)
    assert kr.load_sidecar(tmp_path / "absent.json") == {}


def test_violation_rules() -> None:
    def row(**changes: object) -> kr.Row:
        base = kr.Row(backend="triton", kernel="k", target="sm_90a", config="c", batch=1,
                      dtype="bf16", hot=True, matrix_work=True, gpu="H100", sm_count=132, grid=132,
                      threads=256, registers=100, spill_bytes=0, shared_bytes=1024, static_shared_bytes=1024,
                      tensor_core_instructions={"HGMMA": 4},
                      local_instructions={"STL": 0, "LDL": 0})
        for key, value in changes.items():
            setattr(base, key, value)
        return base

    assert kr.violations([row()]) == []
    assert kr.violations([row(dtype="fp32", tensor_core_instructions={})]) == []
    assert kr.violations([row(target="sm_75", dtype="fp16", tensor_core_instructions={})]) == []
    for target in ("sm_80", "sm_90a", "sm_100a", "sm_120"):
        (line,) = kr.violations([row(target=target, tensor_core_instructions={})])
        assert line.startswith(f"no tensor-core instruction: triton k [c] {target} (H100) B=1 bf16")
    (line,) = kr.violations([row(backend="cuda", target="sm_75", dtype="fp16", tensor_core_instructions={})])
    assert line.startswith("no tensor-core instruction: cuda k [c] sm_75")
    (line,) = kr.violations([row(shared_bytes=232449)])
    assert "232449 bytes per block, limit 232448" in line
    assert kr.violations([row(target="sm_80", shared_bytes=166912)]) == []
    for target in ("sm_86", "sm_89", "sm_120"):
        (line,) = kr.violations([row(target=target, shared_bytes=101377)])
        assert "101377 bytes per block, limit 101376" in line
    (line,) = kr.violations([row(target="sm_75", dtype="fp16", shared_bytes=65537)])
    assert "limit 65536" in line
    (line,) = kr.violations([row(static_shared_bytes=49153, shared_bytes=49153)])
    assert line.startswith("static shared memory over the limit")
    (line,) = kr.violations([row(local_instructions={"STL": 1, "LDL": 0})])
    assert line.startswith("hot kernel spills")
    assert kr.violations([row(hot=False, spill_bytes=64)]) == []
    # 255 registers (256 allocated) x 256 threads fill the register file; 512 threads do not fit.
    assert kr.violations([row(registers=255)]) == []
    (line,) = kr.violations([row(registers=255, threads=512)])
    assert line.endswith("255 per thread x 512 threads, limit 65536 per block")
    (line,) = kr.violations([row(grid=64)])
    assert line == ("hot kernel under one wave at B=1: triton k [c] sm_90a (H100) B=1 bf16: 64 blocks on 132 SMs "
                    "(0.48 waves); expected at least one wave, or the launch's small_grid_reason")
    assert kr.violations([row(grid=64, small_grid_reason="faster")]) == []
    assert kr.violations([row(grid=64, batch=64)]) == []
    assert kr.violations([row(grid=None)]) == []  # CUDA rows without launches have no grid
    (line,) = kr.violations([row(error="CompilationError: boom")])
    assert line == "does not compile: triton k [c] sm_90a (H100) B=1 bf16: CompilationError: boom"


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    kr.add_arguments(parser)
    return parser.parse_args(["--json", str(tmp_path / "report.json"),
                              "--cubin-dir", str(tmp_path / "cubins"), "--no-cache", *extra])


def test_arguments_reject_unknown_values() -> None:
    parser = argparse.ArgumentParser()
    kr.add_arguments(parser)
    for bad in (["--targets", "sm_70"], ["--dtypes", "fp8"], ["--batches", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    all_targets = "sm_75,sm_80,sm_86,sm_89,sm_90a,sm_100a,sm_120"
    assert kr._targets(all_targets) == tuple(all_targets.split(",")) == parser.parse_args([]).targets


def test_default_csrc_is_the_repository_s() -> None:
    parser = argparse.ArgumentParser()
    kr.add_arguments(parser)
    assert parser.parse_args([]).csrc == HERE.parent / "csrc"


# ----------------------------------------------------------------------------- Triton

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None
    or kr.find_cuobjdump(prefer_triton=True) is None,
    reason="needs triton, torch (for dtypes) and cuobjdump")


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One real compile of the fixture kernels for sm_80 and sm_90a, bf16, B=1."""
    tmp_path = tmp_path_factory.mktemp("triton_report")
    # A private cache makes this a real compile, and leaves the user's cache alone.
    cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        args = _args(tmp_path, "--targets", "sm_80,sm_90a", "--batches", "1", "--dtypes", "bf16", "--strict",
                     "--csrc", str(tmp_path / "no-csrc"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = kr.run(args, [HERE / "report_fixture_kernels.py"], discover=False)
    finally:
        if cache is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = cache
    return tmp_path, code, out.getvalue()


def _records(tmp_path: Path) -> dict[tuple[str, str], dict]:
    records = json.loads((tmp_path / "report.json").read_text())
    return {(r["kernel"], r["target"]): r for r in records}


@needs_triton
def test_triton_rows_show_registers_spills_and_tensor_cores(
        triton_report: tuple[Path, int, str]) -> None:
    tmp_path, _, _ = triton_report
    rows = _records(tmp_path)
    assert sorted(rows) == sorted((k, t) for k in ("softmax_fits", "softmax_spills", "dot")
                                  for t in ("sm_80", "sm_90a"))
    for target in ("sm_80", "sm_90a"):
        fits = rows[("softmax_fits", target)]
        assert fits["error"] is None and 0 < fits["registers"] < 255
        assert fits["spill_bytes"] == 0 and fits["local_instructions"] == {"STL": 0, "LDL": 0}
        spills = rows[("softmax_spills", target)]
        assert spills["registers"] == 255 and spills["spill_bytes"] > 0
        assert spills["local_instructions"]["STL"] > 0 and spills["local_instructions"]["LDL"] > 0
        assert (tmp_path / "cubins" / spills["cubin"]).stat().st_size > 0
    assert rows[("dot", "sm_90a")]["tensor_core_instructions"].get("HGMMA", 0) > 0
    assert rows[("dot", "sm_80")]["tensor_core_instructions"].get("HMMA", 0) > 0
    assert rows[("dot", "sm_80")]["tensor_core_instructions"].get("HGMMA", 0) == 0
    # 64x32 + 32x64 bf16 tiles staged through shared memory.
    assert rows[("dot", "sm_90a")]["shared_bytes"] >= 8192
    assert rows[("dot", "sm_90a")]["flops"] == 2 * 64 * 64 * 32
    # Each target's GPU, its grid in waves of that GPU's SMs, and the launch's reason for less.
    for target, gpu, sms in (("sm_80", "A100", 108), ("sm_90a", "H100", 132)):
        fits = rows[("softmax_fits", target)]
        assert (fits["gpu"], fits["sm_count"], fits["grid"], fits["waves"], fits["threads"]) == (gpu, sms, sms, 1.0,
                                                                                                   128)
        dot = rows[("dot", target)]
        assert (dot["grid"], dot["small_grid_reason"]) == (1, "one tile per object")


@needs_triton
def test_triton_strict_mode_flags_the_spilling_kernel(
        triton_report: tuple[Path, int, str]) -> None:
    _, code, out = triton_report
    assert code == 1
    flagged = [line for line in out.splitlines() if line.startswith("VIOLATION")]
    assert len(flagged) == 2, out
    assert all("hot kernel spills: triton softmax_spills" in line for line in flagged)
    assert "softmax_fits" in out and "HGMMA:" in out and "HMMA:" in out
    assert "132 (1.00w)" in out and "one tile per object" in out


@needs_triton
def test_json_records_have_the_documented_keys(triton_report: tuple[Path, int, str]) -> None:
    tmp_path, _, _ = triton_report
    records = json.loads((tmp_path / "report.json").read_text())
    required = {"backend", "kernel", "target", "config", "registers", "spill_bytes",
                "shared_bytes", "tensor_core_instructions", "flops", "min_bytes", "cubin"}
    assert len(records) == 6
    for record in records:
        assert required <= set(record) and set(record) == set(kr.JSON_KEYS)
        assert record["backend"] == "triton" and record["cubin"].endswith(".cubin")
        assert record["floor_us"] > 0


BROKEN_KERNELS = """
import torch
import triton
import triton.language as tl

from memenc_fast.kernels._common import Launch


@triton.jit
def scale(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def report_launches(batch, dtype, device):
    if dtype == torch.float16:
        raise RuntimeError("no fp16 configuration")
    # 'n' is in neither args nor constexprs.
    return [Launch(kernel="scale", fn=scale, grid=(1,), args={"x_ptr": torch.empty(128, device="meta")},
                   constexprs={"BLOCK": 128}, num_warps=4, num_stages=1, config="BLOCK=128",
                   matrix_work=False, flops=0, min_bytes=0)]
"""


@needs_triton
def test_broken_specs_are_compile_failures(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    module = tmp_path / "broken_kernels.py"
    module.write_text(BROKEN_KERNELS)
    args = _args(tmp_path, "--targets", "sm_90a", "--batches", "1", "--dtypes", "bf16,fp16",
                 "--strict", "--csrc", str(tmp_path), "--jobs", "1")
    assert kr.run(args, [module], discover=False) == 1
    flagged = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("VIOLATION")]
    assert flagged == [
        "VIOLATION does not compile: triton scale [BLOCK=128] sm_90a (H100) B=1 bf16: ValueError: "
        "argument 'n' of scale has neither a type in signature nor a value in constexprs",
        "VIOLATION does not compile: triton broken_kernels [-] sm_90a (H100) B=1 fp16: report_launches "
        "failed: RuntimeError: no fp16 configuration",
    ]


def test_spec_validation_names_expected_and_given() -> None:
    with pytest.raises(ValueError, match="num_warps must be a power of two in 1..32, got 3"):
        kr.TritonKernelSpec(kernel="k", fn=None, signature={}, constexprs={}, num_warps=3,
                            num_stages=1, config="", matrix_work=False, hot=True, flops=0,
                            min_bytes=0)
    with pytest.raises(ValueError, match=r"in both signature and constexprs"):
        kr.TritonKernelSpec(kernel="k", fn=None, signature={"n": "i32"}, constexprs={"n": 1},
                            num_warps=4, num_stages=1, config="", matrix_work=False, hot=True,
                            flops=0, min_bytes=0)


@needs_triton
def test_spec_from_launch_types_arguments_as_triton_does_at_launch() -> None:
    import torch

    from memenc_fast.kernels._common import Launch

    spec_args = {"x_ptr": torch.empty(4, dtype=torch.bfloat16, device="meta"),
                 "w_ptr": torch.empty(4, dtype=torch.float32, device="meta"),
                 "scale": 2.0, "one": 1, "rows": 48, "odd": 7, "huge": 2**40 + 1}
    launch = Launch(kernel="k", fn=None, grid=(1,), args=spec_args, constexprs={"BLOCK": 64}, num_warps=4,
                    num_stages=2, config="c", matrix_work=True, flops=10, min_bytes=20)
    spec = kr.spec_from_launch(launch)
    assert spec.signature == {"x_ptr": "*bf16", "w_ptr": "*fp32", "scale": "fp32", "rows": "i32", "odd": "i32",
                              "huge": "i64"}
    assert spec.constexprs == {"BLOCK": 64, "one": 1}
    assert spec.aligned_ints == ("rows",)
    assert (spec.num_warps, spec.num_stages, spec.flops, spec.min_bytes, spec.hot) == (4, 2, 10, 20, True)
    bad = Launch(kernel="k", fn=None, grid=(1,), args={"x_ptr": torch.empty(4, dtype=torch.int8, device="meta")},
                 constexprs={}, num_warps=4, num_stages=1, config="c", matrix_work=False, flops=0, min_bytes=0)
    with pytest.raises(ValueError, match="argument 'x_ptr': expected a float32, bfloat16, float16 or int32 tensor, "
                                         "an int or a float, got torch.int8"):
        kr.spec_from_launch(bad)


@needs_triton
def test_a_second_run_takes_every_cubin_from_the_cache(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Inspected cubins are kept by a hash of the kernel's source, its configuration and the
    target: a rerun compiles nothing and reports the very same rows."""
    fixture = HERE / "report_fixture_kernels.py"
    parser = argparse.ArgumentParser()
    kr.add_arguments(parser)

    def report(run: str) -> tuple[list[dict], str]:
        args = parser.parse_args(["--json", str(tmp_path / f"{run}.json"), "--cache-dir", str(tmp_path / "cache"),
                                  "--targets", "sm_80", "--batches", "1", "--dtypes", "fp16", "--jobs", "1",
                                  "--csrc", str(tmp_path / "no-csrc")])
        kr.run(args, [fixture], discover=False)
        out = capsys.readouterr().out
        records = json.loads((tmp_path / f"{run}.json").read_text())
        return [{k: v for k, v in r.items() if k != "compile_seconds"} for r in records], out

    first, first_out = report("first")
    second, second_out = report("second")
    assert "3 distinct kernels, 3 compiled" in first_out and "0 from the cache" in first_out
    assert "3 distinct kernels, none compiled, 3 from the cache" in second_out
    assert first == second and len(first) == 3


@needs_triton
def test_every_chooser_compiles_within_each_targets_limits_and_fills_a_wave(tmp_path: Path) -> None:
    """The backend's kernels as each report GPU runs them at B=1 (SAM 2.1's per-object call), in
    fp16 and fp32, compiled for every target: no spill, shared memory and registers within the
    target's limits, tensor-core code where Triton has it (fp32 with TF32 dots included), at least
    a wave of programs or a reason; and every row is what the GPU's choosers pick. bf16
    configurations are fp16's, in the other dtype.

    Uses the user's cubin cache (``python -m memenc_fast kernels`` fills it): cold, this compiles
    about 140 kernels, a few minutes on two cores.
    """
    import torch

    from memenc_fast.kernels import cxblock as cx
    from memenc_fast.kernels import mask_downsample as md
    from memenc_fast.kernels import proj_add as pa

    parser = argparse.ArgumentParser()
    kr.add_arguments(parser)
    args = parser.parse_args(["--json", str(tmp_path / "report.json"), "--batches", "1", "--dtypes", "fp16,fp32",
                              "--csrc", str(tmp_path / "no-csrc"), "--strict"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kr.run(args)
    assert code == 0, [line for line in out.getvalue().splitlines() if line.startswith("VIOLATION")]
    rows = json.loads((tmp_path / "report.json").read_text())
    configs = {(r["gpu"], r["kernel"], r["dtype"], r["config"]) for r in rows}

    def reported(gpu: str, kernel: str, dtype: str, description: str, weights: str) -> bool:
        # The MLP's config names its shares' traffic between its description and its weights.
        return any(key[:3] == (gpu, kernel, dtype) and key[3].startswith(description + " ")
                   and key[3].endswith(f"W={weights}") for key in configs)
    gpus = kr.report_gpus(tuple(kr.TARGET_LIMITS))
    assert {r["gpu"] for r in rows} == {gpu.name for gpu in gpus}
    for gpu in gpus:
        for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            chosen = [("cxblock_mlp", cx.choose_mlp_config(4096, 256, 1024, dtype, dtype, gpu)),
                      ("dwconv_ln", cx.choose_dwconv_config(1, 64, 64, gpu)),
                      ("proj_add", pa.choose_config(1, 4096, 256, dtype, dtype, gpu)),
                      ("mask_path", md.choose_config(md.SAM2_GEOMETRY, 1, (64, 64), dtype, dtype, gpu))]
            for kernel, cfg in chosen:
                assert reported(gpu.name, kernel, name, cfg.describe(), name), (gpu.name, kernel, name)
        if gpu.capability >= (8, 0):
            fp32 = torch.float32
            tf32 = [("cxblock_mlp", cx.choose_mlp_config(4096, 256, 1024, fp32, fp32, gpu, tf32=True)),
                    ("proj_add", pa.choose_config(1, 4096, 256, fp32, fp32, gpu, tf32=True)),
                    ("mask_path", md.choose_config(md.SAM2_GEOMETRY, 1, (64, 64), fp32, fp32, gpu, tf32=True))]
            for kernel, cfg in tf32:
                assert reported(gpu.name, kernel, "tf32", cfg.describe(), "fp32"), (gpu.name, kernel)
        if gpu.bf16:
            for module in (cx, md, pa):
                fp16 = [launch.config for launch in module.report_launches(1, torch.float16, gpu)]
                bf16 = [launch.config for launch in module.report_launches(1, torch.bfloat16, gpu)]
                assert [c.replace("fp16", "bf16") for c in fp16] == bf16, gpu.name


# ----------------------------------------------------------------------------- CUDA

CUDA_SOURCE = r"""
#include <cuda_bf16.h>
extern "C" __global__ void add_one(float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += 1.0f;
}
// 64 live floats under a 32-register cap (1024 threads, 2 blocks per SM): ptxas spills.
template <typename T>
__global__ void __launch_bounds__(1024, 2) spills(const T* x, T* y, int k) {
  float buf[64];
  for (int i = 0; i < 64; ++i) buf[i] = (float)x[i * blockDim.x + threadIdx.x];
  buf[(k + threadIdx.x) & 63] += 1.0f;
  y[threadIdx.x] = (T)(buf[k & 63] + buf[(3 * k) & 63]);
}
template __global__ void spills<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int);
__global__ void staged(float* y) {
  __shared__ float tile[1024];
  tile[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = tile[1023 - threadIdx.x];
}
"""

SIDECAR = {
    "add_one": {"hot": True, "matrix_work": False, "flops_per_object": 4096,
                "min_bytes_per_object": 32768},
    "spills<__nv_bfloat16>": {"hot": True, "min_bytes_per_object": 100},
    "staged": {"hot": False, "dynamic_shared_bytes": 230000},
}

needs_nvcc = pytest.mark.skipif(
    kr.find_nvcc() is None or kr.find_cuobjdump(prefer_triton=False, nvcc=kr.find_nvcc()) is None,
    reason="needs nvcc and cuobjdump")


@needs_nvcc
def test_cuda_rows_from_a_real_nvcc_compile(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cu").write_text(CUDA_SOURCE)
    (csrc / "broken.cu").write_text("__global__ void broken(float* x) { x[0] = undefined_name; }\n")
    (csrc / "kernels.json").write_text(json.dumps(SIDECAR))
    code = kr.run(_args(tmp_path, "--csrc", str(csrc), "--targets", "sm_90a", "--batches", "1,64",
                        "--strict"), discover=False)
    out = capsys.readouterr().out
    assert code == 1
    records = json.loads((tmp_path / "report.json").read_text())
    by_key = {(r["kernel"], r["batch"]): r for r in records}

    add_one = by_key[("add_one", 64)]
    assert add_one["registers"] > 0 and add_one["spill_bytes"] == 0
    assert add_one["flops"] == 4096 * 64 and add_one["min_bytes"] == 32768 * 64
    assert add_one["cubin"] == "cuda_tiny_sm_90a.cubin" and add_one["dtype"] == "-"
    assert (tmp_path / "cubins" / "cuda_tiny_sm_90a.cubin").is_file()

    spills = by_key[("spills", 1)]
    assert spills["config"] == "__nv_bfloat16" and spills["dtype"] == "bf16"
    assert spills["registers"] <= 32 and spills["spill_bytes"] > 0
    assert spills["local_instructions"]["STL"] > 0 and spills["local_instructions"]["LDL"] > 0
    assert spills["min_bytes"] == 100 and spills["flops"] is None

    staged = by_key[("staged", 1)]
    # 4 KiB of static shared memory (plus the 1 KiB sm_90 reserves) and the sidecar's dynamic.
    assert staged["shared_bytes"] >= 4096 + 230000

    broken = by_key[("broken.cu", None)]
    assert "undefined_name" in broken["error"]

    flagged = sorted(line.split(":")[0] for line in out.splitlines()
                     if line.startswith("VIOLATION"))
    assert flagged == ["VIOLATION does not compile", "VIOLATION hot kernel spills",
                       "VIOLATION hot kernel spills", "VIOLATION shared memory over the limit",
                       "VIOLATION shared memory over the limit"]


def _fake_cuda_launches(batch: int, dtype: object, weight_dtype: object, spec: object) -> list[dict]:
    """What the CUDA backend's report_launches would say for the CUDA_SOURCE kernels (bf16 only)."""
    import torch

    if dtype != torch.bfloat16 or weight_dtype != torch.bfloat16:
        return []
    return [
        {"kernel": "spills<__nv_bfloat16>", "grid": 4 * batch, "block": 1024, "dynamic_smem": 0, "config": "x4"},
        {"kernel": "staged", "grid": (2 * spec.sm_count, batch), "block": (1024,), "dynamic_smem": 100000,
         "config": "tile"},
        {"kernel": "add_one", "grid": 1, "block": 256, "dynamic_smem": 0, "config": "one block",
         "small_grid_reason": "a single block of work"},
        {"kernel": "missing_kernel<float>", "grid": 1, "block": 32, "dynamic_smem": 0, "config": "-"},
        {"kernel": "add_one", "grid": 1},
    ]


@needs_nvcc
def test_cuda_rows_per_launch_show_waves_and_dynamic_shared_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """With the backend's report_launches, a CUDA row is one launch on one report GPU: its grid in
    waves of that GPU's SMs, its threads, and its dynamic shared memory beside the static."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cu").write_text(CUDA_SOURCE)
    (csrc / "kernels.json").write_text(json.dumps(SIDECAR))
    monkeypatch.setattr(kr, "_cuda_report_launches", lambda options, report: _fake_cuda_launches)
    code = kr.run(_args(tmp_path, "--csrc", str(csrc), "--targets", "sm_86,sm_90a", "--batches", "1",
                        "--dtypes", "bf16", "--strict"), discover=False)
    out = capsys.readouterr().out
    assert code == 1
    records = json.loads((tmp_path / "report.json").read_text())
    rows = {(r["kernel"], r["gpu"]): r for r in records if r["error"] is None}
    for gpu, sms, limit in (("A10", 72, 101376), ("H100", 132, 232448)):
        spills = rows[("spills", gpu)]
        assert (spills["grid"], spills["threads"], spills["config"]) == (4, 1024, "<__nv_bfloat16> x4")
        assert spills["waves"] == pytest.approx(4 / sms) and spills["dtype"] == "bf16"
        staged = rows[("staged", gpu)]
        assert staged["grid"] == 2 * sms and staged["waves"] == 2.0
        assert staged["shared_bytes"] >= 4096 + 100000
        assert (staged["shared_bytes"] > limit) == (gpu == "A10")
        assert rows[("add_one", gpu)]["small_grid_reason"] == "a single block of work"
    errors = sorted((r["gpu"], r["kernel"], r["error"]) for r in records if r["error"] is not None)
    assert len(errors) == 4
    assert errors[0][1:] == ("add_one", "a launch must be a dict with kernel, grid, block, dynamic_smem, config; "
                                        "block, dynamic_smem, config missing or mistyped in {'kernel': 'add_one', "
                                        "'grid': 1}")
    assert errors[1][1:] == ("missing_kernel<float>", "no function missing_kernel<float> in the csrc cubins for sm_86")
    flagged = sorted(line.split(":")[0] for line in out.splitlines() if line.startswith("VIOLATION"))
    assert flagged == sorted(["VIOLATION does not compile"] * 4 + ["VIOLATION hot kernel spills"] * 2
                             + ["VIOLATION hot kernel under one wave at B=1"] * 2
                             + ["VIOLATION shared memory over the limit"])


def test_missing_nvcc_skips_cuda_rows_in_one_line(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cu").write_text(CUDA_SOURCE)
    monkeypatch.setattr(kr, "find_nvcc", lambda: None)
    assert kr.run(_args(tmp_path, "--csrc", str(csrc), "--strict"), discover=False) == 1
    captured = capsys.readouterr()
    assert "CUDA rows skipped: nvcc not found" in captured.out
    assert "error: compiled nothing" in captured.err


def test_report_runs_without_torch_and_triton(tmp_path: Path) -> None:
    # Loaded by path so the package's own imports (torch) play no part.
    script = f"""
import sys, importlib.util
sys.modules["torch"] = None
sys.modules["triton"] = None
spec = importlib.util.spec_from_file_location("kernel_report", {str(KERNEL_REPORT_PY)!r})
module = importlib.util.module_from_spec(spec)
sys.modules["kernel_report"] = module
spec.loader.exec_module(module)
sys.exit(module.main(["--csrc", {str(tmp_path)!r}, "--strict"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Triton rows skipped: triton is not installed" in proc.stdout
    assert f"no CUDA kernels: no .cu files in {tmp_path}" in proc.stdout
    assert "error: compiled nothing" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- one verdict

CSRC = HERE.parent / "csrc"


def test_sources_digest_is_the_one_the_build_records(tmp_path: Path) -> None:
    """The report tells a library built from ``--csrc`` by the digest the build compiles into it;
    an installed package has no build_tools, so the report computes it too: the two agree."""
    from build_tools.cuda_build import sources_digest

    assert kr.sources_digest(CSRC) == sources_digest(CSRC)
    (tmp_path / "a.cu").write_text("// a\n")
    (tmp_path / "kernels.json").write_text("{}")
    (tmp_path / "common.cuh").write_text("// common\n")
    digest = kr.sources_digest(tmp_path)
    assert digest == sources_digest(tmp_path)
    (tmp_path / "launch_args.h").write_text("#pragma once\n")
    assert kr.sources_digest(tmp_path) == sources_digest(tmp_path) != digest


def _function(kernel: str, template: str) -> kr._CudaFunction:
    return kr._CudaFunction(kernel, template, kr.ResourceUsage(registers=64, stack=0, shared=0, local=0),
                            kr.SassCounts(tensor_core={}, stl=0, ldl=0), "x.cubin", None)


def test_without_plans_only_tiles_that_fit_are_judged() -> None:
    """Without the plans, an instantiation whose dynamic shared memory exceeds a target's limit is
    left out where another tile (last template argument) of that kernel fits: no plan picks it.
    Where no tile fits, every launch is refused and the rows stay, to be flagged."""
    sidecar = {"conv<float, 64, 256, 64>": {"dynamic_shared_bytes": 67584},
               "conv<float, 64, 256, 32>": {"dynamic_shared_bytes": 46080},
               "conv<float, 16, 64, 128>": {"dynamic_shared_bytes": 70000},
               "other<float, 1>": {"dynamic_shared_bytes": 80000}}
    functions = [_function("conv", "float, 64, 256, 64"), _function("conv", "float, 64, 256, 32"),
                 _function("conv", "float, 16, 64, 128"), _function("other", "float, 1"), _function("probe", "")]
    kept, left_out = kr._launchable_functions(functions, "sm_75", sidecar)
    assert left_out == [functions[0]] and kept == functions[1:]
    assert kr._launchable_functions(functions, "sm_86", sidecar) == (functions, [])


needs_built_library = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or kr.find_nvcc() is None
    or kr.find_cuobjdump(prefer_triton=False, nvcc=kr.find_nvcc()) is None,
    reason="needs torch, nvcc and cuobjdump")


def _library_of_these_sources() -> None:
    """Skips unless the CUDA library is built from the repository's csrc/ (the plans to ask)."""
    from memenc_fast.backends.cuda import library

    try:
        built_from = library.load().sources_digest
    except library.CudaLibraryError as exc:
        pytest.skip(f"no CUDA library: {exc}")
    if built_from != kr.sources_digest(CSRC):
        pytest.skip("the CUDA library is not built from these sources (pip install -e .)")


@needs_built_library
def test_a_library_of_other_sources_gives_no_plans(tmp_path: Path) -> None:
    _library_of_these_sources()
    (tmp_path / "tiny.cu").write_text(CUDA_SOURCE)
    report = kr.Report()
    options = kr.Options(targets=("sm_75",), batches=(1,), dtypes=("fp16",), cubin_dir=tmp_path, csrc_dir=tmp_path)
    assert kr._cuda_report_launches(options, report) is None
    (note,) = report.notes
    assert "the built CUDA library was compiled from other sources" in note and str(tmp_path) in note


@pytest.fixture(scope="module")
def cuda_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, list[dict], str]]:
    """The CUDA rows of the real csrc/ for sm_75 (T4: 64 KiB of shared memory, less than the
    largest stage-4 tile needs) and sm_86, B=1, as the report gives them from the repository, from
    a copy of csrc/ elsewhere (an installed package's ``--csrc``), from that copy without a
    library (the plans cannot be asked), and for sm_75 from an empty cache and then that cache
    warm. ``(exit code, JSON records without compile times, stdout)`` per run.

    Uses the user's cubin cache (``python -m memenc_fast kernels`` fills it) except for the cold
    run: about 20 s of nvcc on two cores, more where the user's cache is cold.
    """
    from memenc_fast.backends.cuda import library

    _library_of_these_sources()
    tmp_path = tmp_path_factory.mktemp("verdicts")
    copy = tmp_path / "installed-csrc"
    copy.mkdir()
    for source in CSRC.iterdir():
        if source.suffix in (".cu", ".cuh", ".h", ".json"):
            (copy / source.name).write_bytes(source.read_bytes())
    parser = argparse.ArgumentParser()
    kr.add_arguments(parser)

    def report(name: str, *extra: str) -> tuple[int, list[dict], str]:
        args = parser.parse_args(["--json", str(tmp_path / f"{name}.json"), "--batches", "1", "--strict", *extra])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = kr.run(args, discover=False)
        records = json.loads((tmp_path / f"{name}.json").read_text())
        return code, [{k: v for k, v in r.items() if k != "compile_seconds"} for r in records], out.getvalue()

    def refuse(path: Path | None = None) -> library.CudaLibrary:
        raise library.CudaLibraryError("the CUDA library was not built (pip install -e . with nvcc)")

    both = ("--targets", "sm_75,sm_86")
    verdicts = {"repository": report("repository", *both),
                "copy": report("copy", *both, "--csrc", str(copy))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(library, "load", refuse)
        verdicts["no library"] = report("no library", *both, "--csrc", str(copy))
    cold = ("--targets", "sm_75", "--csrc", str(copy), "--cache-dir", str(tmp_path / "cache"))
    verdicts["cold"] = report("cold", *cold)
    verdicts["warm"] = report("warm", *cold)
    return verdicts


def _violations(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("VIOLATION")]


@needs_built_library
def test_one_verdict_from_the_repository_and_from_a_copy_of_csrc(
        cuda_verdicts: dict[str, tuple[int, list[dict], str]]) -> None:
    """``--csrc`` anywhere asks the plans of a library built from those sources: the same rows and
    the same verdict as from the repository, where sm_75 never launches the 64-pixel stage-4 tile
    (66 KiB of shared memory, the T4 gives 64 KiB)."""
    code, rows, out = cuda_verdicts["repository"]
    assert (code, _violations(out)) == (0, [])
    assert cuda_verdicts["copy"][:2] == (0, rows) and _violations(cuda_verdicts["copy"][2]) == []
    assert {r["target"] for r in rows} == {"sm_75", "sm_86"} and all(r["grid"] for r in rows)
    stage4 = {(r["target"], r["dtype"], r["config"].split(">")[0]) for r in rows
              if r["kernel"] == "mf::conv3x3s2_ln_gelu_kernel" and ", 64, 256, " in r["config"]}
    assert {dtype for target, dtype, _ in stage4 if target == "sm_75"} == {"fp16", "fp32"}
    assert not any(template.endswith(", 64") for target, _, template in stage4 if target == "sm_75")


@needs_built_library
def test_one_verdict_without_a_library_to_ask(cuda_verdicts: dict[str, tuple[int, list[dict], str]]) -> None:
    """Without plans every instantiation that may launch is judged, and the tiles no plan of a
    target picks (over its shared memory) are left out: the verdict stays the plans'."""
    _, planned, _ = cuda_verdicts["repository"]
    code, rows, out = cuda_verdicts["no library"]
    assert (code, _violations(out)) == (0, [])
    assert "report_launches is unusable here (CudaLibraryError: the CUDA library was not built" in out
    judged = {(r["kernel"], r["config"], r["target"], r["dtype"]) for r in rows}
    assert all(r["grid"] is None for r in rows)
    assert {(r["kernel"], r["config"].split("> ")[0].lstrip("<"), r["target"], r["dtype"]) for r in planned} <= judged
    (note,) = [line for line in out.splitlines() if line.startswith("sm_75: left out")]
    assert "over the 65536 bytes" in note and "mf::conv3x3s2_ln_gelu_kernel<__half, __half, 64, 256, 64>" in note
    too_big = [r for r in rows if r["kernel"] == "mf::conv3x3s2_ln_gelu_kernel" and r["config"].endswith("64, 256, 64")]
    assert {r["target"] for r in too_big} == {"sm_86"}
    assert not any(line.startswith("sm_86: left out") for line in out.splitlines())


@needs_built_library
def test_one_verdict_from_an_empty_and_a_warm_cache(cuda_verdicts: dict[str, tuple[int, list[dict], str]]) -> None:
    files = len(list(CSRC.glob("*.cu")))
    code, rows, out = cuda_verdicts["cold"]
    assert f"{files} files x targets, {files} compiled" in out and "0 from the cache" in out
    warm_code, warm_rows, warm_out = cuda_verdicts["warm"]
    assert f"{files} files x targets, 0 compiled (0.0 s), {files} from the cache" in warm_out
    assert (code, _violations(out)) == (warm_code, _violations(warm_out)) == (0, [])
    assert rows == warm_rows == [r for r in cuda_verdicts["repository"][1] if r["target"] == "sm_75"]
