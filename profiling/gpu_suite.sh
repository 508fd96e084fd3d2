#!/usr/bin/env bash
# Everything that needs a GPU, in one call, raw output under OUT_DIR:
# build the CUDA extension, run the GPU tests and the kernel tests compiled, then every
# benchmark (fused trajectory, gated fusion, the training-step harness for adarec and
# adarec-dual with eager and fused backends).
#
#   bash profiling/gpu_suite.sh OUT_DIR
#
# Expects torch, triton, deepspeed, faiss, nvtx, numpy, tqdm, pyyaml, matplotlib installed
# (a machine without network needs these as local wheels first).
# Steps continue after a failure; each one's exit status is listed in OUT_DIR/status.txt.
set -u
OUT=${1:?usage: bash profiling/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
: > "$OUT/status.txt"

step() {  # step NAME COMMAND...: run, keep stdout+stderr in OUT/NAME.txt, record the status
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/status.txt"
    local start=$SECONDS
    "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/status.txt"
}

step environment bash -c 'date -u; nvidia-smi; git rev-parse HEAD; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
step build pip install --no-build-isolation --no-deps -e .
step gpu_tests python -m pytest -q -m gpu tests
step kernel_tests python -m pytest -q tests/test_trajectory_kernel.py tests/test_gated_fusion_op.py
step bench_trajectory python -m adarec.profiling.bench_trajectory --out "$OUT/trajectory"
step bench_trajectory_fp32 python -m adarec.profiling.bench_trajectory --dtype fp32 --out "$OUT/trajectory"
step bench_fusion python -m adarec.profiling.bench_fusion --out "$OUT/fusion"
step bench_adarec python -m adarec.profiling.bench --config configs/adarec_beauty.yaml --backends eager fused \
    --out "$OUT/adarec_beauty"
step bench_adarec_dual python -m adarec.profiling.bench --config configs/adarec-dual_beauty.yaml \
    --backends eager fused --out "$OUT/adarec-dual_beauty"
step trace_adarec python -m adarec.profiling.bench --config configs/adarec_beauty.yaml --backends fused \
    --repeats 1 --steps 5 --eval-repeats 0 --trace --out "$OUT/adarec_beauty_trace"
