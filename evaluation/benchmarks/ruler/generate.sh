#!/usr/bin/env bash
# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
#
# Generate the RULER evaluation data (https://github.com/NVIDIA/RULER) for one or more context lengths, then turn
# each length into one parquet file of the harness's columns with create_huggingface_dataset.py.
#
# What the published dataset (simonjegou/ruler) was made with: the tokenizer meta-llama/Meta-Llama-3.1-8B, the
# "base" model template, 500 samples per task, the 13 tasks niah_single_1..3, niah_multikey_1..3, niah_multivalue,
# niah_multiquery, vt, cwe, fwe, qa_1, qa_2. Needs the network (RULER's code, its essays and QA data, the tokenizer)
# and RULER's Python requirements; `--dry_run` prints the commands without running anything.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: evaluation/benchmarks/ruler/generate.sh [options]

  --lengths "4096 8192"   context lengths in tokens (default: 4096)
  --output_dir DIR        where the parquet files go, one ruler_<length>.parquet each (default: ./ruler_data)
  --ruler_dir DIR         a RULER checkout (default: <output_dir>/RULER, cloned from $RULER_REPO when missing)
  --tokenizer NAME        tokenizer of the prompts (default: meta-llama/Meta-Llama-3.1-8B)
  --num_samples N         samples per task (default: 500)
  --tasks "niah_single_1 vt"  a subset of the 13 tasks (default: all)
  --push_to_hub ORG/NAME  also push each length to the Hub (data_dir = the length, split test)
  --dry_run               print the commands, run nothing
  -h, --help              this help

Then evaluate offline: python evaluation/evaluate.py --dataset ruler --data_path <output_dir>/ruler_4096.parquet
EOF
}

fail() {
    echo "Error: $*" >&2
    exit 2
}

ALL_TASKS="niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt cwe fwe qa_1 qa_2"
LENGTHS="4096"
OUTPUT_DIR="./ruler_data"
RULER_DIR=""
TOKENIZER="meta-llama/Meta-Llama-3.1-8B"
NUM_SAMPLES=500
TASKS="$ALL_TASKS"
PUSH_TO_HUB=""
DRY_RUN=0
RULER_REPO="${RULER_REPO:-https://github.com/NVIDIA/RULER.git}"

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry_run) DRY_RUN=1; shift ;;
        --lengths | --output_dir | --ruler_dir | --tokenizer | --num_samples | --tasks | --push_to_hub)
            [ $# -ge 2 ] || fail "$1 needs a value (see --help)"
            case "$1" in
                --lengths) LENGTHS="$2" ;;
                --output_dir) OUTPUT_DIR="$2" ;;
                --ruler_dir) RULER_DIR="$2" ;;
                --tokenizer) TOKENIZER="$2" ;;
                --num_samples) NUM_SAMPLES="$2" ;;
                --tasks) TASKS="$2" ;;
                --push_to_hub) PUSH_TO_HUB="$2" ;;
            esac
            shift 2 ;;
        *) fail "unknown option '$1' (see --help)" ;;
    esac
done

[ -n "$LENGTHS" ] || fail "--lengths is empty"
for length in $LENGTHS; do
    [[ "$length" =~ ^[1-9][0-9]*$ ]] || fail "--lengths must be positive integers (tokens), got '$length'"
done
[[ "$NUM_SAMPLES" =~ ^[1-9][0-9]*$ ]] || fail "--num_samples must be a positive integer, got '$NUM_SAMPLES'"
[ -n "$TASKS" ] || fail "--tasks is empty"
for task in $TASKS; do
    [[ " $ALL_TASKS " == *" $task "* ]] || fail "unknown RULER task '$task'; tasks: $ALL_TASKS"
done
RULER_DIR="${RULER_DIR:-$OUTPUT_DIR/RULER}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

run() {
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then
        "$@"
    fi
}

if [ ! -f "$RULER_DIR/scripts/data/prepare.py" ]; then
    if [ "$DRY_RUN" -eq 0 ]; then
        mkdir -p "$(dirname "$RULER_DIR")"
        git clone --depth 1 "$RULER_REPO" "$RULER_DIR" ||
            fail "could not clone RULER from $RULER_REPO (no network?); clone it where there is network and pass --ruler_dir"
    else
        echo "+ git clone --depth 1 $RULER_REPO $RULER_DIR"
    fi
    # RULER's essays (niah haystack) and QA data (SQuAD, HotpotQA)
    run bash -c "cd '$RULER_DIR/scripts/data/synthetic/json' && $PYTHON download_paulgraham_essay.py && bash download_qa_dataset.sh" ||
        fail "could not download RULER's essays and QA data (no network?)"
fi

for length in $LENGTHS; do
    raw_dir="$OUTPUT_DIR/raw/$length"
    for task in $TASKS; do
        run bash -c "cd '$RULER_DIR/scripts/data' && $PYTHON prepare.py --save_dir '$(realpath -m "$raw_dir")' \
--benchmark synthetic --task $task --tokenizer_path $TOKENIZER --tokenizer_type hf --max_seq_length $length \
--model_template_type base --num_samples $NUM_SAMPLES" ||
            fail "RULER's prepare.py failed for task $task at length $length (RULER's requirements installed? network for the tokenizer?)"
    done
    convert=("$PYTHON" "$HERE/create_huggingface_dataset.py" --ruler_dir "$raw_dir" --context_length "$length"
        --output "$OUTPUT_DIR/ruler_$length.parquet" --tasks "[$(echo $TASKS | tr ' ' ',')]")
    if [ -n "$PUSH_TO_HUB" ]; then
        convert+=(--push_to_hub "$PUSH_TO_HUB")
    fi
    [ "$DRY_RUN" -eq 1 ] || mkdir -p "$OUTPUT_DIR"
    run "${convert[@]}"
done
