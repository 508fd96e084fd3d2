#!/usr/bin/env bash
# The GPU device check: everything in the project that needs a GPU, in one call, in priority
# order (build the CUDA extension, the Triton and native-op tests, the other GPU tests, the
# CE and ranking at 12k to 1M items and a 1M-item training run, the kernel benchmarks, the
# training-step harness, a bf16 DeepSpeed run, bf16 under ZeRO-1 and ZeRO-2, the peers' reverse
# processes in bf16, a short convergence run).
# It replaces profiling/gpu_suite.sh.
#
#   bash profiling/gpu_check.sh OUT [--dry-run]          (or ADAREC_CHECK_DRY_RUN=1)
#
# It is made for a fresh, bare GPU machine without network, run from a copy of the working tree
# without .git, whose results come back only as a few files, and which may be killed at its time
# limit. Hence:
# - OUT receives exactly three files (at most 8 come back, no folders): summary.txt (header and
#   one line per step with its exit status, seconds and key numbers, from check_summary.py),
#   log.txt (every step's command and output) and results.tgz (everything the steps wrote,
#   one folder per step, files over 4 MiB left out and listed in summary.txt, under 16 MiB).
#   The steps write into a work folder outside OUT; all three files are rewritten after every
#   step (results.tgz and summary.txt through a temporary name and a rename), so a kill at any
#   moment leaves complete files describing every finished step and the one that was running.
# - The whole check, install included, must fit in 8 minutes: every step has its own timeout
#   (a timed-out step exits 124, or 137 when it had to be killed; the check goes on), and a
#   budget (ADAREC_CHECK_BUDGET, 450 s) caps each timeout to what is left and skips the steps
#   that would start with less than 10 s, so the worst case ends near budget + 10 s.
# - The commit comes from ADAREC_COMMIT (default "unknown"); .git is never read.
# - Only python3 is assumed on PATH: PYTHON overrides it, pip and pytest run as `$PY -m`.
#
# --dry-run runs nothing of the plan: each step prints the command it would run and exits 0, in
# a 2 s timeout, so the whole check takes seconds on any machine (no GPU, no nvidia-smi needed).
# For the tests, ADAREC_CHECK_FAKE="kernels=fail,bench_fusion=timeout" makes a dry-run step exit 3
# (fail) or sleep past its timeout (timeout). ADAREC_CHECK_ONLY="kernels bench_adarec" runs only
# the named steps (the others are listed as not selected), e.g. to repeat failed steps; the
# install step is needed by every other one on a fresh machine.
set -u

# -- the steps, in priority order ---------------------------------------------------------------
# name               timeout(s)  command (run with bash -c; $PY is the python, $STEP_DIR the
#                                step's own folder in the work folder, the repository is the cwd)
# Order: within the first four minutes the versions, the native build, one correctness pass per
# kernel (kernels_fast) and the whole-step benchmark of adarec and adarec-dual at README settings;
# everything else after. Each timeout is a cold start (python, torch, DeepSpeed: about 8 s) plus
# the Triton compiles the step is the first to need, measured ahead of time for sm_90 by
# profiling/aot_compile.py (results/bench/aot_sm90/steps.md), plus its run time, with a margin;
# docs/gpu_check.md has the arithmetic. They add up to at most 450 s (the budget): a check where
# every step runs into its timeout still ends within the 8 minutes.
# The pytest steps run verbosely, with a per-test timeout (ADAREC_TEST_TIMEOUT) and each failure's
# short traceback printed as it happens (ADAREC_TB_AS_YOU_GO, tests/conftest.py), the most
# valuable tests first; every benchmark writes each row as soon as it is measured
# (profiling/timing.py RowWriter), so a step cut off at its timeout keeps what it finished.
STEPS='
environment           10  env_report
install               85  install_project
kernels_fast          45  ADAREC_TEST_TIMEOUT=30 ADAREC_TB_AS_YOU_GO=1 $PY -m pytest -v --tb=short -p no:cacheprovider tests/test_trajectory_kernel.py::test_bf16_matches_fp32_reference_within_twice_eager_bf16_error[256] tests/test_trajectory_kernel.py::test_fp32_rng_path_runs_compiled_and_is_reproducible tests/test_linear_ce.py::test_triton_kernels_bf16_on_gpu[shape0] tests/test_gated_fusion_op.py::test_cuda_bf16_within_twice_the_eager_bf16_error
bench_adarec          70  $PY -m adarec.profiling.bench --config configs/adarec_beauty.yaml --backends eager fused autocast graphs --steps 10 --repeats 3 --eval-repeats 1 --trace-summary --out "$STEP_DIR" --set model.kmeans_init=false
bench_adarec_dual     30  $PY -m adarec.profiling.bench --config configs/adarec-dual_beauty.yaml --backends eager fused autocast graphs --steps 10 --repeats 3 --eval-repeats 1 --trace-summary --out "$STEP_DIR" --set model.kmeans_init=false
gpu_tests             70  ADAREC_TEST_TIMEOUT=60 ADAREC_TB_AS_YOU_GO=1 $PY -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/test_graphed_step.py tests/test_linear_ce.py tests/test_trajectory_kernel.py tests/test_custom_ops.py tests/test_draw_extremes.py tests/test_gated_fusion_op.py tests/test_engine_gpu.py --deselect tests/test_trajectory_kernel.py::test_bf16_matches_fp32_reference_within_twice_eager_bf16_error[256] --deselect tests/test_trajectory_kernel.py::test_fp32_rng_path_runs_compiled_and_is_reproducible --deselect tests/test_linear_ce.py::test_triton_kernels_bf16_on_gpu[shape0] --deselect tests/test_gated_fusion_op.py::test_cuda_bf16_within_twice_the_eager_bf16_error
bench_trajectory      25  $PY -m adarec.profiling.bench_trajectory --tilings default 16,32,4 16,16,16 --out "$STEP_DIR"
bench_fusion          10  $PY -m adarec.profiling.bench_fusion --out "$STEP_DIR"
bench_catalog         20  $PY -m adarec.profiling.bench_catalog --device cuda --dtype bf16 --rows 12800 --users 1024 --items 12101 100000 1000000 --repeats 5 --out "$STEP_DIR"
catalog_1m            20  $PY -m adarec.data.synthetic --items 1000000 --users 20000 --mean-length 40 --output "$STEP_DIR/synthetic_1m.txt" && $PY -m adarec train --config configs/sasrec_synthetic1m.yaml --output-dir "$STEP_DIR/run" --set data.path="$STEP_DIR/synthetic_1m.txt" train.epochs=1 train.precision=bf16 kernels.backend=fused
deepspeed_bf16        20  $PY -m adarec train --config configs/adarec_beauty.yaml --output-dir "$STEP_DIR/run" --set train.epochs=1 train.precision=bf16 train.bf16_mode=deepspeed kernels.backend=fused
zero_bf16             15  for stage in 1 2; do $PY -m adarec train --config configs/adarec_beauty.yaml --output-dir "$STEP_DIR/zero$stage" --set train.epochs=1 data.max_users=3000 train.precision=bf16 train.zero_stage=$stage kernels.backend=fused || exit; done
bench_peers           15  $PY -m adarec.profiling.bench_reverse --batch 1024 --dtype bf16 --repeats 3 --out "$STEP_DIR"
convergence           15  $PY -m adarec train --config configs/adarec_beauty_sparse5.yaml --output-dir "$STEP_DIR/run" --set train.epochs=2 kernels.backend=fused
'

usage() {
    echo "usage: bash profiling/gpu_check.sh OUT [--dry-run]" >&2
    exit 2
}

OUT=""
case ${ADAREC_CHECK_DRY_RUN:-0} in "" | 0) DRY=0 ;; *) DRY=1 ;; esac
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$arg ;;
    esac
done
[ -n "$OUT" ] || usage

# OUT is relative to the caller's folder, so it is made absolute before moving to the repository.
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2

export PY=${PYTHON:-python3}
export ADAREC_COMMIT=${ADAREC_COMMIT:-unknown}
# The harness refuses to run with it set (it would override the backend under test), and the
# training steps name their backend explicitly.
unset ADAREC_KERNELS
# No network: pip must not try an index or its own version check (which can hang until a timeout).
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
BUDGET=${ADAREC_CHECK_BUDGET:-450}
ONLY=${ADAREC_CHECK_ONLY:-}
FAKE=${ADAREC_CHECK_FAKE:-}
ARCHIVE_MAX=$((16 * 1024 * 1024))
if [ "$DRY" = 1 ]; then
    DRY_TIMEOUT=2 KILL_AFTER=1 MIN_LEFT=1
else
    KILL_AFTER=10 MIN_LEFT=10
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/adarec-gpu-check.XXXX") || exit 2
: > "$WORK/steps.txt"      # the summary's step lines, finished steps only
: > "$WORK/left_out.txt"   # files too big for results.tgz
# What a step learns for the later ones (the install's JIT fallback): sourced before each command.
export CHECK_ENV=$WORK/check_env.sh
: > "$CHECK_ENV"
: > "$OUT/log.txt"
SECONDS=0
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
if command -v nvidia-smi > /dev/null 2>&1; then
    GPU=$(timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4 | paste -sd ';')
else
    GPU="none (no nvidia-smi)"
fi
PY_VERSION=$("$PY" --version 2>&1)

env_report() {  # the environment step: what the machine brings, before anything is built
    date -u
    if command -v nvidia-smi > /dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    echo "ADAREC_COMMIT=$ADAREC_COMMIT"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    echo "CUDA_HOME=${CUDA_HOME:-unset} nvcc=$(command -v nvcc || echo missing) g++=$(command -v g++ || echo missing)"
    # Each import on its own, so that one missing wheel does not hide the state of the others;
    # the exit status says whether the required ones import (matplotlib and TensorBoard are
    # optional: without them a run skips its plots and event files).
    "$PY" -c "
import importlib, sys
bad = 0
for name, required in (('deepspeed', 1), ('faiss', 1), ('nvtx', 1), ('pytest', 1), ('yaml', 1), ('numpy', 1),
                       ('tqdm', 1), ('setuptools', 1), ('matplotlib', 0), ('tensorboard', 0)):
    try:
        print(name, getattr(importlib.import_module(name), '__version__', 'imported'))
    except Exception as err:
        bad += required
        print(name, 'IMPORT ERROR' if required else 'missing (optional)', type(err).__name__, err)
sys.exit(1 if bad else 0)
"
}
export -f env_report

install_missing() {  # fallback wheels (.whl/fallback, profiling/device_wheels.sh) for what the machine lacks
    # Only what does not import already: a carried wheel never shadows the machine's own pytest
    # or setuptools. DeepSpeed's own imports (py-cpuinfo, msgpack, einops, pynvml) are among them.
    local dir=.whl/fallback pair missing=()
    [ -d "$dir" ] || { echo "no .whl/fallback: nothing to add"; return 0; }
    for pair in pytest:pytest yaml:pyyaml setuptools:setuptools wheel:wheel cpuinfo:py-cpuinfo msgpack:msgpack \
                einops:einops pynvml:nvidia-ml-py; do
        "$PY" -c "import ${pair%%:*}" 2> /dev/null || missing+=("${pair#*:}")
    done
    if [ ${#missing[@]} -eq 0 ]; then echo "fallback wheels: none needed"; return 0; fi
    echo "fallback wheels for: ${missing[*]}"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --find-links "$dir" "${missing[@]}"
}
export -f install_missing

install_project() {  # the native build for the visible GPU; else the JIT build; else Python only
    local cap
    # One architecture, the GPU's own: a build for torch's whole list takes minutes.
    cap=$(timeout 15 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ')
    [ -n "$cap" ] && export TORCH_CUDA_ARCH_LIST=$cap
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
    install_missing || echo "some fallback wheels did not install; going on"
    if PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
        "$PY" -c "import torch; from adarec import ops; ops.load_native(); \
print('native ops loaded; CUDA kernel:', ops.native_supports(torch.device('cuda')))" 2>&1 | tail -n 1
        return 0
    fi
    echo "the native build failed: installing without it, then trying torch's JIT build of the native ops"
    ADAREC_NO_EXT=1 PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        || { echo "the Python-only install failed too"; return 2; }
    # Either way the step exits 1, so the summary shows that the native build failed.
    if "$PY" -c "from adarec import ops; ops.load_native(jit=True)"; then
        echo "export ADAREC_JIT=1" >> "$CHECK_ENV"
        echo "the JIT build works: later steps load it (ADAREC_JIT=1)"
    else
        echo "no native ops: the Triton steps still run, the native fusion tests fail"
    fi
    return 1
}
export -f install_project

# What a dry-run step runs instead of its command: the plan, then the fake outcome if one is asked.
# shellcheck disable=SC2016  # expanded by the step's own shell
STANDIN='echo "dry run, would run: $STEP_PLAN"
case $STEP_FAKE in
    fail) echo "fake failure"; exit 3 ;;
    timeout) echo "fake hang"; sleep 60 ;;
esac'

fake_for() {  # fake_for NAME: the outcome ADAREC_CHECK_FAKE asks of step NAME (fail, timeout or empty)
    local item
    for item in ${FAKE//,/ }; do
        [ "${item%%=*}" = "$1" ] && { echo "${item#*=}"; return; }
    done
}

selected() {  # selected NAME: whether ADAREC_CHECK_ONLY (empty: every step) names the step
    [ -z "$ONLY" ] && return 0
    case " ${ONLY//,/ } " in *" $1 "*) return 0 ;; esac
    return 1
}

write_summary() {  # write_summary [LINE]: header, finished steps, LINE (the running step), left-out files
    {
        echo "adarec GPU check"
        echo "started: $STARTED"
        echo "updated: $(date -u '+%Y-%m-%d %H:%M:%S UTC') (elapsed $SECONDS s, budget $BUDGET s)"
        echo "commit: $ADAREC_COMMIT"
        echo "gpu: $GPU"
        echo "python: $PY_VERSION ($PY)"
        echo "dry_run: $DRY"
        [ -n "$ONLY" ] && echo "only: $ONLY"
        echo
        cat "$WORK/steps.txt"
        [ -n "${1-}" ] && echo "$1"
        if [ -s "$WORK/left_out.txt" ]; then
            echo
            echo "left out of results.tgz (too big):"
            cat "$WORK/left_out.txt"
        fi
    } > "$OUT/summary.txt.part" 2>&1
    mv -f "$OUT/summary.txt.part" "$OUT/summary.txt"
}

write_archive() {  # results.tgz from the work folder: files over a size limit left out, under 16 MiB
    local limit size
    # Lower the per-file limit until the archive fits (traces and logs compress well, so the
    # first one nearly always does).
    for limit in 4194304 1048576 262144 65536; do
        (cd "$WORK" && find . -mindepth 1 \( -type d -o \( -type f -size -$((limit + 1))c \) \) -printf '%P\0' \
            | tar --null --no-recursion -T - -czf "$OUT/results.tgz.part") > /dev/null 2>&1
        size=$(stat -c %s "$OUT/results.tgz.part" 2> /dev/null || echo 0)
        [ "$size" -le "$ARCHIVE_MAX" ] && break
    done
    mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
    (cd "$WORK" && find . -type f -size +"${limit}"c -printf '%P (%s bytes)\n' | sort) > "$WORK/left_out.all"
    head -n 20 "$WORK/left_out.all" > "$WORK/left_out.txt"
    local more=$(($(wc -l < "$WORK/left_out.all") - 20))
    [ "$more" -gt 0 ] && echo "... and $more more" >> "$WORK/left_out.txt"
    rm -f "$WORK/left_out.all"
}

append_log() {  # append_log FILE: a step's output into log.txt, its middle cut when it is huge
    local file=$1 size
    size=$(wc -c < "$file")
    if [ "$size" -le 262144 ]; then
        cat "$file"
    else
        head -c 65536 "$file"
        printf '\n[... %s bytes left out here; the whole output is in results.tgz ...]\n' "$((size - 262144))"
        tail -c 196608 "$file"
    fi >> "$OUT/log.txt"
    echo >> "$OUT/log.txt"
}

refresh() {  # refresh: rewrite summary.txt and results.tgz after a step (summary first: it is cheaper)
    write_summary
    write_archive
    write_summary
}

record() {  # record LINE: one line of the summary's step list
    echo "$1" >> "$WORK/steps.txt"
}

STEP_PID=""
RUNNING=""
RUNNING_DIR=""
on_signal() {  # killed from outside (e.g. a time limit): stop the step, keep what it wrote so far
    trap - TERM INT HUP
    [ -n "$STEP_PID" ] && kill -TERM "$STEP_PID" 2> /dev/null
    [ -n "$RUNNING_DIR" ] && [ -f "$RUNNING_DIR/output.txt" ] && append_log "$RUNNING_DIR/output.txt"
    echo "===== check interrupted by a signal at $SECONDS s while running: ${RUNNING:-nothing}" >> "$OUT/log.txt"
    record "interrupted at $SECONDS s while running: ${RUNNING:-nothing}"
    refresh
    [ "${ADAREC_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
    exit 143
}
trap on_signal TERM INT HUP

run_step() {  # run_step NAME TIMEOUT COMMAND: run one step in its folder, then refresh OUT
    local name=$1 limit=$2 cmd=$3
    local dir="$WORK/$name"
    mkdir -p "$dir"
    if ! selected "$name"; then
        record "step $name skipped (not selected)"
        return
    fi
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$MIN_LEFT" ]; then
        record "step $name skipped (budget)"
        echo "===== step $name skipped (budget): $SECONDS s elapsed of $BUDGET s" >> "$OUT/log.txt"
        refresh
        return
    fi
    [ "$DRY" = 1 ] && limit=$DRY_TIMEOUT
    [ "$limit" -gt "$left" ] && limit=$left
    local shown=${cmd//'$PY'/$PY}
    shown=${shown//'$STEP_DIR'/$dir}
    echo "===== step $name (timeout $limit s, at $SECONDS s): $shown" >> "$OUT/log.txt"
    RUNNING="$name (since $SECONDS s, timeout $limit s)" RUNNING_DIR=$dir
    write_summary "running: $RUNNING"
    local start=$SECONDS rc
    # In the background and waited for, so that a signal to the check is handled at once.
    if [ "$DRY" = 1 ]; then
        STEP_PLAN=$shown STEP_FAKE=$(fake_for "$name") \
            timeout --kill-after="$KILL_AFTER" "$limit" bash -c "$STANDIN" > "$dir/output.txt" 2>&1 < /dev/null &
    else
        STEP_DIR=$dir timeout --kill-after="$KILL_AFTER" "$limit" bash -c ". \"\$CHECK_ENV\"; $cmd" \
            > "$dir/output.txt" 2>&1 < /dev/null &
    fi
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID="" RUNNING="" RUNNING_DIR=""
    local took=$((SECONDS - start)) note=""
    case $rc in
        124) note=" (timed out)" ;;
        137) note=" (killed after its timeout)" ;;
    esac
    append_log "$dir/output.txt"
    echo "===== step $name: exit $rc after $took s$note" >> "$OUT/log.txt"
    record "step $name exit $rc seconds $took$note"
    timeout 30 "$PY" profiling/check_summary.py "$dir" "$name" "$rc" 2>&1 | head -n 12 | sed 's/^/    /' >> "$WORK/steps.txt"
    refresh
}

for item in ${FAKE//,/ }; do  # a typo in the fakes would silently test nothing
    case ${item#*=} in fail | timeout) ;; *) echo "ADAREC_CHECK_FAKE: $item: use NAME=fail or NAME=timeout" >&2; exit 2 ;; esac
done

echo "===== adarec GPU check, commit $ADAREC_COMMIT, dry run $DRY, work folder $WORK" >> "$OUT/log.txt"
refresh
# The table is read on fd 3 so that nothing a step runs can read the rest of it from stdin.
while read -r -u 3 name limit cmd; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    run_step "$name" "$limit" "$cmd"
done 3<<< "$STEPS"

echo "finished after $SECONDS s" >> "$WORK/steps.txt"
echo "===== check finished after $SECONDS s" >> "$OUT/log.txt"
refresh
# The archive holds everything; ADAREC_CHECK_KEEP_WORK=1 keeps the folder for a look on the machine.
[ "${ADAREC_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
