# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVzap training (https://arxiv.org/abs/2601.07891): collect KVzip+ targets (`data.py`), train the per-layer
surrogates that `kvpress.presses.kvzap_press.KVzapPress` loads (`train.py`), and evaluate them (`evaluate_aime.py`,
`compare_reference.py`). See kvzap/README.md."""
