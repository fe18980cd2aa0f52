# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic long-context tasks (RULER-style, https://arxiv.org/abs/2404.06654), generated offline from a seed.

The one idea: rows are built locally from word lists and a seed, so the tasks need no download (`tasks.py`, with
the word lists of `words.py`); `scoring.py` scores an answer by string matching.
"""
