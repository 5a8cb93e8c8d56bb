"""Which adapter describes which model: looked up by class and, where a class wraps several
language models, by config.

One HF class may hold models of different shapes: `Blip2ForConditionalGeneration` is OPT
(decoder-only) or Flan-T5 (encoder-decoder), told apart only by `text_config.model_type`. Such
adapters declare the config values they describe (`Adapter.requires`), and the lookup reads
them from the config, so a checkpoint no adapter describes fails before its weights are read.

Family modules (`llava.py`, `qwen_vl.py`, ...) each define their adapters as data and import
nothing from here; this module collects them, so the import graph runs one way:
registry -> families -> adapter.

    adapter_for(model)                                   # by the model's class and config
    adapter_for("Blip2ForConditionalGeneration", config) # before loading: from the config alone
    register(my_adapter)                                 # a family of your own, before vt.load
"""

from __future__ import annotations

from typing import Any

import torch

from . import (
    blip,
    blip2,
    gemma,
    idefics,
    internvl,
    llava,
    llava_next_video,
    mistral3,
    mllama,
    onevision,
    qwen_vl,
    text,
    vipllava,
)
from .adapter import Adapter, UnknownArchitectureError, config_value
from .refusals import refuse

FAMILY_MODULES = (
    llava,
    vipllava,
    llava_next_video,
    blip,
    blip2,
    idefics,
    internvl,
    mllama,
    qwen_vl,
    onevision,
    gemma,
    mistral3,
    text,
)
"""Every module that defines adapters, in the order `vlmtrace models` lists them."""

ADAPTERS: dict[str, list[Adapter]] = {}
"""Architecture class name -> the adapters describing it, in registration order."""


class UnsupportedVariantError(UnknownArchitectureError):
    """A known class whose config (e.g. its language model) no registered adapter describes."""


def register(adapter: Adapter) -> Adapter:
    """Make an adapter known to `adapter_for` (for families vlmtrace does not ship).

    An adapter registered later is tried first, so yours wins over a shipped one for the same
    class and config.
    """
    for name in adapter.architectures:
        ADAPTERS.setdefault(name, []).append(adapter)
    return adapter


def registered() -> list[Adapter]:
    """Every registered adapter once, in registration order."""
    return list({id(a): a for adapters in ADAPTERS.values() for a in adapters}.values())


for _module in FAMILY_MODULES:
    for _adapter in _module.ADAPTERS:
        register(_adapter)


def _value(config: Any, path: str) -> Any:
    try:
        return config_value(config, path)
    except AttributeError:
        return None


def describes(adapter: Adapter, config: Any) -> bool:
    """Whether the config holds, at every path the adapter `requires`, one of its values."""
    return all(_value(config, path) in values for path, values in adapter.requires.items())


def adapter_for(model: torch.nn.Module | str, config: Any = None) -> Adapter:
    """The adapter describing `model` (or an architecture class name with its config), or an
    error that says why none does and what to do."""
    if isinstance(model, str):
        name = model
    else:  # an HF model carries its config; any other module has none
        name, config = type(model).__name__, getattr(model, "config", None)
    candidates = ADAPTERS.get(name)
    if not candidates:
        refuse(name)
        fields = ", ".join(f.name for f in Adapter.__dataclass_fields__.values())
        raise UnknownArchitectureError(
            f"vlmtrace has no adapter for {name}. Known: {', '.join(sorted(ADAPTERS))}. "
            f"Describe it with vlmtrace.models.adapter.Adapter(...) (fields: {fields}; each Stack "
            "names its `layers` ModuleList path and site hooks: block, attn, mlp, cross_attn, head) "
            "and call vlmtrace.models.registry.register(adapter) before loading."
        )
    if config is None:
        if len(candidates) == 1 and not candidates[0].requires:
            return candidates[0]
        raise UnsupportedVariantError(
            f"{name} is described by several adapters ({', '.join(a.family for a in candidates)}), "
            "told apart by its config: pass the config, adapter_for(name, config)."
        )
    for adapter in reversed(candidates):
        if describes(adapter, config):
            return adapter
    paths = sorted({path for adapter in candidates for path in adapter.requires})
    found = ", ".join(f"{path}={_value(config, path)!r}" for path in paths)
    known = "; ".join(
        f"{a.family}: " + ", ".join(f"{p} in {list(v)}" for p, v in a.requires.items()) for a in candidates
    )
    raise UnsupportedVariantError(
        f"vlmtrace describes {name} only for some of its language models, and this checkpoint has "
        f"{found}. Supported: {known}. Describe this variant with an Adapter whose `requires` "
        "names it, and register it before loading."
    )
