# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Run a harness script as `__main__`, SIGKILLing one rank right after it saved its N-th answer (a test hook).

    python -m torch.distributed.run --nproc_per_node 2 tests/harness/kill_launcher.py evaluation/evaluate.py ...

`KILL_RANK` (the rank to kill) and `KILL_AFTER` (how many saved answers it writes first) choose the kill; without
them the script runs unchanged. The answers are counted where both harnesses write them to disk
(`harness.results.PartialResults.append`, `reason.records.PredictionLog.append`), so the kill lands between two
saved answers, as a crash after a write would. The repository must be on PYTHONPATH (tests/harness/torchrun.py sets it).
"""

import os
import runpy
import signal
import sys


def kill_after(owner, name: str, count: int) -> None:
    original = getattr(owner, name)
    calls = [0]

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= count:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, counted)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: kill_launcher.py SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    kill_rank = os.environ.get("KILL_RANK")
    if kill_rank is not None and os.environ.get("RANK", "0") == kill_rank:
        count = int(os.environ.get("KILL_AFTER", "1"))
        from harness.results import PartialResults
        from reason.records import PredictionLog

        kill_after(PartialResults, "append", count)
        kill_after(PredictionLog, "append", count)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
