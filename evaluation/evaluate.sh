#!/usr/bin/env bash
# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
#
# Sweep presses x compression ratios on one benchmark, one press per GPU (as upstream's evaluate.sh).
# Every setting can be overridden from the environment, e.g.
#   PRESSES="knorm snapkv" RATIOS="0.25 0.5" DATASET=loogle DATA_DIR=shortdep_qa ./evaluation/evaluate.sh
# With DATA_PARALLEL=1, runs are made one after the other, each spread over all GPUs with `accelerate launch`
# (every process answers a shard of the rows; the shards are merged into one result).
# Extra arguments are passed to every run (e.g. --query_aware, --fraction 0.1).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
DATASET="${DATASET:-ruler}"
DATA_DIR="${DATA_DIR:-4096}"
MODEL="${MODEL:-meta-llama/Meta-Llama-3.1-8B-Instruct}"
RATIOS=(${RATIOS:-0.1 0.25 0.5})
PRESSES=(${PRESSES:-expected_attention knorm streaming_llm snapkv})
OUTPUT_DIR="${OUTPUT_DIR:-./results}"

NUM_GPUS=$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)
if [ "${NUM_GPUS}" -eq 0 ]; then
    echo "Error: no GPU found (nvidia-smi --list-gpus). On a CPU, run evaluation/evaluate.py directly." >&2
    exit 1
fi

run() {  # run <device> <press> <ratio> [extra args]
    local device="$1" press="$2" ratio="$3"
    shift 3
    "${PYTHON}" "${SCRIPT_DIR}/evaluate.py" --dataset "${DATASET}" --data_dir "${DATA_DIR}" --model "${MODEL}" \
        --press_name "${press}" --compression_ratio "${ratio}" --output_dir "${OUTPUT_DIR}" --device "${device}" "$@"
}

if [ "${DATA_PARALLEL:-0}" = "1" ]; then
    for press in "${PRESSES[@]}"; do
        for ratio in "${RATIOS[@]}"; do
            echo "Running ${press} at ${ratio} on ${NUM_GPUS} GPUs (data parallel)"
            accelerate launch --num_processes "${NUM_GPUS}" "${SCRIPT_DIR}/evaluate.py" --dataset "${DATASET}" \
                --data_dir "${DATA_DIR}" --model "${MODEL}" --press_name "${press}" --compression_ratio "${ratio}" \
                --output_dir "${OUTPUT_DIR}" "$@"
        done
    done
    exit 0
fi

if [ "${#PRESSES[@]}" -gt "${NUM_GPUS}" ]; then
    echo "Error: ${#PRESSES[@]} presses but only ${NUM_GPUS} GPUs; one press runs per GPU." >&2
    echo "Use fewer presses, or DATA_PARALLEL=1 to run them one after the other on all GPUs." >&2
    exit 1
fi

for i in "${!PRESSES[@]}"; do
    (
        for ratio in "${RATIOS[@]}"; do
            echo "Running ${PRESSES[$i]} at ${ratio} on cuda:${i}"
            run "cuda:${i}" "${PRESSES[$i]}" "${ratio}" "$@"
        done
    ) &
done
wait
echo "All evaluations done; plot them with: ${PYTHON} ${SCRIPT_DIR}/plot.py --results_dir ${OUTPUT_DIR}"
