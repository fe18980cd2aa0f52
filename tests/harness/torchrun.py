# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Launch a harness script as a real two-process data-parallel run on CPU (torchrun, gloo), for the tests."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("kill_launcher.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(
    script: str, args: list[str], nproc: int = 2, kill_rank: Optional[int] = None, kill_after: int = 1, timeout=180
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node nproc kill_launcher.py script args` (nproc 1: no torchrun,
    a plain process), on CPU, offline, one thread per process. `kill_rank` SIGKILLs that rank after `kill_after`
    saved answers. The run gets its own TMPDIR (torchrun's log folders), removed afterwards."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name in ("KILL_RANK", "KILL_AFTER", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if kill_rank is not None:
        env.update(KILL_RANK=str(kill_rank), KILL_AFTER=str(kill_after))
    if nproc == 1:
        command = [sys.executable, str(LAUNCHER), script, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(LAUNCHER), script, *args]
    with tempfile.TemporaryDirectory(prefix="kvpress-torchrun-") as scratch:
        env["TMPDIR"] = scratch
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
