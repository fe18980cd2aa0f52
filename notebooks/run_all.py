# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Execute every notebook of this folder (or the ones given) with nbclient and fail on any error.

Each notebook runs in a fresh kernel with its working directory set to `notebooks/`, under a wall-clock limit per
notebook (`--timeout`, seconds). The executed notebooks are not written back (the committed ones stay without
outputs). Prints one line per notebook and a final `N passed, M failed`; exits non-zero when any failed.

    python notebooks/run_all.py                       # all notebooks
    python notebooks/run_all.py notebooks/demo.ipynb --timeout 600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

HERE = Path(__file__).resolve().parent


def run_notebook(path: Path, timeout: float) -> tuple[bool, float, str]:
    """Execute `path` cell by cell; the cells share one deadline of `timeout` seconds. (ok, seconds, error)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=int(timeout), kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    start = time.perf_counter()
    try:
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                remaining = timeout - (time.perf_counter() - start)
                if remaining <= 0:
                    raise CellTimeoutError(f"the notebook ran past its {timeout:.0f} s limit (at cell {index})")
                client.timeout = max(1, int(remaining))
                client.execute_cell(cell, index)
    except CellTimeoutError as error:
        return False, time.perf_counter() - start, f"timeout: {str(error).splitlines()[0]}"
    except (CellExecutionError, DeadKernelError) as error:
        return False, time.perf_counter() - start, str(error)
    return True, time.perf_counter() - start, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every *.ipynb of notebooks/")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per notebook (default 300)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    if not paths:
        parser.error(f"no notebooks found in {HERE}")
    passed, failed = 0, 0
    for path in paths:
        ok, seconds, error = run_notebook(path.resolve(), args.timeout)
        if ok:
            passed += 1
            print(f"PASS {path.name} ({seconds:.1f} s)", flush=True)
        else:
            failed += 1
            print(f"FAIL {path.name} ({seconds:.1f} s)\n{error}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
