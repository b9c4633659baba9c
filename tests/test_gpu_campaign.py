"""benchmarks/gpu_campaign.sh and the programs it runs, proven without a GPU.

The dry run plans every step against the budget and lays out OUTDIR as a run would; every command
it plans names options its program has. ``prepare`` builds a library that loads and names its
targets. A stand-in ``python``/``compute-sanitizer``/``nvidia-smi`` plays a GPU machine where some
steps fail or hang, to show that every step is recorded, the later ones still run, and a run killed
midway keeps what finished. benchmarks/sanitize_kernels.py runs its cases under Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List

import pytest

from helpers import requires_cuda

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_campaign.sh"
STEPS = ["env", "install", "library", "check", "tests", "speed", "ops", "video", "memcheck", "racecheck"]
BUDGET, RESERVE, BUILD_EXTRA = 360, 5, 60
OUT_FILES = {"SUMMARY.md", "results.json", "campaign.tar.gz"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _campaign(args: List[str], env: Dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _dry_run(out: Path, prepared: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, MEMENC_FAST_CAMPAIGN_DRY_RUN="1",
               MEMENC_FAST_CAMPAIGN_DIR=str(prepared))
    proc = _campaign(["run", str(out), *args], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _check_outdir(out: Path) -> None:
    """At most 8 files, none deeper than two folders: what a GPU loan gives back."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert {p.name for p in files} == OUT_FILES


def _plan_table(summary: str) -> Dict[str, int]:
    """step -> planned seconds, from SUMMARY.md's plan table."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| (\w+) \| (\d+) \| \d+ \| ", summary, re.M)}


def _steps(out: Path) -> Dict[str, dict]:
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert [s["step"] for s in steps] == STEPS
    return {s["step"]: s for s in steps}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dry run with the default budget and nothing prepared."""
    out = tmp_path_factory.mktemp("dry") / "out"
    _dry_run(out, out.parent / "nothing-prepared")
    return out


def test_the_dry_run_plans_every_step_within_the_budget(dry_run: Path) -> None:
    _check_outdir(dry_run)
    summary = (dry_run / "SUMMARY.md").read_text()
    assert summary.startswith("## GPU campaign: ") and "(dry run)" in summary.splitlines()[0]
    assert f"- Versions: python {sys.version.split()[0]}, torch " in summary
    assert _plan_table(summary) == {"env": 10, "install": 15, "library": 10, "check": 45, "tests": 85,
                                    "speed": 65, "ops": 20, "video": 45, "memcheck": 30, "racecheck": 30}
    assert f"| total | {BUDGET} |" in summary
    for step in STEPS:
        assert re.search(rf"^### {step}: (dry-run|dropped: .*) \(0s of \d+s\)$", summary, re.M), step

    steps = _steps(dry_run)
    # Nothing prepared: the library step borrows a build's time from the lowest steps, which drop.
    assert "nvcc builds one" in steps["library"]["note"]
    assert steps["library"]["limit"] == 10 + BUILD_EXTRA
    planned = [s for s in STEPS if steps[s]["status"] == "dry-run"]
    assert planned == STEPS[:len(planned)] and planned[-1] == "video"
    assert all(steps[s]["status"].startswith("dropped: ") for s in STEPS[len(planned):])
    assert sum(steps[s]["limit"] for s in planned) + RESERVE <= BUDGET
    assert "Dropped for want of time: memcheck racecheck." in summary
    assert str(dry_run) not in summary and str(REPO) not in summary

    with tarfile.open(dry_run / "campaign.tar.gz") as archive:
        names = archive.getnames()
    assert "campaign/env/facts.out" in names and "campaign/check/commands.tsv" in names


def _help_text(argv: List[str]) -> str:
    """What ``argv --help`` prints: memenc_fast's subcommands in this process, the rest in their own."""
    if argv[1:3] == ["-m", "memenc_fast"]:
        from memenc_fast.tools import cli

        with contextlib.redirect_stdout(io.StringIO()) as text:
            assert cli.main([*argv[3:], "--help"]) == 0
        return text.getvalue()
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_every_planned_command_names_options_its_program_has(dry_run: Path) -> None:
    helps: Dict[tuple, str] = {}
    checked = 0
    for step in _steps(dry_run).values():
        for command in step["commands"]:
            words = shlex.split(command["command"])
            if words[0] == "env":  # env VAR=VALUE ... PROGRAM
                words = words[next(i for i, w in enumerate(words[1:], 1) if "=" not in w):]
            if words[0] == "compute-sanitizer":
                sanitizer = shutil.which("compute-sanitizer")
                if sanitizer is not None:
                    text = helps.setdefault(("sanitizer",), _help_text([sanitizer]))
                    for flag in ("--tool", "--error-exitcode", "--print-limit"):
                        assert flag in text
                words = words[words.index("python"):]  # the program it watches
            if words[:2] == ["bash", "benchmarks/gpu_campaign.sh"]:
                assert f"\n    {words[2]})" in SCRIPT.read_text(), words  # one of its own subcommands
                continue
            assert words[0] == "python", command
            if words[1] == "-m" and words[2] in ("memenc_fast", "pip"):
                program = words[:4]  # the subcommand has its own options
            elif words[1] == "-m":
                program = words[:3]
            else:
                program = words[:2]
                assert (REPO / words[1]).is_file(), words[1]
            text = helps.setdefault(tuple(program), _help_text([sys.executable, *program[1:]]))
            for word in words[len(program):]:
                if word.startswith("-"):
                    flag = word if word.startswith("--") else word[:2]  # -rfEs: -r and its characters
                    assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{flag} of {command['command']}"
                    checked += 1
    assert checked > 40
    assert (REPO / "tests").is_dir()


def test_prepare_builds_a_library_that_loads_and_names_its_targets(tmp_path: Path) -> None:
    from build_tools.cuda_build import find_nvcc

    if find_nvcc(os.environ) is None:
        pytest.skip("prepare builds the CUDA library with nvcc, which is not installed here")
    prepared = tmp_path / "prepared"
    env = dict(os.environ, PYTHON=sys.executable, MEMENC_FAST_CAMPAIGN_DIR=str(prepared))
    # The package's own build (all targets) is taken where it is current, else prepare builds.
    installed = REPO / "memenc_fast" / "_lib" / "libmemenc_fast_cuda.so"
    proc = _campaign(["prepare", "sm_90a", "--no-wheels", "--library", str(installed)], env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^library: .*\(current: (.+, )?sm_90a, (.+, )?compute_\d+\)$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^prepared: .* holds [\d.]+ MiB \(at most 40\)$", proc.stdout, re.M), proc.stdout
    assert "bash benchmarks/gpu_campaign.sh run OUTDIR --budget 360" in proc.stdout
    library = prepared / "lib" / "libmemenc_fast_cuda.so"

    info_json = tmp_path / "info.json"
    proc = subprocess.run([sys.executable, "-m", "memenc_fast", "info", "--json", str(info_json)],
                          env=dict(os.environ, MEMENC_FAST_CUDA_LIBRARY=str(library)), cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(info_json.read_text())["cuda library"]
    assert info["path"] == str(library)
    assert info["status"].startswith("loads"), info["status"]
    assert "sm_90a" in info["architectures"] and "sm_90a" in info["ptxas report targets"]

    # Prepared again for the same target, it is kept, not built anew.
    proc = _campaign(["prepare", "sm_90a", "--no-wheels"], env, timeout=120)
    assert proc.returncode == 0 and f"library: {library} is up to date (current: " in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------------
# A GPU machine played by stand-ins. Every call is appended to $FAKE_CALLS. One of the four check
# runs fails, the test suite has a failure, `bench --ops` hangs past its limit, racecheck reports a
# race; with FAKE_HANG_VIDEO the video benchmark hangs.

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >>"$FAKE_CALLS"
after() { local flag="$1"; shift; while (($#)); do [[ "$1" == "$flag" ]] && { echo "$2"; return; }; shift; done; }
case "$1" in
    -) exec "$REAL_PYTHON" "$@" ;;  # the campaign's own record keeping
    -c)
        case "$2" in
            *platform.python_version*)
                printf 'python: 3.12.3\ntorch: 2.11.0+cu130\ntorch CUDA: 13.0\n'
                printf 'device: NVIDIA H100 80GB HBM3 (sm_90)\nsm: sm_90\ndevice memory: 132 SMs, 79.2 GiB\n'
                printf 'triton: 3.6.0\n' ;;
            *sources_digest*)  # with FAKE_STALE_LIBRARY the prepared one is stale, a fresh build is not
                if [[ -n "${FAKE_STALE_LIBRARY:-}" && "$3" == "$MEMENC_FAST_CAMPAIGN_DIR"/* ]]; then
                    echo "stale: built (sm_90a, compute_90) from other sources than csrc/ holds now"; exit 1
                fi
                echo "current: sm_90a, compute_90" ;;
            *build_cuda_library*) echo "built for $MEMENC_FAST_CUDA_ARCHS" && touch "$3/libmemenc_fast_cuda.so" ;;
            *memenc_fast.kernels*) exit 1 ;;  # not installed: the install step installs it
            *importlib.metadata*) shift 2; printf '%s\n' "$@" ;;  # every prepared wheel is missing
            *"import xdist"* | *"import matplotlib"*) exit 1 ;;
            *get_device_capability*) echo 90a ;;
            *is_available*) exit 0 ;;
            *) echo "unexpected -c: $2"; exit 99 ;;
        esac ;;
    -m)
        case "$2 $3" in
            "pip list") echo "torch 2.11.0" ;;
            "pip install") echo "Successfully installed" ;;
            "memenc_fast info") echo '{}' >"$(after --json "$@")" ;;
            "memenc_fast check")
                echo "{\"rows\": [{\"backend\": \"cuda\", \"status\": \"PASS\"}]}" >"$(after --json "$@")"
                printf '| backend | result |\n| cuda | PASS |\n'
                [[ "$*" != *"--preset sam3 --batch 8"* ]] || { echo "1 of 9 checks failed" >&2; exit 1; } ;;
            "memenc_fast bench")
                [[ "$*" != *--ops* ]] || exec sleep 30
                echo '{"rows": [{"impl": "cuda+graphs", "ms": 0.5}]}' >"$(after --json "$@")"
                printf '| impl | ms/forward |\n| cuda+graphs | 0.500 |\n' ;;
            "pytest tests")
                echo '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="5">' \
                     '<testcase classname="tests.test_x" name="test_a"><failure/></testcase>' \
                     '</testsuite></testsuites>' >"$(after --junit-xml "$@")"
                echo "FAILED tests/test_x.py::test_a"; exit 1 ;;
            *) echo "unexpected: $*"; exit 99 ;;
        esac ;;
    benchmarks/bench_video.py)
        [[ -z "${FAKE_HANG_VIDEO:-}" ]] || exec sleep 60
        echo '{"rows": [{"objects": 8}]}' >"$(after --json "$@")"
        printf '| objects | backend |\n| 8 | cuda |\n' ;;
    benchmarks/sanitize_kernels.py)
        echo '{"rows": []}' >"$(after --json "$@")"
        echo "all 30 cases passed" ;;
    *) echo "unexpected: $*"; exit 99 ;;
esac
"""

FAKE_SANITIZER = r"""#!/usr/bin/env bash
[[ "$1" != --version ]] || { echo "NVIDIA (R) Compute Sanitizer"; echo "Version 2025.3.1.0"; exit 0; }
echo "compute-sanitizer caching=${PYTORCH_NO_CUDA_MEMORY_CACHING:-} $*" >>"$FAKE_CALLS"
tool="$2"
shift 6
"$@" || exit $?
if [[ "$tool" == racecheck ]]; then echo "========= ERROR SUMMARY: 1 error"; exit 1; fi
echo "========= ERROR SUMMARY: 0 errors"
"""

FAKE_NVIDIA_SMI = r"""#!/usr/bin/env bash
if [[ "$1" == --query-gpu* ]]; then echo "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB"; exit; fi
echo "NVIDIA-SMI 580.159.04"
"""


def _fake_machine(tmp_path: Path, **extra: str) -> Dict[str, str]:
    """The environment of a campaign on the stand-in GPU machine, with a prepared library and wheel."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER),
                       ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    prepared = tmp_path / "prepared"
    (prepared / "lib").mkdir(parents=True)
    (prepared / "lib" / "libmemenc_fast_cuda.so").write_bytes(b"stand-in")
    (prepared / "wheels").mkdir()
    (prepared / "wheels" / "sam2-1.1.0-py3-none-any.whl").write_bytes(b"stand-in")
    env = {name: value for name, value in os.environ.items() if name != "MEMENC_FAST_CAMPAIGN_DRY_RUN"}
    env.update(PYTHON=str(fake / "python"), REAL_PYTHON=sys.executable, FAKE_CALLS=str(tmp_path / "calls"),
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", MEMENC_FAST_CAMPAIGN_DIR=str(prepared),
               MEMENC_FAST_CAMPAIGN_T_OPS="3", **extra)
    return env


@pytest.mark.parametrize("budget", [BUDGET, 200])
def test_the_plan_fits_the_budget_and_drops_the_lowest_steps(tmp_path: Path, budget: int) -> None:
    """A GPU machine with the library prepared: the default budget plans every step as planned; a
    smaller one plans the highest steps, the last of them with what is left, and drops the rest."""
    env = _fake_machine(tmp_path, MEMENC_FAST_CAMPAIGN_DRY_RUN="1")
    env.pop("MEMENC_FAST_CAMPAIGN_T_OPS")
    out = tmp_path / "out"
    proc = _campaign(["run", str(out), "--budget", str(budget)], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_outdir(out)
    steps = _steps(out)
    planned = [s for s in STEPS if steps[s]["status"] == "dry-run"]
    assert planned == STEPS[:len(planned)]
    assert all(steps[s]["status"].startswith("dropped: ") for s in STEPS[len(planned):])
    assert sum(steps[s]["limit"] for s in planned) + RESERVE == budget
    if budget == BUDGET:
        assert planned == STEPS and steps["library"]["note"] == "prepared library current: sm_90a, compute_90"
        assert "Dropped" not in (out / "SUMMARY.md").read_text()
    else:
        assert planned[-1] == "speed" and steps["speed"]["limit"] < 65


def test_failures_and_timeouts_are_recorded_and_later_steps_still_run(tmp_path: Path) -> None:
    env = _fake_machine(tmp_path)
    out = tmp_path / "out"
    proc = _campaign(["run", str(out)], env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    _check_outdir(out)

    steps = _steps(out)
    status = {name: step["status"] for name, step in steps.items()}
    assert status == {"env": "ok", "install": "ok", "library": "ok", "check": "failed", "tests": "failed",
                      "speed": "ok", "ops": "timeout", "video": "ok", "memcheck": "ok", "racecheck": "failed"}
    assert steps["ops"]["limit"] == 3 and steps["ops"]["seconds"] < 10
    assert [c["exit"] for c in steps["check"]["commands"]] == [0, 0, 0, 1]
    assert steps["tests"]["results"]["junit"] == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2,
                                                  "failed": ["tests.test_x::test_a"]}
    assert steps["check"]["results"]["sam2-B1"]["rows"][0]["status"] == "PASS"
    assert steps["racecheck"]["results"]["sanitizer_errors"] == {"racecheck": 1}
    assert steps["memcheck"]["results"]["sanitizer_errors"] == {"memcheck": 0}

    # Every step after the first failure ran, in order, each command as planned.
    calls = (tmp_path / "calls").read_text()
    order = [calls.index(pattern) for pattern in (
        "pip install -q --no-index --no-deps --no-compile", "memenc_fast info --json", "check --preset sam3 --batch 8",
        "-m pytest tests -m gpu", "bench --preset sam2 --batch 1,8,32 --dtypes bf16", "bench --ops",
        "bench_video.py --objects 1,8", "--tool memcheck", "--tool racecheck")]
    assert order == sorted(order)
    assert "caching=1 --tool memcheck --error-exitcode 1 --print-limit 50" in calls
    assert "caching= --tool racecheck" in calls

    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith("## GPU campaign: NVIDIA H100 80GB HBM3 (sm_90)\n")
    assert "driver 580.159.04" in summary and "compute-sanitizer 2025.3.1.0" in summary
    assert "- Versions: python 3.12.3, torch 2.11.0+cu130 (CUDA 13.0), triton 3.6.0" in summary
    assert "### check: failed" in summary and "1 of 9 checks failed" in summary
    assert "### ops: timeout (" in summary and "### speed: ok" in summary and "| cuda+graphs | 0.500 |" in summary
    assert "junit.xml: 5 tests, 1 failures, 0 errors, 2 skipped" in summary
    assert "ERROR SUMMARY: 1 error" in summary
    assert "Failed or timed out: check tests ops racecheck." in summary
    assert str(tmp_path) not in summary
    with tarfile.open(out / "campaign.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"campaign/tests/junit.xml", "campaign/video/video.json", "campaign/racecheck/racecheck.out",
            "campaign/env/nvidia-smi.out"} <= names


def test_a_run_killed_midway_keeps_what_finished(tmp_path: Path) -> None:
    """Killed while the video benchmark hangs; the prepared library was stale, so nvcc built one."""
    env = _fake_machine(tmp_path, FAKE_HANG_VIDEO="1", FAKE_STALE_LIBRARY="1")
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "run", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    calls = tmp_path / "calls"
    try:
        deadline = time.monotonic() + 120
        while "bench_video.py" not in (calls.read_text() if calls.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the video step"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _check_outdir(out)
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert [s["step"] for s in steps] == STEPS[:STEPS.index("video")]
    library = steps[STEPS.index("library")]
    assert library["status"] == "ok" and library["limit"] >= 10 + BUILD_EXTRA
    assert library["note"].startswith("prepared library unusable (stale: ") and "nvcc builds one" in library["note"]
    summary = (out / "SUMMARY.md").read_text()
    assert "### ops: timeout" in summary and "### video" not in summary
    assert "building it for sm_90a with nvcc" in summary
    with tarfile.open(out / "campaign.tar.gz") as archive:
        assert "campaign/speed/bf16.json" in archive.getnames()


# ---------------------------------------------------------------------------------------------------
# The programs the campaign runs that no other test does.

def test_sanitize_script_judges_and_lists_each_launch(tmp_path: Path) -> None:
    """Its cases under Triton's interpreter (the CUDA backend needs a GPU build's GPU)."""
    pytest.importorskip("triton")
    result = tmp_path / "cases.json"
    proc = subprocess.run([sys.executable, "benchmarks/sanitize_kernels.py", "--device", "cpu", "--backends", "triton",
                           "--geometries", "small", "--precisions", "fp32", "--json", str(result)],
                          env=dict(os.environ, TRITON_INTERPRET="1"), cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(result.read_text())
    [row] = payload["rows"]
    assert row["status"] == "PASS" and row["rel_error"] < row["bound"] and row["graph"] == "no"
    kernels = {entry["kernel"] for entry in payload["configurations"]}
    assert {"mask_path", "proj_add", "dwconv_ln"} <= kernels and kernels & {"cxblock_mlp", "cxblock_mlp_out"}
    assert row["launches"] == sum(entry["launches"] for entry in payload["configurations"])
    assert "all 1 cases passed" in proc.stdout


def test_sanitize_script_refuses_a_backend_without_kernels(capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("sanitize_kernels", REPO / "benchmarks" / "sanitize_kernels.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--backends", "torch"])
    assert exit_info.value.code == 2
    assert "expected a comma list of backends from triton, cuda; got 'torch'" in capsys.readouterr().err


def test_bench_cuda_graphs_needs_a_cuda_device(capsys: pytest.CaptureFixture) -> None:
    from memenc_fast.tools.cli import main

    assert main(["bench", "--device", "cpu", "--preset", "small", "--cuda-graphs"]) == 2
    assert "--cuda-graphs times whole forwards on a CUDA device; got cpu" in capsys.readouterr().err


@requires_cuda
def test_bench_cuda_graphs_times_each_backend_replaying_graphs(tmp_path: Path) -> None:
    from memenc_fast.tools.cli import main

    result = tmp_path / "bench.json"
    assert main(["bench", "--preset", "small", "--batch", "1", "--dtypes", "bf16", "--no-compile", "--repeats", "3",
                 "--cuda-graphs", "--json", str(result)]) == 0
    rows = {row["impl"]: row for row in json.loads(result.read_text())["rows"]}
    fused = [name for name in rows if name not in ("reference",) and not name.endswith("+graphs")]
    assert fused and all(rows[f"{name}+graphs"]["ms"] > 0 for name in fused)


def test_the_cuda_library_can_be_loaded_from_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$MEMENC_FAST_CUDA_LIBRARY``, through which a run loads the prepared library as is."""
    from memenc_fast.backends.cuda import library

    monkeypatch.setenv(library.LIBRARY_ENV, str(tmp_path / "elsewhere.so"))
    assert library.library_path() == tmp_path / "elsewhere.so"
    with pytest.raises(library.CudaLibraryError, match=r"^\$MEMENC_FAST_CUDA_LIBRARY names .*elsewhere\.so, which is"):
        library.load(library.library_path())
    monkeypatch.delenv(library.LIBRARY_ENV)
    assert library.library_path() == REPO / "memenc_fast" / "_lib" / library.LIBRARY_NAME
