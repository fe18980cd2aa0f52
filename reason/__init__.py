# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The reasoning benchmark of the "Hold Onto That Thought" fork: KV-cache budgets on long reasoning traces."""
