"""The command line: arguments refused before any work, check's and bench's tables and JSON, the plot,
and ``info``."""

import itertools
import json
import re
import struct
import subprocess
import sys

import pytest
import torch

from memenc_fast import dispatch
from memenc_fast.tools import bench, check, info, kernel_report
from memenc_fast.tools.cli import main

from helpers import stub_backend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table(out: str, first_header: str):
    """The header and the data rows (lists of cells) of the markdown table whose first column is
    ``first_header``."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.split("|")[1].strip() == first_header)
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start:]]
    return split[0], split[2:]


def _column(header, rows, name):
    return [row[header.index(name)] for row in rows]


# ---- bad arguments: exit 2, one line on stderr, no work --------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Makes any subcommand's run fail the test: a refused argument must stop before it."""
    def must_not_run(args):
        pytest.fail(f"ran with arguments that should have been refused: {args}")

    for module in (check, bench, info, kernel_report):
        monkeypatch.setattr(module, "run", must_not_run)


def _assert_refused(argv, expected, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    assert expected in captured.err, captured.err


MISSING_FOLDER = "/nonexistent-folder-of-memenc-fast-tests/out"


@pytest.mark.parametrize("argv, expected", [
    (["check", "--batch", "0"], "expected a positive integer; got '0'"),
    (["check", "--batch", "-1"], "expected a positive integer; got '-1'"),
    (["check", "--dtypes", "fp8"], "(fp8 unknown)"),
    (["check", "--dtypes", ""], "expected a comma list of dtypes"),
    (["check", "--preset", "bogus"], "invalid choice: 'bogus'"),
    (["check", "--backends", "torch,bogus"], "(bogus unknown)"),
    (["check", "--device", "bogus"], "expected a torch device such as cpu, cuda or cuda:1; got 'bogus'"),
    (["check", "--device", "cuda:99"], "'cuda:99' asked for, but this machine has"),
    (["check", "--json", MISSING_FOLDER + ".json"], "No such file or directory"),
    (["bench", "--batch", "1,x"], "expected a comma list of positive integers; got '1,x'"),
    (["bench", "--batch", "0"], "positive integers"),
    (["bench", "--repeats", "-5"], "expected a positive integer; got '-5'"),
    (["bench", "--repeats", "0"], "expected a positive integer; got '0'"),
    (["bench", "--preset", "small,bogus"], "(bogus unknown)"),
    (["bench", "--backends", "bogus"], "expected a comma list of backends from auto, reference"),
    (["bench", "--dtypes", "fp8"], "(fp8 unknown)"),
    (["bench", "--device", "bogus"], "got 'bogus'"),
    (["bench", "--compile-mode", "fast"], "invalid choice: 'fast'"),
    (["bench", "--json", MISSING_FOLDER + ".json"], "No such file or directory"),
    (["bench", "--plot", MISSING_FOLDER + ".png"], "No such file or directory"),
    (["bench", "--plot", "bench.txt"], "expected an image file name ending in .png"),
    (["bench", "--ops", "--plot", "bench.png"], "not allowed with argument --ops"),
    (["info", "--json", MISSING_FOLDER + ".json"], "No such file or directory"),
    (["kernels", "--json", MISSING_FOLDER + ".json"], "No such file or directory"),
    (["kernels", "--targets", "sm_75,sm_99"], "expected values from sm_75, sm_80"),
    (["kernels", "--batches", "0"], "expected positive integers; got '0'"),
])
def test_bad_argument_is_refused_before_any_work(argv, expected, no_work, capsys):
    _assert_refused(argv, expected, capsys)


def test_output_path_that_is_a_folder_is_refused(tmp_path, no_work, capsys):
    _assert_refused(["bench", "--json", str(tmp_path)], "a folder", capsys)


@pytest.mark.parametrize("option", ["--cubin-dir", "--cache-dir"])
def test_kernel_report_folder_that_cannot_be_made_is_refused(option, tmp_path, no_work, capsys):
    # Below a file: no user, root included, can make that folder.
    (tmp_path / "a-file").write_text("")
    _assert_refused(["kernels", option, str(tmp_path / "a-file" / "cubins")], "expected a folder this user can write",
                    capsys)


def test_checking_an_output_file_leaves_no_file_behind(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert main(["check", "--json", str(path), "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err and not path.exists()


def test_plot_without_matplotlib_is_refused(monkeypatch, tmp_path, no_work, capsys):
    # A None entry in sys.modules makes the import raise ImportError, as on a machine without it.
    for name in ["matplotlib"] + [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    _assert_refused(["bench", "--plot", str(tmp_path / "bench.png")], "needs matplotlib, which is not installed",
                    capsys)


# ---- check ---------------------------------------------------------------------------------------


def test_check_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    code = main(["check", "--preset", "small", "--batch", "1", "--backends", "reference,torch",
                 "--dtypes", "fp32,bf16", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all 4 checks passed" in out
    header, rows = _table(out, "backend")
    assert header == ["backend", "dtype", "B", "rel err", "bound", "ref same dtype", "result"]
    scientific = re.compile(r"\d\.\d\de[+-]\d\d")
    for name in ("rel err", "bound"):
        assert all(scientific.fullmatch(cell) for cell in _column(header, rows, name)), rows
    assert all(scientific.fullmatch(cell) or cell == "-" for cell in _column(header, rows, "ref same dtype"))
    rows = json.loads(path.read_text())["rows"]
    assert {(r["backend"], r["dtype"]) for r in rows} == {
        ("reference", "fp32"), ("torch", "fp32"), ("reference", "bf16"), ("torch", "bf16")}
    assert all(r["status"] == "PASS" and 0 < r["rel_error"] < r["bound"] for r in rows)


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    from memenc_fast.backends import torch_ops

    def off_by_a_bit(x, layer):
        return torch_ops.out_proj(x, layer) * 1.001

    monkeypatch.setitem(dispatch._registry, "broken", stub_backend("broken", {"out_proj": off_by_a_bit}))
    code = main(["check", "--preset", "small", "--batch", "1", "--backends", "broken,torch", "--dtypes", "fp32"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "PASS" in out


def test_check_reports_a_crashing_backend_as_error(capsys):
    code = main(["check", "--preset", "small", "--batch", "1", "--backends", "torch", "--dtypes", "fp16",
                 "--device", "meta"])
    out = capsys.readouterr().out
    assert code == 1 and "ERROR" in out


# ---- bench ---------------------------------------------------------------------------------------


def test_bench_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--preset", "small", "--batch", "1,2", "--backends", "torch", "--repeats", "1",
                 "--no-compile", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path)])
    assert code == 0
    header, cells = _table(capsys.readouterr().out, "preset")
    assert header == ["preset", "dtype", "B", "impl", "ms/forward", "objects/s", "vs eager"]
    formats = {"ms/forward": r"[\d,]+\.\d{3}", "objects/s": r"[\d,]+\.\d", "vs eager": r"\d+\.\d\dx"}
    for name, pattern in formats.items():
        assert all(re.fullmatch(pattern, cell) for cell in _column(header, cells, name)), (name, cells)
    rows = json.loads(json_path.read_text())["rows"]
    assert {(r["impl"], r["batch"]) for r in rows} == {("reference", 1), ("torch", 1), ("reference", 2), ("torch", 2)}
    for row in rows:
        assert row["ms"] > 0 and row["objects_per_s"] == pytest.approx(row["batch"] / row["ms"] * 1e3)
        assert row["vs_compile"] is None
    assert all(r["vs_eager"] == 1.0 for r in rows if r["impl"] == "reference")
    data = plot_path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_bench_columns_add_compiled_and_gpu_rates():
    headers = [c.header for c in bench.end_to_end_columns(torch.device("cuda"), compiled=True)]
    assert headers[-3:] == ["vs compiled", "TFLOP/s", "% of bf16 peak"]


def test_bench_plot_draws_every_panel_with_gaps(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    rows = []
    for preset, dtype, batch in itertools.product(("sam2", "sam3"), ("fp32", "bf16"), (1, 8, 64)):
        for impl, speedup in (("reference", 1.0), ("reference+compile", 1.5), ("cuda", 4.0)):
            timed = not (impl == "cuda" and batch == 8)  # a failed timing: a gap in its line
            rows.append(dict(preset=preset, dtype=dtype, batch=batch, impl=impl, ms=10.0 / speedup if timed else None,
                             vs_eager=speedup if timed else None, vs_compile=speedup / 1.5 if timed else None))
    path = tmp_path / "plot.png"
    bench._plot(rows, path, torch.device("cuda"))
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_bench_ops_rows(tmp_path, capsys):
    path = tmp_path / "ops.json"
    assert main(["bench", "--ops", "--preset", "small", "--batch", "1", "--backends", "torch", "--repeats", "1",
                 "--json", str(path)]) == 0
    header, cells = _table(capsys.readouterr().out, "preset")
    for name in ("µs", "floor µs"):
        assert all(re.fullmatch(r"[\d,]+\.\d", cell) for cell in _column(header, cells, name)), cells
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["mask_downsample", "proj_add", "cxblock", "out_proj"]
    assert all(r["us"] > 0 and r["floor_us"] > 0 and r["gflop"] > 0 for r in rows)


# ---- info and the entry point --------------------------------------------------------------------


def test_info_prints_every_section_and_writes_json(tmp_path, capsys):
    path = tmp_path / "info.json"
    assert main(["info", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    written = json.loads(path.read_text())
    assert list(written) == ["versions", "devices", "backends", "cpu fast paths", "cuda library"]
    assert {"ATen CPU capability", "oneDNN fused MLP, float32"} <= set(written["cpu fast paths"])
    for section, entries in written.items():
        assert f"\n{section}\n" in f"\n{out}\n"
        assert all(re.search(rf"^ +{re.escape(key)}:", out, re.MULTILINE) for key in entries), (section, out)
    assert {"memenc_fast", "python", "torch", "torch CUDA", "triton", "platform"} <= set(written["versions"])
    assert set(dispatch.registered_backends()) <= set(written["backends"])
    assert {"path", "status", "ptxas report"} <= set(written["cuda library"])
    if torch.cuda.is_available():
        assert {"name", "compute capability", "SMs", "shared memory per block"} <= set(written["devices"]["cuda:0"])
        assert "on cuda:0" in written["backends"]
    else:
        assert written["devices"]["cuda"].startswith("no CUDA device")


def test_info_without_triton_or_the_cuda_library(monkeypatch, tmp_path, capsys):
    import importlib.metadata

    from memenc_fast.backends.cuda import library

    real_version = importlib.metadata.version

    def version(name):
        if name == "triton":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(library, "library_path", lambda: tmp_path / library.LIBRARY_NAME)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  triton: +not installed$", out, re.MULTILINE), out
    assert re.search(r"^  status: +not built", out, re.MULTILINE) and "ptxas report: not built" in out


def test_fatbin_targets_match_the_ptxas_report():
    from memenc_fast.backends.cuda import library

    path = library.library_path()
    report = path.parent / info.PTXAS_REPORT
    if not (path.is_file() and report.is_file()):
        pytest.skip("the CUDA library and its ptxas report are not built")
    assert sorted(info.fatbin_targets(path)) == sorted(info.ptxas_report_targets(report.read_text()))


def _elf_with_fatbin(entries):
    """A 64-bit ELF file whose .nv_fatbin section holds one fat binary of header-only ``entries``
    (kind, SM version, flags), laid out as nvcc lays them out."""
    records = b"".join(struct.pack("<HHII16xI8xI20x", kind, 0x101, 64, 0, sm, flags) for kind, sm, flags in entries)
    fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(records)) + records
    names = b"\0.shstrtab\0.nv_fatbin\0"
    table_offset = 64 + len(names) + len(fatbin)
    header = b"\x7fELF\x02\x01" + bytes(0x22) + struct.pack("<Q10xHHH", table_offset, 64, 3, 1)
    sections = [(0, 0, 0), (1, 64, len(names)), (11, 64 + len(names), len(fatbin))]
    table = b"".join(struct.pack("<IIQQQQ24x", name, 1, 0, 0, offset, size) for name, offset, size in sections)
    return header + names + fatbin + table


def test_fatbin_targets_name_cubins_ptx_and_arch_variants(tmp_path):
    path = tmp_path / "lib.so"
    path.write_bytes(_elf_with_fatbin([(2, 80, 0x11), (2, 90, 0x100011), (1, 90, 0x108011), (2, 120, 0x1200011)]))
    assert info.fatbin_targets(path) == ["sm_80", "sm_90a", "sm_120f", "compute_90a"]


def test_ptxas_report_targets_read_the_nvcc_command():
    command = ("nvcc -O3 -gencode=arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=[sm_90a,compute_90a] "
               "-o lib.so\narch regs\n")
    assert info.ptxas_report_targets(command) == ["sm_80", "sm_90a", "compute_90a"]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("check", "bench", "info", "kernels"))


def test_module_entry_point_runs_info():
    result = subprocess.run([sys.executable, "-m", "memenc_fast", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "versions" in result.stdout and "cuda library" in result.stdout
