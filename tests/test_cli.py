"""The command line: check's table and exit code, bench's rows and JSON."""

import json
import subprocess
import sys

import pytest
import torch

from memenc_fast import dispatch
from memenc_fast.tools.cli import main

from helpers import stub_backend


def test_check_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    code = main(["check", "--preset", "small", "--batch", "1", "--backends", "reference,torch",
                 "--dtypes", "fp32,bf16", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| torch" in out and "all 4 checks passed" in out
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


def test_check_reports_a_crashing_backend_as_error(monkeypatch, capsys):
    code = main(["check", "--preset", "small", "--batch", "1", "--backends", "torch", "--dtypes", "fp16",
                 "--device", "meta"])
    out = capsys.readouterr().out
    assert code == 1 and "ERROR" in out


def test_bench_end_to_end_rows_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--preset", "small", "--batch", "1,2", "--backends", "torch", "--repeats", "1",
                 "--json", str(path)])
    assert code == 0
    rows = json.loads(path.read_text())["rows"]
    assert {(r["impl"], r["batch"]) for r in rows} == {("reference", 1), ("torch", 1), ("reference", 2), ("torch", 2)}
    for row in rows:
        assert row["ms"] > 0 and abs(row["us_per_object"] - row["ms"] * 1e3 / row["batch"]) < 1e-6
    reference_rows = [r for r in rows if r["impl"] == "reference"]
    assert all(r["vs_eager"] == 1.0 for r in reference_rows)
    assert "µs/object" in capsys.readouterr().out


def test_bench_ops_rows(tmp_path):
    path = tmp_path / "ops.json"
    assert main(["bench", "--ops", "--preset", "small", "--batch", "1", "--backends", "torch", "--repeats", "1",
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["mask_downsample", "proj_add", "cxblock", "out_proj"]
    assert all(r["us"] > 0 and r["floor_us"] > 0 and r["gflop"] > 0 for r in rows)


def test_bench_rejects_bad_batch_list(capsys):
    assert main(["bench", "--batch", "1,x"]) == 2
    assert "positive integers" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "memenc_fast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check" in result.stdout and "bench" in result.stdout


def test_bench_rejects_unknown_preset(capsys):
    assert main(["bench", "--preset", "small,bogus"]) == 2
    assert "--preset must be a comma list" in capsys.readouterr().err


def test_bench_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    path = tmp_path / "bench.png"
    assert main(["bench", "--preset", "small", "--batch", "1,2", "--backends", "torch", "--repeats", "1",
                 "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
