#!/usr/bin/env bash
# The GPU campaign: what a short GPU loan can tell about memenc-fast, prepared on a machine with nvcc
# and network, run on the GPU machine in one command.
#
#   bash benchmarks/gpu_campaign.sh prepare [TARGETS] [--no-wheels] [--library FILE]
#   bash benchmarks/gpu_campaign.sh run OUTDIR [--budget SECONDS]
#
# prepare builds the CUDA library for TARGETS (default sm_90a: H100/H200; a comma list such as
# sm_90a,sm_100a) with nvcc, and gathers the wheels the steps need where a machine has only torch
# (sam2 and its hydra/omegaconf/antlr4/iopath, pytest and its plugins; sdists are built into pure
# wheels here), into one folder ignored by git: .campaign/ (MEMENC_FAST_CAMPAIGN_DIR names another).
# A library already there, or the one --library names (memenc_fast/_lib's, say), is taken instead of
# a build where it was built from csrc/ as it is and holds every target. It prints the folder's size
# (at most 40 MiB) and the command to run on the GPU machine.
#
# run installs nothing whose failure stops the rest: the wheels of distributions the machine lacks
# go into a scratch folder on PYTHONPATH, the package itself is installed editable without
# building CUDA code, and the prepared library is loaded as is ($MEMENC_FAST_CUDA_LIBRARY); only where
# it is missing, stale or has no code for the GPU does nvcc build one. Then the steps, in the order
# of what is most needed: check (every backend and dtype against the float64 reference), the
# gpu-marked tests, speed, per-op times against their floors, the SAM 2 video predictor, and
# compute-sanitizer memcheck and racecheck over benchmarks/sanitize_kernels.py. Each step runs under
# its own time limit inside the budget (default 360 s of wall time); time a step leaves unused raises
# the next one's limit (MEMENC_FAST_CAMPAIGN_T_<STEP>=SECONDS sets a step's limit as is), and a step
# that can no longer get its least useful time is dropped, the lowest first. A step at its limit
# gets SIGINT (a Python traceback, pytest's junit) and, 10 s later at most, SIGKILL; a failing step
# never stops the next one. Never prompts, never reaches the network.
#
# OUTDIR receives three files, each rewritten the moment a step finishes, so that a run killed
# midway keeps what finished: SUMMARY.md (the machine, the plan, then each step's tables; ready to
# paste into benchmarks/RESULTS.md), results.json (every step's numbers) and campaign.tar.gz (logs,
# junit, plots, Triton's cubins; under 16 MiB). MEMENC_FAST_CAMPAIGN_DRY_RUN=1 plans every step
# against the budget and writes OUTDIR as a real run would, running no step. On a machine where
# torch sees no GPU, the GPU steps are skipped with that reason. Exit status: 0 when no step failed
# or timed out.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="benchmarks/gpu_campaign.sh"
CAMPAIGN="${MEMENC_FAST_CAMPAIGN_DIR:-$REPO/.campaign}"
LIB_NAME="libmemenc_fast_cuda.so"
MAX_PREPARED_MIB=40
MAX_ARCHIVE_BYTES=$((15 * 1024 * 1024)) # what comes back: 16 MiB a file at most
cd "$REPO" || exit 2

# What a machine with only torch (and torchvision, which sam2 needs: it brings numpy and pillow)
# lacks for the video benchmark and the tests, as wheels for CPython 3.12 on x86-64 Linux; run
# installs only those of them the machine does not have, so that none shadows its own packages.
PURE_PACKAGES=(sam2==1.1.0 hydra-core==1.3.2 "omegaconf>=2.2,<2.4" "antlr4-python3-runtime==4.9.*" iopath
    tqdm portalocker packaging pytest pluggy iniconfig pygments hypothesis attrs sortedcontainers
    pytest-xdist execnet)
BINARY_PACKAGES=(PyYAML)
GPU_PYTHON_VERSION=3.12

usage() {
    sed -n '2,7p' "$REPO/$SELF" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "$SELF: $*" >&2
    exit 2
}

find_python() { # $PYTHON, the project's .venv, else the first of python3/python that imports torch
    local candidate
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
        return
    fi
    for candidate in "$REPO/.venv/bin/python" python3 python; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if timeout 60 "$candidate" -c 'import torch' >/dev/null 2>&1 </dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo python3
}

# Whether the library at $1 loads, was built from csrc/ as it is now, and holds the code wanted:
# every target of $2 when given, else code for the GPU torch sees (when it sees one). Prints its
# architectures or what is wrong; exit status 0 when usable. Run from the repository root.
LIBRARY_STATUS_PY='
import sys
from pathlib import Path

path = Path(sys.argv[1])
if not path.is_file():
    sys.exit(f"no library at {path}")

import torch

from build_tools.cuda_build import embedded_code, parse_archs, sources_digest
from memenc_fast.backends.cuda import library

try:
    lib = library.CudaLibrary(path)
except library.CudaLibraryError as err:
    sys.exit(f"does not load: {err}")
built = ", ".join(lib.archs)
if lib.sources_digest != sources_digest(Path("csrc")):
    sys.exit(f"stale: built ({built}) from other sources than csrc/ holds now")
if len(sys.argv) > 2:
    missing = [code for _, code in embedded_code(parse_archs(sys.argv[2])) if code not in lib.archs]
    if missing:
        sys.exit(f"built for {built}, without " + ", ".join(missing))
elif torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    if lib.code_for((major, minor)) is None:
        sys.exit(f"built for {built}: no code for this sm_{major}{minor} GPU")
print(f"current: {built}")
'

# Builds the library into the folder $1 for $MEMENC_FAST_CUDA_ARCHS (build_tools/cuda_build.py).
BUILD_PY='
import sys
from pathlib import Path

from build_tools.cuda_build import build_cuda_library

sys.exit(0 if build_cuda_library(Path("csrc"), Path(sys.argv[1])) else 1)
'

# ==================================================================================== prepare

prepare() {
    local targets="sm_90a" wheels=1 built="" lib status size extra
    while (($#)); do
        case "$1" in
            --no-wheels) wheels=0 ;;
            --library)
                [[ -n "${2:-}" ]] || die "prepare: --library needs a file"
                built="$2"
                shift
                ;;
            -h | --help) usage ;;
            -*) die "prepare: unknown option '$1'" ;;
            *) targets="$1" ;;
        esac
        shift
    done
    PY="$(find_python)"
    mkdir -p "$CAMPAIGN" || exit 2
    lib="$CAMPAIGN/lib/$LIB_NAME"

    if [[ -n "$built" ]] && status="$("$PY" -c "$LIBRARY_STATUS_PY" "$built" "$targets" 2>&1 </dev/null)"; then
        rm -rf "$CAMPAIGN/lib" && mkdir -p "$CAMPAIGN/lib" && cp "$built" "$lib" || die "prepare: cannot copy $built"
        for extra in launch_args.h ptxas_report.txt; do # what the build puts beside it
            [[ ! -f "$(dirname "$built")/$extra" ]] || cp "$(dirname "$built")/$extra" "$CAMPAIGN/lib/"
        done
        echo "library: took $built ($status)"
    elif status="$("$PY" -c "$LIBRARY_STATUS_PY" "$lib" "$targets" 2>&1 </dev/null)"; then
        echo "library: $lib is up to date ($status)"
    else
        echo "library: building $LIB_NAME for $targets with nvcc (${status##*$'\n'})"
        rm -rf "$CAMPAIGN/lib.new"
        if ! MEMENC_FAST_CUDA_ARCHS="$targets" "$PY" -c "$BUILD_PY" "$CAMPAIGN/lib.new" \
            >"$CAMPAIGN/build.log" 2>&1 </dev/null; then
            tail -n 30 "$CAMPAIGN/build.log" >&2
            die "prepare: the CUDA build failed (log: $CAMPAIGN/build.log)"
        fi
        rm -rf "$CAMPAIGN/lib" && mv "$CAMPAIGN/lib.new" "$CAMPAIGN/lib" && rm -f "$CAMPAIGN/build.log"
        status="$("$PY" -c "$LIBRARY_STATUS_PY" "$lib" "$targets" 2>&1 </dev/null)" ||
            die "prepare: the library just built is not usable: $status"
        echo "library: built $lib ($status)"
    fi

    if ((wheels)); then
        prepare_wheels || die "prepare: gathering the wheels failed"
    fi

    size="$(du -sb "$CAMPAIGN" | cut -f1)"
    printf 'prepared: %s holds %.1f MiB (at most %d)\n' "$CAMPAIGN" \
        "$(awk -v b="$size" 'BEGIN { print b / 1048576 }')" "$MAX_PREPARED_MIB"
    ((size <= MAX_PREPARED_MIB * 1024 * 1024)) || die "prepare: $CAMPAIGN is over $MAX_PREPARED_MIB MiB"
    echo
    if [[ "$CAMPAIGN" == "$REPO"/* ]]; then
        echo "Take ${CAMPAIGN#"$REPO"/}/ (ignored by git) along with the repository's tracked files; on the GPU"
    else
        echo "Take $CAMPAIGN along with the repository's tracked files (and name it there in"
        echo "MEMENC_FAST_CAMPAIGN_DIR); on the GPU"
    fi
    echo "machine, from the repository root, with a time limit of the budget plus a minute:"
    echo
    echo "    bash $SELF run OUTDIR --budget 360"
}

prepare_wheels() { # pip download (no deps) into $CAMPAIGN/wheels, sdists built into pure wheels here
    local fresh="$CAMPAIGN/wheels.new" file name
    rm -rf "$fresh" && mkdir -p "$fresh/sdist" || return 1
    echo "wheels: downloading ${PURE_PACKAGES[*]} ${BINARY_PACKAGES[*]} for Python $GPU_PYTHON_VERSION"
    "$PY" -m pip download -q --no-deps --disable-pip-version-check --no-input --python-version "$GPU_PYTHON_VERSION" \
        -d "$fresh/sdist" "${PURE_PACKAGES[@]}" </dev/null || return 1
    "$PY" -m pip download -q --no-deps --disable-pip-version-check --no-input --only-binary=:all: \
        --python-version "$GPU_PYTHON_VERSION" --implementation cp --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$fresh" "${BINARY_PACKAGES[@]}" </dev/null || return 1
    mv "$fresh"/sdist/*.whl "$fresh"/ 2>/dev/null
    shopt -s nullglob
    for file in "$fresh"/sdist/*; do
        # sam2's sdist builds its CUDA extension unless told not to; the video benchmark needs none.
        SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index --disable-pip-version-check \
            -w "$fresh" "$file" </dev/null || return 1
    done
    rm -rf "$fresh/sdist"
    for file in "$fresh"/*.whl; do
        name="$(basename "$file")"
        [[ "$name" == *-none-any.whl || "$name" == *-cp312-*manylinux*x86_64.whl ]] ||
            { echo "wheels: $name does not install on CPython 3.12 x86_64" >&2; return 1; }
    done
    shopt -u nullglob
    rm -rf "$CAMPAIGN/wheels" && mv "$fresh" "$CAMPAIGN/wheels" || return 1
    echo "wheels: $(find "$CAMPAIGN/wheels" -name '*.whl' | wc -l) in $CAMPAIGN/wheels"
}

# ==================================================================================== run: helpers

now() { date +%s.%N; }

elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

tidy() { # text as the summary shows it: $WORK for this run's scratch folder, paths in the repository relative
    local text="${1//"$WORK"/\$WORK}"
    [[ "$CAMPAIGN" == "$REPO"/* ]] || text="${text//"$CAMPAIGN"/\$MEMENC_FAST_CAMPAIGN_DIR}"
    printf '%s' "${text//"$REPO"\//}"
}

shown() { # a command as the summary shows it (tidy), "python" for the interpreter
    local word text="" plain='^[A-Za-z0-9_./=:,+@%$-]+$'
    for word in "$@"; do
        [[ "$word" == "$PY" ]] || word="$(tidy "$word")"
        [[ "$word" != "$PY" ]] || word=python
        [[ -z "$SANITIZER" || "$word" != "$SANITIZER" ]] || word=compute-sanitizer
        [[ "$word" =~ $plain ]] || word="'${word//\'/\'\\\'\'}'"
        text+="${text:+ }$word"
    done
    printf '%s' "$text"
}

add() { # add NAME WORD...: a command of the step being planned
    CMD_NAMES+=("$1")
    shift
    CMD_LINES+=("$(printf '%q ' "$@")")
    CMD_SHOWN+=("$(shown "$@")")
}

importable() { timeout 60 "$PY" -c "import $1" >/dev/null 2>&1 </dev/null; }

find_sanitizer() { # PATH, then the CUDA toolkit that holds nvcc, then the usual roots
    local roots=() root candidate
    command -v compute-sanitizer 2>/dev/null && return 0
    if command -v nvcc >/dev/null 2>&1; then
        roots+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
    fi
    roots+=("${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda)
    for root in "${roots[@]}"; do
        [[ -n "$root" ]] || continue
        for candidate in "$root/bin/compute-sanitizer" "$root/compute-sanitizer/compute-sanitizer"; do
            [[ -x "$candidate" ]] && { echo "$candidate"; return 0; }
        done
    done
    return 1
}

# ==================================================================================== run: facts

FACTS_PY='
import platform
print(f"python: {platform.python_version()}")
try:
    import torch
except ImportError as exc:
    print(f"torch: not importable ({exc})")
else:
    print(f"torch: {torch.__version__}")
    print(f"torch CUDA: {torch.version.cuda}")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        props = torch.cuda.get_device_properties(0)
        print(f"device: {torch.cuda.get_device_name()} (sm_{major}{minor})")
        print(f"sm: sm_{major}{minor}")
        print(f"device memory: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("device: no CUDA device visible to torch")
try:
    import triton
    print(f"triton: {triton.__version__}")
except ImportError:
    print("triton: not installed")
'

facts() { # the machine, one "key: value" a line
    local sanitizer
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -srm), $(nproc) cores"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
            head -n 1 | awk -F', ' '{ print "gpu: " $1 " (" $3 ")"; print "driver: " $2 }'
    else
        echo "driver: nvidia-smi not found"
    fi
    "$PY" -c "$FACTS_PY" </dev/null
    if command -v nvcc >/dev/null 2>&1; then
        echo "nvcc: $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
    else
        echo "nvcc: not found"
    fi
    if sanitizer="$(find_sanitizer)"; then
        echo "compute-sanitizer: $("$sanitizer" --version 2>/dev/null |
            sed -n 's/.*Version \([^ ]*\).*/\1/p' | head -n 1)"
    else
        echo "compute-sanitizer: not found"
    fi
    if git rev-parse --git-dir >/dev/null 2>&1; then
        local changes=""
        [[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] || changes=" (with local changes)"
        echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$changes"
    fi
}

fact() { # fact KEY: its value in the env step's facts, or "unknown"
    local value
    value="$(sed -n "s/^$1: //p" "$RUN/env/facts.out" 2>/dev/null | head -n 1)"
    echo "${value:-unknown}"
}

# ==================================================================================== run: the steps

STEPS=(env install library check tests speed ops video memcheck racecheck)
# Planned limits in seconds (they add up to the default budget, less RESERVE) and the least time worth
# starting each step with.
declare -A LIMIT=([env]=10 [install]=15 [library]=10 [check]=45 [tests]=85 [speed]=65 [ops]=20 [video]=45
    [memcheck]=30 [racecheck]=30)
declare -A LEAST=([env]=5 [install]=5 [library]=5 [check]=20 [tests]=30 [speed]=25 [ops]=10 [video]=25
    [memcheck]=15 [racecheck]=15)
declare -A ABOUT=(
    [env]="device, driver, versions (nvidia-smi, torch, triton, nvcc)"
    [install]="prepared wheels the machine lacks (into \$WORK/site), memenc_fast editable without CUDA code"
    [library]="the prepared CUDA library checked (a fresh nvcc build only where it is unusable), then info"
    [check]="every backend and dtype vs the float64 reference: sam2 and sam3 presets, B=1 and B=8"
    [tests]="the gpu-marked tests"
    [speed]="sam2 preset, B=1,8,32, fp32 and bf16: eager, torch.compile, every backend with and without CUDA graphs"
    [ops]="per-op times of each backend against their floors, B=1 and 32, bf16 and fp32"
    [video]="SAM 2.1 video predictor with 1 and 8 objects, with and without memenc-fast and CUDA graphs"
    [memcheck]="compute-sanitizer memcheck over benchmarks/sanitize_kernels.py"
    [racecheck]="compute-sanitizer racecheck over benchmarks/sanitize_kernels.py"
)
RESERVE=5 # the last archive and summary
BUILD_EXTRA=60 # what a fresh nvcc build of the library may take from the later steps
GPU_STEPS=" check tests speed ops video memcheck racecheck "

limit_of() { # the planned limit of step $1: MEMENC_FAST_CAMPAIGN_T_<STEP>, else the default
    local var="MEMENC_FAST_CAMPAIGN_T_${1^^}"
    echo "${!var:-${LIMIT[$1]}}"
}

plan_env() {
    add facts bash "$SELF" facts
    command -v nvidia-smi >/dev/null 2>&1 && add nvidia-smi nvidia-smi
    add pip-list "$PY" -m pip list --disable-pip-version-check
}

MISSING_PY='
import importlib.metadata, re, sys
for wheel in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", wheel.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
'

SOURCE_TREE_PY='
import sys
from pathlib import Path
import memenc_fast.kernels
sys.exit(Path(memenc_fast.kernels.__file__).resolve().parent != Path("kernels").resolve())
'

plan_install() {
    local wheels=() missing=()
    shopt -s nullglob
    wheels=("$CAMPAIGN"/wheels/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        mapfile -t missing < <(timeout 60 "$PY" -c "$MISSING_PY" "${wheels[@]}" </dev/null)
        NOTE="${#missing[@]} of the ${#wheels[@]} prepared wheels are for distributions this python lacks"
        ((${#missing[@]} == 0)) || add wheels "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --disable-pip-version-check --target "$SITE" "${missing[@]}"
    else
        NOTE="no prepared wheels (${CAMPAIGN#"$REPO"/}/wheels)"
    fi
    if timeout 60 "$PY" -c "$SOURCE_TREE_PY" >/dev/null 2>&1 </dev/null; then
        NOTE+="; memenc_fast is already installed from this tree"
    else
        add memenc_fast env MEMENC_FAST_SKIP_CUDA=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
            --disable-pip-version-check -e .
    fi
}

plan_library() {
    local status
    if status="$(timeout 60 "$PY" -c "$LIBRARY_STATUS_PY" "$CAMPAIGN/lib/$LIB_NAME" 2>&1 </dev/null)"; then
        NOTE="prepared library ${status}"
    else
        NOTE="prepared library unusable (${status##*$'\n'}): nvcc builds one for this GPU"
        EXTRA=$BUILD_EXTRA
    fi
    add library bash "$SELF" library "$WORK/lib"
    add info "$PY" -m memenc_fast info --json "$RUN/library/info.json"
}

plan_check() {
    local preset batch
    PARALLEL=1 # four processes: Triton compiles on the CPU, and the GPU has room for all
    for preset in sam2 sam3; do
        for batch in 1 8; do
            add "$preset-B$batch" "$PY" -m memenc_fast check --preset "$preset" --batch "$batch" \
                --json "$RUN/check/$preset-B$batch.json"
        done
    done
}

plan_tests() {
    local workers=()
    if importable xdist; then
        workers=(-n 8)
        NOTE="8 pytest-xdist workers"
    fi
    add pytest "$PY" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider -o faulthandler_timeout=60 \
        "${workers[@]}" --junit-xml "$RUN/tests/junit.xml"
}

plan_speed() {
    local dtype plot=() plots=0
    importable matplotlib && plots=1
    for dtype in fp32 bf16; do
        ((plots)) && plot=(--plot "$RUN/speed/$dtype.png")
        # torch.compile in its default mode: max-autotune tunes for minutes per shape.
        add "$dtype" "$PY" -m memenc_fast bench --preset sam2 --batch 1,8,32 --dtypes "$dtype" --compile \
            --compile-mode default --cuda-graphs --json "$RUN/speed/$dtype.json" "${plot[@]}"
    done
}

plan_ops() {
    add ops "$PY" -m memenc_fast bench --ops --preset sam2 --batch 1,32 --dtypes bf16,fp32 --json "$RUN/ops/ops.json"
}

plan_video() {
    add video "$PY" benchmarks/bench_video.py --objects 1,8 --frames 8 --cuda-graphs --json "$RUN/video/video.json"
}

plan_sanitizer() { # plan_sanitizer TOOL
    local memory=() sanitizer="$SANITIZER"
    if [[ -z "$sanitizer" ]]; then
        NOTE="compute-sanitizer not found (PATH, nvcc's CUDA root, CUDA_HOME, /usr/local/cuda)"
        [[ "$DRY_RUN" == 1 ]] || { SKIP="$NOTE"; return; }
        sanitizer=compute-sanitizer
    fi
    # Without torch's caching allocator every tensor is an allocation of its own, so memcheck sees an
    # access past a tensor that would otherwise land inside a pooled block.
    [[ "$1" != memcheck ]] || memory=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    add "$1" "${memory[@]}" "$sanitizer" --tool "$1" --error-exitcode 1 --print-limit 50 \
        "$PY" benchmarks/sanitize_kernels.py --json "$RUN/$1/cases.json"
}

plan_memcheck() { plan_sanitizer memcheck; }
plan_racecheck() { plan_sanitizer racecheck; }

ARCH_PY='
import torch
major, minor = torch.cuda.get_device_capability()
print(f"{major}{minor}" + ("a" if major in (9, 10) and minor == 0 else ""))
'

library_cmd() { # library DIR: the prepared library, or a fresh build for this GPU, in DIR
    local dir="$1" status arch
    PY="$(find_python)"
    mkdir -p "$dir" || return 1
    if status="$("$PY" -c "$LIBRARY_STATUS_PY" "$CAMPAIGN/lib/$LIB_NAME" 2>&1 </dev/null)"; then
        cp "$CAMPAIGN"/lib/* "$dir"/ || return 1
        echo "the prepared library, $status"
        return 0
    fi
    echo "the prepared library is unusable: ${status##*$'\n'}"
    # Hopper and Blackwell datacenter GPUs get their arch-specific code (sm_90a, sm_100a), as by default.
    arch="$("$PY" -c "$ARCH_PY" 2>/dev/null </dev/null)" || { echo "no GPU to build for"; return 1; }
    echo "building it for sm_$arch with nvcc"
    MEMENC_FAST_CUDA_ARCHS="$arch" "$PY" -c "$BUILD_PY" "$dir" </dev/null || return 1
    status="$("$PY" -c "$LIBRARY_STATUS_PY" "$dir/$LIB_NAME" 2>&1 </dev/null)"
    echo "$status"
    [[ "$status" == current:* ]]
}

# ==================================================================================== run: records

RESULTS_PY='
import json, os, re, sys
from pathlib import Path
from xml.etree import ElementTree

out, work, budget, dry_run = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
run = work / "campaign"
facts = {}
facts_file = run / "env" / "facts.out"
for line in facts_file.read_text(errors="replace").splitlines() if facts_file.is_file() else []:
    key, _, value = line.partition(": ")
    facts.setdefault(key, value)

def numbers(folder):
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except ValueError as err:
            found[path.stem] = f"unreadable: {err}"
    junit = folder / "junit.xml"
    if junit.is_file():
        try:
            suites = ElementTree.parse(junit).getroot()
            suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
            found["junit"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            found["junit"]["failed"] = ["::".join((case.get("classname", ""), case.get("name", "")))
                                        for case in suite.iter("testcase")
                                        if case.find("failure") is not None or case.find("error") is not None]
        except (ElementTree.ParseError, AttributeError) as err:
            found["junit"] = f"unreadable: {err}"
    for path in sorted(folder.glob("*.out")):
        match = re.search(r"ERROR SUMMARY: (\d+) error", path.read_text(errors="replace"))
        if match:
            found.setdefault("sanitizer_errors", {})[path.stem] = int(match.group(1))
    return found

steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, seconds, limit, note = line.split("\t")
    folder = run / name
    commands = []
    if (folder / "commands.tsv").is_file():
        for row in (folder / "commands.tsv").read_text().splitlines():
            label, exit_code, command = row.split("\t")
            commands.append({"name": label, "exit": None if exit_code == "-" else int(exit_code), "command": command})
    steps.append({"step": name, "status": status, "seconds": float(seconds), "limit": float(limit), "note": note,
                  "commands": commands, "results": numbers(folder) if folder.is_dir() else {}})
payload = {"campaign": {"budget_s": budget, "dry_run": dry_run}, "machine": facts, "steps": steps}
tmp = out / ".results.json.tmp"
tmp.write_text(json.dumps(payload, indent=1) + "\n")
os.replace(tmp, out / "results.json")
'

record() { # record STEP STATUS SECONDS LIMIT NOTE: steps.tsv, results.json, SUMMARY.md, the archive
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$(tidy "$2")" "$3" "$4" "$(tidy "$5")" >>"$WORK/steps.tsv"
    [[ -s "$OUT/SUMMARY.md" ]] || header >"$OUT/SUMMARY.md" # after the env step, whose facts head it
    summarize "$1" "$(tidy "$2")" "$3" "$4" "$(tidy "$5")" >>"$OUT/SUMMARY.md"
    timeout 60 "$PY" - "$OUT" "$WORK" "$BUDGET" "$DRY_RUN" <<<"$RESULTS_PY" ||
        echo "$SELF: results.json not updated" >&2
    archive
    printf '==> %-10s %-30s %7ss of %ss  %s\n' "$1" "$2" "$3" "$4" "$5"
}

archive() { # OUTDIR/campaign.tar.gz: the run's folder and Triton's cubins, under MAX_ARCHIVE_BYTES
    local tmp="$OUT/.campaign.tar.gz.tmp" list="$WORK/triton-files.txt"
    (cd "$WORK" && find triton -type f \( -name '*.cubin' -o -name '*.json' \) 2>/dev/null | sort) >"$list"
    tar -czf "$tmp" -C "$WORK" campaign -T "$list" 2>/dev/null
    if (($(stat -c %s "$tmp" 2>/dev/null || echo 0) > MAX_ARCHIVE_BYTES)); then
        echo "Triton's cubins left out: with them the archive passes $((MAX_ARCHIVE_BYTES >> 20)) MiB" \
            >"$RUN/archive-note.txt"
        tar -czf "$tmp" -C "$WORK" campaign 2>/dev/null
    fi
    mv -f "$tmp" "$OUT/campaign.tar.gz"
}

junit_counts() { # "N tests, N failures, N errors, N skipped" from a junit XML file
    local suite attr counts=""
    suite="$(grep -o '<testsuite [^>]*>' "$1" | head -n 1)"
    for attr in tests failures errors skipped; do
        counts+="${counts:+, }$(sed -n "s/.* $attr=\"\([0-9]*\)\".*/\1/p" <<<"$suite") $attr"
    done
    echo "$counts"
}

fenced() { # fenced FILE LINES: the file's last LINES lines (tidy) as a fenced block, said when cut
    local total
    total="$(wc -l <"$1")"
    ((total <= $2)) || printf '(last %d of %d lines of `%s`)\n\n' "$2" "$total" "${1#"$WORK"/}"
    echo '```text'
    tidy "$(tail -n "$2" "$1")"
    printf '\n```\n'
}

summarize() { # summarize STEP STATUS SECONDS LIMIT NOTE: the step's section of SUMMARY.md
    local step="$1" status="$2" folder="$RUN/$1" name code shown
    printf '\n### %s: %s (%ss of %ss)\n\n' "$step" "$status" "$3" "$4"
    [[ -z "$5" ]] || printf '%s\n\n' "$5"
    [[ -f "$folder/commands.tsv" ]] || return 0
    while IFS=$'\t' read -r name code shown; do
        printf -- '- `%s` (exit %s)\n' "${shown//|/\\|}" "$code"
    done <"$folder/commands.tsv"
    [[ "$status" != dry-run ]] || return 0
    [[ ! -f "$folder/junit.xml" ]] || printf '\njunit.xml: %s\n' "$(junit_counts "$folder/junit.xml")"
    while IFS=$'\t' read -r name code _; do
        [[ "$code" != - ]] || continue # not run
        if [[ "$code" == 0 ]]; then
            # What the commands print (their tables); the setup steps' output stays in the archive.
            [[ " env install " != *" $step "* && -s "$folder/$name.out" ]] || continue
            echo
            fenced "$folder/$name.out" 120
            continue
        fi
        printf '\n`%s` (exit %s):\n' "$name" "$code"
        [[ ! -s "$folder/$name.out" ]] || { echo; fenced "$folder/$name.out" 40; }
        [[ ! -s "$folder/$name.err" ]] || { echo; fenced "$folder/$name.err" 30; }
        [[ -s "$folder/$name.out" || -s "$folder/$name.err" ]] || printf '\n(no output)\n'
    done <"$folder/commands.tsv"
}

run_commands() { # run_commands STEP SECONDS: the planned commands, in parallel with PARALLEL=1
    local step="$1" deadline i left grace pids=() name
    deadline="$(awk -v a="$(now)" -v s="$2" 'BEGIN { printf "%d", a + s }')"
    for i in "${!CMD_LINES[@]}"; do
        name="${CMD_NAMES[$i]}"
        left=$((deadline - $(date +%s)))
        if ((left < 2)); then
            echo 124 >"$RUN/$step/$name.rc"
            echo "not started: the step's time was up" >"$RUN/$step/$name.err"
            : >"$RUN/$step/$name.out"
            continue
        fi
        # SIGINT first (Python's traceback, pytest's junit), SIGKILL after the grace.
        grace=$((left / 6 > 10 ? 10 : left / 6 < 1 ? 1 : left / 6))
        (
            eval "timeout -s INT -k $grace $((left - grace)) ${CMD_LINES[$i]}" \
                >"$RUN/$step/$name.out" 2>"$RUN/$step/$name.err" </dev/null
            echo $? >"$RUN/$step/$name.rc"
        ) &
        pids+=($!)
        ((PARALLEL)) || wait "$!"
    done
    ((${#pids[@]} == 0)) || wait "${pids[@]}"
}

run_step() { # run_step STEP: plan it, fit it into what is left of the budget, run it, record it
    local step="$1" start left later=0 spare var limit planned status code i j
    CMD_NAMES=() CMD_LINES=() CMD_SHOWN=() PARALLEL=0 NOTE="" SKIP="" EXTRA=0
    mkdir -p "$RUN/$step"
    if [[ -n "$NO_GPU" && "$GPU_STEPS" == *" $step "* ]]; then
        SKIP="$NO_GPU"
    else
        "plan_$step"
    fi
    planned="$(limit_of "$step")"
    for ((j = STEP_INDEX + 1; j < ${#STEPS[@]}; j++)); do
        later=$((later + $(limit_of "${STEPS[$j]}")))
    done
    # What is left, less what the later steps are planned to take: time saved so far goes to this
    # step's limit, unless its limit was set from the environment; a build borrows from later steps.
    left="$(awk -v b="$BUDGET" -v r="$RESERVE" -v e="$CLOCK" 'BEGIN { printf "%d", b - r - e }')"
    spare=$((left - later - planned))
    var="MEMENC_FAST_CAMPAIGN_T_${step^^}"
    [[ -z "${!var:-}" ]] || spare=0
    limit=$((planned + EXTRA + (spare > 0 ? spare : 0)))
    ((limit <= left)) || limit=$left
    for i in "${!CMD_NAMES[@]}"; do
        printf '%s\t-\t%s\n' "${CMD_NAMES[$i]}" "${CMD_SHOWN[$i]}"
    done >"$RUN/$step/commands.tsv"
    if [[ -n "$SKIP" ]]; then
        record "$step" "skipped: $SKIP" 0 0 "$NOTE"
        return
    fi
    if ((limit < LEAST[$step] && limit < planned)); then
        record "$step" "dropped: ${left}s left, ${LEAST[$step]}s needed" 0 "$planned" "$NOTE"
        DROPPED+=("$step")
        return
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        CLOCK=$((CLOCK + limit)) # planned as if it took all of its limit
        # The machine's facts are read even so: they head the summary.
        [[ "$step" != env ]] || run_commands "$step" "$limit"
        record "$step" dry-run 0 "$limit" "$NOTE"
        return
    fi
    echo "--> $step (limit ${limit}s)"
    start="$(now)"
    run_commands "$step" "$limit"
    status=ok
    for i in "${!CMD_NAMES[@]}"; do
        code="$(cat "$RUN/$step/${CMD_NAMES[$i]}.rc" 2>/dev/null || echo 1)"
        case "$code" in
            0) ;;
            124 | 137) [[ "$status" == failed ]] || status="timeout" ;;
            *) status=failed ;;
        esac
        printf '%s\t%s\t%s\n' "${CMD_NAMES[$i]}" "$code" "${CMD_SHOWN[$i]}"
    done >"$RUN/$step/commands.tsv"
    [[ "$status" == ok ]] || FAILED+=("$step")
    record "$step" "$status" "$(elapsed "$start")" "$limit" "$NOTE"
}

header() { # the top of SUMMARY.md: the machine, then the plan
    local step total=0
    echo "## GPU campaign: $(fact device)$([[ "$DRY_RUN" != 1 ]] || echo ' (dry run)')"
    echo
    echo "- Date: $(fact date)"
    echo "- Device: $(fact device), $(fact 'device memory'); nvidia-smi: $(fact gpu), driver $(fact driver)"
    echo "- Versions: python $(fact python), torch $(fact torch) (CUDA $(fact 'torch CUDA')), triton $(fact triton)," \
        "nvcc $(fact nvcc), compute-sanitizer $(fact compute-sanitizer)"
    echo "- Commit: $(fact commit); host: $(fact host)"
    echo "- Command: \`bash $SELF run OUTDIR --budget $BUDGET\`; \$WORK is the run's scratch folder," \
        "\$WORK/campaign is campaign.tar.gz"
    echo
    echo "Plan: $BUDGET s of wall time; each step's limit, raised by what earlier steps leave unused:"
    echo
    echo "| step | planned s | least s | what |"
    echo "| --- | ---: | ---: | --- |"
    for step in "${STEPS[@]}"; do
        total=$((total + $(limit_of "$step")))
        echo "| $step | $(limit_of "$step") | ${LEAST[$step]} | ${ABOUT[$step]} |"
    done
    echo "| (archive, summary) | $RESERVE | | |"
    echo "| total | $((total + RESERVE)) | | |"
}

footer() {
    local line
    printf '\n### Steps\n\n| step | status | seconds | limit |\n| --- | --- | ---: | ---: |\n'
    while IFS=$'\t' read -r -a line; do
        echo "| ${line[0]} | ${line[1]} | ${line[2]} | ${line[3]} |"
    done <"$WORK/steps.tsv"
    echo
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "Dry run: the steps planned to take $CLOCK s of the $BUDGET s budget, $RESERVE s kept for the archive."
    else
        echo "Done in $(elapsed "$T0") s of the $BUDGET s budget."
    fi
    ((${#DROPPED[@]} == 0)) || echo "Dropped for want of time: ${DROPPED[*]}."
    ((${#FAILED[@]} == 0)) || echo "Failed or timed out: ${FAILED[*]}."
    [[ ! -f "$RUN/archive-note.txt" ]] || cat "$RUN/archive-note.txt"
}

run() {
    local arg
    BUDGET=360
    OUT=""
    while (($#)); do
        case "$1" in
            --budget)
                [[ "${2:-}" =~ ^[0-9]+$ ]] || die "run: --budget needs whole seconds"
                BUDGET="$2"
                shift
                ;;
            -h | --help) usage ;;
            -*) die "run: unknown option '$1'" ;;
            *)
                [[ -z "$OUT" ]] || die "run: one OUTDIR only"
                OUT="$1"
                ;;
        esac
        shift
    done
    [[ -n "$OUT" ]] || usage
    mkdir -p "$OUT" || exit 2
    OUT="$(cd "$OUT" && pwd)"
    DRY_RUN="${MEMENC_FAST_CAMPAIGN_DRY_RUN:-0}"
    T0="$(now)"
    CLOCK=0
    DROPPED=() FAILED=()
    PY="$(find_python)"
    SANITIZER="$(find_sanitizer || true)"
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/memenc_fast_campaign.XXXXXX")" || exit 2
    # shellcheck disable=SC2064 # the folder is known now
    trap "rm -rf '$WORK'" EXIT
    RUN="$WORK/campaign"
    SITE="$WORK/site"
    mkdir -p "$RUN" "$SITE" "$WORK/triton"
    : >"$WORK/steps.tsv"
    rm -f "$OUT"/{SUMMARY.md,results.json,campaign.tar.gz,.results.json.tmp,.campaign.tar.gz.tmp}
    for arg in "$OUT"/* "$OUT"/.[!.]*; do
        [[ -e "$arg" ]] && echo "$SELF: note: $OUT already holds $(basename "$arg")" >&2
    done

    # No network, no questions; what the steps need on the path; one Triton cache, archived.
    export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$WORK/triton"
    export MEMENC_FAST_CUDA_LIBRARY="$WORK/lib/$LIB_NAME" PYTHON="$PY"

    NO_GPU="no CUDA GPU (torch.cuda.is_available() is false or torch is missing)"
    if [[ "$DRY_RUN" == 1 ]] ||
        timeout 60 "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1 </dev/null
    then
        NO_GPU=""
    fi

    for STEP_INDEX in "${!STEPS[@]}"; do
        [[ "$DRY_RUN" == 1 ]] || CLOCK="$(elapsed "$T0")"
        run_step "${STEPS[$STEP_INDEX]}"
    done
    footer >>"$OUT/SUMMARY.md"
    archive
    echo "wrote $OUT/SUMMARY.md, results.json, campaign.tar.gz"
    ((${#FAILED[@]} == 0))
}

case "${1:-}" in
    prepare) shift && prepare "$@" ;;
    run) shift && run "$@" ;;
    facts) PY="$(find_python)" && facts ;;
    library) shift && library_cmd "$@" ;;
    *) usage ;;
esac
