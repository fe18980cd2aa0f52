# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The head-wise mask module (`kvpress.headwise_masks`): set, add, merge, remap and clear, and that no other code
sets the attribute by name."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kvpress
from kvpress.headwise_masks import (
    MASK_ATTRIBUTE,
    add_masks,
    clear_masks,
    get_masks,
    masks_as_bool,
    masks_inside,
    merge_masks,
    remap_masks,
    set_masks,
    set_masks_from_bool,
)


def _idx(*rows):
    return tuple(torch.tensor(r) for r in zip(*rows)) if rows else None


def _entries(module) -> set:
    masks = get_masks(module)
    return set() if masks is None else set(zip(*(i.tolist() for i in masks)))


def test_set_get_clear_and_bad_input():
    module = SimpleNamespace()
    assert get_masks(module) is None
    set_masks(module, _idx((0, 1, 2), (1, 0, 3)))
    assert _entries(module) == {(0, 1, 2), (1, 0, 3)}
    clear_masks(module)
    assert get_masks(module) is None and getattr(module, MASK_ATTRIBUTE) is None
    with pytest.raises(TypeError, match="tuple"):
        set_masks(module, [torch.tensor([0])] * 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one length"):
        set_masks(module, (torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0])))


def test_from_bool_and_back():
    module = SimpleNamespace()
    pruned = torch.zeros(2, 2, 5, dtype=torch.bool)
    set_masks_from_bool(module, pruned)
    assert get_masks(module) is None  # nothing pruned: no masks
    set_masks_from_bool(module, pruned, empty_as_none=False)
    assert get_masks(module) is not None and get_masks(module)[0].numel() == 0
    pruned[1, 0, 4] = pruned[0, 1, 0] = True
    set_masks_from_bool(module, pruned)
    assert _entries(module) == {(1, 0, 4), (0, 1, 0)}
    assert torch.equal(masks_as_bool(module, (2, 2, 5)), pruned)
    assert masks_as_bool(module, (2, 2, 4)).sum() == 1  # entries beyond the length are left out
    with pytest.raises(ValueError, match="boolean"):
        set_masks_from_bool(module, pruned.float())


def test_add_appends_and_merge_takes_the_union_once():
    module = SimpleNamespace()
    add_masks(module, *_idx((0, 0, 1)))
    add_masks(module, *_idx((0, 1, 2), (0, 0, 1)))
    assert get_masks(module)[0].numel() == 3  # add keeps repeats (DMS counts them itself)
    previous = _idx((0, 0, 1), (1, 1, 1))
    set_masks(module, _idx((0, 0, 1), (0, 1, 3)))
    merge_masks(module, previous)
    assert get_masks(module)[0].numel() == 3 and _entries(module) == {(0, 0, 1), (1, 1, 1), (0, 1, 3)}
    clear_masks(module)
    merge_masks(module, previous)
    assert get_masks(module) is previous


def test_remap_follows_the_kept_tokens():
    module = SimpleNamespace()
    set_masks(module, _idx((0, 0, 1), (0, 1, 4), (0, 1, 2), (0, 0, 9)))
    kept = torch.tensor([[[0, 1, 3], [2, 4, 5]]])  # (1, 2, 3) of a cache of 6
    remap_masks(module, kept, 6)
    assert _entries(module) == {(0, 0, 1), (0, 1, 1), (0, 1, 0)}  # position 9 was outside: dropped
    remap_masks(module, torch.tensor([[[0], [5]]]), 6)
    assert get_masks(module) is None  # every masked entry was removed
    set_masks(module, _idx((0, 0, 4)))
    assert masks_inside(module, 4)[0].numel() == 0


def test_no_module_sets_the_attribute_by_name():
    """The module is the single place that writes head-wise masks."""
    root = Path(kvpress.__file__).parent
    pattern = re.compile(r"setattr\([^)]*[\"']masked_key_indices[\"']|\.masked_key_indices\s*=")
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "headwise_masks.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
