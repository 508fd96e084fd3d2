#!/usr/bin/env bash
# Trimmed, length-grouped batches against full-width ones, fp32 and bf16, every model's Beauty
# config, on this machine (README settings; the CPU when no GPU): one bench.py table per
# (model, precision, layout) under OUT/<model>_<precision>_<layout>/.
#
#   bash profiling/bench_trimming.sh results/bench/trimming_cpu [model ...]
#   LAYOUTS=after EVAL_REPEATS=0 bash profiling/bench_trimming.sh ...   # one layout, no validation pass
#
# "before" is data.width_buckets=null data.group_by_length=false (every batch at max_len, as
# before trimming existed), timed on blocks of steps (random batches are all about max_len wide);
# "after" is the default (grouped and trimmed), timed on one whole epoch (--full-epoch), since
# its step time depends on the batch's width. Run nothing else on the machine meanwhile.
set -euo pipefail
OUT=${1:?usage: bench_trimming.sh OUT [model ...]}
shift
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(sasrec elcrec adarec adarec-dual diffuasr diffurec adrec)
mkdir -p "$OUT"

# Steps per timed block for the "before" layout, by model (about a minute of steps each).
declare -A STEPS=([sasrec]=20 [elcrec]=10 [adarec]=2 [adarec-dual]=3 [diffuasr]=10 [diffurec]=10 [adrec]=5)
# ADRec pre-trains its embeddings in prepare (50 epochs by default): not part of a training step.
declare -A EXTRA=([adrec]="model.pretrain_epochs=0")

for model in "${MODELS[@]}"; do
  for precision in fp32 bf16; do
    read -r -a layouts <<< "${LAYOUTS:-before after}"
    # DiffuRec and ADRec read padding (their public code) and are never trimmed: one layout.
    case $model in diffurec|adrec) layouts=(after) ;; esac
    evals=${EVAL_REPEATS:-1}
    for layout in "${layouts[@]}"; do
      sets=("train.precision=$precision" ${EXTRA[$model]:-})
      timing=(--steps "${STEPS[$model]}" --repeats 3 --warmup 1)
      if [ "$layout" = before ]; then
        sets+=(data.width_buckets=null data.group_by_length=false)
      else
        timing+=(--full-epoch)
      fi
      dir="$OUT/${model}_${precision}_${layout}"
      echo "== $model $precision $layout $(date -u +%FT%TZ)"
      python -m adarec.profiling.bench --config "configs/${model}_beauty.yaml" --backends auto \
          --eval-repeats "$evals" "${timing[@]}" --set "${sets[@]}" --out "$dir" > "$dir.log" 2>&1 \
        || echo "   failed, see $dir.log"
      tail -n 4 "$dir.log"
    done
  done
done
