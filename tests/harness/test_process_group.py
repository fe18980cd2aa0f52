# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""harness/process_group.py: one process outside a launcher, and the main process's wait for the other shards."""

import pytest

from harness.process_group import ProcessGroup, wait_until_complete


def test_one_process_outside_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = ProcessGroup.from_environment()
    assert (group.rank, group.world_size, group.is_main, group.barrier) == (0, 1, True, None)
    group.wait()  # no barrier, no error


def test_waits_until_no_row_is_missing():
    remaining = [3, 2, 2, 0, 5]  # polled in order; the wait ends at the first 0
    calls = []

    def count_missing():
        calls.append(None)
        return remaining[len(calls) - 1]

    wait_until_complete(count_missing, total=3, poll_seconds=0.001)
    assert len(calls) == 4


@pytest.mark.parametrize("poll, report", [(0, 1), (1, -1)])
def test_bad_intervals_are_refused(poll, report):
    with pytest.raises(ValueError, match="must be positive"):
        wait_until_complete(lambda: 0, total=1, poll_seconds=poll, report_seconds=report)
