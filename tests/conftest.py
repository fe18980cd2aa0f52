# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
import os

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # One thread per xdist worker: the workers already use every core, more threads only fight over them.
    torch.set_num_threads(1)


def _hook_origin(hook) -> str:
    func = getattr(hook, "__func__", getattr(hook, "func", hook))
    return getattr(func, "__module__", "") or ""


def pytest_runtest_teardown(item, nextitem):
    """The shared tiny models must leave every test as they came: no press hook left behind."""
    from tests.fixtures import BUILT_MODELS

    leftovers = []
    for model in BUILT_MODELS:
        for name, module in model.named_modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key, hook in list(hooks.items()):
                    if _hook_origin(hook).startswith(("kvpress", "tests")):
                        leftovers.append(f"{type(model).__name__}.{name}: {_hook_origin(hook)}")
                        del hooks[key]
    assert not leftovers, f"{item.nodeid} left press hooks on shared models: {leftovers[:4]}"
