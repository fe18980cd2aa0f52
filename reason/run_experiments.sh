#!/usr/bin/env bash
# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
#
# The paper's sweep ("Hold Onto That Thought"): cache budgets x presses x datasets, 2048 new tokens, then the plot.
#
#   bash reason/run_experiments.sh              # the sweep, data parallel over every visible GPU
#   bash reason/run_experiments.sh --tiny       # a tiny offline run on CPU: reference model, local data, 8 tokens
#   bash reason/run_experiments.sh --dry-run    # print the commands only
#
# Settings (environment variables): MODEL, NUM_GPUS (processes of `accelerate launch`; 0 or 1 runs plain python),
# DATASETS, PRESSES, BUDGETS, MAX_NEW_TOKENS, NUM_SAMPLES, OUTPUT_DIR, EXTRA_ARGS (passed to evaluate.py), PYTHON.
# Finished runs are skipped and interrupted ones resume, so the script can simply be started again.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TINY="${TINY:-0}"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '4,13p' "$0"; exit 0 ;;
    *) echo "run_experiments.sh: unknown argument '$arg' (allowed: --tiny, --dry-run, --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python}"
if [ "$TINY" = 1 ]; then
  MODEL="${MODEL:-$HERE/../reference/model}"
  DATASETS="${DATASETS:-synthetic}"
  PRESSES="${PRESSES:-knorm h2o}"
  BUDGETS="${BUDGETS:-64 96}"
  MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-8}"
  NUM_SAMPLES="${NUM_SAMPLES:-2}"
  NUM_GPUS="${NUM_GPUS:-0}"
  OUTPUT_DIR="${OUTPUT_DIR:-$HERE/results/tiny}"
  EXTRA_ARGS="${EXTRA_ARGS:---data_path $HERE/fixtures/synthetic_tiny.jsonl --device cpu --progress False}"
else
  MODEL="${MODEL:-meta-llama/Llama-3.1-8B-Instruct}"
  DATASETS="${DATASETS:-gsm8k math500 aime24 aime25 folio strategyqa logiqa reclor openbookqa commonsenseqa drop}"
  PRESSES="${PRESSES:-knorm h2o streaming_llm rkv snapkv_d}"
  BUDGETS="${BUDGETS:-128 256 384 512}"
  MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-2048}"
  NUM_SAMPLES="${NUM_SAMPLES:-100}"
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  fi
  OUTPUT_DIR="${OUTPUT_DIR:-$HERE/results}"
  EXTRA_ARGS="${EXTRA_ARGS:-}"
fi

if [ "${NUM_GPUS:-0}" -gt 1 ]; then
  LAUNCH=(accelerate launch --num_processes "$NUM_GPUS" "$HERE/evaluate.py")
else
  LAUNCH=("$PYTHON" "$HERE/evaluate.py")
fi

run() {
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

for dataset in $DATASETS; do
  # the uncompressed baseline once per dataset (its budget only names the run)
  # shellcheck disable=SC2086
  run "${LAUNCH[@]}" --dataset "$dataset" --model "$MODEL" --press_name full --cache_budget 0 \
    --max_new_tokens "$MAX_NEW_TOKENS" --num_samples "$NUM_SAMPLES" --output_dir "$OUTPUT_DIR" $EXTRA_ARGS
  for press in $PRESSES; do
    for budget in $BUDGETS; do
      # shellcheck disable=SC2086
      run "${LAUNCH[@]}" --dataset "$dataset" --model "$MODEL" --press_name "$press" --cache_budget "$budget" \
        --max_new_tokens "$MAX_NEW_TOKENS" --num_samples "$NUM_SAMPLES" --output_dir "$OUTPUT_DIR" $EXTRA_ARGS
    done
  done
done

run "$PYTHON" "$HERE/plot.py" --results_dir "$OUTPUT_DIR" --output "$OUTPUT_DIR/sweep.png"
