# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic long-context tasks (RULER-style, https://arxiv.org/abs/2404.06654), generated offline from a seed.

The one idea: rows are built locally from word lists and a seed, so the tasks need no download. The generators live in
`harness.synthetic` (shared with `reference/`); this folder holds the benchmark's metric (`calculate_metrics.py`)
and the dataset command line (`create_dataset.py`).
"""
