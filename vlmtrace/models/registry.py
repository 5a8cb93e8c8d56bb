"""Which adapter describes which model class: the table the loader looks architectures up in.

Family modules (`llava.py`, `qwen_vl.py`, ...) each define their adapters as data and import
nothing from here; this module collects them, so the import graph runs one way:
registry -> families -> adapter.

    adapter_for(model)                        # by the model's class
    adapter_for("Qwen2VLForConditionalGeneration")
    register(my_adapter)                      # a family of your own, before vt.load
"""

from __future__ import annotations

import torch

from . import blip, blip2, gemma, idefics, internvl, llava, mistral3, mllama, onevision, qwen_vl, text
from .adapter import Adapter, UnknownArchitectureError

FAMILY_MODULES = (llava, blip, blip2, idefics, internvl, mllama, qwen_vl, onevision, gemma, mistral3, text)
"""Every module that defines adapters, in the order `vlmtrace models` lists them."""

ADAPTERS: dict[str, Adapter] = {}
"""Architecture class name -> adapter."""


def register(adapter: Adapter) -> Adapter:
    """Make an adapter known to `adapter_for` (for families vlmtrace does not ship)."""
    for name in adapter.architectures:
        ADAPTERS[name] = adapter
    return adapter


for _module in FAMILY_MODULES:
    for _adapter in _module.ADAPTERS:
        register(_adapter)


def adapter_for(model: torch.nn.Module | str) -> Adapter:
    """The adapter describing `model` (or an architecture class name), or an error that says
    how to write one."""
    name = model if isinstance(model, str) else type(model).__name__
    if name in ADAPTERS:
        return ADAPTERS[name]
    fields = ", ".join(f.name for f in Adapter.__dataclass_fields__.values())
    raise UnknownArchitectureError(
        f"vlmtrace has no adapter for {name}. Known: {', '.join(sorted(ADAPTERS))}. "
        f"Describe it with vlmtrace.models.adapter.Adapter(...) (fields: {fields}; each Stack "
        "names its `layers` ModuleList path and site hooks: block, attn, mlp, cross_attn, head) "
        "and call vlmtrace.models.registry.register(adapter) before loading."
    )
