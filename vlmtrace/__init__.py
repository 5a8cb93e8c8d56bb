"""vlmtrace: causal interventions on vision-language models, batched in nnsight traces.

import vlmtrace as vt
vlm = vt.load("shapes-llava")
ds = vt.patch(vlm, samples, corruption=vt.ReplaceSpan("visual"),
              grid=vt.Grid(sites=("mlp", "attn"), windows=(1, 3, 6)))
vt.save(ds, "trace.zarr")

The public names are imported on first use (PEP 562), so `import vlmtrace.cli` and
`vlmtrace --help` start without torch, transformers or nnsight.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "attribute": ".engine.attribution",
    "GaussianNoise": ".engine.corruptions",
    "ImagePair": ".engine.corruptions",
    "InpaintPair": ".engine.inpainting",
    "ReplaceSpan": ".engine.corruptions",
    "SymmetricTokenReplacement": ".engine.corruptions",
    "Sample": ".data.sample",
    "UserError": ".errors",
    "check": ".engine.invariants",
    "edit": ".engine.editing",
    "knockout": ".engine.knockout",
    "KL": ".engine.metrics",
    "LogitDiff": ".engine.metrics",
    "LogProb": ".engine.metrics",
    "Probability": ".engine.metrics",
    "normalised": ".engine.metrics",
    "above_floor": ".engine.metrics",
    "VLM": ".models.load",
    "load": ".models.load",
    "wrap": ".models.load",
    "Options": ".options",
    "open_result": ".results.dataset",
    "save": ".results.dataset",
    "Grid": ".engine.sites",
    "patch": ".engine.sweep",
}

__all__ = [
    "attribute",
    "check",
    "edit",
    "KL",
    "VLM",
    "GaussianNoise",
    "Grid",
    "ImagePair",
    "InpaintPair",
    "LogProb",
    "LogitDiff",
    "Options",
    "Probability",
    "ReplaceSpan",
    "Sample",
    "UserError",
    "SymmetricTokenReplacement",
    "knockout",
    "load",
    "normalised",
    "above_floor",
    "open_result",
    "patch",
    "save",
    "wrap",
]


# nnsight mounts a `save` method on every object while a trace runs, and a module attribute
# found that way never reaches `__getattr__`: `vt.save` would be nnsight's. So the names that
# can collide are bound now (results imports numpy and xarray only).
from .results.dataset import open_result, save  # noqa: E402


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vlmtrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from .data.sample import Sample
    from .engine.attribution import attribute
    from .engine.corruptions import GaussianNoise, ImagePair, ReplaceSpan, SymmetricTokenReplacement
    from .engine.editing import edit
    from .engine.inpainting import InpaintPair
    from .engine.invariants import check
    from .engine.knockout import knockout
    from .engine.metrics import KL, LogitDiff, LogProb, Probability, above_floor, normalised
    from .engine.sites import Grid
    from .engine.sweep import patch
    from .errors import UserError
    from .models.load import VLM, load, wrap
    from .options import Options
