#!/usr/bin/env bash
# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
# Issue 19's GPU measurements of the ragged cache, in one go (run from the repository root on the GPU machine):
#   1. speed and memory at 32k, batch 1, 8B shape: head-wise presses (AdaKV(SnapKV), AdaKV(ExpectedAttention)) against
#      Knorm at the same kept size, masked in-place loop against the ragged cache;
#   2. the largest context: no press (dynamic cache) and AdaKV(SnapKV) 0.8 (ragged) at 128k and 256k;
#   3. HEADWISE=1 only: the resident KV and peak memory of the other head-wise presses that need nothing from the Hub
#      on a random-weight shape (CriticalAdaKV over SnapKV and ExpectedAttention, KVCompose) at 0.5 and 0.8, ragged
#      loop, 8 new tokens (memory, not speed: it may share the GPU with other work);
#   4. OVERHEAD=1 only: one layer's decoding attention call, compiled FlexAttention over a ragged layer against SDPA
#      on the same entries, wall and kernel time per call and the compiled call's host events
#      (benchmarks/attention_call_overhead.py, in overhead/).
# Results go to $1 (default benchmark_results/ragged): run1 ... runN (SPEED_REPEATS runs of the speed part, default 1,
# per ragged backend of RAGGED_BACKENDS, default "triton"; runs and ratio files of a backend other than flex end in
# _<backend>,
# one after the other so that drift on the host touches every row alike), longest/ and headwise/, each with
# results.jsonl and table.txt; decode_ratio.json, every row's decode time against Knorm's (in-place loop, same ratio)
# over the runs (benchmarks/decode_ratio.py); env.txt (GPU and versions) and log.txt (everything printed). Every file
# is one folder below $1. The GPU machine returns at most 8 files, 2 folders down, so pack them there:
#   bash benchmarks/ragged_cache.sh /tmp/ragged; tar czf $OUT/ragged.tgz -C /tmp ragged
# One speed run takes about 200 s on an H100 (12 rows); give SPEED_TIMEOUT room.
# SPEED_PRESSES replaces the speed part's press list (keep Knorm at each ratio: it is the baseline).
# SKIP_LONGEST=1 leaves out the largest-context part; SKIP_SPEED=1 the speed part; headwise/ holds part 3.
# RAGGED_GRAPH=1 adds the CUDA-graph loops to the speed part (`graph` for the in-place cache, `ragged_graph` for the
# ragged one) and a second ratio file, decode_ratio_graph.json, against Knorm on the `graph` loop (about 1.6x the
# time per run).
# Every part is capped by `timeout` so that one slow part leaves the others their time; rerunning resumes
# (the benchmark skips the rows already in results.jsonl).
set -u
out=${1:-benchmark_results/ragged}
mkdir -p "$out/longest" "$out/headwise" "$out/overhead"
exec > >(tee -a "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/env.txt"
python -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
    | tee -a "$out/env.txt"
# RAGGED_GRAPH=1: also the CUDA-graph loops, in-place (`graph`, Knorm's baseline) and ragged (`ragged_graph`)
loops=inplace,ragged
[ "${RAGGED_GRAPH:-0}" = 1 ] && loops=inplace,ragged,graph,ragged_graph
loops=${SPEED_LOOPS:-$loops}  # SPEED_LOOPS replaces the list (keep Knorm's baseline loop, inplace or graph)
[ "${SKIP_SPEED:-0}" = 1 ] && repeats=0 || repeats=${SPEED_REPEATS:-1}
# RAGGED_BACKENDS: the ragged attention backends to time, each in its own runs (default triton, what "auto" picks on
# CUDA; e.g. "triton flex")
for backend in ${RAGGED_BACKENDS:-triton}; do
    [ "$backend" = flex ] && suffix= || suffix=_$backend
    runs=()
    for run in $(seq 1 "$repeats"); do
        mkdir -p "$out/run$run$suffix"
        runs+=("$out/run$run$suffix")
        KVPRESS_RAGGED_BACKEND=$backend timeout "${SPEED_TIMEOUT:-300}" python -m kvpress.benchmark \
            --model llama3.1-8b --context_lengths 32768 --max_new_tokens 64 --decode_loops "$loops" --profile_steps 5 \
            --output_dir "$out/run$run$suffix" \
            --presses "${SPEED_PRESSES:-knorm:0.5,knorm:0.8,adakv_snapkv:0.5,adakv_snapkv:0.8,expected_attention:0.5,expected_attention:0.8}"
        echo "speed run $run ($backend) rc $?"
    done
    # each ratio file needs its baseline loop among the timed ones: inplace for the eager ratio, graph for the other
    if [ "$repeats" -gt 0 ] && [[ ",$loops," == *,inplace,* ]]; then
        python benchmarks/decode_ratio.py --runs "${runs[@]}" --output "$out/decode_ratio$suffix.json"
        echo "decode ratio ($backend) rc $?"
    fi
    if [ "$repeats" -gt 0 ] && [[ ",$loops," == *,graph,* ]]; then  # Knorm replayed from a CUDA graph as the baseline
        python benchmarks/decode_ratio.py --runs "${runs[@]}" --baseline_loop graph \
            --output "$out/decode_ratio_graph$suffix.json"
        echo "decode ratio (graph, $backend) rc $?"
    fi
done
if [ "${SKIP_LONGEST:-0}" != 1 ]; then
    timeout "${LONGEST_TIMEOUT:-240}" python -m kvpress.benchmark --model llama3.1-8b --context_lengths 131072,262144 \
        --max_new_tokens 4 --presses none --decode_loops dynamic --output_dir "$out/longest"
    echo "longest none rc $?"
    timeout "${LONGEST_TIMEOUT:-240}" python -m kvpress.benchmark --model llama3.1-8b --context_lengths 131072,262144 \
        --max_new_tokens 4 --presses adakv_snapkv:0.8 --decode_loops ragged --output_dir "$out/longest"
    echo "longest adakv_snapkv rc $?"
fi
if [ "${HEADWISE:-0}" = 1 ]; then
    timeout "${HEADWISE_TIMEOUT:-150}" python -m kvpress.benchmark --model llama3.1-8b --context_lengths 32768 \
        --max_new_tokens 8 --decode_loops ragged --output_dir "$out/headwise" --presses \
        critical_adakv_snapkv:0.5,critical_adakv_snapkv:0.8,critical_adakv_expected_attention:0.5,critical_adakv_expected_attention:0.8,kvcompose:0.5,kvcompose:0.8
    echo "headwise rc $?"
fi
if [ "${OVERHEAD:-0}" = 1 ]; then
    timeout "${OVERHEAD_TIMEOUT:-120}" python benchmarks/attention_call_overhead.py --context_lengths 1024,16384,32768 \
        --output_dir "$out/overhead"
    echo "overhead rc $?"
fi
