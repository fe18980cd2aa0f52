# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
# PLACEHOLDER: to be implemented.
from dataclasses import dataclass

from kvpress.presses.base_press import BasePress


@dataclass
class AdaKVPress(BasePress):
    pass
