# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where a process stands in a data-parallel run (`accelerate launch`, torchrun): shared by the evaluation and
reasoning harnesses."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class ProcessGroup:
    """Where this process stands in a data-parallel run (`accelerate launch`): rank, size, and a barrier."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    barrier: Optional[Callable[[], None]] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.barrier is not None:
            self.barrier()

    @classmethod
    def from_environment(cls) -> "ProcessGroup":
        """One process, unless launched by `accelerate launch` / torchrun (WORLD_SIZE > 1).

        On GPUs, accelerate's PartialState sets up the process group (NCCL); without CUDA (where PartialState falls
        back to a single process) a gloo process group is used, so data-parallel runs also work on CPUs.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if torch.cuda.is_available():
            from accelerate import PartialState

            state = PartialState()
            return cls(state.process_index, state.num_processes, state.local_process_index, state.wait_for_everyone)
        import torch.distributed as distributed

        if not distributed.is_initialized():
            distributed.init_process_group("gloo")
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, world_size, local_rank, distributed.barrier)


def wait_until_complete(
    count_missing: Callable[[], int], total: int, poll_seconds: float = 2.0, report_seconds: float = 300.0
) -> None:
    """Return once `count_missing()` (the rows no process has saved yet) is 0, polling every `poll_seconds`.

    The main process of a data-parallel run waits this way for the other shards, not with a collective barrier: a
    barrier times out (NCCL's and gloo's default timeouts are minutes) while a slower shard is still generating, and
    then kills a run whose answers were all being saved. A worker that dies makes the launcher stop every process.
    """
    if poll_seconds <= 0 or report_seconds <= 0:
        raise ValueError(f"poll_seconds and report_seconds must be positive, got {poll_seconds} and {report_seconds}")
    last_report = time.monotonic()
    while True:
        missing = count_missing()
        if missing == 0:
            return
        if time.monotonic() - last_report > report_seconds:
            logger.info("Waiting for the other processes: %d of %d rows still unanswered.", missing, total)
            last_report = time.monotonic()
        time.sleep(poll_seconds)
