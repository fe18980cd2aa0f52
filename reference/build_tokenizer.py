# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the reference model's tokenizer: a small byte-level BPE trained with `tokenizers` on the synthetic tasks.

The one idea: train the vocabulary on text of the synthetic tasks themselves (https://arxiv.org/abs/2404.06654 for
the task family), so that every word, coded word and variable name of the tasks is one token, digits are always
single tokens (numbers are copied digit by digit) and any other text still encodes byte by byte.

    python reference/build_tokenizer.py --output_dir /tmp/tokenizer     # writes tokenizer.json and its config

The shipped reference/model/tokenizer.json was built by this script from an earlier revision of the list tasks in
tasks.py (same words and layout, other list sizing and Zipf draws). A rebuild today gives the same whole-word tokens
(every task word, coded word and variable name is one token) but a different set of sub-word merges, so keep the
shipped tokenizer files with the shipped weights; a model retrained from scratch can use a rebuilt tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from harness.synthetic.tasks import TASK_NAMES, build_row, essay_sentences
from harness.synthetic.words import ADJECTIVES, CODED_WORDS, NOUNS, VARIABLE_NAMES

logger = logging.getLogger("reference.build_tokenizer")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 65536


class _ApproximateTokenizer:
    """Counts words and punctuation: only used to size the corpus rows before the real tokenizer exists."""

    _pattern = re.compile(r"\w+|[^\w\s]")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * len(self._pattern.findall(text))


def corpus(rows_per_task: int = 120) -> list[str]:
    """Texts of every task at several lengths, the essay pool, and each key noun, coded word and variable name
    repeated often enough to become a token of its own."""
    texts = list(essay_sentences())
    for repeat in range(20):
        texts.append(" ".join(f"VAR {name} = VAR {name}." for name in VARIABLE_NAMES))
        texts.append(" ".join(CODED_WORDS))
        texts.append(" ".join(f"{ADJECTIVES[(i + repeat) % len(ADJECTIVES)]}-{noun}" for i, noun in enumerate(NOUNS)))
    counter = _ApproximateTokenizer()
    for task in TASK_NAMES:
        for i in range(rows_per_task):
            length = (128, 256, 512)[i % 3]
            row = build_row(task, length, counter, row_seed=f"tokenizer|{i}")
            texts.append(row["context"] + row["question"] + "\n" + row["answer_prefix"] + row["target"])
    return texts


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MODEL_MAX_LENGTH,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where to save (not reference/model: see above)")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = train_tokenizer(args.vocab_size)
    tokenizer.save_pretrained(args.output_dir)
    logger.info("saved a tokenizer of %d tokens to %s", len(tokenizer), args.output_dir)


if __name__ == "__main__":
    main()
