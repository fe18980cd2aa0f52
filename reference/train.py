# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Train the reference model from scratch on the synthetic long-context tasks (RULER-style,
https://arxiv.org/abs/2404.06654).

The one idea: a small GQA Llama learns retrieval (induction heads), multi-hop tracking and counting when trained on
the task rows themselves, with the loss on the answer tokens (plus a little language-model loss on the context) and a
curriculum from short to long contexts. Two things make key matching learnable at this size: the trained answer to a
one-value needle question restates the asked key in the words of its needle before the value ("... is wide-willow
is: 1456079."), which turns key matching into copying, and a drill of multi-key rows with up to 12 needles, which
dominates the first 30% of the steps. Key matching still emerges abruptly and in some runs only (two of six without
the keyed drill below), so a run that has not learned it by step 6000 (teacher-forced multi-key answers below 0.9)
starts again from scratch with the next seed, at most twice (`--milestone`, `--retries`). A second drill, of
multi-query rows whose target restates every asked key before its value (`niah_multiquery_keyed`), makes key
matching emerge more often (ten attempts of fourteen) but cost common words in every finished run (50 to 79%), so it
is off by default (`--early_task_weights niah_multiquery_keyed=2` turns it on). Rows are generated on the fly by
data-loader workers from seeds that the evaluation never uses ("train|<seed>|<batch>|<row>" versus generate_rows'
"eval|<seed>|..."), so every accuracy reported afterwards is on held-out rows. The data of batch i is a function of
(seed, i) alone and the schedule of `--max_steps` alone (`auto` fits the step count to `--time_budget_s` from a timed
step, and prints it). On CUDA the model is compiled and the cuDNN attention backend is off (`--cudnn_attention` keeps
it): it builds a new plan for every new batch shape, which made the eager step 3.4 to 3.8 times slower on an H100
with new batch shapes (reference/results/bench_train*.json).

The shipped checkpoint (reference/model/) is the default recipe, run solo on one H100 (torch 2.11) in 1049 s, 17.5
minutes: seeds 0 and 1 missed the milestone (teacher-forced multi-key 0.00 and 0.23 at step 6000), seed 2 met it
(0.95) and finished its 23000 steps and the held-out evaluation in 635 s (reference/results/):

    python reference/train.py --output_dir run
    cp run/model/config.json run/model/model.safetensors reference/model/

A rerun follows the same schedule but is not bit-identical (GPU kernels), so whether a given seed meets the milestone
can change. The shipped run used all three attempts the default allows; if all three miss, the run exits with
status 3 (`--retries 3` allows a fourth, for about 3 more minutes: a missed attempt took 158 to 245 s).
reference/README.md has every run, its wall time and held-out accuracy.

A smoke test on CPU:

    python reference/train.py --output_dir /tmp/ref --device cpu --tiny --max_steps 20

Writes `output_dir/model/` (config, fp16 weights that load as float32, tokenizer), `output_dir/train_log.jsonl` (the
training curve), `output_dir/train_summary.json` (held-out accuracies at the trained length and at twice it) and
`output_dir/resume/` (fp32 weights, the step and the optimizer state, to continue with `--resume`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import pickle
import random
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.synthetic.tasks import TASK_NAMES, build_row, generate_rows, get_counter
from reference import avoid_cudnn_attention, write_report

logger = logging.getLogger("reference.train")

# Training-only drills: name -> the task that builds their rows. `niah_multikey_dense` is niah_multikey with 2 to
# DENSE_NEEDLES needles (as many as fit the context): with many needles and short contexts, copying any needle value
# is rarely right, so the gradient rewards matching the asked key (RULER-style multi-key retrieval).
DRILLS = {"niah_multikey_dense": "niah_multikey", "niah_multiquery_keyed": "niah_multiquery"}
DENSE_NEEDLES = 12
TRAINING_TASKS: tuple[str, ...] = TASK_NAMES + tuple(DRILLS)

# Relative frequency of each task in training (the harder families more often).
TASK_WEIGHTS = {
    "niah_single_noise": 0.3,
    "niah_single_essay": 0.4,
    "niah_single_uuid": 0.6,
    "niah_multikey": 0.8,
    "niah_multivalue": 0.5,
    "niah_multiquery": 0.6,
    "variable_tracking": 1.2,
    "common_words": 2.0,
    "frequent_words": 2.0,
    "niah_multikey_dense": 0.5,
    # off by default (here and early): every finished run with it scored 50 to 79 on common words (reference/README.md)
    "niah_multiquery_keyed": 0.0,
}
# The mixture of the first --early_steps, while contexts are short: more of the multi-key drill.
EARLY_TASK_WEIGHTS = {
    "niah_single_noise": 0.4,
    "niah_single_essay": 0.5,
    "niah_single_uuid": 0.6,
    "niah_multikey": 1.2,
    "niah_multivalue": 0.6,
    "niah_multiquery": 0.8,
    "variable_tracking": 1.4,
    "common_words": 1.2,
    "frequent_words": 1.2,
    "niah_multikey_dense": 2.0,
    "niah_multiquery_keyed": 0.0,  # --early_task_weights niah_multiquery_keyed=2 turns the keyed drill on
}
SHORT_NAMES = dict(
    zip(TRAINING_TASKS, ("noise", "essay", "uuid", "mkey", "mval", "mquery", "vt", "cwe", "fwe", "dense", "mqkey"))
)
# Key matching emerges abruptly, in some runs only (reference/README.md): a run of the default recipe that has not
# learned it by this step starts again from scratch with the next seed (--milestone, --retries).
DEFAULT_MILESTONES = [("niah_multikey", 0.9, 6000)]
MIN_TRAIN_CONTEXT = 160  # shortest training context (every task fits)
RESUME_PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB


def asked_keys(row: dict) -> list[str]:
    """The keys a needle question asks about, in the order of the question ("... for k3, k1 and k2 mentioned ...")."""
    return row["question"].split(" for ", 1)[1].rsplit(" mentioned", 1)[0].replace(" and ", ", ").split(", ")


def keyed_target(row: dict) -> str:
    """The target of the `niah_multiquery_keyed` drill: every asked value after its restated key, in the order of the
    question (" k3 is: v3, k1 is: v1, ..."), so one row trains as many key lookups as it has needles (the evaluation's
    multi-query target lists the values in the order of the text instead, which needs no key matching)."""
    keys = asked_keys(row)
    if len(keys) != len(row["answer"]):
        raise ValueError(f"cannot pair the asked keys {keys} with the answer {row['answer']}")
    return " " + ", ".join(f"{key} is: {value}" for key, value in zip(keys, row["answer"])) + "."


def _task_weights(text: str, base: Optional[dict[str, float]] = None) -> dict[str, float]:
    """TASK_WEIGHTS (or `base`) updated with "task=weight,..." pairs."""
    weights = dict(TASK_WEIGHTS if base is None else base)
    for pair in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = pair.partition("=")
        if name not in TASK_WEIGHTS:
            raise argparse.ArgumentTypeError(
                f"unknown task {name!r} in task weights; tasks: {', '.join(TRAINING_TASKS)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"task weight of {name!r} must be a number, got {value!r}") from None
        if weights[name] < 0:
            raise argparse.ArgumentTypeError(f"task weight of {name!r} must be >= 0, got {value!r}")
    return weights


def _milestone(text: str) -> Optional[tuple[str, float, int]]:
    """ "TASK=ACCURACY@STEP" -> (task, accuracy, step); "none" -> None (no milestone, not even the default one)."""
    if text.strip().lower() == "none":
        return None
    name, _, rest = text.partition("=")
    accuracy, _, step = rest.partition("@")
    if name not in TRAINING_TASKS:
        tasks = ", ".join(TRAINING_TASKS)
        raise argparse.ArgumentTypeError(f"unknown task {name!r} in milestone {text!r}; tasks: {tasks}")
    try:
        value, at = float(accuracy), int(step)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a milestone is TASK=ACCURACY@STEP (e.g. niah_multikey=0.9@8000), got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0 or at < 1:
        raise argparse.ArgumentTypeError(
            f"a milestone's accuracy must be in [0, 1] and its step >= 1, got accuracy {value} and step {at}"
        )
    return name, value, at


def _early_task_weights(text: str) -> dict[str, float]:
    """EARLY_TASK_WEIGHTS updated with "task=weight,..." pairs."""
    return _task_weights(text, EARLY_TASK_WEIGHTS)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output_dir", required=True, help="where the model, logs and resume checkpoint go")
    add("--tokenizer_dir", default=str(REFERENCE_MODEL_DIR))
    add("--seed", type=int, default=0)
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    # model
    add("--layers", type=int, default=6)
    add("--hidden", type=int, default=256)
    add("--heads", type=int, default=4)
    add("--kv_heads", type=int, default=2)
    add("--head_dim", type=int, default=64)
    add("--intermediate", type=int, default=1024)
    add("--rope_theta", type=float, default=100_000.0)
    # data
    add("--context_length", type=int, default=TRAINED_CONTEXT_LENGTH)
    add("--start_context_length", type=int, default=256, help="longest context at step 0 of the curriculum")
    add(
        "--curriculum_steps",
        type=float,
        default=0.5,
        help="steps to grow the longest context to --context_length (a number below 1: that fraction of the steps)",
    )
    add("--tokens_per_batch", type=int, default=32768)
    add("--task_weights", type=_task_weights, default=dict(TASK_WEIGHTS), help="e.g. common_words=2,niah_multikey=1.5")
    add(
        "--early_steps",
        type=float,
        default=0.3,
        help="batches before this index use --early_task_weights (a number below 1: that fraction of the steps)",
    )
    add(
        "--early_task_weights",
        type=_early_task_weights,
        default=dict(EARLY_TASK_WEIGHTS),
        help="task weights of the first --early_steps",
    )
    add("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    # optimisation
    add("--lr", type=float, default=1e-3)
    add("--min_lr_ratio", type=float, default=0.05)
    add("--warmup_steps", type=int, default=150)
    add("--weight_decay", type=float, default=0.1)
    add("--lm_weight", type=float, default=0.1, help="weight of the language-model loss on context tokens")
    add(
        "--answer_loss",
        choices=("token", "row"),
        default="token",
        help="average the answer loss over all answer tokens of a batch (token) or per row first (row: a long answer "
        "weighs no more than a short one)",
    )
    add(
        "--max_steps",
        default="23000",
        help="number of steps (23000, as the shipped checkpoint), or 'auto' to fit --time_budget_s from a timed step",
    )
    add(
        "--time_budget_s",
        type=float,
        default=1170.0,
        help="with --max_steps auto: wall-clock budget of the whole run, evaluation included (a fixed --max_steps "
        "always runs to its end)",
    )
    add("--eval_reserve_s", type=float, default=75.0, help="seconds kept for the final save and evaluation")
    add(
        "--stop_after_s",
        type=float,
        default=None,
        help="stop this invocation after so many seconds and save a resume checkpoint (a long run in several parts)",
    )
    add("--stop_after_steps", type=int, default=None, help="stop this invocation after so many steps (and save)")
    add(
        "--milestone",
        type=_milestone,
        action="append",
        default=None,
        help="TASK=ACCURACY@STEP (repeatable): stop the run if the teacher-forced exact answers of TASK in the first "
        "logging window that ends at or after STEP are below ACCURACY (then --retries, else exit status 3); default "
        "niah_multikey=0.9@6000, which abandons a run in which key matching has not emerged ('none': no milestone; "
        "--tiny: none)",
    )
    add(
        "--retries",
        type=int,
        default=2,
        help="after a missed milestone, start again from scratch with the next --seed, at most this many times",
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on CUDA); --no-compile trains eagerly",
    )
    add(
        "--cudnn_attention",
        action="store_true",
        help="keep PyTorch's cuDNN attention backend on CUDA (off by default: it rebuilds a plan for every new batch "
        "shape, which made an eager step on new shapes 3.4 to 3.8 times slower on an H100)",
    )
    add("--log_every", type=int, default=50)
    add("--save_every_s", type=float, default=120.0)
    add("--resume", default=None, help="a resume/ directory written by an earlier run")
    # evaluation
    add("--eval_rows", type=int, default=40, help="held-out rows per task at the trained length")
    add("--eval_rows_long", type=int, default=10, help="held-out rows per task at twice the trained length")
    add("--eval_seed", type=int, default=1000, help="seed of the held-out rows (any seed: training seeds differ)")
    add("--tiny", action="store_true", help="a tiny model and short contexts, for smoke tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim, args.intermediate = 2, 64, 2, 1, 32, 128
        args.context_length, args.start_context_length, args.curriculum_steps = 256, 192, 0.5
        args.tokens_per_batch, args.warmup_steps, args.log_every = 2048, 5, 5
        args.eval_rows, args.eval_rows_long = 2, 1
    if args.max_steps != "auto":
        args.max_steps = int(args.max_steps)
    if args.milestone is None:
        args.milestone = [] if args.tiny else list(DEFAULT_MILESTONES)
    args.milestone = [milestone for milestone in args.milestone if milestone is not None]
    if args.retries < 0:
        parser.error(f"--retries must be >= 0, got {args.retries}")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data


def curriculum_max_length(step: int, args: argparse.Namespace) -> int:
    if step >= args.curriculum_steps:
        return args.context_length
    fraction = step / max(args.curriculum_steps, 1)
    return int(args.start_context_length + fraction * (args.context_length - args.start_context_length))


def encode_row(row: dict, tokenizer) -> tuple[list[int], int, int]:
    """Token ids exactly as the pipeline builds them: bos + context | question + "\\n" + answer_prefix | answer + eos
    (the pipeline encodes bos_token + context; the special token is split off before the text is encoded).

    Returns the ids, the number of context tokens (bos included) and the index of the first answer token."""
    context = [tokenizer.bos_token_id] + get_counter(tokenizer).encode(row["context"])
    prompt = tokenizer.encode(row["question"] + "\n" + row["answer_prefix"], add_special_tokens=False)
    answer = tokenizer.encode(row["target"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return context + prompt + answer, len(context), len(context) + len(prompt)


def make_batch(index: int, args: argparse.Namespace, tokenizer) -> dict[str, torch.Tensor]:
    """Training batch number `index`: a function of (seed, index) only."""
    rng = random.Random(f"train|{args.seed}|{index}")
    longest = curriculum_max_length(index, args)
    shortest = min(MIN_TRAIN_CONTEXT, longest)
    if rng.random() < 0.5:
        length = rng.randint(max(shortest, int(0.75 * longest)), longest)
    else:
        length = rng.randint(shortest, longest)
    rows = max(1, args.tokens_per_batch // (length + 64))
    mixture = args.early_task_weights if index < args.early_steps and args.early_task_weights else args.task_weights
    names = [name for name, weight in mixture.items() if weight > 0]
    weights = [mixture[name] for name in names]
    sequences, context_lengths, answer_starts, tasks = [], [], [], []
    for j in range(rows):
        task = rng.choices(names, weights=weights)[0]
        row_seed = f"train|{args.seed}|{index}|{j}"
        if task in DRILLS:
            # as many needles as fit (a needle and its share of haystack take about 24 tokens)
            most = max(2, min(DENSE_NEEDLES, (length - 60) // 24))
            row = build_row(DRILLS[task], length, tokenizer, row_seed=row_seed, num_needles=rng.randint(2, most))
            if task == "niah_multiquery_keyed":
                row["target"] = keyed_target(row)
        else:
            row = build_row(task, length, tokenizer, row_seed=row_seed)
        ids, n_context, answer_start = encode_row(row, tokenizer)
        sequences.append(ids)
        context_lengths.append(n_context)
        answer_starts.append(answer_start)
        tasks.append(TRAINING_TASKS.index(task))
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    # Masks over the *predicted* positions 1..width-1 (the logits at position t predict token t + 1).
    answer_mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    context_mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        answer_mask[i, answer_starts[i] - 1 : len(ids) - 1] = True
        context_mask[i, : context_lengths[i] - 1] = True
    return {
        "input_ids": input_ids,
        "answer_mask": answer_mask,
        "context_mask": context_mask,
        "task": torch.tensor(tasks),
        "index": torch.tensor(index),
    }


class TaskBatches(IterableDataset):
    """Batches start, start+1, ...; worker w of W makes the batches with index = w (mod W), so the loader yields them
    in order and each batch is the same whatever the number of workers."""

    def __init__(self, args: argparse.Namespace, start: int):
        self.args = args
        self.start = start

    def __iter__(self) -> Iterator[dict]:
        from transformers import AutoTokenizer

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # one thread per data worker: many workers must not oversubscribe the CPUs
            torch.set_num_threads(1)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tokenizer = AutoTokenizer.from_pretrained(self.args.tokenizer_dir)
        counter = get_counter(tokenizer)
        index = self.start + worker
        while True:
            yield make_batch(index, self.args, counter.tokenizer)
            index += workers


# ---------------------------------------------------------------------------------------------------------------------
# Model, schedule, checkpoints


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 64 * math.ceil(len(tokenizer) / 64)  # padded for efficient matrix shapes
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timing)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resolve_fractions(args: argparse.Namespace, max_steps: int) -> None:
    """--curriculum_steps and --early_steps below 1 are fractions of the run's steps: make them step counts."""
    for name in ("curriculum_steps", "early_steps"):
        value = float(getattr(args, name))
        if value < 0:
            raise ValueError(f"--{name} must be >= 0 (a step count, or a fraction of the steps below 1), got {value}")
        setattr(args, name, int(round(value * max_steps)) if 0 < value < 1 else int(value))


def calibrate_max_steps(train_step, tokenizer, args: argparse.Namespace, device: str, started: float) -> int:
    """The number of steps that fits the time budget: times full-size steps (forward and backward, no update) on a
    synthetic batch at 3/4 of the trained length, then divides the time left by that, with a 15% margin."""
    length = max(16, int(0.75 * args.context_length))
    rows = max(1, args.tokens_per_batch // (length + 64))
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(4, len(tokenizer), (rows, length), generator=generator).to(device)
    answer_mask = torch.zeros(rows, length - 1, dtype=torch.bool, device=device)
    answer_mask[:, -8:] = True
    context_mask = ~answer_mask

    def run(count: int) -> float:
        for _ in range(count):
            train_step(input_ids, answer_mask, context_mask, 0.0, update=False)
        synchronize(device)
        return time.time()

    run(3)  # warm-up (and compilation)
    begin = time.time()
    per_step = (run(10) - begin) / 10
    left = args.time_budget_s - args.eval_reserve_s - (time.time() - started) - 20  # 20 s: the loader's start
    steps = max(1, int(left / (per_step * 1.15)))
    logger.info(
        "auto max_steps: %d (%.4f s per step measured; pass --max_steps %d to repeat the schedule)",
        steps,
        per_step,
        steps,
    )
    return steps


def learning_rate(step: int, max_steps: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_resume(
    model, step: int, max_steps: int, args: argparse.Namespace, optimizer=None, seconds: float = 0.0
) -> None:
    """fp32 weights and the step, split in parts small enough to come back from the device, and the optimizer state
    (`optimizer.pt`, larger: a resume on the same machine continues the run exactly; without it the moments restart
    with a short warm-up)."""
    buffer = io.BytesIO()
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    # the arguments as JSON values: the checkpoint must load with torch.load(weights_only=True)
    saved_args = json.loads(json.dumps(vars(args), default=str))
    torch.save({"model": state, "step": step, "max_steps": max_steps, "seconds": seconds, "args": saved_args}, buffer)
    data = buffer.getvalue()
    directory = Path(args.output_dir) / "resume"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("part*"):
        old.unlink()
    for i in range(0, len(data), RESUME_PART_BYTES):
        (directory / f"part{i // RESUME_PART_BYTES}").write_bytes(data[i : i + RESUME_PART_BYTES])
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, directory / "optimizer.pt.tmp")
        os.replace(directory / "optimizer.pt.tmp", directory / "optimizer.pt")


def _load_checkpoint(source, what: str) -> dict:
    """`torch.load(weights_only=True)`: what save_resume writes is tensors, dicts, lists, tuples, strings and numbers
    only, so a resume never needs a full pickle load (which would run any code a tampered file names)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"--resume: {what} cannot be loaded with torch.load(weights_only=True) (it holds objects other than "
            f"tensors, dicts, lists and numbers: {str(error).splitlines()[-1]}). save_resume never writes such "
            "objects, so this file was not written by this script; it is not unpickled."
        ) from error


def load_resume(directory: str) -> dict:
    parts = sorted(Path(directory).glob("part*"), key=lambda p: int(p.name[4:]))
    if not parts:
        raise FileNotFoundError(f"--resume {directory}: no part* files written by save_resume there.")
    return _load_checkpoint(io.BytesIO(b"".join(p.read_bytes() for p in parts)), f"the checkpoint in {directory}")


def save_model(model, tokenizer, output_dir: Path) -> Path:
    """The shipped checkpoint: fp16 weights (half the size), a config that loads them as float32, the tokenizer."""
    path = output_dir / "model"
    model.to(torch.float16).save_pretrained(path)
    model.to(torch.float32)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Training


def evaluate_held_out(model, tokenizer, args: argparse.Namespace) -> dict:
    """Full-cache accuracy through the kvpress pipeline on held-out rows, at the trained length and at twice it."""
    from reference.evaluate import evaluate, first_mismatches, make_pipeline

    model.eval()
    pipe = make_pipeline(model, tokenizer)
    results = {}
    for length, count in ((args.context_length, args.eval_rows), (2 * args.context_length, args.eval_rows_long)):
        if count <= 0:
            continue
        rows = [
            row for task in TASK_NAMES for row in generate_rows(task, count, length, tokenizer, seed=args.eval_seed)
        ]
        start = time.time()
        scores, predictions = evaluate(pipe, rows)
        results[str(length)] = scores
        logger.info("held-out accuracy at %d tokens (%d rows, %.0f s):", length, len(rows), time.time() - start)
        for task, score in scores.items():
            logger.info("  %-20s %6.1f", task, score)
        for line in first_mismatches(rows, predictions, limit=4):
            logger.info("  wrong: %s", line)
    return results


def make_optimizer(model, args: argparse.Namespace, device: str):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.startswith("cuda"),
    )


def mean_answer_loss(losses: torch.Tensor, answer_mask: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """The answer loss of a batch from per-token losses (rows x positions): "token" averages over all answer tokens
    (a row weighs as much as it has answer tokens), "row" averages each row's answer tokens, then the rows (every row
    weighs the same, whatever its answer's length)."""
    if mode == "token":
        return (losses * answer_mask).sum() / answer_mask.sum().clamp(min=1)
    if mode == "row":
        counts = answer_mask.sum(dim=1)
        per_row = (losses * answer_mask).sum(dim=1) / counts.clamp(min=1)
        return per_row.sum() / (counts > 0).sum().clamp(min=1)
    raise ValueError(f"answer loss mode must be 'token' or 'row', got {mode!r}")


def make_train_step(model, optimizer, args: argparse.Namespace, device: str):
    """One optimisation step on a batch: returns (loss, answer loss, lm loss) and per-row exact answers, on the
    device (no host synchronisation). `update=False` computes the gradients but leaves the weights alone (timing).
    `args.compile` compiles the model's forward pass (dynamic shapes: the batch's rows and width change from step to
    step); compiling the loss with it failed in inductor on torch 2.11."""
    use_autocast = device.startswith("cuda")
    # before compiling: a traced graph keeps the attention backend it saw
    if use_autocast and not args.cudnn_attention and avoid_cudnn_attention():
        logger.info("attention: cuDNN SDPA off (it rebuilds a plan for every new batch shape)")
    compiled = args.compile if args.compile is not None else device.startswith("cuda")
    forward = torch.compile(model, dynamic=True) if compiled else model
    logger.info("model forward: %s", "torch.compile(dynamic=True)" if compiled else "eager")

    def train_step(input_ids, answer_mask, context_mask, lr: float, update: bool = True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext():
            logits = forward(input_ids=input_ids).logits[:, :-1]
        targets = input_ids[:, 1:]
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        answer_loss = mean_answer_loss(losses, answer_mask, args.answer_loss)
        lm_loss = (losses * context_mask).sum() / context_mask.sum().clamp(min=1)
        loss = answer_loss + args.lm_weight * lm_loss
        loss.backward()  # gradients are cleared after every step, so none are left from the last one
        if update:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        correct = ((logits.argmax(-1) == targets) | ~answer_mask).all(dim=1).float()
        return torch.stack([loss.detach(), answer_loss.detach(), lm_loss.detach()]), correct

    return train_step


def train(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    started = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    model = build_model(args, tokenizer)
    start_step, max_steps, earlier_seconds = 0, args.max_steps, 0.0
    if args.resume:
        state = load_resume(args.resume)
        model.load_state_dict(state["model"])
        start_step = int(state["step"])
        earlier_seconds = float(state.get("seconds", 0.0))  # wall time of the earlier invocations
        if state.get("max_steps", -1) not in (-1, None) and args.max_steps == "auto":
            max_steps = int(state["max_steps"])  # continue the schedule of the run
        logger.info("resumed at step %d of %s", start_step, max_steps)
    model.to(device).train()
    optimizer_state = None
    if args.resume and (Path(args.resume) / "optimizer.pt").exists():
        saved = _load_checkpoint(Path(args.resume) / "optimizer.pt", f"{Path(args.resume) / 'optimizer.pt'}")
        if int(saved["step"]) == start_step:
            optimizer_state = saved["optimizer"]
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s parameters, config %s", f"{n_params:,}", model.config.to_json_string(use_diff=True))
    optimizer = make_optimizer(model, args, device)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        logger.info("optimizer state restored: the run continues exactly")
    train_step = make_train_step(model, optimizer, args, device)

    if max_steps == "auto":
        max_steps = calibrate_max_steps(train_step, tokenizer, args, device, started)
    resolve_fractions(args, max_steps)
    logger.info(
        "schedule: %d steps, contexts from %d to %d tokens over %d steps, early mixture for %d steps",
        max_steps,
        args.start_context_length,
        args.context_length,
        args.curriculum_steps,
        args.early_steps,
    )

    loader = DataLoader(
        TaskBatches(args, start_step),
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=8 if args.workers > 0 else None,
        persistent_workers=False,
        pin_memory=device.startswith("cuda"),
    )
    log_file = (output_dir / "train_log.jsonl").open("a")
    sums = torch.zeros(3, device=device)  # loss, answer loss, lm loss over the logging window
    window_steps = 0
    hits = torch.zeros(len(TRAINING_TASKS), device=device)
    seen = torch.zeros(len(TRAINING_TASKS), device=device)
    tokens_done, last_save = 0, time.time()
    # A fixed --max_steps runs its whole schedule; only --stop_after_s (a run in parts) or --max_steps auto (a schedule
    # fitted to --time_budget_s) set a deadline.
    if args.stop_after_s:
        deadline = started + args.stop_after_s
    elif args.max_steps == "auto":
        deadline = started + args.time_budget_s - args.eval_reserve_s
    else:
        deadline = math.inf
    step = start_step
    resume_warmup = 50 if args.resume and optimizer_state is None else 0
    train_started = window_started = time.time()
    pending = sorted(args.milestone, key=lambda m: m[2])
    missed = None
    batches = iter(loader)
    data_wait = 0.0  # seconds of the logging window spent waiting for the data loader
    while True:
        waited = time.time()
        batch = next(batches, None)
        data_wait += time.time() - waited
        if batch is None or step >= max_steps:
            break
        if args.stop_after_steps is not None and step - start_step >= args.stop_after_steps:
            logger.info("stopping after %d steps of this invocation: saving a resume checkpoint", args.stop_after_steps)
            break
        if time.time() > deadline:
            logger.warning("time limit of this invocation reached at step %d: saving a resume checkpoint", step)
            break
        lr = learning_rate(step, max_steps, args)
        if resume_warmup and step - start_step < resume_warmup:
            lr *= (step - start_step + 1) / resume_warmup
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        losses, correct = train_step(
            input_ids,
            batch["answer_mask"].to(device, non_blocking=True),
            batch["context_mask"].to(device, non_blocking=True),
            lr,
        )
        step += 1
        tokens_done += input_ids.numel()
        with torch.no_grad():
            task = batch["task"].to(device, non_blocking=True)
            hits.index_add_(0, task, correct)
            seen.index_add_(0, task, torch.ones_like(correct))
            sums += losses
            window_steps += 1

        if step % args.log_every == 0:
            hit_counts, seen_counts = hits.cpu(), seen.cpu()  # waits for the window's steps
            now = time.time()
            elapsed = now - train_started
            exact = {
                name: round(float(hit_counts[i] / seen_counts[i]), 3)
                for i, name in enumerate(TRAINING_TASKS)
                if seen_counts[i] > 0
            }
            record = {
                "seed": args.seed,
                "step": step,
                "max_steps": max_steps,
                "lr": lr,
                "context_max": curriculum_max_length(step, args),
                **dict(zip(("loss", "answer_loss", "lm_loss"), (sums / max(window_steps, 1)).tolist())),
                "answer_exact": exact,
                "tokens_per_s": tokens_done / elapsed,
                "step_ms": round(1000 * (now - window_started) / max(window_steps, 1), 1),
                "data_wait_ms": round(1000 * data_wait / max(window_steps, 1), 1),
                "elapsed_s": round(time.time() - started, 1),
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            logger.info(
                "step %5d/%s lr %.2e len<=%d loss %.3f answer %.3f lm %.3f | %s | %.0fk tok/s %.0f ms/step "
                "(%.0f waiting for data) %.0fs",
                step,
                max_steps,
                lr,
                record["context_max"],
                record["loss"],
                record["answer_loss"],
                record["lm_loss"],
                " ".join(f"{SHORT_NAMES[name]}={value:.2f}" for name, value in exact.items()),
                record["tokens_per_s"] / 1000,
                record["step_ms"],
                record["data_wait_ms"],
                record["elapsed_s"],
            )
            sums.zero_()
            window_steps, window_started, data_wait = 0, time.time(), 0.0
            hits.zero_()
            seen.zero_()
            for task, accuracy, at in [m for m in pending if m[2] <= step and m[0] in exact]:
                pending.remove((task, accuracy, at))
                if exact[task] < accuracy:
                    missed = f"{task} at {exact[task]:.3f} < {accuracy} by step {step} (milestone step {at})"
                    break
                logger.info("milestone met: %s %.3f >= %s at step %d", task, exact[task], accuracy, step)
            if missed:
                logger.warning("milestone missed: %s; stopping (held-out evaluation skipped)", missed)
                break
        if time.time() - last_save > args.save_every_s:
            save_resume(model, step, max_steps, args, optimizer, earlier_seconds + time.time() - started)
            last_save = time.time()
    log_file.close()
    finished = step >= max_steps
    save_resume(model, step, max_steps, args, optimizer, earlier_seconds + time.time() - started)
    path = save_model(model, tokenizer, output_dir)
    logger.info("saved the model to %s after %d steps (%s)", path, step, "complete" if finished else "INCOMPLETE")
    if finished:
        results = evaluate_held_out(model, tokenizer, args)
    elif missed:
        results = {}
    else:
        logger.info(
            "the schedule is not finished: continue with --resume %s (held-out evaluation skipped)",
            Path(args.output_dir) / "resume",
        )
        results = {}
    summary = {
        "steps": step,
        "max_steps": max_steps,
        "complete": finished,
        "train_seconds": round(time.time() - train_started, 1),
        "run_seconds_all_invocations": round(earlier_seconds + time.time() - started, 1),
        "parameters": n_params,
        "held_out_accuracy": results,
        "missed_milestone": missed,
        "args": vars(args),
    }
    write_report(output_dir / "train_summary.json", summary)
    logger.info("total %.0f s", time.time() - started)
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    """Train; after a missed milestone, start again from scratch with the next seed (at most --retries times). The
    summary of a run with retries lists every attempt and the wall time of them all."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    started = time.time()
    attempts = []
    while True:
        summary = train(args)
        attempts.append({"seed": args.seed, "steps": summary["steps"], "missed_milestone": summary["missed_milestone"]})
        if not summary["missed_milestone"] or len(attempts) > args.retries:
            break
        args.seed += 1
        args.resume = None  # a retry starts from scratch
        # the new model compiles afresh (inductor's disk cache makes that quick) instead of as recompilations of the
        # old one, which count towards dynamo's recompile limit
        torch._dynamo.reset()
        logger.warning(
            "attempt %d missed its milestone: starting again from scratch with --seed %d (%d retries left)",
            len(attempts),
            args.seed,
            args.retries - len(attempts),
        )
    if len(attempts) > 1:
        summary["attempts"] = attempts
        summary["seconds_all_attempts"] = round(time.time() - started, 1)
        write_report(Path(args.output_dir) / "train_summary.json", summary)
        logger.info("%d attempts, %.0f s in all", len(attempts), summary["seconds_all_attempts"])
    if summary["missed_milestone"]:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
