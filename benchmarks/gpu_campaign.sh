#!/usr/bin/env bash
# One command on a GPU machine: build, test, check, benchmark, inspect and sanitize memenc-fast,
# and write everything into OUTDIR with a SUMMARY.md ready to paste into benchmarks/RESULTS.md.
#
#   benchmarks/gpu_campaign.sh OUTDIR [STEP ...]
#
# STEPs (default: all, in this order): build deps tests check bench ops kernels video memcheck
# racecheck initcheck. env (the machine's facts) and worktree (no untracked build products) always
# run. Uses the machine's own python and torch (PYTHON picks another interpreter) and no network.
# Never prompts. Every step runs under a time limit, its output goes to OUTDIR/<step>.log, and its
# status, exit code and duration go to OUTDIR/steps.tsv; a failing step never stops the next one.
# MEMENC_FAST_CAMPAIGN_T_<STEP>=SECONDS changes a limit (e.g. MEMENC_FAST_CAMPAIGN_T_TESTS=300).
# The limits add up to about 19 minutes; where one command may run 10 at most, split the steps
# over two runs (README, "GPU campaign"). Exit status: 0 when no step failed or timed out.
#
# deps installs what the video benchmark and the sam2 tests import (sam2, hydra-core, omegaconf,
# antlr4-python3-runtime, iopath), with no network, from the wheels and source archives in
# MEMENC_FAST_CAMPAIGN_WHEELS (default: the repository's .whl/), when there are any.
#
# Without a CUDA GPU (torch.cuda.is_available() false) the GPU steps are skipped with that reason
# and the rest still runs. MEMENC_FAST_CAMPAIGN_DRY_RUN=1 records every step's command without
# running it (the environment facts, the GPU probe and the git check still run).
set -uo pipefail

ALL_STEPS=(build deps tests check bench ops kernels video memcheck racecheck initcheck)
if (($# < 1)); then
    echo "usage: $0 OUTDIR [STEP ...] (STEPs: ${ALL_STEPS[*]}; default all)" >&2
    exit 2
fi
for step in "${@:2}"; do
    if [[ " ${ALL_STEPS[*]} " != *" $step "* ]]; then
        echo "$0: unknown step '$step'; expected some of: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
done
SELECTED=" ${*:2} "
[[ -n "${SELECTED// /}" ]] || SELECTED=" ${ALL_STEPS[*]} "

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}"
DRY_RUN="${MEMENC_FAST_CAMPAIGN_DRY_RUN:-0}"
STEPS="$OUT/steps.tsv"
SANITIZER=""
cd "$REPO" || exit 2

# A reused OUTDIR must not show an earlier run's results as this one's.
rm -rf "$OUT/cubins" "$OUT"/{SUMMARY.md,steps.tsv,facts.txt,junit.xml,bench.png} \
    "$OUT"/{env,build,deps,tests,check,bench,ops,kernels,video,memcheck,racecheck,initcheck,worktree}.log \
    "$OUT"/{check,bench,ops,kernels,video}.json
: >"$STEPS"

# No network and no questions: pip never reaches an index, no step reads a terminal.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

limit() { # limit STEP DEFAULT_SECONDS: the step's time limit, overridable from the environment
    local var="MEMENC_FAST_CAMPAIGN_T_${1^^}"
    echo "${!var:-$2}"
}

now() { date +%s.%N; }

since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

shown() { # a command as SUMMARY.md shows it: $OUTDIR for this run's folder, no machine paths
    local text="${SHOW:-}" arg
    if [[ -z "$text" ]]; then
        for arg in "$@"; do
            [[ "$arg" != *[[:space:]]* ]] || arg="'$arg'"
            text+="${text:+ }$arg"
        done
    fi
    # shellcheck disable=SC2016 # a literal $OUTDIR is the point
    text="${text//"$OUT"/'$OUTDIR'}"
    [[ -z "${PYTHON:-}" ]] || text="${text//"$PY"/python}"
    [[ -z "$SANITIZER" ]] || text="${text//"$SANITIZER"/compute-sanitizer}"
    printf '%s' "$text"
}

record() { # record STEP STATUS EXIT SECONDS COMMAND... (SHOW, if set, stands for the command)
    local step="$1" status="$2" code="$3" seconds="$4" command
    shift 4
    command="$(shown "$@")"
    printf '%s\t%s\t%s\t%s\t%s\n' "$step" "$status" "$code" "$seconds" "$command" >>"$STEPS"
    printf '==> %-10s %-8s exit=%-4s %6ss  %s\n' "$step" "$status" "$code" "$seconds" "$command"
}

skip() { # skip STEP REASON COMMAND...
    local step="$1" reason="$2"
    shift 2
    echo "skipped: $reason" >"$OUT/$step.log"
    record "$step" "skipped: $reason" "-" "0" "$@"
}

selected() { [[ "$SELECTED" == *" $1 "* ]]; }

run_step() { # run_step STEP SECONDS COMMAND...: run under a time limit, log, record
    local step="$1" seconds="$2" start code status
    selected "$step" || return 0
    shift 2
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "dry run: $(shown "$@")" >"$OUT/$step.log"
        record "$step" "dry-run" "-" "0" "$@"
        return 0
    fi
    start="$(now)"
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$step.log" 2>&1 </dev/null
    code=$?
    case "$code" in
        0) status="ok" ;;
        124 | 137) status="timeout (${seconds}s)" ;;
        *) status="failed" ;;
    esac
    record "$step" "$status" "$code" "$(since "$start")" "$@"
}

# ---------------------------------------------------------------------------- environment

# shellcheck disable=SC2317 # run through `bash -c facts`, under a time limit
facts() { # what the summary states about the machine; one "key: value" a line
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -srm)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
            head -n 1 | awk -F', ' '{ print "gpu: " $1 " (" $3 ")"; print "driver: " $2 }'
    else
        echo "driver: nvidia-smi not found"
    fi
    "$PY" - <<'EOF'
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
        print(f"device: {torch.cuda.get_device_name()} (sm_{major}{minor})")
    else:
        print("device: no CUDA device visible to torch")
try:
    import triton
    print(f"triton: {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
    if command -v nvcc >/dev/null 2>&1; then
        echo "nvcc: $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
    else
        echo "nvcc: not found"
    fi
    if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        local changes=""
        [[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]] ||
            changes=" (with local changes)"
        echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none)$changes"
    fi
}

# A hung driver must not hang the campaign: the facts and the GPU probe have time limits too.
export -f facts
export PY REPO
start="$(now)"
timeout --kill-after=5 "$(limit env 15)" bash -c facts >"$OUT/facts.txt" 2>&1 </dev/null
code=$?
{
    cat "$OUT/facts.txt"
    echo
    command -v nvidia-smi >/dev/null 2>&1 && timeout 10 nvidia-smi
} >"$OUT/env.log" 2>&1
status=ok
((code == 0)) || status=failed
SHOW="date, uname, nvidia-smi, python (platform, torch, triton), nvcc --version, git" \
    record env "$status" "$code" "$(since "$start")"

fact() { # fact KEY: its value from facts.txt, or "unknown"
    local value
    value="$(sed -n "s/^$1: //p" "$OUT/facts.txt" | head -n 1)"
    echo "${value:-unknown}"
}

NO_GPU="no CUDA GPU (torch.cuda.is_available() is false or torch is missing)"
if timeout 15 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1 </dev/null; then
    NO_GPU=""
fi

gpu_step() { # gpu_step STEP SECONDS COMMAND...: run_step, or skip where there is no GPU
    selected "$1" || return 0
    if [[ -n "$NO_GPU" ]]; then
        local step="$1"
        shift 2
        skip "$step" "$NO_GPU" "$@"
    else
        run_step "$@"
    fi
}

# Build products must all be ignored by git: compare git's view before and after.
IN_GIT=""
if git rev-parse --git-dir >/dev/null 2>&1; then
    IN_GIT=1
    worktree_before="$(git status --porcelain --untracked-files=all | sort)"
fi

# ---------------------------------------------------------------------------- build

# shellcheck disable=SC2317 # run through `bash -c build`, under a time limit
build() { # pip's editable install, or setup.py's in-place build where pip cannot do it
    MEMENC_FAST_CUDA_ARCHS=90a "$PY" -m pip install --no-build-isolation --no-deps -e . && return
    echo "pip install -e failed; falling back to setup.py build_ext --inplace"
    MEMENC_FAST_CUDA_ARCHS=90a "$PY" setup.py build_ext --inplace
}
export -f build
SHOW="MEMENC_FAST_CUDA_ARCHS=90a $PY -m pip install --no-build-isolation --no-deps -e . \
|| MEMENC_FAST_CUDA_ARCHS=90a $PY setup.py build_ext --inplace" \
    run_step build "$(limit build 95)" bash -c build

# ---------------------------------------------------------------------------- deps

WHEELS="${MEMENC_FAST_CAMPAIGN_WHEELS:-$REPO/.whl}"
if selected deps; then
    shopt -s nullglob
    archives=("$WHEELS"/*.whl "$WHEELS"/*.tar.gz "$WHEELS"/*.zip)
    shopt -u nullglob
    SHOW="SAM2_BUILD_CUDA=0 $PY -m pip install --no-deps --no-build-isolation \
${MEMENC_FAST_CAMPAIGN_WHEELS:-.whl}/*"
    if ((${#archives[@]} == 0)); then
        skip deps "no wheel or source archive in ${MEMENC_FAST_CAMPAIGN_WHEELS:-.whl/}" true
    else
        run_step deps "$(limit deps 60)" env SAM2_BUILD_CUDA=0 "$PY" -m pip install --no-deps \
            --no-build-isolation "${archives[@]}"
    fi
    unset SHOW
fi

# ---------------------------------------------------------------------------- tests, check, bench

# The GPU tests (marker gpu): the CPU tests are CI's, on every commit.
gpu_step tests "$(limit tests 240)" "$PY" -m pytest tests -q -rs -p no:cacheprovider -m gpu \
    --junitxml "$OUT/junit.xml"
gpu_step check "$(limit check 40)" "$PY" -m memenc_fast check --json "$OUT/check.json"
# torch.compile in its default mode: max-autotune tunes for minutes per shape, past the budget.
# bench refuses --plot up front without matplotlib: plot only where it is installed.
PLOT=()
if timeout 60 "$PY" -c 'import matplotlib' >/dev/null 2>&1 </dev/null; then
    PLOT=(--plot "$OUT/bench.png")
fi
gpu_step bench "$(limit bench 80)" "$PY" -m memenc_fast bench --batch 1,8,32,64 \
    --dtypes fp32,bf16 --compile-mode default --json "$OUT/bench.json" "${PLOT[@]}"
gpu_step ops "$(limit ops 40)" "$PY" -m memenc_fast bench --ops --batch 1,64 --dtypes bf16 \
    --json "$OUT/ops.json"
run_step kernels "$(limit kernels 75)" "$PY" -m memenc_fast kernels \
    --json "$OUT/kernels.json" --cubin-dir "$OUT/cubins"

# ---------------------------------------------------------------------------- video

VIDEO=("$PY" benchmarks/bench_video.py --objects "1,8,32" --frames 8 --cuda-graphs --json "$OUT/video.json")
if selected video && [[ -z "$NO_GPU" && "$DRY_RUN" != 1 ]] &&
    ! timeout 60 "$PY" -c 'import sam2' >/dev/null 2>&1 </dev/null; then
    skip video "sam2 is not importable (put its archives in .whl/ and run the deps step)" "${VIDEO[@]}"
else
    gpu_step video "$(limit video 150)" "${VIDEO[@]}"
fi

# ---------------------------------------------------------------------------- sanitizers

find_sanitizer() { # PATH, then the CUDA toolkit that holds nvcc, then the usual roots
    local roots=() root candidate
    command -v compute-sanitizer 2>/dev/null && return 0
    if command -v nvcc >/dev/null 2>&1; then
        roots+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
    fi
    roots+=("${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda)
    for root in "${roots[@]}"; do
        [[ -n "$root" ]] || continue
        for candidate in "$root/bin/compute-sanitizer" "$root/compute-sanitizer/compute-sanitizer"
        do
            [[ -x "$candidate" ]] && { echo "$candidate"; return 0; }
        done
    done
    return 1
}

SANITIZER="$(find_sanitizer)"
for tool in memcheck racecheck initcheck; do
    selected "$tool" || continue
    # The GPU test suite but its heavy tests (over 20 GiB, or a whole SAM 2 model). Without torch's
    # caching allocator every tensor is an allocation of its own, so memcheck sees an
    # out-of-bounds access that would otherwise land inside a pooled block.
    command=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZER:-compute-sanitizer}"
             --tool "$tool" --error-exitcode 1 "$PY" -m pytest tests -q -p no:cacheprovider
             -m "gpu and not heavy")
    if [[ -z "$SANITIZER" && -z "$NO_GPU" ]]; then
        skip "$tool" "compute-sanitizer not found (PATH, nvcc's CUDA root, CUDA_HOME, \
/usr/local/cuda)" "${command[@]}"
    else
        gpu_step "$tool" "$(limit "$tool" 150)" "${command[@]}"
    fi
done

# ---------------------------------------------------------------------------- worktree

if [[ -n "$IN_GIT" ]]; then
    start="$(now)"
    # New lines in git's view, leaving out OUTDIR itself when it lies inside the repository.
    new_files="$(comm -13 <(echo "$worktree_before") \
        <(git status --porcelain --untracked-files=all | sort) |
        grep -vF " ${OUT#"$REPO"/}/" || true)"
    if [[ -z "$new_files" ]]; then
        echo "no file that git would track appeared" >"$OUT/worktree.log"
        record worktree ok 0 "$(since "$start")" git status --porcelain --untracked-files=all
    else
        echo "$new_files" >"$OUT/worktree.log"
        record worktree "failed: files not ignored by git appeared" 1 "$(since "$start")" \
            git status --porcelain --untracked-files=all
    fi
else
    skip worktree "not a git work tree" git status --porcelain --untracked-files=all
fi

# ---------------------------------------------------------------------------- SUMMARY.md

junit_counts() { # "N tests, N failures, N errors, N skipped" from the junit XML
    local suite attr counts=""
    suite="$(grep -o '<testsuite [^>]*>' "$OUT/junit.xml" | head -n 1)"
    for attr in tests failures errors skipped; do
        counts+="${counts:+, }$(sed -n "s/.* $attr=\"\([0-9]*\)\".*/\1/p" <<<"$suite") $attr"
    done
    echo "$counts"
}

log_block() { # log_block STEP LINES: the step's log (its last LINES lines) as a fenced block
    local log="$OUT/$1.log" total
    total="$(wc -l <"$log")"
    if ((total > $2)); then
        echo "(last $2 of $total lines of \`$1.log\`)"
        echo
    fi
    echo '```text'
    if [[ -s "$log" ]]; then tail -n "$2" "$log"; else echo "(no output)"; fi
    echo '```'
}

TABLES=" check bench ops kernels video "
{
    echo "## GPU campaign: $(fact device)"
    echo
    echo "- Date: $(fact date)"
    echo "- Device: $(fact device); nvidia-smi: $(fact gpu)"
    echo "- Driver: $(fact driver)"
    echo "- Versions: python $(fact python), torch $(fact torch) (CUDA $(fact 'torch CUDA')),"\
         "triton $(fact triton), nvcc $(fact nvcc)"
    echo "- Commit: $(fact commit)"
    echo "- Host: $(fact host)"
    echo "- Command: \`benchmarks/gpu_campaign.sh \$OUTDIR\`$([[ "$DRY_RUN" != 1 ]] ||
        echo ' (dry run)')"
    echo
    echo "| step | status | exit | seconds | command |"
    echo "| --- | --- | --- | --- | --- |"
    while IFS=$'\t' read -r step status code seconds command; do
        echo "| $step | $status | $code | $seconds | \`${command//|/\\|}\` |"
    done <"$STEPS"
    if [[ -f "$OUT/junit.xml" ]]; then
        echo
        echo "Test suite (junit.xml): $(junit_counts)"
    fi
    # The tables the commands printed, then the end of every other failed step's log.
    for step in $TABLES; do
        status="$(awk -F'\t' -v s="$step" '$1 == s { print $2 }' "$STEPS")"
        [[ "$status" == ok || "$status" == failed || "$status" == timeout* ]] || continue
        printf '\n### %s (%s)\n\n' "$step" "$status"
        log_block "$step" 200
    done
    while IFS=$'\t' read -r step status _; do
        [[ "$status" == failed* || "$status" == timeout* ]] || continue
        [[ "$TABLES" != *" $step "* ]] || continue
        printf '\n### %s (%s)\n\n' "$step" "$status"
        log_block "$step" 30
    done <"$STEPS"
} >"$OUT/SUMMARY.md"

echo "wrote $OUT/SUMMARY.md"
failed="$(awk -F'\t' '$2 != "ok" && $2 != "dry-run" && $2 !~ /^skipped/' "$STEPS" | wc -l)"
echo "$failed step(s) failed or timed out"
exit $((failed > 0))
