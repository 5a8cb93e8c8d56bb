"""One recipe per seed method: each module reads like the method section of its paper.

Installed as `vlmtrace.recipes`, so `vlmtrace recipe NAME` works from any directory. A recipe
module defines:

    DESCRIPTION: str                     one line for `vlmtrace recipe list`
    run(vlm, samples, **options) -> xarray.Dataset
    default_samples(vlm, n, seed) -> list[Sample]   its synthetic data on the organisms
    DEFAULT_MODEL: str                   the shipped organism it runs on by default
    figures(ds, out_dir) -> list[Path]   PNGs (plotting stays out of `run`)
    summary(ds) -> str                   the headline finding, in a sentence or two
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def names() -> list[str]:
    """Recipe module names, in the order of the seed papers."""
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    order = [
        "visual_constraint",
        "multi_constraint",
        "blip_noise",
        "gn_vs_str",
        "notice",
        "information_flow",
        "universal_heads",
    ]
    return sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))


def get(name: str) -> ModuleType:
    """The recipe module `name`, or an error listing the recipes there are."""
    if name not in names():
        raise KeyError(f"no recipe {name!r}; choose one of {names()} (see `vlmtrace recipe list`).")
    return importlib.import_module(f"{__name__}.{name}")
