# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The benchmark's needle mode (`python -m kvpress.benchmark --needle`) on CPU with the shipped 1k reference model:
where the needle sits (recounted from the text), the table and JSON, both question modes, resume after a kill, the
model aliases and the error for the absent 32k checkpoint."""

from __future__ import annotations

import bisect
import json
import re

import pytest

import kvpress.pipeline
from harness import reference_model
from harness.reference_model import REFERENCE_MODEL_DIR
from harness.synthetic.tasks import load_reference_tokenizer, needle_sweep_rows
from kvpress import benchmark
from kvpress.benchmark import format_needle_table, main, needle_key, resolve_model
from kvpress.resources import weights_digest

NEEDLE = re.compile(r"One special magic number for [a-z]+-[a-z]+ is: \d{7}\.")


@pytest.fixture(scope="module")
def tokenizer():
    return load_reference_tokenizer()


def needle_argv(tmp_path, *extra, lengths="512", depths="0.05,0.95", samples="2", presses="none"):
    return [
        "--model",
        "reference",
        "--needle",
        "--context_lengths",
        lengths,
        "--needle_depths",
        depths,
        "--needle_samples",
        samples,
        "--presses",
        presses,
        "--output_dir",
        str(tmp_path),
        *extra,
    ]


class CountingPipeline:
    """Wraps the real pipeline's __call__: counts the calls, records (context, question), and raises
    KeyboardInterrupt at call number `kill_at` (a run killed in the middle of a cell)."""

    def __init__(self, monkeypatch, kill_at=None):
        self.calls, self.seen, self.kill_at = 0, [], kill_at
        original = kvpress.pipeline.KVPressTextGenerationPipeline.__call__
        counter = self

        def call(pipe, inputs=None, *args, **kwargs):
            counter.calls += 1
            if counter.kill_at is not None and counter.calls == counter.kill_at:
                raise KeyboardInterrupt
            counter.seen.append((inputs, kwargs.get("question")))
            return original(pipe, inputs, *args, **kwargs)

        monkeypatch.setattr(kvpress.pipeline.KVPressTextGenerationPipeline, "__call__", call)


# --- where the needle sits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [512, 1024, 8192, 32768])
def test_the_needle_sits_at_the_sentence_boundary_nearest_its_depth(tokenizer, length):
    """The sweep fills the context to the requested length with the reference tokenizer (32k included) and puts the
    needle at the sentence boundary whose token count (recounted on the haystack without the needle, by the
    tokenizer's own offsets) is nearest to depth x haystack tokens."""
    depths = (0.05, 0.5, 0.95)
    rows = needle_sweep_rows([length], depths=depths, num_samples=2, tokenizer=tokenizer)
    assert [row["depth"] for row in rows] == [d for d in depths for _ in range(2)]
    for row in rows:
        tokens = len(tokenizer.encode(row["context"], add_special_tokens=False))
        assert length - 24 <= tokens <= length
        intro, haystack = row["context"].split("\n", 1)
        haystack = haystack.rstrip("\n")
        (needle,) = NEEDLE.finditer(haystack)
        assert row["answer"] == [needle.group(0).rsplit(" ", 1)[1].rstrip(".")]
        # the haystack without the needle (and the space that joined it), and where the needle was
        if needle.start() == 0:
            without, at = haystack[needle.end() + 1 :], 0
        else:
            without, at = haystack[: needle.start() - 1] + haystack[needle.end() :], needle.start() - 1
        starts = [
            start
            for start, _ in tokenizer(without, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ]
        total = len(starts)
        # sentence boundaries: before the first sentence, after each ". "
        boundaries = [0] + [m.end() - 1 for m in re.finditer(r"\. ", without)] + [len(without)]
        counts = [bisect.bisect_left(starts, position) for position in boundaries]
        before = bisect.bisect_left(starts, at)
        assert before in counts  # between two sentences, never inside one
        goal = row["depth"] * total
        nearest = min(abs(count - goal) for count in counts)
        assert abs(before - goal) <= nearest + 1  # the nearest boundary (a token's slack for a tie)
        longest_sentence = max(b - a for a, b in zip(counts, counts[1:]))
        assert abs(before - goal) <= longest_sentence / 2 + 1


# --- the table, both modes, the no-press accuracy -------------------------------------------------------------------


def test_needle_table_rows_and_json_in_both_modes(tmp_path, capsys, monkeypatch):
    """One row per (press, mode, length, depth), a table per mode with a column per (length, depth) and the mean, the
    same rows in needle.json. The 1k model finds every needle at 1024 tokens with the full cache (measured: 30 of 30
    with 10 samples per depth, both modes); StreamingLLM keeping the last half loses the needle at 5% depth. In
    question-aware mode the question is part of the compressed context."""
    pipeline = CountingPipeline(monkeypatch)
    argv = needle_argv(
        tmp_path,
        "--needle_modes",
        "agnostic,aware",
        lengths="512,1024",
        depths="0.05,0.5,0.95",
        presses="none,streaming_llm:0.5",
    )
    rows = main(argv)
    assert pipeline.calls == 2 * 2 * 2 * 3 * 2  # presses x modes x lengths x depths x samples
    keys = [(r["press"], r["mode"], r["context_length"], r["depth"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24
    assert all(r["samples"] == 2 and r["dtype"] == "float32" and r["model"] == "reference" for r in rows)
    accuracy = dict(zip(keys, (r["accuracy"] for r in rows)))
    for mode in ("agnostic", "aware"):
        for depth in (0.05, 0.5, 0.95):
            assert accuracy[("none", mode, 1024, depth)] == 100.0
        assert accuracy[("streaming_llm:0.5", mode, 1024, 0.05)] == 0.0

    # question-aware: the question ends the context and nothing is asked after it
    questions = {question for _, question in pipeline.seen}
    assert "" in questions and any(q and q.startswith("What is the special magic number") for q in questions)
    for context, question in pipeline.seen:
        if question == "":
            assert context.rstrip().endswith("mentioned in the text above?")

    text = (tmp_path / "needle.txt").read_text()
    assert text == capsys.readouterr().out
    agnostic, aware = text.split("\n\n")
    for block, title in ((agnostic, "question-agnostic"), (aware, "question-aware")):
        lines = block.strip().splitlines()
        header = lines[-4]
        assert header.startswith(f"press ({title}) | 512 @ 5% | 512 @ 50% | 512 @ 95% | 1024 @ 5%")
        assert header.endswith("1024 @ 95% | mean") and header.count("|") == 7
        assert [line.split(" | ")[0] for line in lines[-2:]] == ["none", "streaming_llm:0.5"]
        assert all(line.count("|") == 7 for line in lines[-2:])
    summary = json.loads((tmp_path / "needle.json").read_text())
    assert summary["rows"] == rows and summary["modes"] == ["agnostic", "aware"]
    assert summary["context_lengths"] == [512, 1024] and summary["depths"] == [0.05, 0.5, 0.95]
    assert summary["model_path"] == str(REFERENCE_MODEL_DIR)


def test_table_marks_missing_and_out_of_memory_cells():
    rows = [
        {"press": "none", "mode": "agnostic", "context_length": 8192, "depth": 0.5, "accuracy": 80.0},
        {"press": "none", "mode": "agnostic", "context_length": 32768, "depth": 0.5, "accuracy": 40.0},
        {"press": "knorm:0.5", "mode": "agnostic", "context_length": 8192, "depth": 0.5, "accuracy": None},
    ]
    lines = format_needle_table(rows).splitlines()
    assert lines[0] == "press (question-agnostic) | 8192 @ 50% | 32768 @ 50% | mean"
    assert lines[2] == "none | 80 | 40 | 60.0"
    assert lines[3] == "knorm:0.5 | oom | - | -"


# --- resume ---------------------------------------------------------------------------------------------------------


def test_a_killed_run_resumes_without_duplicate_rows(tmp_path, monkeypatch):
    """Killed in its second cell (and mid-write: a line cut short), a rerun with one more press measures only the
    cells not in needle.jsonl, drops the cut line, and leaves one parseable row per cell; a third run measures
    nothing and returns the same rows."""
    killed = CountingPipeline(monkeypatch, kill_at=3)  # cell 1 = calls 1-2, killed in cell 2
    with pytest.raises(KeyboardInterrupt):
        main(needle_argv(tmp_path))
    results = tmp_path / "needle.jsonl"
    assert len(results.read_text().splitlines()) == 1
    with results.open("a") as handle:
        handle.write('{"model": "reference", "press": "no')  # a row cut short by the kill
    monkeypatch.undo()

    resumed = CountingPipeline(monkeypatch)
    rows = main(needle_argv(tmp_path, presses="none,knorm:0.5"))
    assert resumed.calls == (4 - 1) * 2  # 2 presses x 2 depths, one cell done, 2 samples a cell
    lines = results.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert len(parsed) == 4 and len({needle_key(row) for row in parsed}) == 4
    assert sorted(map(needle_key, parsed)) == sorted(map(needle_key, rows))
    monkeypatch.undo()

    again = CountingPipeline(monkeypatch)
    assert main(needle_argv(tmp_path, presses="none,knorm:0.5")) == rows
    assert again.calls == 0
    # more samples per cell is a different measurement: measured again, beside the old rows
    more = main(needle_argv(tmp_path, samples="3"))
    assert again.calls == 2 * 3 and all(row["samples"] == 3 for row in more)
    assert len(results.read_text().splitlines()) == 6
    del killed


def test_cells_of_another_checkpoint_are_measured_again(tmp_path, monkeypatch):
    """The rows carry the weights' digest: the same alias on retrained weights does not resume the old cells."""
    first = main(needle_argv(tmp_path, depths="0.5", samples="1"))
    assert first[0]["model_sha256"] == weights_digest(REFERENCE_MODEL_DIR) and len(first[0]["model_sha256"]) == 16
    summary = json.loads((tmp_path / "needle.json").read_text())
    assert summary["model_sha256"] == first[0]["model_sha256"]
    assert summary["float32_kv_heads_repeated"] is False  # CUDA only: SDPA's float32 kernels differ there
    monkeypatch.setattr(benchmark, "weights_digest", lambda path: "0123456789abcdef")  # "retrained"
    counted = CountingPipeline(monkeypatch)
    again = main(needle_argv(tmp_path, depths="0.5", samples="1"))
    assert counted.calls == 1 and again[0]["model_sha256"] == "0123456789abcdef"
    assert len((tmp_path / "needle.jsonl").read_text().splitlines()) == 2


# --- model aliases and errors ---------------------------------------------------------------------------------------


def test_model_aliases(tmp_path, monkeypatch):
    assert resolve_model("reference") == str(REFERENCE_MODEL_DIR)
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    installed = tmp_path / "model-32k"
    installed.mkdir()
    (installed / "config.json").write_text("{}")
    monkeypatch.setattr(reference_model, "REFERENCE_MODEL_32K_DIR", installed)
    assert resolve_model("reference-32k") == str(installed)


def test_absent_32k_checkpoint_is_a_one_line_error_saying_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference_model, "REFERENCE_MODEL_32K_DIR", tmp_path / "model-32k")
    with pytest.raises(FileNotFoundError, match="model-32k"):
        resolve_model("reference-32k")
    with pytest.raises(SystemExit):
        main(["--model", "reference-32k", "--needle", "--context_lengths", "8192", "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not in" in error and str(tmp_path / "model-32k") in error
    assert "python reference/train.py --recipe long32k --output_dir RUN" in error and "--export_to" in error
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--needle_modes", "aware,both"], "--needle_modes: unknown ['both']"),
        (["--needle_modes", ","], "--needle_modes"),
        (["--needle_depths", "0.5,1.5"], "fractions between 0 and 1"),
        (["--needle_depths", "half"], "comma-separated fractions"),
        (["--needle_samples", "0"], "--needle_samples must be positive"),
    ],
)
def test_bad_needle_flags(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        main(needle_argv(tmp_path / "o", *extra))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_weights_digest_reads_every_safetensors_file(tmp_path):
    assert weights_digest(tmp_path) is None and weights_digest("some-org/some-model") is None
    (tmp_path / "model-00002.safetensors").write_bytes(b"b")
    one = weights_digest(tmp_path)
    (tmp_path / "model-00001.safetensors").write_bytes(b"a")
    two = weights_digest(tmp_path)
    assert one != two and len(two) == 16
    (tmp_path / "model-00001.safetensors").write_bytes(b"c")
    assert weights_digest(tmp_path) != two
