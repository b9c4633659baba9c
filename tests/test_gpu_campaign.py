"""benchmarks/gpu_campaign.sh: its control flow, proven without a GPU.

Two runs: the real interpreter with no GPU visible (GPU steps skip with the reason, the rest is
a dry run), and a stand-in ``python``/``compute-sanitizer``/``nvidia-smi`` that plays a GPU
machine where some steps fail or time out, to show that every step is recorded and the later
ones still run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_campaign.sh"
STEPS = ["env", "build", "deps", "tests", "check", "bench", "ops", "kernels", "video", "memcheck",
         "racecheck", "initcheck", "worktree"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# Plays python on a GPU machine. Each call is appended to $FAKE_CALLS; pip fails to install the
# project (so the build falls back to setup.py) but installs the carried archives, the GPU test
# suite has a failure, `bench --ops` hangs past its limit and `kernels` reports a violation.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >>"$FAKE_CALLS"
case "$1 $2" in
    "- ") cat >/dev/null
        printf 'python: 3.12.3\ntorch: 2.11.0+cu128\ntorch CUDA: 12.8\n'
        printf 'device: NVIDIA H100 80GB HBM3 (sm_90)\ntriton: 3.6.0\n' ;;
    "-c "*) exit 0 ;;
    "-m pip")
        if [[ "$*" == *" -e ."* ]]; then echo "ERROR: no setup.py build backend"; exit 1; fi
        echo "Successfully installed sam2-1.1.0" ;;
    "setup.py build_ext") echo "built memenc_fast/_lib/libmemenc_fast_cuda.so" ;;
    "-m pytest")
        [[ "$*" == *--junitxml* ]] || { echo "4 passed"; exit 0; }  # under a sanitizer
        while [[ "$1" != --junitxml ]]; do shift; done
        echo '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2"' \
             'tests="5" time="1.0"></testsuite></testsuites>' >"$2"
        echo "1 failed, 2 passed, 2 skipped"; exit 1 ;;
    "benchmarks/bench_video.py --objects") printf '| objects | backend |\n| 8 | cuda |\n' ;;
    "-m memenc_fast")
        case "$3 $4" in
            "check "*) printf 'backend  dtype  rel_err\ntriton   bf16   2.1e-03\n' ;;
            "bench --ops") exec sleep 30 ;;
            "bench "*) printf 'backend  B   us\ncuda     64  1234\n' ;;
            "kernels "*) echo "VIOLATION hot kernel spills: triton mask_path"; exit 3 ;;
        esac ;;
    *) echo "unexpected: $*"; exit 99 ;;
esac
"""

FAKE_SANITIZER = r"""#!/usr/bin/env bash
echo "compute-sanitizer caching=${PYTORCH_NO_CUDA_MEMORY_CACHING:-} $*" >>"$FAKE_CALLS"
tool="$2"
shift 4
"$@" || exit $?
if [[ "$tool" == racecheck ]]; then
    echo "========= ERROR SUMMARY: 1 error"; exit 1
fi
echo "========= ERROR SUMMARY: 0 errors"
"""

FAKE_NVIDIA_SMI = r"""#!/usr/bin/env bash
if [[ "$1" == --query-gpu* ]]; then echo "NVIDIA H100 80GB HBM3, 570.86.15, 81559 MiB"; exit; fi
echo "NVIDIA-SMI 570.86.15"
"""


def _steps(out: Path) -> dict[str, list[str]]:
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == STEPS
    return {r[0]: r[1:] for r in rows}


def _summary_rows(summary: str) -> dict[str, str]:
    """step -> status, from SUMMARY.md's table."""
    return {m.group(1): m.group(2)
            for m in re.finditer(r"^\| (\w+) \| ([^|]+) \| ", summary, re.MULTILINE)
            if m.group(1) != "step"}


def test_without_a_gpu_the_gpu_steps_skip_and_the_summary_comes_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # No GPU visible even on a GPU machine; the dry run keeps build and kernels from running.
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               MEMENC_FAST_CAMPAIGN_DRY_RUN="1", MEMENC_FAST_CAMPAIGN_WHEELS=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = _steps(out)
    for step in ("tests", "check", "bench", "ops", "video", "memcheck", "racecheck", "initcheck"):
        assert steps[step][0].startswith("skipped: no CUDA GPU"), steps[step]
    assert steps["deps"][0].startswith("skipped: no wheel or source archive in ")
    assert steps["build"][0] == steps["kernels"][0] == "dry-run"
    assert steps["env"][0] == "ok"
    summary = (out / "SUMMARY.md").read_text()
    assert set(_summary_rows(summary)) == set(STEPS)
    assert "`python -m memenc_fast kernels --json $OUTDIR/kernels.json" in summary
    assert f"- Versions: python {sys.version.split()[0]}, torch " in summary
    assert str(out) not in summary


def test_failures_and_timeouts_are_recorded_and_later_steps_still_run(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER),
                       ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "sam2-1.1.0.tar.gz").write_bytes(b"")
    env = dict(os.environ, PYTHON=str(fake / "python"), FAKE_CALLS=str(calls),
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", MEMENC_FAST_CAMPAIGN_T_OPS="1",
               MEMENC_FAST_CAMPAIGN_WHEELS=str(wheels))
    env.pop("MEMENC_FAST_CAMPAIGN_DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr

    steps = _steps(out)
    assert steps["build"][:2] == ["ok", "0"]
    assert "falling back to setup.py build_ext --inplace" in (out / "build.log").read_text()
    assert steps["tests"][:2] == ["failed", "1"]
    assert steps["check"][:2] == ["ok", "0"] and steps["bench"][:2] == ["ok", "0"]
    assert steps["ops"][0] == "timeout (1s)" and steps["ops"][1] in ("124", "137")
    assert float(steps["ops"][2]) < 10
    assert steps["kernels"][:2] == ["failed", "3"]
    assert steps["deps"][:2] == ["ok", "0"] and steps["video"][:2] == ["ok", "0"]
    assert steps["memcheck"][:2] == steps["initcheck"][:2] == ["ok", "0"]
    assert steps["racecheck"][:2] == ["failed", "1"]

    # Every step after the first failure ran, in order.
    ran = calls.read_text().splitlines()
    order = [next(i for i, line in enumerate(ran) if pattern in line) for pattern in (
        "sam2-1.1.0.tar.gz", "-m pytest", "memenc_fast check --json", "memenc_fast bench --batch 1,8,32,64",
        "memenc_fast bench --ops", "memenc_fast kernels", "bench_video.py", "--tool memcheck",
        "--tool racecheck", "--tool initcheck")]
    assert order == sorted(order)
    assert "-m pytest tests -q -rs -p no:cacheprovider -m gpu --junitxml" in calls.read_text()
    assert re.search(r"compute-sanitizer caching=1 --tool memcheck --error-exitcode 1 \S*python -m pytest "
                     r"tests -q -p no:cacheprovider -m gpu and not heavy", calls.read_text())

    summary = (out / "SUMMARY.md").read_text()
    assert _summary_rows(summary) == {step: status[0] for step, status in steps.items()}
    assert "## GPU campaign: NVIDIA H100 80GB HBM3 (sm_90)" in summary
    assert "- Driver: 570.86.15" in summary
    assert ("- Versions: python 3.12.3, torch 2.11.0+cu128 (CUDA 12.8), triton 3.6.0"
            in summary)
    assert "Test suite (junit.xml): 5 tests, 1 failures, 0 errors, 2 skipped" in summary
    # The tables the commands printed, and the tail of each failed step's log.
    assert "### check (ok)" in summary and "triton   bf16   2.1e-03" in summary
    assert "### bench (ok)" in summary and "cuda     64  1234" in summary
    assert "### kernels (failed)" in summary and "VIOLATION hot kernel spills" in summary
    assert "### racecheck (failed)" in summary and "ERROR SUMMARY: 1 error" in summary
    assert "### video (ok)" in summary and "| 8 | cuda |" in summary
    assert ("`env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck "
            "--error-exitcode 1 python -m pytest tests -q -p no:cacheprovider -m 'gpu and not heavy'`"
            in summary)
    assert "`SAM2_BUILD_CUDA=0 python -m pip install --no-deps --no-build-isolation " in summary
    assert str(out) not in summary and str(fake) not in summary


def test_named_steps_run_alone_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", MEMENC_FAST_CAMPAIGN_DRY_RUN="1")
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "kernels", "initcheck"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["env", "kernels", "initcheck", "worktree"]
    assert set(_summary_rows((out / "SUMMARY.md").read_text())) == {"env", "kernels", "initcheck", "worktree"}

    proc = subprocess.run(["bash", str(SCRIPT), str(out), "tests", "benchmark"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "unknown step 'benchmark'; expected some of: build deps tests" in proc.stderr
