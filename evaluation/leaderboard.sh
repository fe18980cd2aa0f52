#!/usr/bin/env bash
# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
#
# The leaderboard sweep (as upstream's leaderboard.sh): RULER 4k with Qwen3-8B on 4 GPUs, results in ./results_lb.
# Override MODEL, DATASET, DATA_DIR, OUTPUT_DIR or PYTHON from the environment. Finished runs are skipped, so the
# script can be rerun after an interruption.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
MODEL="${MODEL:-Qwen/Qwen3-8B}"
DATASET="${DATASET:-ruler}"
DATA_DIR="${DATA_DIR:-4096}"
OUTPUT_DIR="${OUTPUT_DIR:-./results_lb}"
RATIOS=(0.25 0.50 0.75 0.875)

NUM_GPUS=$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)
if [ "${NUM_GPUS}" -lt 4 ]; then
    echo "Error: the leaderboard sweep runs 4 ratios in parallel on cuda:0..3; found ${NUM_GPUS} GPU(s)." >&2
    exit 1
fi

evaluate() {  # evaluate <device> <press> [args]
    local device="$1" press="$2"
    shift 2
    "${PYTHON}" "${SCRIPT_DIR}/evaluate.py" --dataset "${DATASET}" --data_dir "${DATA_DIR}" --model "${MODEL}" \
        --press_name "${press}" --output_dir "${OUTPUT_DIR}" --device "${device}" "$@"
}

# 1. The uncompressed baseline.
evaluate cuda:0 no_press --compression_ratio 0.00

# 2. Question-agnostic presses, the four ratios in parallel.
for press in random knorm snapkv expected_attention streaming_llm tova observed_attention qfilter pyramidkv lagkv \
    keydiff adakv_compactor cur kvzip; do
    for i in "${!RATIOS[@]}"; do
        evaluate "cuda:${i}" "${press}" --compression_ratio "${RATIOS[$i]}" &
    done
    wait
done

# 3. Threshold presses (KVzap). For Llama-3.1-8B, thresholds -6 to -9 cover the same ratios.
THRESHOLDS=(-3 -4 -5 -6)
for press in kvzap_linear kvzap_mlp; do
    for i in "${!THRESHOLDS[@]}"; do
        evaluate "cuda:${i}" "${press}" --threshold "${THRESHOLDS[$i]}" &
    done
    wait
done

# 4. Head-wise DuoAttention (duo_attention needs published patterns for the model; Qwen3-8B has none, so only the
#    on-the-fly variant can run with it).
for press in duo_attention duo_attention_on_the_fly; do
    for i in "${!RATIOS[@]}"; do
        evaluate "cuda:${i}" "${press}" --head_compression_ratio "${RATIOS[$i]}" || true &
    done
    wait
done

# 5. Query-aware presses (the question is part of the compressed context).
for press in snapkv adakv_snapkv finch chunkkv; do
    for i in "${!RATIOS[@]}"; do
        evaluate "cuda:${i}" "${press}" --compression_ratio "${RATIOS[$i]}" --query_aware &
    done
    wait
done

echo "Leaderboard runs done; plot them with: ${PYTHON} ${SCRIPT_DIR}/plot.py --results_dir ${OUTPUT_DIR}"
