# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""FastKVzipPress: KVzip scores predicted by small learned gates (Fast KVzip, https://arxiv.org/abs/2601.17668).

The one idea: instead of reconstructing the context, a tiny per-layer gate reads the attention input of each token
during the prefill and predicts how important its KV entry is: the softmax weight of the token's own key against a
few learned "sink" keys, seen from learned queries. The lowest predicted scores are pruned head-wise, as in KVzip.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Generator, Optional

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from kvpress.headwise_masks import set_masks
from kvpress.presses.base_press import (
    BasePress,
    get_hook_inputs,
    layer_is_prefilling,
    refuse_nested_press,
)
from kvpress.presses.kvzip_press import compressed_attention_modules, headwise_masks
from kvpress.resources import text_config
from kvpress.utils import get_language_model, validate_compression_ratio
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

FASTKVZIP_REPO_ID = "Jang-Hyun/Fast-KVzip"
# Beyond this many context tokens the protected local window is `window_size` instead of `window_ratio * T`.
LONG_CONTEXT_TOKENS = 32000


def gate_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype, its name (`"bfloat16"`, `"torch.float16"`: `model.config.dtype` holds a name once a
    config went through `to_dict`/`save_pretrained`) or None (torch's default dtype)."""
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"FastKVzipGate dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16', 'float32').")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"FastKVzipGate dtype must be a torch.dtype or its name, got {type(dtype).__name__}.")
    return dtype


class FastKVzipGate(nn.Module):
    """The gate of one layer: `(B, T, input_dim)` attention inputs -> `(B, nhead, T)` importance scores in (0, 1].

    For token t and KV head h, with learned per-group queries `q_g = q_norm(W_q x_t)`, key `k = k_norm(W_k x_t)`,
    bias `b_g` and `sink` learned keys `s_j`: `score_g = 1 / (1 + sum_j exp(<s_j, q_g>/sqrt(d) - (<k, q_g>/sqrt(d)
    + b_g)))`, the softmax weight of the token's own logit against the sinks, averaged over the `ngroup` groups.
    """

    def __init__(
        self,
        index: int,
        input_dim: int,
        nhead: int,
        ngroup: int,
        dtype: torch.dtype | str | None,
        output_dim: int = 16,
        sink: int = 16,
    ):
        super().__init__()
        dtype = gate_dtype(dtype)
        self.index = index
        self.input_dim = input_dim
        self.nhead = nhead
        self.ngroup = ngroup
        self.output_dim = output_dim
        self.sink = sink
        self.q_proj = nn.Linear(input_dim, nhead * ngroup * output_dim, bias=True, dtype=dtype)
        self.k_proj = nn.Linear(input_dim, nhead * output_dim, bias=False, dtype=dtype)
        self.q_norm = Qwen3RMSNorm(output_dim)
        self.k_norm = Qwen3RMSNorm(output_dim)
        self.k_base = nn.Parameter(torch.zeros(nhead, 1, sink, output_dim))
        self.b = nn.Parameter(torch.zeros(nhead, 1, ngroup, dtype=dtype))
        self.d = math.sqrt(output_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, T, input_dim)` (or `(T, input_dim)`, one sequence) -> `(B, nhead, T)` scores, in float32."""
        if hidden_states.dim() == 2:
            hidden_states = hidden_states.unsqueeze(0)
        bsz, length, _ = hidden_states.shape
        hidden_states = hidden_states.to(self.q_proj.weight.dtype)
        queries = self.q_proj(hidden_states).view(bsz, length, self.nhead, self.ngroup, self.output_dim)
        keys = self.k_proj(hidden_states).view(bsz, length, self.nhead, 1, self.output_dim)
        queries = self.q_norm(queries).float()
        keys = self.k_norm(keys).float()
        # (B, T, nhead, ngroup): the token's own logit; (B, T, nhead, ngroup, sink): the sinks' logits
        own = (keys * queries).sum(dim=-1) / self.d + self.b.float().view(1, 1, self.nhead, self.ngroup)
        sinks = torch.einsum("hsc,bthgc->bthgs", self.k_base.float()[:, 0], queries) / self.d
        # 1 / (1 + sum_j exp(sink_j - own)) is the softmax weight of `own` among [own, sinks], computed stably
        score = torch.cat([own.unsqueeze(-1), sinks], dim=-1).softmax(dim=-1)[..., 0]
        return score.mean(dim=-1).transpose(1, 2)  # (B, nhead, T)

    def extra_repr(self) -> str:
        return (
            f"index={self.index}, input_dim={self.input_dim}, output_dim={self.output_dim}, nhead={self.nhead}, "
            f"ngroup={self.ngroup}, sink={self.sink}"
        )


def get_gate_id(model_name: str) -> str:
    """File of a model's gates in the Fast-KVzip Hub repo: `<model name lower-cased>/q<G>_dim16_sink16.pt`."""
    config = AutoConfig.from_pretrained(model_name)
    config = getattr(config, "text_config", None) or config
    ngroup = config.num_attention_heads // config.num_key_value_heads
    return f"{model_name.rstrip('/').split('/')[-1].lower()}/q{ngroup}_dim16_sink16.pt"


class UnsafePickleError(ValueError):
    """A gate file needs a full pickle load (which can run arbitrary code): kvpress never does one."""


def _gates_from_safetensors(path: str) -> dict:
    """A safetensors gate file: flat tensors named `module.<layer>.<parameter>` -> {"module": [state dict, ...]}."""
    from safetensors.torch import load_file

    layers: dict[int, dict] = {}
    for name, tensor in load_file(path, device="cpu").items():
        prefix, _, rest = name.partition(".")
        index, _, parameter = rest.partition(".")
        if prefix != "module" or not index.isdigit() or not parameter:
            raise ValueError(
                f"{path} is not a Fast-KVzip gate file: its tensors must be named module.<layer>.<parameter> "
                f"(e.g. module.0.q_proj.weight), found {name!r}."
            )
        layers.setdefault(int(index), {})[parameter] = tensor
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"{path}: the gate layers must be numbered 0..n-1, found {sorted(layers)}.")
    return {"module": [layers[index] for index in range(len(layers))]}


def _load_gate_file(path: str) -> list[dict]:
    """The per-layer state dicts of a gate file, never through a full pickle load: `.safetensors` files are read with
    safetensors, others with `torch.load(weights_only=True)` (tensors, dicts, lists and numbers only)."""
    if path.endswith(".safetensors"):
        checkpoint: object = _gates_from_safetensors(path)
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafePickleError(
                f"The Fast-KVzip gate file {path} cannot be loaded with torch.load(weights_only=True): it holds "
                f"objects other than tensors, dicts, lists and numbers ({str(error).splitlines()[-1]}). Reading it "
                "would need a full pickle load, which runs whatever code the file names, and kvpress never does one. "
                "If you trust the file's source, convert it once in your own session (load it with torch.load and "
                "weights_only turned off, then torch.save only {'module': [state dict of each layer]}), or save the "
                "gates as safetensors (tensors named module.<layer>.<parameter>), and pass that file as gates_path."
            ) from error
    if not isinstance(checkpoint, dict) or "module" not in checkpoint:
        raise ValueError(f"{path} is not a Fast-KVzip gate file: expected a dict with a 'module' list of state dicts.")
    return list(checkpoint["module"])


def get_gate_weight(model_name: str, repo_or_path: str = FASTKVZIP_REPO_ID) -> tuple[list[dict], str]:
    """Per-layer gate state dicts and the gate id. `repo_or_path` is a Hub repo laid out like
    `Jang-Hyun/Fast-KVzip`, a local directory with the same layout, or a local `.pt` or `.safetensors` file.
    Files are never unpickled in full, whatever their source."""
    if os.path.isfile(repo_or_path):
        return _load_gate_file(repo_or_path), os.path.basename(repo_or_path)
    gate_id = get_gate_id(model_name)
    if os.path.isdir(repo_or_path):
        path = os.path.join(repo_or_path, *gate_id.split("/"))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No Fast-KVzip gates for {model_name!r} in {repo_or_path!r}: expected {path}.")
        return _load_gate_file(path), gate_id
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id=repo_or_path, filename=gate_id)
    return _load_gate_file(path), gate_id


def load_fastkvzip(
    model_name: str = "Qwen/Qwen3-8B",
    device: str | torch.device = "cuda",
    gates_path: Optional[str] = None,
) -> list[FastKVzipGate]:
    """Build one gate per layer from the trained weights (Hub by default; `gates_path`: a local file/directory)."""
    state_dicts, gate_id = get_gate_weight(model_name, gates_path or FASTKVZIP_REPO_ID)
    if len(state_dicts) == 0:
        raise ValueError(f"The Fast-KVzip gate file {gate_id} holds no layer.")
    first = state_dicts[0]
    dtype = first["q_proj.weight"].dtype
    head_group_dim, input_dim = first["q_proj.weight"].shape
    head_dim = first["k_proj.weight"].shape[0]
    output_dim = first["q_norm.weight"].shape[-1]
    nhead = head_dim // output_dim
    ngroup = head_group_dim // head_dim
    sink = first["k_base"].shape[2]
    gates = []
    for index, state_dict in enumerate(state_dicts):
        gate = FastKVzipGate(index, input_dim, nhead, ngroup, dtype, output_dim=output_dim, sink=sink)
        gate.load_state_dict(state_dict)
        gates.append(gate.to(device))
    logger.info("Loaded Fast-KVzip gates %s (%d layers, %r)", gate_id, len(gates), gates[0])
    return gates


@dataclass
class FastKVzipPress(BasePress):
    """Predict KVzip scores with per-layer gates during the prefill; mask the lowest ones head-wise at exit.

    Parameters
    ----------
    compression_ratio: fraction of the context's KV entries (all layers and heads together) that is pruned.
    layerwise: every layer prunes the same fraction (default False: the lowest scores of all layers are pruned).
    n_sink: the first `n_sink` tokens are always kept.
    window_size: the last `window_size` tokens are always kept when the context has 32000 tokens or more.
    window_ratio: below that, the last `int(T * window_ratio)` tokens are always kept (none when that is 0).
    gates_path: where the trained gates are: None (default) for the Hub repo `Jang-Hyun/Fast-KVzip`, or a local
        `.pt` or `.safetensors` file, a local directory laid out like that repo, or another Hub repo id.
    Gate files are read with safetensors (`.safetensors`) or `torch.load(weights_only=True)` (tensors, dicts, lists,
    numbers), whatever their source, the default Hub repo included: a file that would need a full pickle load is
    refused with `UnsafePickleError`, which says how to convert a trusted file once.

    The masks are set when the `with press(model):` block exits normally; the cache keeps its length and the
    patched attention neutralises the masked entries (`module.masked_key_indices`).
    """

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4
    window_size: int = 4096
    window_ratio: float = 0.02
    gates_path: Optional[str] = None
    gates: Optional[list[FastKVzipGate]] = field(default=None, init=False, repr=False, compare=False)
    score_val: Optional[list[Optional[torch.Tensor]]] = field(default=None, init=False, repr=False, compare=False)

    # Scores in one pass and masks at exit, head by head: it cannot be chained.
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    def __post_init__(self):
        validate_compression_ratio(self.compression_ratio)
        for name in ("n_sink", "window_size"):
            validate_int(self, name, getattr(self, name), 0, bound="a non-negative integer")
        ratio = self.window_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(
                f"{type(self).__name__}.window_ratio must be a number in [0, 1], got {ratio!r}: the fraction of the "
                "context, at its end, that is always kept."
            )

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        """Load the gates of this model once (from `gates_path`, else the Hub), and check they fit it."""
        if self.gates is None:
            name = str(getattr(model.config, "name_or_path", "") or "")
            try:
                self.gates = load_fastkvzip(
                    model_name=name,
                    device=model.device,
                    gates_path=self.gates_path,
                )
            except UnsafePickleError:
                raise  # the gates exist: the error says how to load them
            except Exception as error:
                where = self.gates_path or f"the Hub repo {FASTKVZIP_REPO_ID}"
                raise RuntimeError(
                    f"The gates for the given model are not released! Could not load Fast-KVzip gates for "
                    f"{name or 'this model'} from {where} ({type(error).__name__}: {error}). Trained gates are "
                    f"published for some models in {FASTKVZIP_REPO_ID}; pass gates_path=<local .pt/.safetensors file "
                    "or directory> to use your own."
                ) from error
        config = text_config(model)
        expected = (
            len(get_language_model(model).layers),
            config.hidden_size,
            config.num_key_value_heads,
            config.num_attention_heads // config.num_key_value_heads,
        )
        gate = self.gates[0]
        found = (len(self.gates), gate.input_dim, gate.nhead, gate.ngroup)
        if found != expected:
            raise ValueError(
                "The Fast-KVzip gates do not fit this model: (layers, hidden size, KV heads, group size) = "
                f"{found} for the gates, {expected} for the model. Set press.gates = None to load the right ones."
            )

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        """Score during the prefill inside the block; mask the lowest scores when the block exits normally."""
        refuse_nested_press(self, model)  # before touching the scores of a block that may still be open
        self.score_val = [None] * len(get_language_model(model).layers)
        with BasePress.__call__(self, model):
            yield
            self.compress_post(model)

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        """Score the prefill's tokens with this layer's gate; the cache itself is untouched."""
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        if cache is not None and layer_is_prefilling(module, cache, hidden_states.shape[1]):
            self._score_fast(module, hidden_states)
        return output

    def _score_fast(self, module: nn.Module, hidden_states: torch.Tensor) -> None:
        layer_idx = int(module.layer_idx)
        gate = self.gates[layer_idx].to(hidden_states.device)
        with torch.no_grad():
            scores = gate(hidden_states)
        scores[..., : self.n_sink] = 1.0
        length = scores.shape[-1]
        window = int(length * self.window_ratio) if length < LONG_CONTEXT_TOKENS else self.window_size
        if window > 0:  # `-0:` would select the whole sequence
            scores[..., -window:] = 1.0
        self.score_val[layer_idx] = scores

    def compress_post(self, model: PreTrainedModel) -> None:
        """Mask the lowest scores over the compressed layers (Gemma3's sliding-window layers take no part)."""
        if self.score_val is None:
            return
        scored = [
            module
            for module in compressed_attention_modules(model)
            if self.score_val[int(module.layer_idx)] is not None
        ]
        if not scored:
            logger.debug("FastKVzipPress: no prefill ran inside the block, nothing to compress")
            return
        if self.compression_ratio <= 0:
            return
        scores = torch.stack([self.score_val[int(module.layer_idx)] for module in scored])
        for module, mask in zip(scored, headwise_masks(scores, self.compression_ratio, self.layerwise)):
            set_masks(module, mask)
