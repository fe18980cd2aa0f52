# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Which attention heads of a reference checkpoint do multi-key retrieval, measured on teacher-forced rows.

The one idea: on `niah_multikey` rows fed with their trained answer ("... is wide-willow is: 1456079."), read the
attention of every head at the answer position that predicts the value's first digit: a head that retrieves puts its
weight on the asked needle's value and not on the other needles' values. Two more columns show the look-back that
makes this possible: from the space before each needle's value back to that needle's key, and from the answer's
space back to the restated key (the same offset on both sides, so one positional head can serve both).

    python reference/probe_multikey.py                       # the shipped model, 12 rows of 512 tokens
    python reference/probe_multikey.py --model_dir run/model --output probe.json

Prints the heads with any column above --show and writes every head's numbers as JSON.
"""

from __future__ import annotations

import argparse
import bisect
import re
from typing import Optional

import torch

from harness.reference_model import REFERENCE_MODEL_DIR
from harness.synthetic.tasks import build_row
from reference import write_report
from reference.train import asked_keys, encode_row

NEEDLE = re.compile(r"One special magic number for (\S+) is: (\d+)\.")
COLUMNS = ("asked_value", "other_value", "needle_to_own_key", "answer_to_restated_key")


def _token_spans(tokenizer, ids: list[int]):
    """A function mapping a character span of the decoded ids to the token indices that cover it."""
    starts, text = [], ""
    for token in ids:
        starts.append(len(text))
        text += tokenizer.decode([token])

    def span(begin: int, end: int) -> list[int]:
        return list(range(bisect.bisect_right(starts, begin) - 1, bisect.bisect_left(starts, end)))

    return text, starts, span


def probe(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """Mean attention `(layers, heads, 4)` over `rows`, in the order of COLUMNS (per needle for the other values)."""
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    totals = torch.zeros(layers, heads, len(COLUMNS))
    for row in rows:
        ids, n_context, answer_start = encode_row(row, tokenizer)
        with torch.no_grad():
            attentions = model(torch.tensor([ids]), output_attentions=True).attentions
        text, starts, span = _token_spans(tokenizer, ids)
        needles = [(m.group(1), span(*m.span(1)), span(*m.span(2))) for m in NEEDLE.finditer(text[: starts[n_context]])]
        (asked,) = asked_keys(row)
        if [key for key, _, _ in needles].count(asked) != 1:
            raise ValueError(f"row {row['question']!r}: expected one needle for {asked!r} in the context")
        tokens = tokenizer.convert_ids_to_tokens(ids)
        colon = next(i for i in range(answer_start, len(ids)) if tokens[i] == ":")
        query = colon + 1  # the space token that predicts the value's first digit
        restated = list(range(answer_start, colon - 1))  # the restated key, before " is" and ":"
        for layer, weights in enumerate(attentions):
            weights = weights[0].float()  # (heads, T, T)
            for key, key_span, value_span in needles:
                on_value = weights[:, query, value_span].sum(-1)
                if key == asked:
                    totals[layer, :, 0] += on_value
                else:
                    totals[layer, :, 1] += on_value / (len(needles) - 1)
                totals[layer, :, 2] += weights[:, value_span[0] - 1, key_span].sum(-1) / len(needles)
            totals[layer, :, 3] += weights[:, query, restated].sum(-1)
    return totals / max(len(rows), 1)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(REFERENCE_MODEL_DIR))
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--length", type=int, default=512, help="context tokens per row")
    parser.add_argument("--seed", default="probe", help="row seed prefix (any: these are not training seeds)")
    parser.add_argument("--show", type=float, default=0.1, help="print heads with a column above this")
    parser.add_argument("--output", default=None, help="JSON file for every head's numbers")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise SystemExit(f"--rows must be at least 1, got {args.rows}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="eager").eval()
    rows = [build_row("niah_multikey", args.length, tokenizer, row_seed=f"{args.seed}|{i}") for i in range(args.rows)]
    totals = probe(model, tokenizer, rows)
    print(f"{args.rows} niah_multikey rows of {args.length} tokens, {args.model_dir}")
    print("| head | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    heads = {}
    for layer in range(totals.shape[0]):
        for head in range(totals.shape[1]):
            values = [round(float(v), 3) for v in totals[layer, head]]
            heads[f"L{layer}H{head}"] = dict(zip(COLUMNS, values))
            if max(values) > args.show:
                print(f"| L{layer}H{head} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    result = {"model_dir": args.model_dir, "rows": args.rows, "length": args.length, "heads": heads}
    return write_report(args.output, result)


if __name__ == "__main__":
    main()
