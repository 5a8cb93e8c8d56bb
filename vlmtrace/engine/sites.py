"""The grid of intervention sites: which module, which layers (and window), which positions.

A causal trace is a grid of cells; each cell patches one site kind over a window of layers
at one position (or one whole segment), optionally one head. `Grid` describes the grid in
the paper's words, and `cells()` expands it for one sample once its segments are known:

    Grid(sites=("mlp", "attn"), windows=(1, 3, 6))                  # Basu et al.
    Grid(sites=("block",), stack="decoder")                           # Palit et al., decoder
    Grid(sites=("attn_head",), positions="tokens", segments=("last",))     # NOTICE head patching

Windows follow ROME: a window of size w centred on layer l covers
`max(0, l - w // 2) .. min(L, l - (-w // 2)) - 1`, clipped at both ends, so every layer has a
cell at every window size and the sizes can share one `window` dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import UserError
from .positions import Segments

HEAD_SITES = ("attn_head", "cross_attn_head")


class GridError(UserError):
    """A grid that does not fit the model (layer, window, head or site out of range)."""


@dataclass(frozen=True)
class Cell:
    """One cell of a grid: the coordinates it is stored at and the edits it makes."""

    site: str
    window: int
    layer: int
    """The window's centre: the `layer` coordinate of results."""
    key: int | str
    """Position index within the grid's selection, or the segment name."""
    head: int | None
    layers: tuple[int, ...]
    """Every layer the window covers."""
    positions: tuple[int, ...]
    """Positions (in the clean sequence) patched at each covered layer."""


def window_layers(centre: int, size: int, n_layers: int) -> tuple[int, ...]:
    """Layers covered by a window of `size` centred on `centre`, clipped to the model."""
    low = max(0, centre - size // 2)
    high = min(n_layers, centre - (-size // 2))
    return tuple(range(low, high))


@dataclass(frozen=True)
class Grid:
    """Which sites to patch, over which layers, window sizes, positions and heads."""

    sites: Sequence[str] = ("block",)
    stack: str | None = None
    """The layer stack to patch (adapter's first by default: LLaVA "lm", BLIP "encoder")."""
    layers: Sequence[int] | None = None
    """Window centres; None means every layer."""
    windows: Sequence[int] = (1,)
    positions: Literal["tokens", "segments", "all"] = "tokens"
    """"tokens": one cell per position; "segments": one cell per segment, patched whole;
    "all": one cell patching every selected position at once (restore-everything checks)."""
    segments: Sequence[str] | None = None
    """Restrict to positions of these segments (e.g. ("visual", "last")); None: all."""
    skip: Sequence[str] = ()
    """Segments to leave out (e.g. ("image",): LLaVA-1.5's 576 image tokens)."""
    heads: Sequence[int] | None = None
    """Heads for head sites; None means every head."""

    def __post_init__(self) -> None:
        """Refuse what no model could run: a string where a sequence is meant, empty or
        repeated choices, layers and heads that are not integers."""
        for name in ("sites", "windows", "segments", "skip", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise GridError(
                    f"Grid({name}={value!r}) is a string, read as the characters {list(value)}; "
                    f"write a tuple: {name}=({value!r},)."
                )
            if value is None:
                continue
            if len(value) == 0 and name != "skip":
                every = {"layers": " (None: every layer)", "heads": " (None: every head)"}
                raise GridError(
                    f"Grid({name}=()) is empty: the result would have no cells; give at least one"
                    f"{every.get(name, ' (None: every segment)' if name == 'segments' else '')}."
                )
            if len(set(value)) != len(value):
                raise GridError(f"Grid({name}={tuple(value)!r}) repeats a value; each must appear once.")
            if name in ("windows", "layers", "heads"):
                for item in value:
                    if isinstance(item, bool) or not isinstance(item, int | np.integer):
                        raise GridError(f"Grid({name}=...) must hold integers; got {item!r}.")

    def check(self, *, available_sites: Sequence[str], n_layers: int, n_heads: int) -> None:
        """Refuse a grid that does not fit the model, naming the valid range."""
        for site in self.sites:
            if site not in available_sites:
                raise GridError(
                    f"site {site!r} is not available on this stack; choose from {list(available_sites)}."
                )
        for size in self.windows:
            if not 1 <= size <= n_layers:
                raise GridError(
                    f"window {size} does not fit a stack of {n_layers} layers; use sizes "
                    f"between 1 and {n_layers}."
                )
        for layer in self.layers or ():
            if not 0 <= layer < n_layers:
                raise GridError(f"layer {layer} is out of range 0..{n_layers - 1}.")
        for head in self.heads or ():
            if not 0 <= head < n_heads:
                raise GridError(
                    f"head {head} is out of range: the model has {n_heads} heads (0..{n_heads - 1})."
                )
        if self.positions not in ("tokens", "segments", "all"):
            raise GridError(f"positions must be 'tokens', 'segments' or 'all', not {self.positions!r}.")

    def selected(self, segments: Segments) -> list[int]:
        """Positions of the clean sequence that the grid covers."""
        if self.segments is None:
            return [i for i, label in enumerate(segments.labels) if label not in self.skip]
        missing = [name for name in self.segments if name not in segments.names]
        if missing:
            raise GridError(
                f"grid segments {missing} are not in this prompt (it has {list(segments.names)})."
            )
        return [i for i, label in enumerate(segments.labels) if label in self.segments]

    def keys(self, segments: Segments) -> list[tuple[int | str, tuple[int, ...]]]:
        """(coordinate key, positions) for each position or segment of the grid."""
        chosen = self.selected(segments)
        if self.positions == "tokens":
            return [(k, (p,)) for k, p in enumerate(chosen)]
        if self.positions == "all":
            return [("all", tuple(chosen))]
        names = [n for n in segments.names if any(segments.labels[p] == n for p in chosen)]
        return [(n, tuple(p for p in chosen if segments.labels[p] == n)) for n in names]

    def cells(
        self,
        segments: Segments,
        *,
        n_layers: int,
        n_heads: int,
        site_layers: dict[str, tuple[int, ...]] | None = None,
    ) -> list[Cell]:
        """Every cell of the grid for one sample, in storage order.

        `site_layers` says where each site exists (all layers by default). A cell patches its
        site at the window's layers where it exists; a cell whose centre lacks the site has
        no layers and stays NaN: Mllama's cross-attention exists in a few layers only.
        """
        centres = list(self.layers) if self.layers is not None else list(range(n_layers))
        heads = list(self.heads) if self.heads is not None else list(range(n_heads))
        cells = []
        for site in self.sites:
            exists = set(site_layers[site]) if site_layers and site in site_layers else set(range(n_layers))
            for size in self.windows:
                for centre in centres:
                    covered = window_layers(centre, size, n_layers)
                    covered = tuple(layer for layer in covered if layer in exists) if centre in exists else ()
                    for key, positions in self.keys(segments):
                        for head in heads if site in HEAD_SITES else [None]:
                            cells.append(Cell(site, size, centre, key, head, covered, positions))
        return cells
