# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
import os

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without an NVIDIA device, Triton kernels (the "triton" ragged backend) run under Triton's interpreter, which must be
# chosen before anything imports Triton (torch's compiler does); with one, they compile for the GPU.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # One thread per xdist worker: the workers already use every core, more threads only fight over them.
    torch.set_num_threads(1)


def pytest_runtest_teardown(item, nextitem):
    """The shared tiny models must leave every test as they came: no press hook left behind."""
    from tests.fixtures import BUILT_MODELS, is_press_hook

    leftovers = []
    for model in BUILT_MODELS:
        for name, module in model.named_modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key, hook in list(hooks.items()):
                    if is_press_hook(hook):
                        leftovers.append(f"{type(model).__name__}.{name}")
                        del hooks[key]
    assert not leftovers, f"{item.nodeid} left press hooks on shared models: {leftovers[:4]}"
