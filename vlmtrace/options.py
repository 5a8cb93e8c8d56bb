"""How a recipe's sweeps run: batch size, memory, resumable stores, shards, screen, machine.

A recipe describes an experiment; *how* it runs (on which machine, in what memory, resumable
or not) is the user's choice and the same for every recipe. `Options` carries that choice
into each `vt.patch` call, giving every sub-sweep of a recipe (one per corruption, constraint
or metric) its own resumable store under `parts`:

    options = Options(max_batch=32, parts=Path("trace.parts"), shard=(0, 2))
    vt.patch(vlm, samples, corruption=..., grid=..., **options.sweep("visual"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Options:
    max_batch: int = 64
    """Rows per batched forward."""
    max_memory: float | None = None
    """Bytes a forward may use; lowers the rows per forward from an estimate."""
    parts: Path | None = None
    """Directory of resumable stores, one per sub-sweep; None keeps results in memory."""
    shard: tuple[int, int] | None = None
    """(i, n): run every n-th sample starting at i (needs `parts`, which the shards share)."""
    overwrite: bool = False
    """Replace part stores written by another configuration."""
    screen: int | None = None
    """Patch only the top-k cells by attribution-patching estimate; 3x the cells you will read
    (`benchmarks/screened_sweep.py`)."""
    screen_method: str = "atp"
    """How the screen estimates: one of `vlmtrace.engine.attribution.METHODS` ("atp": the gradient at
    the run; "ig": integrated gradients; "atp+qk", "atp+graddrop", "atp*": AtP*'s fixes)."""
    reuse_prefix: bool = False
    """Skip the layers (and, in decoders, the positions) below each cell's first patch."""
    backend: Any = None
    """An nnsight backend (remote execution); None runs here."""
    inpaint: Any = None
    """Recipes that compare image corruptions add inpainted pairs: a backend ("opencv", or a diffusers
    inpainting pipeline's id or directory) or a configured `vt.InpaintPair`. None: no inpainting."""
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise UserError(f"max_batch must be a whole number of rows >= 1, not {self.max_batch!r}.")
        memory = self.max_memory
        if memory is not None and (
            isinstance(memory, bool)
            or not isinstance(memory, int | float)
            or not math.isfinite(memory)
            or memory <= 0
        ):
            raise UserError(
                f"max_memory must be a finite number of bytes > 0 (CLI: --max-memory 20GB), not {memory!r}."
            )
        from .engine.attribution import METHODS  # here: `vlmtrace --help` must not import torch

        if self.screen_method not in METHODS:
            raise UserError(
                f"--screen-method must be one of {', '.join(METHODS)}, not {self.screen_method!r}."
            )
        if self.shard is not None and self.parts is None:
            raise UserError("sharding needs a store the shards share: give `parts` (CLI: --out).")

    def sweep(self, part: str) -> dict[str, Any]:
        """Keyword arguments for `vt.patch` for the sub-sweep named `part`."""
        return {
            "max_batch": self.max_batch,
            "max_memory": self.max_memory,
            "store": None if self.parts is None else self.parts / f"{part}.zarr",
            "shard": self.shard,
            "overwrite": self.overwrite,
            "screen": self.screen,
            "screen_method": self.screen_method,
            "reuse_prefix": self.reuse_prefix,
            "backend": self.backend,
            "progress": self.progress,
        }

    def knockout(self) -> dict[str, Any]:
        """Keyword arguments for `vt.knockout` (not resumable: one forward per few cells)."""
        return {"max_batch": self.max_batch, "backend": self.backend, "progress": self.progress}
