"""Attention knockout: cut the attention edges from one set of positions to another.

Zhang et al. ask *how* information flows from the image to the answer by blocking it: in a
window of layers, no query position of set Q may attend to any key position of set K (the
mask entry is set to -inf). If the answer's probability drops, information had to flow
K -> Q in those layers.

    ds = knockout(vlm, samples,
                  blocks={"image->question": ("image", "question"),
                          "image+question->last": (("image", "question", "visual"), "last")},
                  windows=(3,))
    (ds["knockout"] - ds["clean"]) / ds["clean"]       # relative change in P(answer)

A side of a block is a segment name, a tuple of names, or a function
`(sample, segments) -> positions` (e.g. the image patches that cover one object).
Rows: row 0 is the clean run; each (block, window, layer) is one more row of the clean
input with its mask edited, all in one batched forward per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from .corruptions import clean_side
from .data.sample import Sample
from .forward import SEQUENCE_FIELDS, Edits, run, stack_rows
from .inputs import scored_answer_ids
from .metrics import Metric, Probability
from .models.load import VLM
from .positions import Segments
from .progress import progress_bar
from .results import provenance, sample_ids
from .sites import GridError, window_layers

PositionSet = str | Sequence[str] | Callable[[Sample, Segments], Sequence[int]]

DEFAULT_BLOCKS: dict[str, tuple[PositionSet, PositionSet]] = {
    "image->question": ("image", "question"),
    "image->last": ("image", "last"),
    "question->last": ("question", "last"),
}


def resolve(side: PositionSet, sample: Sample, segments: Segments) -> list[int]:
    """Positions of one side of a block."""
    if callable(side):
        return [int(p) for p in side(sample, segments)]
    names = (side,) if isinstance(side, str) else tuple(side)
    return [p for name in names if name in segments.names for p in segments.positions(name)]


def knockout(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    blocks: Mapping[str, tuple[PositionSet, PositionSet]] = DEFAULT_BLOCKS,
    windows: Sequence[int] = (1,),
    layers: Sequence[int] | None = None,
    stack: str | None = None,
    metric: Metric = Probability(),
    max_batch: int = 64,
    progress: bool = True,
    recipe: str = "",
    backend: Any = None,
) -> xr.Dataset:
    """The metric with attention K -> Q blocked, per (sample, block, window, layer)."""
    if not samples:
        raise ValueError("no samples for attention knockout: the data set is empty.")
    stack_name = stack or vlm.adapter.default_stack
    the_stack = vlm.adapter.stacks[stack_name]
    if the_stack.sequence != "prompt":
        raise ValueError("attention knockout runs on a stack over the prompt (e.g. LLaVA 'lm').")
    n_layers = vlm.shape.layers[stack_name]
    for size in windows:
        if not 1 <= size <= n_layers:
            raise GridError(f"window {size} does not fit {n_layers} layers; use 1..{n_layers}.")
    centres = list(layers) if layers is not None else list(range(n_layers))
    for centre in centres:
        if not 0 <= centre < n_layers:
            raise GridError(f"layer {centre} is out of range 0..{n_layers - 1}.")
    names = list(blocks)
    cells = [(b, w, c) for b in names for w in windows for c in centres]
    values = np.full((len(samples), len(names), len(windows), len(centres)), np.nan)
    clean = np.full(len(samples), np.nan)
    per_chunk = max(1, max_batch - 1)
    with progress_bar(progress, f"knockout {vlm.name}") as bar:
        task = bar.add_task("samples", total=len(samples))
        for s, sample in enumerate(samples):
            answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
            encoded = clean_side(vlm, sample, answer)
            segments = encoded.prompt
            sides = {
                b: (resolve(keys, sample, segments), resolve(queries, sample, segments))
                for b, (keys, queries) in blocks.items()
            }
            widths = {"prompt": len(encoded.inputs[SEQUENCE_FIELDS["prompt"][0]])}
            for start in range(0, len(cells), per_chunk):
                chunk = cells[start : start + per_chunk]
                edits = Edits()
                for offset, (b, w, c) in enumerate(chunk):
                    keys, queries = sides[b]
                    for layer in window_layers(c, w, n_layers):
                        index = edits.knock(layer)
                        for q in queries:
                            for k in keys:
                                index.row.append(1 + offset)
                                index.query.append(q)
                                index.key.append(k)
                batch = stack_rows(vlm, [encoded.inputs] * (1 + len(chunk)), widths)
                out = run(
                    vlm,
                    the_stack,
                    batch,
                    edits,
                    metric=metric,
                    answer=torch.tensor(answer),
                    foil=None,
                    answer_slice=slice(-len(answer), None),
                    backend=backend,
                )
                clean[s] = float(out[0])
                for (b, w, c), value in zip(chunk, out[1:].tolist(), strict=True):
                    values[s, names.index(b), list(windows).index(w), centres.index(c)] = value
            bar.advance(task)
    attrs = provenance(
        vlm,
        recipe=recipe,
        experiment="knockout",
        stack=stack_name,
        metric=metric.name,
        blocks={b: [_describe(k), _describe(q)] for b, (k, q) in blocks.items()},
    )
    return xr.Dataset(
        {
            "knockout": (["sample", "block", "window", "layer"], values),
            "clean": (["sample"], clean),
        },
        coords={
            "sample": sample_ids(samples),
            "block": names,
            "window": list(windows),
            "layer": centres,
        },
        attrs=attrs,
    )


def _describe(side: PositionSet) -> str:
    if callable(side):
        return getattr(side, "__name__", "positions")
    return side if isinstance(side, str) else "+".join(side)
