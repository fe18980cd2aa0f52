# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The README's install section says what `make install` runs: the same torch pin and the same editable install
(with the `eval` extra and the `dev` group), so a user who copies the README gets the environment CI tests."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def makefile_commands() -> tuple[str, str]:
    text = (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH \?= (\S+)$", text, re.M).group(1)
    install = re.search(r"^\t\$\(PYTHON\) -m pip install --quiet (-e .*?) \$\(if", text, re.M).group(1)
    return torch, install


def readme_install_section() -> str:
    return (ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]


def test_the_readme_install_line_is_the_makefiles():
    torch, install = makefile_commands()
    section = readme_install_section()
    said = re.search(
        r"which runs `python3 -m venv \.venv`, `pip install \"([^\"]+)\"` and `pip install ([^`]+)`", section
    )
    assert said, "the README no longer says what make install runs"
    assert said.group(1) == torch
    assert shlex.split(said.group(2)) == shlex.split(install) == ["-e", ".[eval]", "--group", "dev"]


def test_the_readme_never_shows_the_install_without_the_extra():
    # the old line, `pip install -e . --group dev`, installed no evaluation dependencies
    assert "pip install -e . --group dev" not in (ROOT / "README.md").read_text()
