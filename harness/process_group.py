# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where a process stands in a data-parallel run (`accelerate launch`, torchrun): shared by the evaluation and
reasoning harnesses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch


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
