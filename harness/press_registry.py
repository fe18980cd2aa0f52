# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Presses by name: `PRESS_REGISTRY[name]` builds a fresh press (None for `no_press`).

The one idea: every press name upstream's `evaluation/evaluate_registry.py` knows is here as a recipe (`PressSpec`),
and nothing is imported until a name is used. Upstream keeps one shared, mutated instance per name; here each lookup
builds a new press, and a press whose module does not exist in this version fails with a clear error only when it is
asked for. Shared by every harness and by `python -m kvpress.benchmark`; `evaluation/evaluate_registry.py`
re-exports it under upstream's import path.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional


class UnknownNameError(KeyError, ValueError):
    """An unknown registry key. A KeyError (mapping semantics) and a ValueError (bad user input) at once."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotAvailableError(ValueError):
    """A registry key whose code does not exist in this version (built by a later change)."""


class PressNotAvailableError(NotAvailableError):
    """A registry key whose press (or one of its inner presses) does not exist in this version."""


@dataclass(frozen=True)
class PressSpec:
    """How to build a press, without importing it: `cls` from `kvpress.presses.<module>` called with `args`/`kwargs`.

    Arguments that are themselves PressSpecs (or lists of them) are built first.
    """

    module: str
    cls: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def import_path(self) -> str:
        return f"kvpress.presses.{self.module}.{self.cls}"

    def nested(self) -> list["PressSpec"]:
        """This spec and every spec inside its arguments, depth first."""
        specs = [self]
        for value in list(self.args) + list(self.kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, PressSpec):
                    specs.extend(item.nested())
        return specs

    def missing(self) -> list[str]:
        """Import paths of the press classes (this one and inner ones) that do not exist in this version."""
        return [spec.import_path for spec in self.nested() if _load_class(spec) is None]

    def build(self):
        press_class = _load_class(self)
        if press_class is None:
            raise PressNotAvailableError(f"{self.import_path} does not exist in this version")
        args = [_build_value(value) for value in self.args]
        kwargs = {name: _build_value(value) for name, value in self.kwargs.items()}
        return press_class(*args, **kwargs)

    def with_cache_budget(self, budget: int) -> "PressSpec":
        """This recipe with `cache_budget=budget` given to the press, or, for a composition (a list of presses), to
        each inner press that takes one. A wrapper (a press given as `press=` / `base_press=`) applies a ratio and
        refuses a budget press, so it raises, as does a press without a `cache_budget` field."""
        press_class = _load_class(self)
        if press_class is None:
            raise PressNotAvailableError(f"{self.import_path} does not exist in this version")
        if "cache_budget" in getattr(press_class, "__dataclass_fields__", {}):
            return PressSpec(self.module, self.cls, self.args, {**self.kwargs, "cache_budget": budget})
        lists = [value for value in self.args if isinstance(value, list)]
        if lists:
            args = tuple(
                [_budget_if_possible(item, budget) for item in value] if isinstance(value, list) else value
                for value in self.args
            )
            rebuilt = PressSpec(self.module, self.cls, args, dict(self.kwargs))
            if rebuilt != self:
                return rebuilt
        raise ValueError(
            f"{self!r} takes no cache_budget: a budget is a field of score-based presses (KnormPress, SnapKVPress, "
            "H2OPress, RKVPress, ...), alone or inside a ComposedPress; wrappers that apply a compression ratio "
            "(AdaKV, DecodingPress, Chunk, ...) refuse a press with a budget."
        )

    def __repr__(self) -> str:
        arguments = [_repr_value(value) for value in self.args]
        arguments += [f"{name}={_repr_value(value)}" for name, value in self.kwargs.items()]
        return f"{self.cls}({', '.join(arguments)})"


@dataclass(frozen=True)
class Deferred:
    """An argument computed when the press is built (not when the registry is imported), e.g. texts to score on."""

    make: Callable[[], Any]
    label: str

    def __repr__(self) -> str:
        return self.label


def _build_value(value):
    if isinstance(value, PressSpec):
        return value.build()
    if isinstance(value, Deferred):
        return value.make()
    if isinstance(value, list):
        return [_build_value(item) for item in value]
    return value


def _budget_if_possible(value, budget: int):
    """`value.with_cache_budget(budget)` for an inner press of a composition that takes a budget, else `value`."""
    if not isinstance(value, PressSpec):
        return value
    press_class = _load_class(value)
    if press_class is not None and "cache_budget" in getattr(press_class, "__dataclass_fields__", {}):
        return value.with_cache_budget(budget)
    return value


def _repr_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_repr_value(item) for item in value) + "]"
    return repr(value)


def _load_class(spec: PressSpec) -> Optional[type]:
    """The press class, or None when its module or class does not exist. Other import errors propagate."""
    module_name = f"kvpress.presses.{spec.module}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise ImportError(f"{spec.import_path} exists but could not be imported: {error}") from error
    return getattr(module, spec.cls, None)


def _synthetic_scoring_texts() -> tuple[str, ...]:
    from harness.synthetic.tasks import head_scoring_texts

    return head_scoring_texts()


def _press(module: str, cls: str, *args: Any, **kwargs: Any) -> PressSpec:
    return PressSpec(module, cls, tuple(args), dict(kwargs))


def _knorm() -> PressSpec:
    return _press("knorm_press", "KnormPress")


def _snapkv() -> PressSpec:
    return _press("snapkv_press", "SnapKVPress")


def _tova() -> PressSpec:
    return _press("tova_press", "TOVAPress")


def _streaming_llm() -> PressSpec:
    return _press("streaming_llm_press", "StreamingLLMPress")


def _keydiff() -> PressSpec:
    return _press("keydiff_press", "KeyDiffPress")


def _qfilter() -> PressSpec:
    return _press("qfilter_press", "QFilterPress")


def _expected_attention(**kwargs: Any) -> PressSpec:
    return _press("expected_attention_press", "ExpectedAttentionPress", **kwargs)


def _adakv(inner: PressSpec) -> PressSpec:
    return _press("adakv_press", "AdaKVPress", inner)


def _kvzap(model_type: str) -> PressSpec:
    return _press("kvzap_press", "KVzapPress", model_type=model_type)


def _decoding(inner: PressSpec) -> PressSpec:
    return _press("decoding_press", "DecodingPress", base_press=inner)


def _cam(inner: PressSpec) -> PressSpec:
    return _press("cam_press", "CAMPress", base_press=inner)


def _merging(inner: PressSpec) -> PressSpec:
    return _press("merging_press", "MergingPress", inner)


# Every key of upstream's PRESS_REGISTRY, with the same press and arguments. None means no compression.
PRESS_SPECS: dict[str, Optional[PressSpec]] = {
    "adakv_snapkv": _adakv(_snapkv()),
    "block_keydiff": _press("block_press", "BlockPress", press=_keydiff(), block_size=128),
    "chunkkv": _press("chunkkv_press", "ChunkKVPress", press=_snapkv(), chunk_length=20),
    "critical_adakv_expected_attention": _press(
        "criticalkv_press", "CriticalAdaKVPress", _expected_attention(use_vnorm=False)
    ),
    "critical_adakv_snapkv": _press("criticalkv_press", "CriticalAdaKVPress", _snapkv()),
    "critical_expected_attention": _press("criticalkv_press", "CriticalKVPress", _expected_attention(use_vnorm=False)),
    "critical_snapkv": _press("criticalkv_press", "CriticalKVPress", _snapkv()),
    "cur": _press("cur_press", "CURPress"),
    "duo_attention": _press("duo_attention_press", "DuoAttentionPress"),
    "duo_attention_on_the_fly": _press("duo_attention_press", "DuoAttentionPress", on_the_fly_scoring=True),
    # offline: heads scored on the synthetic essay haystacks (set head_compression_ratio)
    "duo_attention_synthetic": _press(
        "duo_attention_press",
        "DuoAttentionPress",
        on_the_fly_scoring=True,
        on_the_fly_dataset=Deferred(_synthetic_scoring_texts, "head_scoring_texts()"),
    ),
    "expected_attention": _adakv(_expected_attention(epsilon=1e-2)),
    "fastkvzip": _press("fastkvzip_press", "FastKVzipPress"),
    "finch": _press("finch_press", "FinchPress"),
    "keydiff": _keydiff(),
    "kvcompose": _press("kvcompose_press", "KVComposePress"),
    "kvcompose_unstructured": _press("kvcompose_press", "KVComposePress", structured=False),
    "kvzip": _press("kvzip_press", "KVzipPress"),
    "kvzip_plus": _press("kvzip_press", "KVzipPress", kvzip_plus_normalization=True),
    "kvzap_linear": _press("dms_press", "DMSPress", press=_kvzap("linear")),
    "kvzap_mlp": _press("dms_press", "DMSPress", press=_kvzap("mlp")),
    "kvzap_mlp_head": _kvzap("mlp"),
    "kvzap_mlp_layer": _adakv(_kvzap("mlp")),
    "lagkv": _press("lagkv_press", "LagKVPress"),
    "lukv": _press("lukv_press", "LUKVPress", _expected_attention(epsilon=2e-2), sink=4, window=1),
    "knorm": _knorm(),
    "observed_attention": _press("observed_attention_press", "ObservedAttentionPress"),
    "pyramidkv": _press("pyramidkv_press", "PyramidKVPress"),
    "qfilter": _qfilter(),
    "random": _press("random_press", "RandomPress"),
    "RestoreKV": _press("restorekv_press", "RestoreKVPress"),
    "RestoreKV_plus": _press("restorekv_press", "RestoreKVPress", kvzip_plus_normalization=True),
    "snap_think": _press("composed_press", "ComposedPress", [_snapkv(), _press("think_press", "ThinKPress")]),
    "snapkv": _snapkv(),
    "streaming_llm": _streaming_llm(),
    "think": _press("think_press", "ThinKPress"),
    "tova": _tova(),
    "compactor": _press("compactor_press", "CompactorPress"),
    "adakv_compactor": _adakv(_press("compactor_press", "CompactorPress")),
    "no_press": None,
    # the reasoning fork's presses (use them with a cache_budget)
    "h2o": _press("h2o_press", "H2OPress"),
    "rkv": _press("rkv_press", "RKVPress"),
    "rkv_lsh": _press("rkv_lsh_press", "RKVLSHPress"),
    "snapkv_d": _snapkv(),
    "full": _press("full_press", "FullPress"),
    "cam_streaming_llm": _cam(_streaming_llm()),
    "cam_knorm": _cam(_knorm()),
    "cam_adakv_snapkv": _cam(_adakv(_snapkv())),
    "cam_tova": _cam(_tova()),
    "decoding_knorm": _decoding(_knorm()),
    "decoding_streaming_llm": _decoding(_streaming_llm()),
    "decoding_tova": _decoding(_tova()),
    "decoding_qfilter": _decoding(_qfilter()),
    "decoding_adakv_expected_attention_e2": _decoding(_adakv(_expected_attention(epsilon=1e-2))),
    "decoding_adakv_snapkv": _decoding(_adakv(_snapkv())),
    "decoding_keydiff": _decoding(_keydiff()),
    "merging_knorm": _merging(_knorm()),
    "merging_snapkv": _merging(_snapkv()),
    "merging_expected_attention": _merging(_expected_attention(epsilon=1e-2)),
    "merging_kvzap_mlp": _merging(_kvzap("mlp")),
}


class PressRegistry(Mapping):
    """`PRESS_REGISTRY[name]` builds a new press for `name` (None for `no_press`).

    An unknown name raises `UnknownNameError` (a KeyError and a ValueError) listing the valid names; a name whose
    press does not exist in this version raises `PressNotAvailableError`.
    """

    def __init__(self, specs: dict[str, Optional[PressSpec]]):
        self._specs = specs

    def __getitem__(self, name: str):
        spec = self.spec(name)
        if spec is None:
            return None
        missing = spec.missing()
        if missing:
            raise PressNotAvailableError(
                f"press {name!r} is not available in this version: {spec!r} needs {', '.join(missing)}, which does "
                f"not exist yet. Available presses: {', '.join(self.available())}."
            )
        return spec.build()

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> Optional[PressSpec]:
        """The recipe of `name` (None for `no_press`), without importing anything."""
        if name not in self._specs:
            raise UnknownNameError(f"Unknown press {name!r}; valid press names: {', '.join(sorted(self._specs))}.")
        return self._specs[name]

    def available(self) -> list[str]:
        """The names whose presses all exist (and import) in this version."""
        names = []
        for name, spec in self._specs.items():
            try:
                if spec is None or not spec.missing():
                    names.append(name)
            except ImportError:
                continue
        return names


PRESS_REGISTRY = PressRegistry(PRESS_SPECS)
